"""Export: modes, ONNX / TorchScript / QNN / NNAPI / ExecuTorch artifacts, manifest, callback."""

import copy
import json
import math
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lightning_dance.aap import AdaptivePruner
from lightning_dance.export import ExportCallback, UnsupportedOpError, export_model
from lightning_dance.export.capture import capture, max_abs_error
from lightning_dance.export.modes import build_export_module
from lightning_dance.export.onnx import check_ops, export_onnx, onnx_op_types, run_onnxruntime
from lightning_dance.models import create_model

CLIP = (1, 3, 4, 16, 16)


def _clip(seed=1, shape=CLIP):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _pruner(policy, dims=("frame", "channel"), keep="half"):
    """A tiny_c3d pruner whose eval masks keep all / about half / one entry per dim."""
    torch.manual_seed(0)
    pruner = AdaptivePruner(
        create_model("tiny_c3d", num_classes=4), policy=policy, dims=dims, init_keep=0.5
    ).eval()
    with torch.no_grad():  # well-separated scores: no near-ties for float noise to flip
        ctrl = pruner.controller
        for p in (ctrl.channel_head.weight, ctrl.frame_global.weight, ctrl.frame_local):
            p.normal_(0.0, 1.0)
        if "feature" in dims:
            ctrl.feature_global.weight.normal_(0.0, 1.0)
            ctrl.feature_local.normal_(0.0, 1.0)
        for m in pruner.model.modules():  # non-degenerate logits
            if isinstance(m, torch.nn.Linear):
                m.weight.normal_(0.0, 0.5)
    return _set_keep(pruner, policy, keep, _clip())


def _set_keep(pruner, policy, keep, clip):
    """Calibrate ``pruner`` so that its eval masks keep all / about half / one entry per dim."""
    pruner(clip)  # sets the fixed fraction behind keep_ratio()
    if policy == "topk":
        base = pruner.keep_ratio() / math.exp(float(pruner.calibration))
        target = {"all": 1.0, "half": 0.5, "one": 1e-3}[keep]
        pruner.calibration.fill_(math.log(target / base))
    else:
        pruner.calibration.fill_({"all": 50.0, "half": 0.0, "one": -50.0}[keep])
    return pruner


def _kept(pruner, clip):
    pruner(clip)
    return pruner.last_stats.kept_fractions()


@pytest.mark.parametrize("policy", ["threshold", "topk"])
@pytest.mark.parametrize("keep", ["all", "half", "one"])
def test_export_module_matches_eager(policy, keep):
    clip = _clip(shape=(2, 3, 4, 16, 16))
    pruner = _pruner(policy, ("frame", "channel", "feature"), keep)
    kept = _kept(pruner, clip)
    fracs = [f for layer in kept.values() for f in layer.values()]
    if keep == "all":
        assert min(fracs) == 1.0
    elif keep == "one":
        assert 0 < min(fracs) and max(fracs) <= 0.5  # one entry per dim (min_keep), never empty
    with torch.no_grad():
        ref = pruner(clip)
        for mode in ("masked", policy):
            module, plan = build_export_module(pruner, mode, clip)
            assert max_abs_error(ref, module(clip)) < 1e-5
            ep = capture(module, clip)
            assert max_abs_error(ref, ep.module()(clip)) < 1e-5
            assert plan.executed_macs > 0 and plan.dense_macs > 0


@pytest.mark.parametrize("policy", ["topk", "threshold"])
def test_gathered_plan_counts_real_savings(policy):
    clip = _clip()
    pruner = _pruner(policy, keep="half")
    _, masked = build_export_module(pruner, "masked", clip)
    _, gathered = build_export_module(pruner, policy, clip, skip_outputs=False)
    _, skipping = build_export_module(pruner, policy, clip, skip_outputs=True)  # topk chains
    assert skipping.executed_macs <= gathered.executed_macs < masked.executed_macs
    assert masked.executed_macs >= masked.dense_macs  # masking saves nothing
    assert all(k >= 1 for layer in gathered.keep_counts.values() for k in layer.values())
    # the plan is the sum of what each layer's gathered conv computes (static_executed_macs)
    from lightning_dance.execution.static import static_executed_macs

    pruner(clip)
    stats = pruner.last_stats
    expected = stats.fixed_macs + stats.controller_macs
    for name, layer in stats.layers.items():
        k = {d: int(m[0].sum()) for d, m in layer.masks.items()}
        conv = pruner.model.get_submodule(name)
        expected += static_executed_macs(
            conv, layer.input_shape, k_channel=k["channel"], k_frame=k["frame"]
        )
    assert gathered.executed_macs == expected


