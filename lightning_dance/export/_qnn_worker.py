"""Runs one onnxruntime-qnn session in a child process (``python _qnn_worker.py ...``).

The QNN execution provider can crash the whole process (a segmentation fault) on graphs it
cannot compile, instead of raising. A crash in the user's training process would lose their
run (the export callback runs at the end of ``fit``), so :mod:`lightning_dance.export.snapdragon`
runs every QNN session here, in a separate interpreter that imports only numpy and onnxruntime,
and turns a failure or a crash into an error naming the unsupported nodes.

Usage: ``python _qnn_worker.py run|compile MODEL.onnx SOC ARCH OUT [INPUT.npy]``: ``run`` writes
the first output to ``OUT`` (``.npy``); ``compile`` writes the EP-context model to ``OUT``.
"""

from __future__ import annotations

import sys


def session_options(soc_model: str, htp_arch: str, context_path: str | None):
    """Session options: the HTP backend of ``onnxruntime-qnn``, CPU fallback disabled."""
    import onnxruntime as ort
    import onnxruntime_qnn as oq

    name = oq.get_ep_name()
    if not any(d.ep_name == name for d in ort.get_ep_devices()):
        ort.register_execution_provider_library(name, oq.get_library_path())
    devices = [d for d in ort.get_ep_devices() if d.ep_name == name]
    so = ort.SessionOptions()
    so.log_severity_level = 3  # errors only
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    if context_path is not None:
        so.add_session_config_entry("ep.context_enable", "1")
        so.add_session_config_entry("ep.context_file_path", str(context_path))
        so.add_session_config_entry("ep.context_embed_mode", "1")
    options = {"backend_type": "htp"}
    if soc_model:
        options["soc_model"] = str(soc_model)
    if htp_arch:
        options["htp_arch"] = str(htp_arch)
    so.add_provider_for_devices(devices, options)
    return so


def main(argv: list[str]) -> int:
    import numpy as np
    import onnxruntime as ort

    action, model, soc, arch, out = argv[:5]
    try:
        sess = ort.InferenceSession(
            model, sess_options=session_options(soc, arch, out if action == "compile" else None)
        )
    except Exception as exc:
        print(f"QNN-ERROR: {str(exc).strip().splitlines()[0]}", file=sys.stderr, flush=True)
        # where did the nodes go? With CPU fallback allowed and verbose logs, onnxruntime
        # lists the nodes the QNN EP rejected (or says that it took none)
        so = session_options(soc, arch, None)
        so.add_session_config_entry("session.disable_cpu_ep_fallback", "0")
        so.log_severity_level = 0
        ort.InferenceSession(model, sess_options=so)
        return 1
    if action == "compile":
        return 0
    result = sess.run(None, {sess.get_inputs()[0].name: np.load(argv[5])})[0]
    np.save(out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
