"""Write the example notebooks (``examples/*.ipynb``) from the cell sources in this file.

The notebooks are plain nbformat-4 JSON with no outputs. Edit the cells here and rerun::

    python examples/make_notebooks.py

(only the ``json`` module is needed: no Jupyter). ``tests/test_examples.py`` executes every
notebook with a Jupyter kernel (nbclient) and ``LIGHTNING_DANCE_QUICK=1``.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent

METADATA = {
    "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
    "language_info": {"name": "python", "pygments_lexer": "ipython3"},
}


def md(text: str) -> tuple[str, str]:
    return "markdown", text


def code(text: str) -> tuple[str, str]:
    return "code", text


def notebook(stem: str, cells: list[tuple[str, str]]) -> dict:
    out = []
    for i, (kind, text) in enumerate(cells):
        lines = textwrap.dedent(text).strip("\n").splitlines(keepends=True)
        cell = {"cell_type": kind, "id": f"{stem[:2]}-{i:02d}", "metadata": {}, "source": lines}
        if kind == "code":
            cell |= {"execution_count": None, "outputs": []}
        out.append(cell)
    return {"cells": out, "metadata": METADATA, "nbformat": 4, "nbformat_minor": 5}


# --------------------------------------------------------------------------- 01
NB01 = [
    md(
        """
        # DANCE on your own LightningModule

        This notebook takes an ordinary video-classification `LightningModule` (nothing in it
        knows about DANCE) and makes it cheaper to run with the two DANCE steps:

        1. **dense baseline**: train the module as you already do;
        2. **AVA** (optional): fine-tune the *same, unmodified* module with `AVACallback`, an
           extra loss that concentrates each layer's input activations on fewer frames, channels
           and positions;
        3. **AAP**: wrap it in `DANCEWrapper(model, budget=0.5)`, which trains a small controller
           (backbone frozen) deciding per clip which input frames, channels and spatial blocks of
           every Conv3d to skip;
        4. **calibrate** the controller to the budget, then measure accuracy and executed / dense
           multiply-accumulates (MACs) per clip, with a per-layer `MacReport`.

        The default sizes are those of `lightning-dance demo` with a frozen backbone (the
        controller alone, the quick path): a few minutes on a laptop CPU.
        With the environment variable `LIGHTNING_DANCE_QUICK=1` every stage runs on a handful of
        clips for one epoch (a smoke run in seconds, as the test suite does): the accuracies are
        then meaningless.

        What the MAC figures mean: the masked model multiplies skipped inputs by zero, so it
        *counts* the work DANCE skips but does not run faster by itself. Notebook
        `02_fast_execution_and_export.ipynb` runs the skipped work for real and exports the model.
        """
    ),
    code(
        """
        import copy
        import itertools
        import os

        import lightning as L
        import torch
        import torch.nn.functional as F

        from lightning_dance import (
            AVACallback,
            DANCEWrapper,
            MacReport,
            SyntheticVideoDataModule,
            create_model,
        )

        QUICK = os.environ.get("LIGHTNING_DANCE_QUICK") == "1"  # smoke run (the test suite)

        NUM_CLASSES, FRAMES, SIZE = 6, 8, 32  # clips are [3, FRAMES, SIZE, SIZE]
        BUDGET = 0.5  # target executed / dense MACs
        if QUICK:
            TRAIN_SIZE, VAL_SIZE, BATCH_SIZE = 32, 16, 8
            DENSE_EPOCHS = AVA_EPOCHS = DANCE_EPOCHS = 1
        else:  # a few minutes on a laptop CPU
            TRAIN_SIZE, VAL_SIZE, BATCH_SIZE = 1536, 384, 16
            DENSE_EPOCHS, AVA_EPOCHS, DANCE_EPOCHS = 8, 2, 3
        L.seed_everything(0)
        """
    ),
    md(
        """
        ## Data

        `SyntheticVideoDataModule` renders motion-pattern clips (an object moving, growing,
        rotating, blinking, ...) on a noisy textured background; the class can only be told from
        several frames, and in half of the clips the object is visible in only part of the frames,
        so an input-aware pruner has something to exploit. Nothing is downloaded. Any
        `LightningDataModule` whose batches are `(clip [N, 3, T, H, W], label [N])` works the same
        way (for video files see `03_real_video_folders.ipynb`).
        """
    ),
    code(
        """
        dm = SyntheticVideoDataModule(
            num_classes=NUM_CLASSES,
            frames=FRAMES,
            size=SIZE,
            train_size=TRAIN_SIZE,
            val_size=VAL_SIZE,
            test_size=VAL_SIZE,
            batch_size=BATCH_SIZE,
            seed=0,
        )
        print(dm.classes)
        """
    ),
    md(
        """
        ## Your LightningModule

        A plain module, written the way you would write any classifier: no DANCE import, no hook,
        no special loss. The network is `create_model("tiny_c3d")`, a small C3D-style 3D CNN;
        put your own `nn.Module` there (DANCE acts on its `nn.Conv3d` layers), or a factory model
        such as `create_model("r2plus1d_18", num_classes=..., width=0.5)`. The package's
        `VideoClassifier` is a ready-made module of the same kind.
        """
    ),
    code(
        """
        class MyVideoModule(L.LightningModule):
            def __init__(self, num_classes: int, lr: float = 1e-3):
                super().__init__()
                self.save_hyperparameters()
                self.net = create_model("tiny_c3d", num_classes=num_classes)

            def forward(self, clip):
                return self.net(clip)

            def training_step(self, batch, batch_idx):
                clip, label = batch
                loss = F.cross_entropy(self(clip), label)
                self.log("train_loss", loss, prog_bar=True)
                return loss

            def validation_step(self, batch, batch_idx):
                clip, label = batch
                logits = self(clip)
                self.log("val_loss", F.cross_entropy(logits, label))
                self.log("val_acc", (logits.argmax(-1) == label).float().mean(), prog_bar=True)

            def configure_optimizers(self):
                return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        """
    ),
    md(
        """
        ## 1. Dense baseline

        An ordinary fit. The Trainer writes no logs or checkpoints here (`logger=False`,
        `enable_checkpointing=False`); use your usual settings in your own project.
        """
    ),
    code(
        """
        def make_trainer(epochs, callbacks=()):
            return L.Trainer(
                max_epochs=epochs,
                accelerator="cpu",
                devices=1,
                callbacks=list(callbacks),
                logger=False,
                enable_checkpointing=False,
                enable_model_summary=False,
                enable_progress_bar=not QUICK,
                num_sanity_val_steps=0,
            )


        @torch.no_grad()
        def accuracy(model, loader):
            was_training = model.training
            model.eval()
            correct = total = 0
            for clip, label in loader:
                correct += int((model(clip).argmax(-1) == label).sum())
                total += label.numel()
            # restore the mode: Lightning 2.x does not call model.train() when a fit starts, so
            # a module left in eval mode would train with frozen BatchNorm (and AVA would refuse)
            model.train(was_training)
            return correct / total


        model = MyVideoModule(NUM_CLASSES)
        make_trainer(DENSE_EPOCHS).fit(model, dm)
        dense_acc = accuracy(model, dm.test_dataloader())
        print(f"dense test accuracy {dense_acc:.3f} (chance {1 / NUM_CLASSES:.3f})")
        """
    ),
    md(
        """
        ## 2. AVA fine-tuning: one callback, the module unchanged

        `AVACallback()` adds `weight * penalty` to the loss your `training_step` returns: the
        penalty rewards a skewed distribution of activation magnitude over the frames, channels
        and spatial positions of every Conv3d input except the stem (so fewer of them carry the
        signal, and AAP can skip the rest). The default weight 2.0 is ramped up over the first
        50 optimizer steps (in the quick run there are fewer steps than that, so AVA barely acts).
        See `docs/ava.md`.

        AVA is optional: where we measured it with the backbone fine-tuned jointly with the
        controller (the benchmark and the demo, three seeds each), DANCE from the dense model
        was more accurate than from the AVA model given the same epochs, so the demo skips it.
        Here the backbone stays frozen (step 3); skip this step by setting
        `ava_model = copy.deepcopy(model)`, and keep it only if it helps on your task.

        Callbacks go to the `Trainer` (`Trainer.fit` takes no `callbacks` argument). We fine-tune
        a copy so the dense model stays available for comparison, with a lower learning rate, as
        the demo does.
        """
    ),
    code(
        """
        ava_model = copy.deepcopy(model)
        ava_model.hparams.lr = model.hparams.lr * 0.3
        make_trainer(AVA_EPOCHS, callbacks=[AVACallback()]).fit(ava_model, dm)
        ava_acc = accuracy(ava_model, dm.test_dataloader())
        print(f"AVA test accuracy {ava_acc:.3f} (dense {dense_acc:.3f})")
        """
    ),
    md(
        """
        ## 3. AAP: train the DANCE controller

        `DANCEWrapper(model, budget=0.5)` is a new LightningModule around your module: it
        instruments every Conv3d except the stem (the first conv, which reads the clip) and adds a
        small controller that reads statistics of the stem's output and decides, per clip and per
        layer, which input frames, channels and spatial blocks to keep. The backbone is frozen
        (BatchNorm statistics included); only the controller trains, with cross-entropy,
        distillation from the dense model and a penalty pulling the expected executed / dense MAC
        ratio to the budget. Training multiplies the skipped inputs by zero. See `docs/aap.md`.
        """
    ),
    code(
        """
        weights_before = {k: v.clone() for k, v in ava_model.state_dict().items()}
        dance = DANCEWrapper(ava_model, budget=BUDGET)
        make_trainer(DANCE_EPOCHS).fit(dance, dm)
        """
    ),
    md(
        """
        ## 4. Calibrate to the budget

        The hard eval decisions of a trained controller land near the budget, not on it.
        `calibrate` shifts every keep decision by one offset, found by bisection on a few
        validation batches, so that the mean executed / dense MAC ratio on them meets the budget
        (the offset is a buffer, saved with checkpoints). It returns the ratio reached.
        """
    ),
    code(
        """
        calibration_clips = [clip for clip, _ in itertools.islice(dm.val_dataloader(), 4)]
        reached = dance.pruner.calibrate(calibration_clips)
        print(f"calibrated: executed / dense MACs {reached:.3f} on the calibration clips")
        """
    ),
    md(
        """
        ## 5. Accuracy and MACs per clip

        In eval mode the wrapper applies hard per-clip masks. After each forward,
        `dance.last_stats.mac_ratio()` holds the executed / dense MAC ratio of every clip of the
        batch: it differs from clip to clip, since the decisions depend on the input. A
        `MacReport` accumulates the same statistics per layer over the whole test set.

        For reference, one run of the default settings here (seed 0, one CPU thread, under 4
        minutes in all) gave test accuracies of 0.79 (dense), 0.88 (AVA) and 0.78 (DANCE at budget
        0.5), with 0.51 of the dense MACs per clip on average (0.37 to 0.70 depending on the clip).
        That is one seed on 384 test clips: differences of a few points are within noise.
        """
    ),
    code(
        """
        report = MacReport.for_pruner(dance.pruner, (3, FRAMES, SIZE, SIZE))
        dance.eval()
        correct = total = 0
        ratios = []
        with torch.no_grad():
            for clip, label in dm.test_dataloader():
                logits = dance(clip)
                correct += int((logits.argmax(-1) == label).sum())
                total += label.numel()
                ratios.append(dance.last_stats.mac_ratio())
                report.update_stats(dance.last_stats)
        ratios = torch.cat(ratios)
        dance_acc = correct / total
        print(f"test accuracy: dense {dense_acc:.3f}, AVA {ava_acc:.3f}, DANCE {dance_acc:.3f}")
        print(
            f"executed / dense MACs per clip: mean {ratios.mean():.3f}, "
            f"min {ratios.min():.3f}, max {ratios.max():.3f} (budget {BUDGET})"
        )
        """
    ),
    md(
        """
        ## The MAC report

        Per layer: input shape, dense MACs, mean executed MACs and kept fraction per dim; for the
        whole model: executed MACs (mean, p5, p95 over the clips, the controller's own MACs
        included), memory traffic of the Conv3d layers and an energy figure. Dense counts come
        from fvcore; traffic and energy are *estimates* from a simple 45 nm per-operation model
        (`docs/accounting.md`), not measurements. `report.to_json(path)` saves it and
        `report.log_to(trainer)` logs it.

        Read the traffic and energy lines too: skipping work is not free. The fast path gathers
        the kept inputs into compact copies and assembles the outputs from partial results, and
        the report charges those copies; on a model this small they outweigh what is skipped, so
        the estimated traffic and energy come out *higher* than dense (a "saving" below x1) even
        though the MACs halve (`docs/accounting.md`, section 4).
        """
    ),
    code(
        """
        print(report)
        summary = report.to_dict()
        print(f"report over {summary['samples']} clips: executed / dense MACs {summary['macs_ratio']:.3f}")
        """
    ),
    md(
        """
        ## Your model back

        `unwrap()` returns your module, hooks removed and `requires_grad` flags restored. Its
        weights and BatchNorm statistics are exactly those it had before wrapping: only the
        controller was trained.
        """
    ),
    code(
        """
        original = dance.unwrap()
        assert original is ava_model
        weights_after = original.state_dict()
        assert all(torch.equal(weights_before[k], weights_after[k]) for k in weights_before)
        print("unwrapped: your module with its weights unchanged")
        """
    ),
    code(
        """
        # checks run by the test suite (tests/test_examples.py)
        assert 0.0 <= dense_acc <= 1.0 and 0.0 <= dance_acc <= 1.0
        assert abs(reached - BUDGET) < 0.1, reached
        assert 0.0 < float(ratios.mean()) < 1.0
        assert abs(summary["macs_ratio"] - float(ratios.mean())) < 0.01
        print("notebook 01: ok")
        """
    ),
]

# --------------------------------------------------------------------------- 02
NB02 = [
    md(
        """
        # Fast execution and export

        The masked DANCE model (notebook 01) multiplies the skipped inputs by zero: it decides
        what to skip but computes everything. This notebook

        1. switches a `DANCEWrapper` to the **compact** execution path (`compile_sparse()`), which
           does not compute the skipped frames / channels / spatial blocks, and checks that it
           gives the same outputs as the masked model;
        2. times the dense model against the compact path (ratios, batch 1);
        3. **exports** the pruned model with `export_model` to ONNX and TorchScript (Jetson target)
           and checks, by reloading the files, that they compute what the eager model computes.

        The model here is a stand-in: a randomly initialised backbone whose DANCE controller
        (`policy="topk"`, the exportable policy: a fixed number of kept entries per layer) is
        trained for a few steps, so that its decisions depend on the clip, then calibrated to the
        budget. Exactness, speed and export do not depend on what the controller learned; for your
        model, start from your trained wrapper (e.g. `dance` at the end of notebook 01, trained
        with `policy="topk"`).

        Sizes: by default a slimmed R(2+1)D-18 (`width=0.5`) on 3x8x112x112 clips, channel pruning
        at budget 0.3, the setting that ran 1.65x faster than the dense model in
        `docs/execution.md` (about 3 minutes on one CPU thread, most of it training the stand-in
        controller).
        `LIGHTNING_DANCE_QUICK=1` uses the tiny C3D on 3x8x32x32 clips instead: a smoke run, in
        which the compact path is *slower* than dense (see the timing section).
        """
    ),
    code(
        """
        import os
        import shutil
        import statistics
        import tempfile
        import time
        from pathlib import Path

        import lightning as L
        import torch

        from lightning_dance import DANCEWrapper, SyntheticVideoDataModule, create_model, export_model
        from lightning_dance.execution import accelerate_dense, count_executed_macs, to_fast_layout

        QUICK = os.environ.get("LIGHTNING_DANCE_QUICK") == "1"  # smoke run (the test suite)

        NUM_CLASSES, FRAMES = 6, 8
        DIMS, BUDGET = ("channel",), 0.3  # also try ("channel", "frame"), see docs/execution.md
        if QUICK:
            MODEL, MODEL_KWARGS, SIZE = "tiny_c3d", {}, 32
            TRAIN_STEPS, BATCH_SIZE, TIMING_RUNS = 3, 4, 5
        else:
            MODEL, MODEL_KWARGS, SIZE = "r2plus1d_18", {"width": 0.5}, 112
            TRAIN_STEPS, BATCH_SIZE, TIMING_RUNS = 20, 4, 11
        L.seed_everything(0)
        """
    ),
    md(
        """
        ## A wrapped model

        `DANCEWrapper(..., policy="topk")` keeps a fixed count of entries per layer and dim
        (static shapes: what the Hexagon NPU needs); `policy="threshold"` (the default) keeps an
        input-dependent count, runs compactly as well, and exports as `mode="threshold"`
        (gathers of input-dependent size: ONNX and TorchScript only) or `mode="masked"` (every
        target, no savings). `task="distill"` trains the controller to match the dense model's outputs, so
        no labels are needed.
        """
    ),
    code(
        """
        dm = SyntheticVideoDataModule(
            num_classes=NUM_CLASSES,
            frames=FRAMES,
            size=SIZE,
            train_size=TRAIN_STEPS * BATCH_SIZE,
            val_size=2 * BATCH_SIZE,
            test_size=BATCH_SIZE,
            batch_size=BATCH_SIZE,
        )
        net = create_model(MODEL, num_classes=NUM_CLASSES, **MODEL_KWARGS)
        dance = DANCEWrapper(net, budget=BUDGET, dims=DIMS, policy="topk", task="distill")
        L.Trainer(
            max_steps=TRAIN_STEPS,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=not QUICK,
            limit_val_batches=0,
        ).fit(dance, dm)
        reached = dance.pruner.calibrate([clip for clip, _ in dm.val_dataloader()])
        print(f"calibrated: executed / dense MACs {reached:.3f} (budget {BUDGET})")
        """
    ),
    md(
        """
        ## The compact path gives the masked model's outputs

        `dance.compile_sparse()` switches the wrapper's inference to
        `lightning_dance.execution.CompactPruner`: the stem runs dense, the controller reads its
        output, and every instrumented Conv3d computes only its kept input channels (frames,
        spatial blocks) on oneDNN kernels. Training steps still use the masked path, and
        `last_stats` is not filled by the compact path, so we take the masked outputs and MAC
        statistics first. `count_executed_macs` sums the multiply-adds of the convolutions the
        compact path really issues. By default a conv whose output reaches the next conv only
        through BatchNorm and ReLU computes only the channels that conv keeps
        (`lightning_dance.execution.channel_chains`), and the pruner's count says so
        (`credit_outputs`, on by default): the counted MACs are the MACs the compact path runs
        on the clip. With `skip_outputs=False` (each layer skips only its own dropped inputs)
        more MACs run, with the same outputs.
        """
    ),
    code(
        """
        clips = next(iter(dm.test_dataloader()))[0]  # [BATCH_SIZE, 3, T, H, W]
        clip = clips[:1]  # batch 1: what a device runs
        dance.eval()
        with torch.no_grad():
            masked = dance(clip)
            stats = dance.last_stats
            masked_batch = dance(clips)

            dance.compile_sparse(skip_outputs=False)  # each layer's own kept inputs only
            with count_executed_macs() as inputs_only:
                dance(clip)
            dance.compile_sparse()  # default: also skips the outputs the next conv drops
            with count_executed_macs() as ran:
                compact = dance(clip)
            compact_batch = dance(clips)

        counted = sum(int(layer.executed_macs.sum()) for layer in stats.layers.values())
        print(f"executed / dense MACs of this clip: {float(stats.mac_ratio()[0]):.3f}")
        print(
            f"instrumented-layer MACs: counted {counted:,}, run by the compact path "
            f"{inputs_only.total:,} (inputs only), {ran.total:,} (with output skipping)"
        )
        print(
            f"max |compact - masked|: clip {(compact - masked).abs().max():.2e}, "
            f"batch of {len(clips)} {(compact_batch - masked_batch).abs().max():.2e}"
        )
        assert torch.allclose(compact, masked, rtol=1e-4, atol=1e-5)
        assert torch.allclose(compact_batch, masked_batch, rtol=1e-4, atol=1e-5)
        """
    ),
    md(
        """
        ## Timing: dense vs compact (batch 1)

        Three ways to run one clip, interleaved, median of several runs, as ratios to the dense
        model on the same fast kernels (`accelerate_dense`: oneDNN on `channels_last_3d`, which
        the compact path uses too, so that a slow dense baseline cannot inflate the speedup).
        Absolute times depend on your CPU and its load; only the ratios mean something here.

        Do not expect a speedup from a small model: the compact path pays fixed costs per layer
        (controller statistics, gathers, weight slices, Python), and below a few milliseconds per
        conv they exceed the saved work. In `docs/execution.md`, `tiny_c3d` ran at 0.45-0.87x of
        dense (slower) and X3D-XS at 0.37-0.66x, while R(2+1)D-18 (`width=0.5`, 3x8x112x112)
        reached 1.65x with channel pruning at budget 0.3 (one thread, batch 1). Batches do not
        gain either: samples with different masks run one by one.
        """
    ),
    code(
        """
        def dense_plain():
            net(clip)


        fast_clip = to_fast_layout(clip)


        def dense_fast():
            with accelerate_dense(net):
                net(fast_clip)


        def dance_compact():
            dance(clip)


        runs = {
            "dense, plain PyTorch": dense_plain,
            "dense, fast kernels": dense_fast,
            f"DANCE compact @{BUDGET}": dance_compact,
        }
        times = {name: [] for name in runs}
        with torch.no_grad():
            for fn in runs.values():
                fn()  # warm-up
            for _ in range(TIMING_RUNS):
                for name, fn in runs.items():
                    start = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - start)
        median = {name: statistics.median(t) for name, t in times.items()}
        baseline = median["dense, fast kernels"]
        print(f"{MODEL} {tuple(clip.shape[1:])}, {torch.get_num_threads()} thread(s)")
        for name, seconds in median.items():
            print(f"  {name:26s} speedup vs dense (fast kernels) {baseline / seconds:5.2f}x")
        """
    ),
    md(
        """
        ## Export: ONNX and TorchScript for Jetson

        `export_model(dance, clip, targets=("jetson",), mode="topk")` writes `jetson/model.onnx`
        (static shapes, opset 18, plus `jetson/build_engine.sh` to build a TensorRT engine with
        `trtexec` on the device), `jetson/model.pt` (TorchScript, scripted from the `torch.export`
        graph, never traced) and `manifest.json`. In `topk` mode the artifact gathers the kept
        channels / frames for real (static counts, baked in for this clip shape), runs the
        controller inside the graph, and each artifact is checked against the eager model before
        the folder appears. `mode="dense"` exports your plain model, `mode="masked"` any policy
        without savings; `targets=("snapdragon",)` adds QNN / NNAPI / ExecuTorch formats (see
        `docs/export.md` for what each supports today).

        The export runs on a deep copy: `dance` is not modified.
        """
    ),
    code(
        """
        export_root = Path(tempfile.mkdtemp(prefix="lightning_dance_export_"))
        result = export_model(dance, clip, targets=("jetson",), mode="topk", out_dir=export_root / "export")
        manifest = result.manifest
        print(
            f"MACs per clip: dense {manifest['dense_macs']:,}, "
            f"executed by the artifact {manifest['executed_macs']:,}"
        )
        for art in manifest["artifacts"]:
            print(
                f"  {art['target']}/{art['format']}: {art['status']}, file {art['file']}, "
                f"max abs error vs eager {art['parity_max_abs_error']:.2e}"
            )
        print(sorted(p.name for p in result.out_dir.rglob("*") if p.is_file()))
        """
    ),
    md(
        """
        ## Reload the artifacts and compare

        What a deployment does: load the files, run a clip the exporter never saw, and compare
        with the eager (masked) DANCE model, `dance.pruner(clip)`. The artifacts take exactly the
        example clip's shape, `[1, 3, T, H, W]`.
        """
    ),
    code(
        """
        import onnxruntime as ort

        files = result.files()
        session = ort.InferenceSession(str(files["jetson/onnx"]), providers=["CPUExecutionProvider"])
        scripted = torch.jit.load(str(files["jetson/torchscript"]))

        new_clip = clips[1:2]
        with torch.no_grad():
            eager = dance.pruner(new_clip)
            from_torchscript = scripted(new_clip)
        (from_onnx,) = session.run(None, {session.get_inputs()[0].name: new_clip.numpy()})
        from_onnx = torch.from_numpy(from_onnx)
        scale = float(eager.abs().max())
        print(
            f"|logits| up to {scale:.3g}; max abs error: "
            f"ONNX Runtime {(from_onnx - eager).abs().max():.2e}, "
            f"TorchScript {(from_torchscript - eager).abs().max():.2e}"
        )
        assert torch.allclose(from_onnx, eager, rtol=1e-3, atol=1e-3 * scale)
        assert torch.allclose(from_torchscript, eager, rtol=1e-4, atol=1e-4 * scale)
        """
    ),
    code(
        """
        # checks run by the test suite (tests/test_examples.py), then clean up the export
        assert abs(reached - BUDGET) < 0.1, reached
        assert counted == ran.total and inputs_only.total > counted
        assert manifest["executed_macs"] < manifest["dense_macs"]
        assert all(art["status"] == "ok" for art in manifest["artifacts"])
        shutil.rmtree(export_root)
        print("notebook 02: ok")
        """
    ),
]

# --------------------------------------------------------------------------- 03
NB03 = [
    md(
        """
        # Real video files: `VideoFolderDataModule`

        `VideoFolderDataModule` reads video files laid out one folder per class, the UCF101 /
        HMDB51 / Kinetics layout:

        ```
        root/
          ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi
          ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c02.avi
          ...
          YoYo/v_YoYo_g25_c05.avi
        ```

        Decoding uses PyAV (it seeks to the keyframe before the first frame it needs and decodes
        only what it keeps). This notebook writes a few tiny `.mp4` files into a temporary
        folder, so it runs anywhere, trains the baseline on them, then shows what happens with a
        corrupt file. Nothing is downloaded. With `LIGHTNING_DANCE_QUICK=1` it writes fewer,
        shorter videos and trains for one step; the default trains five epochs (under a minute
        on a laptop CPU). Either way the videos are toy patterns: the accuracy means nothing.

        For UCF101 itself, with its official split files:

        ```python
        dm = VideoFolderDataModule(
            "UCF-101", classes="ucfTrainTestlist/classInd.txt",
            train_list="ucfTrainTestlist/trainlist01.txt",
            test_list="ucfTrainTestlist/testlist01.txt",
            val_fraction=0.1, group_pattern=r"_g(\\d+)_",
            frames=16, frame_stride=2, batch_size=8, num_workers=4,
        )
        ```

        `group_pattern` keeps the clips cut from one long video (same `_gNN_`) in the same split,
        so they cannot leak between train and validation.
        """
    ),
    code(
        """
        import os
        import shutil
        import tempfile
        import warnings
        from pathlib import Path

        import av
        import lightning as L
        import numpy as np
        import torch

        from lightning_dance import VideoClassifier, VideoFolderDataModule
        from lightning_dance.data import VideoDecodeError

        QUICK = os.environ.get("LIGHTNING_DANCE_QUICK") == "1"  # smoke run (the test suite)

        CLASSES = ("MoveLeft", "MoveRight", "Blink")
        if QUICK:
            GROUPS, CLIPS_PER_GROUP, VIDEO_FRAMES, VIDEO_SIZE = 3, 1, 12, 32
            CLIP_FRAMES, CROP, TRAIN = 4, 32, {"max_steps": 1}
        else:
            GROUPS, CLIPS_PER_GROUP, VIDEO_FRAMES, VIDEO_SIZE = 6, 3, 48, 64
            CLIP_FRAMES, CROP, TRAIN = 8, 56, {"max_epochs": 5}
        CODEC = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        L.seed_everything(0)
        """
    ),
    md(
        """
        ## Write a tiny UCF101-style dataset

        Each video is a bright square on a noisy background that moves left, moves right or
        blinks; one `_gNN_` group per "source video", as in UCF101's file names.
        """
    ),
    code(
        """
        def write_video(path, frames, rate=25):
            \"\"\"Encode uint8 frames [T, H, W, 3] with PyAV.\"\"\"
            path.parent.mkdir(parents=True, exist_ok=True)
            with av.open(str(path), "w") as container:
                stream = container.add_stream(CODEC, rate=rate)
                stream.height, stream.width = frames.shape[1:3]
                stream.pix_fmt = "yuv420p"
                for image in frames:
                    for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                        container.mux(packet)
                for packet in stream.encode():  # flush the encoder
                    container.mux(packet)
            return path


        def toy_video(kind, rng, n=VIDEO_FRAMES, size=VIDEO_SIZE):
            frames = rng.integers(0, 80, (n, size, size, 3), dtype=np.uint8)
            side = size // 4
            x, y = rng.integers(0, size - side, 2)
            colour = rng.integers(150, 256, 3, dtype=np.uint8)
            for t in range(n):
                step = 2 * t if kind == "MoveRight" else -2 * t if kind == "MoveLeft" else 0
                left = int(x + step) % (size - side)
                if kind != "Blink" or (t // 3) % 2 == 0:
                    frames[t, y : y + side, left : left + side] = colour
            return frames


        root = Path(tempfile.mkdtemp(prefix="lightning_dance_videos_"))
        rng = np.random.default_rng(0)
        for name in CLASSES:
            for g in range(1, GROUPS + 1):
                for c in range(1, CLIPS_PER_GROUP + 1):
                    write_video(root / name / f"v_{name}_g{g:02d}_c{c:02d}.mp4", toy_video(name, rng))
        for name in CLASSES:
            files = sorted(p.name for p in (root / name).iterdir())
            print(f"{root.name}/{name}/: {len(files)} videos, {files[0]} ... {files[-1]}")
        """
    ),
    md(
        """
        ## The DataModule

        Classes are the sorted folder names (or the order of a class list such as `classInd.txt`,
        via `classes=`). With one folder for everything, `val_fraction` holds out that share of
        each class's groups. Clips are `frames` frames `frame_stride` source frames apart; training
        clips get a random position, crop and flip, validation clips the centre ones. Videos
        shorter than a clip are padded by repeating their last frame.
        """
    ),
    code(
        """
        settings = dict(
            group_pattern=r"_g(\\d+)_",
            frames=CLIP_FRAMES,
            frame_stride=2,
            short_side=CROP,
            crop_size=CROP,
            batch_size=4,
            seed=0,
        )
        dm = VideoFolderDataModule(root, val_fraction=0.34, **settings)
        dm.setup("fit")
        print(f"classes {dm.classes}: {len(dm.train_dataset)} train / {len(dm.val_dataset)} val videos")
        clip, label = next(iter(dm.train_dataloader()))
        print(f"a batch: clips {tuple(clip.shape)} {clip.dtype}, labels {label.tolist()}")
        """
    ),
    md(
        """
        ## Train the baseline

        The dense model of notebook 01's first step, on the video files (`VideoClassifier` is the
        package's plain LightningModule; your own works the same way). From here on, AVA and
        DANCE are exactly as in notebook 01, with `dm` in place of the synthetic data.
        """
    ),
    code(
        """
        model = VideoClassifier("tiny_c3d", num_classes=dm.num_classes, lr=1e-3)
        trainer = L.Trainer(
            **TRAIN,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=not QUICK,
            num_sanity_val_steps=0,
        )
        trainer.fit(model, dm)
        print(
            f"trained {trainer.global_step} step(s), last train loss "
            f"{float(trainer.callback_metrics['train/loss']):.3f}"
        )
        """
    ),
    md(
        """
        ## A corrupt file is named, not hidden

        Real datasets contain broken files. We add one that is not a video at all. With the
        default `on_error="raise"`, the batch that contains it fails with a `VideoDecodeError`
        that names the file and why it could not be decoded (with `num_workers > 0` too).
        """
    ),
    code(
        """
        broken = root / "MoveRight" / "v_MoveRight_g99_c01.mp4"
        broken.write_bytes(b"\\x00\\x00\\x00\\x18ftypmp42" + bytes(range(256)) * 8)

        strict = VideoFolderDataModule(root, val_fraction=0.0, **settings)
        try:
            for _ in strict.train_dataloader():
                pass
            raise AssertionError("the corrupt file was not reported")
        except VideoDecodeError as err:
            error = str(err)
        print(error)
        assert error.startswith(str(broken))
        """
    ),
    md(
        """
        With `on_error="skip"`, `setup` opens every file and decodes its first frame; unreadable
        files are dropped with **one** warning listing them, and kept in `dm.dropped`. A file
        that passes this probe and fails later still raises: nothing is silently replaced.
        """
    ),
    code(
        """
        lenient = VideoFolderDataModule(root, val_fraction=0.0, on_error="skip", **settings)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            lenient.setup("fit")
        for w in caught:
            if "on_error='skip'" in str(w.message):
                print(w.message)
        print("dropped:", lenient.dropped)
        print(f"{len(lenient.train_dataset)} readable training videos")
        assert [path for path, _ in lenient.dropped] == [str(broken)]
        for _ in lenient.train_dataloader():  # every remaining file decodes
            pass
        """
    ),
    code(
        """
        # checks run by the test suite (tests/test_examples.py), then clean up the videos
        assert trainer.global_step >= 1
        assert torch.isfinite(trainer.callback_metrics["train/loss"])
        shutil.rmtree(root)
        print("notebook 03: ok")
        """
    ),
]

# --------------------------------------------------------------------------- 04
NB04 = [
    md(
        """
        # The demo's pictures

        `lightning-dance demo` runs the recommended DANCE recipe on the built-in synthetic clips
        (dense training, then backbone and controller fine-tuned jointly with
        gradual pruning and a cosine learning rate, toward 60% of the dense MACs), measures it and
        writes an output folder. This notebook runs it from Python (`run_demo`) and shows what
        it wrote: the summary table, the four pictures, and how to reload the DANCE checkpoint.

        Unset, `LIGHTNING_DANCE_QUICK` runs the full demo (under 5 minutes on 2 CPU cores); with
        `LIGHTNING_DANCE_QUICK=1` it is the demo's `--quick` smoke run (seconds to a minute; its
        accuracies and speeds mean nothing).
        """
    ),
    code(
        """
        import json
        import os
        import shutil
        import tempfile
        from pathlib import Path

        import torch
        from IPython.display import Image, Markdown, display

        from lightning_dance import VideoClassifier
        from lightning_dance.demo import PICTURES, parse_args, reload_checkpoint, run_demo

        QUICK = os.environ.get("LIGHTNING_DANCE_QUICK") == "1"  # smoke run (the test suite)
        out = Path(tempfile.mkdtemp(prefix="dance-demo-"))  # keep it: use a folder of your own
        args = parse_args(["--out", str(out)] + (["--quick"] if QUICK else []))
        results = run_demo(args)
        """
    ),
    md(
        """
        ## The summary

        `summary.md` is the table the command prints, with the machine and what the run is and
        is not; `results.json` holds every figure.
        """
    ),
    code(
        """
        display(Markdown((out / "summary.md").read_text().split("![")[0]))
        print(sorted(p.name for p in out.iterdir()))
        """
    ),
    md(
        """
        ## Accuracy against executed MACs

        Dense (and, with `--ava-epochs`, the AVA-tuned dense model) at 1.0; DANCE at its trained budget and the same
        controller recalibrated to other budgets (`pruner.set_budget(b)` + `calibrate`). Error
        bars: the binomial standard error over the test clips.
        """
    ),
    code(
        """
        display(Image(filename=str(out / "accuracy_vs_macs.png")))
        """
    ),
    md(
        """
        ## What each layer keeps

        The mean kept fraction of every pruned Conv3d's input, per dim, over the test clips: the
        controller decides per clip and per layer.
        """
    ),
    code(
        """
        display(Image(filename=str(out / "kept_fractions.png")))
        """
    ),
    md(
        """
        ## Clips and their masks

        A few test clips frame by frame, with the keep decisions of the first pruned layer (it
        reads the stem's output) mapped back to the clip's frames and pixels.
        """
    ),
    code(
        """
        display(Image(filename=str(out / "clips.png")))
        """
    ),
    md(
        """
        ## Measured latency

        Batch 1, interleaved, medians: the dense model as PyTorch runs it, the dense model in its
        fastest form (every Conv3d on oneDNN, `channels_last_3d`: the baseline of the speedup),
        the compact DANCE path, and both exported models in onnxruntime.
        """
    ),
    code(
        """
        display(Image(filename=str(out / "latency.png")))
        """
    ),
    md(
        """
        ## Reload the checkpoint

        `dance.ckpt` is a Lightning checkpoint of the `DANCEWrapper`; give it a fresh instance of
        the wrapped module (the weights, the controller and its calibration come from the file).
        """
    ),
    code(
        """
        dance = reload_checkpoint(out / "dance.ckpt", VideoClassifier("tiny_c3d", num_classes=6))
        # the same as DANCEWrapper.load_from_checkpoint(path, model=..., weights_only=True).eval()
        clip = torch.randn(1, 3, args.frames, args.size, args.size)
        with torch.no_grad():
            logits = dance(clip)
        print(logits, dance.last_stats.mac_ratio())
        """
    ),
    code(
        """
        # checks run by the test suite (tests/test_examples.py), then clean up the demo's folder
        assert all((out / name).is_file() for name in PICTURES)
        assert results["onnx"]["ok"] and results["onnx"]["parity_max_abs_error"] < 1e-3
        assert results["checkpoint"]["reload_max_abs_error"] == 0.0
        assert json.loads((out / "results.json").read_text())["budget"] == args.budget
        shutil.rmtree(out)
        print("notebook 04: ok")
        """
    ),
]

NOTEBOOKS = {
    "01_dance_on_your_lightning_module": NB01,
    "02_fast_execution_and_export": NB02,
    "03_real_video_folders": NB03,
    "04_demo_pictures": NB04,
}


def main() -> None:
    for stem, cells in NOTEBOOKS.items():
        path = HERE / f"{stem}.ipynb"
        path.write_text(json.dumps(notebook(stem, cells), indent=1, ensure_ascii=False) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