@pytest.mark.parametrize(
    "policy,mode", [("topk", "masked"), ("topk", "topk"), ("threshold", "threshold")]
)
def test_torch_export_strict(policy, mode):
    clip = _clip()
    pruner = _pruner(policy, ("frame", "channel", "feature"), keep="half")
    module, _ = build_export_module(pruner, mode, clip)
    graph = capture(module, clip, strict=True).module()
    other = _clip(seed=5) * 3  # another clip: the graph must follow its gates, not the example's
    with torch.no_grad():
        assert max_abs_error(pruner(clip), graph(clip)) < 1e-5
        assert max_abs_error(pruner(other), graph(other)) < 1e-5
    ops = {str(n.target) for n in graph.graph.nodes if n.op == "call_function"}
    # the selection is in the graph, not baked in
    assert any(("nonzero" if mode == "threshold" else "topk") in op for op in ops)


def test_mode_errors():
    net = create_model("tiny_c3d", num_classes=4)
    with pytest.raises(ValueError, match="needs a DANCE model"):
        build_export_module(net, "masked", _clip())
    with pytest.raises(ValueError, match="policy='threshold'"):
        build_export_module(_pruner("topk"), "threshold", _clip())
    with pytest.raises(ValueError, match="policy='topk'"):
        build_export_module(_pruner("threshold"), "topk", _clip())
    with pytest.raises(ValueError, match="mode"):
        build_export_module(net, "fast", _clip())


def _r2plus1d_topk(dims, channel_multiple=1):
    torch.manual_seed(0)
    net = create_model("r2plus1d_18", num_classes=5, width=0.25).eval()
    # the full count (credit_outputs=False): each layer's own input masks, checked below
    return AdaptivePruner(
        net,
        dims=dims,
        policy="topk",
        budget=0.4,
        channel_multiple=channel_multiple,
        credit_outputs=False,
    ).eval()


@pytest.mark.parametrize(
    "dims,multiple", [(("channel",), 1), (("frame", "channel"), 1), (("channel",), 8)]
)
def test_topk_export_skips_the_outputs_a_chain_consumer_drops(dims, multiple):
    """R(2+1)D's 24 channel chains: each producer computes only its consumer's top-k channels
    (weight rows, with the BatchNorm folded in, gathered), the consumer reads them as they are.
    Same logits as eager (a batch, another clip), and, with channels only, exactly the MACs
    the eager compact path runs (an independent count). ``channel_multiple``: the plan keeps
    the eager pruner's rounded counts."""
    from lightning_dance.execution import CompactPruner, count_executed_macs

    pruner = _r2plus1d_topk(dims, multiple)
    clip = _clip(shape=(2, 3, 4, 32, 32))
    module, plan = build_export_module(pruner, "topk", clip, skip_outputs=True)
    assert len(module.chains) == 24
    pruner(clip)
    for name, layer in pruner.last_stats.layers.items():
        c = layer.input_shape[0]
        k = plan.keep_counts[name]["channel"]
        assert (layer.kept["channel"] * c).round().eq(k).all(), name
        assert c <= multiple or k % multiple == 0 or k == c, (name, k, c)
    other = _clip(seed=7, shape=(2, 3, 4, 32, 32)) * 2
    with torch.no_grad():
        for c in (clip, other):
            assert max_abs_error(pruner(c), module(c)) < 1e-5
        stats = pruner.last_stats
        with count_executed_macs() as macs:
            CompactPruner(pruner)(other[:1])
    counted = (
        stats.fixed_macs
        + stats.controller_macs
        + sum(int(s.executed_macs[0]) for s in stats.layers.values())
    )  # each layer's own input masks only
    assert plan.executed_macs < (0.75 if dims == ("channel",) else 1.0) * counted
    if dims == ("channel",):  # (with frames the static path computes more than the counter)
        assert plan.executed_macs == macs.total + stats.fixed_macs + stats.controller_macs


@pytest.mark.slow
def test_topk_export_with_chains_captures_and_runs_in_onnxruntime(tmp_path):
    pruner = _r2plus1d_topk(("channel",))
    clip = _clip(shape=(2, 3, 4, 32, 32))
    other = _clip(seed=7, shape=(2, 3, 4, 32, 32)) * 2
    module, _ = build_export_module(pruner, "topk", clip, skip_outputs=True)
    with torch.no_grad():
        graph = capture(module, clip).module()
        assert max_abs_error(pruner(other), graph(other)) < 1e-5
        path = export_onnx(module, clip, tmp_path / "m.onnx", opset=18)
        check_ops(onnx_op_types(path), "qnn")  # Gather, Mul, Add, Conv: what the NPU runs
        got = torch.from_numpy(run_onnxruntime(path, other))
        assert max_abs_error(module(other), got) < 1e-4


@pytest.mark.parametrize("net, n", [("small", 1), ("multiplier", 2)])
def test_topk_export_chain_into_a_depthwise_conv(tmp_path, net, n):
    """conv -> BN -> ReLU -> depthwise conv (X3D's conv_a -> conv_b; also with a channel
    multiplier of 2 and two clips): the producer computes only the depthwise conv's top-k
    channels, which reads them without a gather; same logits as the pruner eagerly, in
    torch.export and in onnxruntime, and fewer MACs than without the chain."""
    from tests.conftest import SmallNet
    from tests.test_indexed import _DepthwiseTail

    torch.manual_seed(0)
    model = SmallNet() if net == "small" else _DepthwiseTail("zeros")
    producer, norm, consumer = ("res.0", "res.1", "res.3") if net == "small" else ("a", "bn", "dw")
    pruner = AdaptivePruner(model, dims=("channel",), policy="topk", budget=0.5).eval()
    with torch.no_grad():  # well-separated scores, non-trivial statistics
        pruner.controller.channel_head.weight.normal_(0.0, 1.0)
        bn = pruner.model.get_submodule(norm)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    shape = (n, 3, 4, 16, 16)
    clip, other = _clip(shape=shape), _clip(seed=7, shape=shape) * 2
    module, plan = build_export_module(pruner, "topk", clip)
    _, inputs_only = build_export_module(pruner, "topk", clip, skip_outputs=False)
    assert module.chains[producer].consumer == consumer  # groups == in_channels
    assert plan.executed_macs < inputs_only.executed_macs
    with torch.no_grad():
        ref = pruner(other)
        assert max_abs_error(ref, module(other)) < 1e-5
        assert max_abs_error(ref, capture(module, clip).module()(other)) < 1e-5
        path = export_onnx(module, clip, tmp_path / "dw.onnx", opset=18)
        got = torch.from_numpy(run_onnxruntime(path, other))
        assert max_abs_error(ref, got) < 1e-4


def test_topk_export_plan_is_the_credited_count():
    """With output skipping credited (AdaptivePruner(credit_outputs=True)), the topk export's
    planned MACs are the pruner's count: the same outputs skipped, here along a chain into a
    depthwise conv."""
    from tests.conftest import SmallNet

    torch.manual_seed(0)
    pruner = AdaptivePruner(SmallNet(), dims=("channel",), policy="topk", budget=0.5,
                            credit_outputs=True).eval()  # fmt: skip
    with torch.no_grad():
        pruner.controller.channel_head.weight.normal_(0.0, 1.0)
    clip = _clip(shape=(1, 3, 4, 16, 16))
    with torch.no_grad():
        pruner(clip)
    credited = int(pruner.last_stats.executed_macs().sum())
    module, plan = build_export_module(pruner, "topk", clip)
    assert "res.0" in module.chains and plan.executed_macs == credited
    _, uncredited = build_export_module(pruner, "topk", clip, skip_outputs=False)
    assert uncredited.executed_macs > credited


def test_topk_export_keeps_chains_whose_norm_uses_batch_statistics():
    """A BatchNorm without running statistics normalizes over the batch: its channels cannot
    differ per sample, so that chain keeps all outputs (the others still skip)."""
    net = torch.nn.Sequential(
        torch.nn.Conv3d(3, 8, 1), torch.nn.Conv3d(8, 12, 1), torch.nn.BatchNorm3d(12),
        torch.nn.ReLU(), torch.nn.Conv3d(12, 10, 1), torch.nn.BatchNorm3d(10, track_running_stats=False),
        torch.nn.Conv3d(10, 6, 1), torch.nn.AdaptiveAvgPool3d(1), torch.nn.Flatten(),
    ).eval()  # fmt: skip
    pruner = AdaptivePruner(net, dims=("channel",), policy="topk", budget=0.5).eval()
    clip = _clip(shape=(2, 3, 2, 4, 4))
    module, _ = build_export_module(pruner, "topk", clip, skip_outputs=True)
    assert set(module.chains) == {"1"}  # 1 -> 2 (BN) -> 3 -> 4; not 4 -> 5 (batch stats) -> 6
    with torch.no_grad():
        assert max_abs_error(pruner(clip), module(clip)) < 1e-5


def test_topk_export_gathers_a_chain_norm_it_cannot_fold():
    """conv -> ReLU -> BatchNorm -> conv: the norm does not read the conv's output directly,
    so it is not folded; the producer computes the consumer's channels and the norm's scale
    and shift are gathered to them. Same logits as eager on clips of a batch."""
    net = torch.nn.Sequential(
        torch.nn.Conv3d(3, 8, 1), torch.nn.Conv3d(8, 12, 1), torch.nn.ReLU(),
        torch.nn.BatchNorm3d(12), torch.nn.Conv3d(12, 6, 1), torch.nn.AdaptiveAvgPool3d(1),
        torch.nn.Flatten(),
    ).eval()  # fmt: skip
    with torch.no_grad():
        net[3].running_mean.uniform_(-1, 1)
        net[3].running_var.uniform_(0.5, 2)
        net[3].bias.uniform_(-1, 1)
    torch.manual_seed(0)
    pruner = AdaptivePruner(net, dims=("channel",), policy="topk", budget=0.5).eval()
    with torch.no_grad():
        pruner.controller.channel_head.weight.normal_(0.0, 1.0)
    clip = _clip(shape=(2, 3, 2, 4, 4))
    module, plan = build_export_module(pruner, "topk", clip)
    assert module.chains["1"].norms == ("3",) and plan.folded_norms == {}
    assert type(module.model[3]).__name__ == "_GatheredNorm"
    with torch.no_grad():
        for c in (clip, _clip(seed=7, shape=(2, 3, 2, 4, 4)) * 2):
            assert max_abs_error(pruner(c), module(c)) < 1e-5


def test_onnx_ops_allowlist(tmp_path):
    clip = _clip()
    module, _ = build_export_module(_pruner("topk", keep="half"), "topk", clip)
    path = export_onnx(module, clip, tmp_path / "m.onnx", opset=18)
    ops = onnx_op_types(path)
    assert "NonZero" not in ops and "If" not in ops  # static shapes, no control flow
    check_ops(ops, "qnn")
    with pytest.raises(UnsupportedOpError, match="NonZero") as info:
        check_ops({"Conv": 1, "NonZero": 1}, "qnn")
    assert info.value.op == "NonZero"
    assert max_abs_error(module(clip), torch.from_numpy(run_onnxruntime(path, clip))) < 1e-4
    with pytest.raises(ValueError, match="opset"):
        export_onnx(module, clip, tmp_path / "x.onnx", opset=21)


@pytest.mark.parametrize(
    "policy, mode", [("topk", "topk"), ("topk", "masked"), ("threshold", "threshold")]
)
def test_export_module_folds_norms_into_their_convs(tmp_path, policy, mode):
    """Each eval BatchNorm that alone reads a conv's output is folded into that conv in the
    export copy, except the stem's (the controller reads the raw stem output): same logits as
    eager with non-trivial statistics, the user's model untouched. In the ``topk`` ONNX graph
    no multiply reads a pruned conv's output (no BatchNorm left as Mul + Add), each layer has
    one TopK per pruned dim and no ScatterElements (indices straight from the scores)."""
    import onnx

    from lightning_dance.execution.chains import conv_norms

    pruner = _pruner(policy, keep="half")
    with torch.no_grad():
        for m in pruner.model.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    before = {k: v.clone() for k, v in pruner.model.state_dict().items()}
    clip, other = _clip(), _clip(seed=7) * 2
    module, plan = build_export_module(pruner, mode, clip)
    pairs = conv_norms(pruner.model)
    assert plan.folded_norms == {n: c for c, n in pairs.items() if c != pruner.stem_name}
    assert len(plan.folded_norms) == len(pairs) - 1 == 4
    for norm in plan.folded_norms:
        assert isinstance(module.model.get_submodule(norm), torch.nn.Identity)
        assert isinstance(pruner.model.get_submodule(norm), torch.nn.BatchNorm3d)
    assert all(torch.equal(v, before[k]) for k, v in pruner.model.state_dict().items())
    with torch.no_grad():
        for c in (clip, other):
            ref = pruner(c)
            assert max_abs_error(ref, module(c)) < 1e-5
    if mode != "topk":
        return
    path = export_onnx(module, clip, tmp_path / "m.onnx", opset=18)
    graph = onnx.load(str(path)).graph
    convs = [n for n in graph.node if n.op_type == "Conv"]
    pruned = {o for n in convs[1:] for o in n.output}  # every conv after the stem
    assert not [n for n in graph.node if n.op_type == "Mul" and pruned & set(n.input)]
    ops = onnx_op_types(path)
    assert ops["TopK"] == 2 * len(pruner.layer_names) and "ScatterElements" not in ops
    assert "BatchNormalization" not in ops
    assert max_abs_error(ref, torch.from_numpy(run_onnxruntime(path, other))) < 1e-4


def _check_manifest(out, clip, ref):
    manifest = json.loads((out.out_dir / "manifest.json").read_text())
    assert manifest == json.loads(json.dumps(out.manifest))
    assert manifest["input_shape"] == list(clip.shape)
    assert manifest["versions"]["torch"] == torch.__version__.split("+")[0] or manifest["versions"][
        "torch"
    ].startswith(torch.__version__.split("+")[0])
    for art in manifest["artifacts"]:
        if art["status"] != "ok":
            continue
        assert (out.out_dir / art["file"]).exists()
        if art["format"] == "onnx":  # the recorded parity error is the measured one
            got = torch.from_numpy(run_onnxruntime(out.out_dir / art["file"], clip))
            assert art["parity_max_abs_error"] == pytest.approx(max_abs_error(ref, got), abs=1e-9)
            assert art["opset"] == 18 and (out.out_dir / "jetson/build_engine.sh").exists()
        if art["format"] == "torchscript":
            loaded = torch.jit.load(str(out.out_dir / art["file"]))
            assert art["parity_max_abs_error"] == pytest.approx(
                max_abs_error(ref, loaded(clip)), abs=1e-9
            )
        if art["format"] in ("qnn", "executorch"):
            from lightning_dance.export import snapdragon as sd

            path = out.out_dir / art["file"]
            got = (
                sd.run_qnn_htp(path, clip)
                if art["format"] == "qnn"
                else sd.run_executorch(path, clip)
            )
            assert art["parity_max_abs_error"] == pytest.approx(
                max_abs_error(ref, torch.as_tensor(got)), abs=1e-6
            )
    return manifest


def test_export_dense_jetson(tmp_path):
    torch.manual_seed(0)
    net = create_model("tiny_c3d", num_classes=4).eval()
    clip = _clip()
    out = export_model(net, clip, targets=("jetson",), out_dir=tmp_path / "exp")
    manifest = _check_manifest(out, clip, net(clip))
    assert [(a["format"], a["status"]) for a in manifest["artifacts"]] == [
        ("onnx", "ok"),
        ("torchscript", "ok"),
    ]
    assert manifest["executed_macs"] == manifest["dense_macs"] > 0
    assert manifest["folded_norms"] == {}  # the user's model as it is (exporters fold)
    script = (tmp_path / "exp/jetson/build_engine.sh").read_text()
    assert "--onnx=model.onnx" in script and "clip:1x3x4x16x16" in script
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]  # no temp folder left


@pytest.mark.slow
@pytest.mark.parametrize("keep", ["all", "half", "one"])
@pytest.mark.parametrize(
    "policy,mode", [("threshold", "masked"), ("topk", "topk"), ("threshold", "threshold")]
)
def test_export_gated_jetson(tmp_path, policy, mode, keep):
    clip = _clip()
    pruner = _pruner(policy, keep=keep)
    out = export_model(pruner, clip, targets=("jetson",), mode=mode, out_dir=tmp_path / "e")
    manifest = _check_manifest(out, clip, pruner(clip))
    assert manifest["mode"] == mode and manifest["policy"] == policy
    assert set(manifest["folded_norms"]) == {"conv2.1", "conv3.1", "res.conv1.1", "res.conv2.1"}
    for art in manifest["artifacts"]:
        assert art["status"] == "ok" and art["parity_max_abs_error"] < 1e-4
    torchscript = next(a for a in manifest["artifacts"] if a["format"] == "torchscript")
    assert torchscript["extra"]["scripted_from"] == "torch.export graph"  # scripted, not traced
    # the scripted artifact still follows the gates on another clip
    other = _clip(seed=7) * 2
    loaded = torch.jit.load(str(out.out_dir / torchscript["file"]))
    assert max_abs_error(pruner(other), loaded(other)) < 1e-4
    onnx_art = next(a for a in manifest["artifacts"] if a["format"] == "onnx")
    assert ("NonZero" in onnx_art["ops"]) == (mode == "threshold")  # dynamic gathers
    got = run_onnxruntime(out.out_dir / onnx_art["file"], other)
    assert max_abs_error(pruner(other), torch.from_numpy(got)) < 1e-4


def test_threshold_mode_is_skipped_where_shapes_must_be_static(tmp_path):
    clip = _clip()
    pruner = _pruner("threshold", keep="half")
    with pytest.raises(UnsupportedOpError, match="NonZero") as info:
        export_model(pruner, clip, targets=("snapdragon",), formats=("qnn",), mode="threshold",
                     out_dir=tmp_path / "q")  # fmt: skip
    assert info.value.op == "NonZero"
    with pytest.raises(UnsupportedOpError, match="input-dependent size"):
        export_model(pruner, clip, targets=("snapdragon",), formats=("executorch",),
                     mode="threshold", out_dir=tmp_path / "x")  # fmt: skip
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("dims", [("frame", "channel"), ("frame", "channel", "feature")])
def test_export_topk_fresh_controller(tmp_path, dims):
    """A freshly initialized controller (no training): its frame / block scores do not tie, so
    ONNX Runtime and torch keep the same entries; the gated tolerance scales with the logits."""
    torch.manual_seed(0)
    pruner = AdaptivePruner(
        create_model("tiny_c3d", num_classes=4), policy="topk", dims=dims
    ).eval()
    clip = _clip()
    ref = pruner(clip)
    out = export_model(pruner, clip, targets=("jetson",), formats=("onnx",), mode="topk",
                       out_dir=tmp_path / "e")  # fmt: skip
    (art,) = _check_manifest(out, clip, ref)["artifacts"]
    scale = float(ref.abs().max())
    assert art["parity_tolerance"] == pytest.approx(max(1e-4, 1e-2 * scale))
    assert art["parity_max_abs_error"] <= 1e-4 * max(1.0, scale)


def test_failed_export_leaves_nothing(tmp_path):
    net = create_model("tiny_c3d", num_classes=4).eval()
    with pytest.raises(RuntimeError, match="parity"):
        export_model(
            net,
            _clip(),
            targets=("jetson",),
            formats=("onnx",),
            out_dir=tmp_path / "bad",
            tolerances={"onnx": -1.0},
        )
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "f").write_text("x")
    with pytest.raises(FileExistsError):
        export_model(net, _clip(), targets=("jetson",), out_dir=tmp_path / "taken")
    with pytest.raises(UnsupportedOpError, match="NNAPI"):
        export_model(
            _pruner("threshold"),
            _clip(),
            targets=("snapdragon",),
            mode="masked",
            formats=("nnapi",),
            out_dir=tmp_path / "nn",
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_argument_validation(tmp_path):
    net = create_model("tiny_c3d", num_classes=4)
    for kwargs, match in [
        (dict(targets=("phone",)), "targets"),
        (dict(mode="fast"), "mode"),
        (dict(opset=21), "opset"),
        (dict(formats=("tflite",)), "formats"),
    ]:
        with pytest.raises(ValueError, match=match):
            export_model(net, _clip(), out_dir=tmp_path / "x", **kwargs)
    for kwargs, match in [
        (dict(targets=()), "targets"),
        (dict(mode="x", clip_shape=(3, 4, 8, 8)), "mode"),
        (dict(), "clip_shape"),
        (dict(clip_shape=(3, 4, 8)), "clip_shape"),
        (dict(opset=30, clip_shape=(3, 4, 8, 8)), "opset"),
    ]:
        with pytest.raises(ValueError, match=match):
            ExportCallback(**kwargs)


def test_callback_rank_zero_on_fit_end(tmp_path):
    net = create_model("tiny_c3d", num_classes=4).eval()
    cb = ExportCallback(
        targets="jetson", formats=("onnx",), clip_shape=(3, 4, 16, 16), out_dir="exported"
    )
    cb.on_fit_end(SimpleNamespace(default_root_dir=str(tmp_path), is_global_zero=False), net)
    assert cb.result is None and not (tmp_path / "exported").exists()
    cb.on_fit_end(SimpleNamespace(default_root_dir=str(tmp_path), is_global_zero=True), net)
    assert cb.result is not None and (tmp_path / "exported/manifest.json").exists()
    assert cb.state_dict() == {"last_export": str(tmp_path / "exported")}
    off = ExportCallback(
        targets="jetson", clip_shape=(3, 4, 16, 16), on_fit_end=False, out_dir=tmp_path / "manual"
    )
    off.on_fit_end(SimpleNamespace(default_root_dir=str(tmp_path), is_global_zero=True), net)
    assert off.result is None
    assert off.export(net).out_dir == tmp_path / "manual"


@pytest.mark.slow
def test_nnapi_dense_conversion(tmp_path):
    from lightning_dance.export.snapdragon import export_nnapi

    net = create_model("tiny_c3d", num_classes=4).eval()
    path, err = export_nnapi(net, _clip(), tmp_path / "m.ptl")
    assert path.stat().st_size > 0 and err < 1e-5


@pytest.mark.slow
def test_qnn_htp_simulator_dense(tmp_path):
    pytest.importorskip("onnxruntime_qnn")  # optional extra
    net = create_model("tiny_c3d", num_classes=4).eval()
    clip = _clip()
    out = export_model(net, clip, targets=("snapdragon",), formats=("qnn",), out_dir=tmp_path / "q")
    art = out.manifest["artifacts"][0]
    assert art["status"] == "ok" and (out.out_dir / art["file"]).exists()
    assert "NonZero" not in art["ops"] and "If" not in art["ops"]
    assert art["parity_max_abs_error"] < 5e-2


@pytest.mark.slow
def test_executorch_runtime_dense(tmp_path):
    pytest.importorskip("executorch")  # optional extra
    from lightning_dance.export.snapdragon import export_executorch, run_executorch

    net = create_model("tiny_c3d", num_classes=4).eval()
    clip = _clip()
    path, _ = export_executorch(net, clip, Path(tmp_path) / "m.pte")
    assert max_abs_error(net(clip), run_executorch(path, clip)) < 1e-4


GATED = [("threshold", "masked"), ("topk", "masked"), ("topk", "topk")]


def _clear_cut(policy, keep):
    """A pruner and a clip whose keep/drop decisions are far apart: the clip's first frames and
    left half are bright (its first frame and top-left block brightest), the controller scores
    frames and blocks by brightness and channels by a +-3 bias (one channel +6); data-dependent
    parts are small. ``keep``: all / half / one entry per dim."""
    torch.manual_seed(0)
    pruner = AdaptivePruner(
        create_model("tiny_c3d", num_classes=4), policy=policy, init_keep=0.5
    ).eval()
    ctrl = pruner.controller
    with torch.no_grad():
        for head in (ctrl.channel_head, ctrl.frame_global, ctrl.feature_global):
            head.weight.normal_(0.0, 1e-3)
            head.bias.zero_()
        for start, stop in ctrl._channel_slices.values():
            order = torch.randperm(stop - start)
            bias = torch.full((stop - start,), 3.0)
            bias[order[: (stop - start) // 2]] = -3.0
            bias[order[-1]] = 6.0
            ctrl.channel_head.bias[start:stop] = bias + 0.1 * torch.randn(stop - start)
        ctrl.frame_local.copy_(torch.tensor([3.0, 0.0]).expand_as(ctrl.frame_local))
        ctrl.feature_local.copy_(torch.tensor([3.0, 0.0]).expand_as(ctrl.feature_local))
        for m in pruner.model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.normal_(0.0, 0.5)
    clip = _clip().abs() + 0.5
    clip[:, :, 2:] *= 0.2
    clip[:, :, 0] *= 2.0
    clip[..., 8:] *= 0.2
    clip[..., :4, :4] *= 2.0
    return _set_keep(pruner, policy, keep, clip), clip


@pytest.mark.slow
@pytest.mark.parametrize("keep", ["all", "half", "one"])
@pytest.mark.parametrize("policy,mode", GATED)
def test_qnn_htp_simulator_gated(tmp_path, policy, mode, keep):
    """Controller + masks (and the top-k gathers) run on the Hexagon NPU simulator with CPU
    fallback disabled (every op is an HTP op) and keep what eager keeps. The HTP computes in
    fp16: decisions a few percent apart can flip (docs/export.md), so the clip is clear-cut."""
    pytest.importorskip("onnxruntime_qnn")  # optional extra, installed by the dev extra
    pruner, clip = _clear_cut(policy, keep)
    kept = [f for layer in _kept(pruner, clip).values() for f in layer.values()]
    low, high = {"all": (1.0, 1.0), "half": (0.3, 0.7), "one": (0.0, 0.3)}[keep]
    assert low <= sum(kept) / len(kept) <= high and min(kept) > 0
    out = export_model(pruner, clip, targets=("snapdragon",), formats=("qnn",), mode=mode,
                       out_dir=tmp_path / "q")  # fmt: skip
    (art,) = _check_manifest(out, clip, pruner(clip))["artifacts"]
    assert out.manifest["gate_margin"] is None or out.manifest["gate_margin"] > 0.04
    assert art["status"] == "ok" and (out.out_dir / art["file"]).exists()
    assert not {"NonZero", "If", "Einsum", "BatchNormalization"} & set(art["ops"])
    if mode == "topk":
        assert art["ops"].get("Gather", 0) > 0  # gathered, not masked
    # fp16 noise only: a different keep set would move the logits by a large fraction
    assert art["parity_max_abs_error"] < 2e-2 * float(pruner(clip).abs().max())


@pytest.mark.slow
def test_qnn_htp_runs_topk_output_skipping(tmp_path):
    """The topk export's channel chains (weight rows gathered by data-dependent indices, the
    BatchNorm scale/shift gathered) finalize and run on the HTP simulator. A Gather on axis 0
    of the 5D weight did not (QNN_COMMON_ERROR_MEM_ALLOC); the rows come from a 2D view."""
    pytest.importorskip("onnxruntime_qnn")
    from lightning_dance.export.snapdragon import run_qnn_htp

    pruner, clip = _clear_cut("topk", "half")
    module, plan = build_export_module(pruner, "topk", clip)
    _, inputs_only = build_export_module(pruner, "topk", clip, skip_outputs=False)
    assert module.chains and plan.executed_macs < inputs_only.executed_macs
    path = export_onnx(module, clip, tmp_path / "chains.onnx")
    with torch.no_grad():
        ref = pruner(clip)
    got = run_qnn_htp(path, clip)
    assert max_abs_error(ref, got) < 2e-2 * float(ref.abs().max())  # fp16 noise only


@pytest.mark.slow
@pytest.mark.parametrize("keep", ["all", "half", "one"])
@pytest.mark.parametrize("policy,mode", GATED)
def test_executorch_runtime_gated(tmp_path, policy, mode, keep):
    pytest.importorskip("executorch")  # optional extra, installed by the dev extra
    clip = _clip()
    pruner = _pruner(policy, ("frame", "channel", "feature"), keep)
    out = export_model(pruner, clip, targets=("snapdragon",), formats=("executorch",),
                       mode=mode, out_dir=tmp_path / "x")  # fmt: skip
    (art,) = _check_manifest(out, clip, pruner(clip))["artifacts"]
    assert art["status"] == "ok" and art["parity_max_abs_error"] < 1e-4
    from lightning_dance.export.snapdragon import run_executorch

    other = _clip(seed=7) * 2  # the .pte follows the gates of another clip too
    got = run_executorch(out.out_dir / art["file"], other)
    assert max_abs_error(pruner(other), got) < 1e-4


def test_qnn_unsupported_op_is_an_error_not_a_crash(tmp_path):
    """onnxruntime-qnn can crash the process on a graph it cannot compile: the session runs in
    a child process and the failure comes back as an error naming the op."""
    pytest.importorskip("onnxruntime_qnn")
    from lightning_dance.export.snapdragon import compile_qnn_context, run_qnn_htp

    class Einsum(torch.nn.Module):
        def forward(self, x):
            return torch.einsum("nctwh,c->ntwh", x, torch.arange(3.0))

    clip = _clip()
    path = export_onnx(Einsum().eval(), clip, tmp_path / "e.onnx")
    assert "Einsum" in onnx_op_types(path)
    with pytest.raises(UnsupportedOpError, match="Einsum") as info:
        run_qnn_htp(path, clip)
    assert info.value.op == "Einsum"
    with pytest.raises(UnsupportedOpError, match="Einsum"):
        compile_qnn_context(path, tmp_path / "ctx.onnx")
    assert not (tmp_path / "ctx.onnx").exists()


def test_qnn_crash_becomes_an_error(tmp_path, monkeypatch):
    """A QNN session that kills its process (a signal) is reported, and the caller survives."""
    pytest.importorskip("onnxruntime_qnn")
    import subprocess

    from lightning_dance.export import snapdragon as sd

    def crashed(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, -11, "", "Unsupported nodes in QNN EP: "
                                           "{ name: n0, type: GatherND }")  # fmt: skip

    monkeypatch.setattr(sd.subprocess, "run", crashed)
    with pytest.raises(UnsupportedOpError, match=r"crashed \(signal 11\).*GatherND"):
        sd.compile_qnn_context(tmp_path / "m.onnx", tmp_path / "ctx.onnx")


@pytest.mark.slow
def test_export_benchmark_smoke(tmp_path):
    """benchmarks/export_benchmark.py: exported dense / masked / topk / threshold ONNX models
    run interleaved in onnxruntime, each checked against eager."""
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "export_benchmark.py"
    spec = importlib.util.spec_from_file_location("export_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    try:
        spec.loader.exec_module(bench)
        out = tmp_path / "export.json"
        bench.main(["--smoke", "--threads", "1", "--out", str(out)])
    finally:
        sys.modules.pop(spec.name, None)
        sys.modules.pop("latency_benchmark", None)
    (result,) = json.loads(out.read_text())["models"]
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == {"dense", "masked 0.5", "topk 0.5", "topk inputs-only 0.5",
                         "threshold 0.5"}  # fmt: skip
    assert rows["dense"]["speedup"] == 1.0 and rows["masked 0.5"]["mac_ratio"] >= 1.0
    assert rows["topk 0.5"]["mac_ratio"] < 0.75 and rows["threshold 0.5"]["mac_ratio"] < 0.75
    assert all(r["max_rel_error"] < 1e-4 for r in rows.values())


def test_topk_export_without_output_skipping_gathers_every_input():
    pruner = _r2plus1d_topk(("channel",))
    clip = _clip(shape=(1, 3, 4, 32, 32))
    skipping, with_chains = build_export_module(pruner, "topk", clip)  # the default: on
    plain, without = build_export_module(pruner, "topk", clip, skip_outputs=False)
    assert plain.chains == {} and len(skipping.chains) == 24
    assert without.executed_macs > with_chains.executed_macs
    with torch.no_grad():
        assert max_abs_error(skipping(clip), plain(clip)) < 1e-5


def test_a_new_export_format_is_one_registry_entry(tmp_path):
    """``export_model`` builds whatever the registry holds: a format registered here (a
    state-dict file, reloaded and run for parity) is built, checked and listed in the
    manifest like the built-in ones; a parity failure of the new entry raises."""
    from lightning_dance.export.formats import FORMATS, ExportFormat, register_format

    def build(job, art, sub, offset=0.0):
        path = sub / "weights.pt"
        torch.save(job.module.state_dict(), path)
        twin = copy.deepcopy(job.module)
        twin.load_state_dict(torch.load(path, weights_only=True))
        art.file, art.runtime = f"{art.target}/{path.name}", "eager reload"
        with torch.no_grad():
            job.check(art, twin(job.clip) + offset)

    register_format(ExportFormat("state_dict_test", "jetson", build))
    register_format(ExportFormat("broken_test", "jetson", partial(build, offset=1.0)))
    try:
        with pytest.raises(ValueError, match="registered already"):
            register_format(ExportFormat("onnx", "jetson", build))
        net = create_model("tiny_c3d", num_classes=4)
        out = export_model(net, _clip(), targets=("jetson",), formats=("state_dict_test",),
                           out_dir=tmp_path / "out")  # fmt: skip
        (art,) = out.manifest["artifacts"]
        assert art["format"] == "state_dict_test" and art["status"] == "ok"
        assert art["parity_max_abs_error"] < 1e-6 and (tmp_path / "out/jetson/weights.pt").is_file()
        with pytest.raises(RuntimeError, match="broken_test: parity error 1"):
            export_model(net, _clip(), targets=("jetson",), formats=("broken_test",),
                         out_dir=tmp_path / "bad")  # fmt: skip
        assert not (tmp_path / "bad").exists()  # nothing half-written is left
    finally:
        del FORMATS["state_dict_test"], FORMATS["broken_test"]
