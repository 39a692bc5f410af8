"""AVA: spread measures, the penalty, the plain-PyTorch recorder and AVACallback under Lightning.

References are independent of the implementation: closed forms, a pairwise Gini formula, numpy
statistics in float64, and hand-written training loops (``loss + weight * penalty`` with the
conv inputs returned explicitly by the network's forward, no hooks).
"""

from __future__ import annotations

import contextlib
import copy
import math
import pickle

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.pytorch.plugins.precision import MixedPrecision
from torch.utils.data import DataLoader, TensorDataset

from lightning_dance.ava import AVARecorder, ava_penalty, saliency, spread
from lightning_dance.ava_callback import (
    DEFAULT_WARMUP_STEPS,
    DEFAULT_WEIGHT,
    AVACallback,
    ava_loss_term,
)
from lightning_dance.layers import NoConv3dError
from lightning_dance.masks import DIMS

# ----------------------------------------------------------------------------- references


def gini_ref(s: np.ndarray) -> np.ndarray:
    """Normalized Gini from the mean absolute difference: sum|si-sj| / (2 (K-1) sum s)."""
    s = np.asarray(s, dtype=np.float64)
    k = s.shape[-1]
    diff = np.abs(s[..., :, None] - s[..., None, :]).sum((-1, -2))
    total = s.sum(-1)
    return np.where(total > 0, diff / (2 * (k - 1) * np.where(total > 0, total, 1)), 0.0)


def entropy_ref(s: np.ndarray) -> np.ndarray:
    s = np.asarray(s, dtype=np.float64)
    p = s / s.sum(-1, keepdims=True)
    h = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0.0), -1)
    return 1 - h / np.log(s.shape[-1])


def hhi_ref(s: np.ndarray) -> np.ndarray:
    """Squared coefficient of variation / (K - 1)."""
    s = np.asarray(s, dtype=np.float64)
    return s.var(-1) / s.mean(-1) ** 2 / (s.shape[-1] - 1)


REFS = {"gini": gini_ref, "entropy": entropy_ref, "hhi": hhi_ref}
MEASURES = list(REFS)


def saliency_ref(x: torch.Tensor, dim: str) -> np.ndarray:
    """Loop over the kept axis, mean |x| of each slice."""
    a = x.detach().double().abs().numpy()
    n, c, t, h, w = a.shape
    if dim == "channel":
        return np.stack([[a[i, j].mean() for j in range(c)] for i in range(n)])
    if dim == "frame":
        return np.stack([[a[i, :, j].mean() for j in range(t)] for i in range(n)])
    return np.stack([[a[i, :, :, p // w, p % w].mean() for p in range(h * w)] for i in range(n)])


def spread_torch_ref(x: torch.Tensor, dim: str) -> torch.Tensor:
    """Differentiable pairwise-Gini of a conv input (torch, float32), for gradient references."""
    axes = {"channel": (2, 3, 4), "frame": (1, 3, 4), "feature": (1, 2)}[dim]
    s = x.float().abs().mean(axes).flatten(1)
    k = s.shape[1]
    diff = (s[:, :, None] - s[:, None, :]).abs().sum((1, 2))
    return diff / (2 * (k - 1) * s.sum(1))


def penalty_torch_ref(inputs: list[torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    num, den = 0.0, 0.0
    for x in inputs:
        for dim, w in weights.items():
            num = num + w * spread_torch_ref(x, dim).mean()
            den += w
    return -num / den


# ----------------------------------------------------------------------------- models


class TinyNet(nn.Module):
    """stem -> c1 -> c2 -> head; ``return_inputs`` gives the inputs of c1 and c2 (no hooks)."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv3d(3, 4, 3, padding=1)
        self.c1 = nn.Conv3d(4, 6, 3, padding=1)
        self.c2 = nn.Conv3d(6, 6, (1, 3, 3), padding=(0, 1, 1))
        self.fc = nn.Linear(6, classes)

    def forward(self, x: torch.Tensor, return_inputs: bool = False):
        h0 = F.relu(self.stem(x))
        h1 = F.relu(self.c1(h0))
        h2 = F.relu(self.c2(h1))
        logits = self.fc(h2.mean((2, 3, 4)))
        return (logits, [h0, h1]) if return_inputs else logits


class LitTiny(L.LightningModule):
    def __init__(self, ret: str = "tensor", lr: float = 0.5, fail_at: int | None = None) -> None:
        super().__init__()
        self.net, self.ret, self.lr, self.fail_at = TinyNet(), ret, lr, fail_at

    def training_step(self, batch, batch_idx):
        if self.fail_at is not None and batch_idx == self.fail_at:
            raise ValueError("boom")
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        return {"loss": loss, "size": x.shape[0]} if self.ret == "dict" else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class LitManual(LitTiny):
    def __init__(self, add_term: bool = True) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.add_term = add_term

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        if self.add_term:
            loss = loss + ava_loss_term(self)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()


class LitCallsTermInAuto(LitTiny):
    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y) + ava_loss_term(self)


class LitNoConv(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def training_step(self, batch, batch_idx):
        return self.fc(batch[0].flatten(1)[:, :4]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def make_data(n: int = 8, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(
        torch.randn(n, 3, 4, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)
    )


def make_trainer(**kw) -> L.Trainer:
    base = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    return L.Trainer(**{**base, **kw})


def no_hooks(module: nn.Module) -> bool:
    return all(not m._forward_pre_hooks for m in module.modules())


# ----------------------------------------------------------------------------- measures


@pytest.mark.parametrize("measure", MEASURES)
@pytest.mark.parametrize("k,m", [(4, 1), (4, 2), (6, 3), (10, 7), (8, 8), (2, 1)])
def test_spread_closed_form(measure: str, k: int, m: int) -> None:
    """m equal non-zero entries out of K: Gini (K-m)/(K-1), entropy 1-log m/log K,
    HHI (K/m-1)/(K-1)."""
    s = torch.zeros(k)
    s[:m] = 3.7
    expected = {
        "gini": (k - m) / (k - 1),
        "entropy": 1 - math.log(m) / math.log(k),
        "hhi": (k / m - 1) / (k - 1),
    }[measure]
    assert spread(s[torch.randperm(k)], measure).item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("measure", MEASURES)
@pytest.mark.parametrize("k", [2, 5, 64])
def test_spread_matches_reference(measure: str, k: int) -> None:
    g = torch.Generator().manual_seed(k)
    s = torch.rand(7, k, generator=g) ** 3  # skewed, non-negative
    got = spread(s, measure).double().numpy()
    np.testing.assert_allclose(got, REFS[measure](s.numpy()), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("measure", MEASURES)
def test_spread_all_zero_is_zero_with_finite_gradient(measure: str) -> None:
    s = torch.zeros(3, 5, requires_grad=True)
    out = spread(s, measure)
    out.sum().backward()
    assert torch.equal(out, torch.zeros(3))
    assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize("dim", DIMS)
def test_saliency_matches_loops(dim: str) -> None:
    x = torch.randn(2, 3, 4, 5, 6)
    np.testing.assert_allclose(saliency(x, dim).double().numpy(), saliency_ref(x, dim), rtol=1e-6)


def test_saliency_accumulates_bf16_in_float32() -> None:
    x = torch.randn(2, 4, 3, 8, 8).bfloat16()
    s = saliency(x, "channel")
    assert s.dtype == torch.float32
    np.testing.assert_allclose(s.double().numpy(), saliency_ref(x.float(), "channel"), rtol=1e-6)


@pytest.mark.parametrize("bad", [torch.randn(2, 3, 4, 5), torch.randn(3, 4, 5, 6, 7, 1)])
def test_saliency_rejects_non_5d(bad: torch.Tensor) -> None:
    with pytest.raises(ValueError, match=r"\[N, C, T, H, W\]"):
        saliency(bad, "channel")


@pytest.mark.parametrize("measure", MEASURES)
@pytest.mark.parametrize("scale", [1e-3, 0.37, 250.0])
def test_penalty_invariant_to_rescaling_activations(measure: str, scale: float) -> None:
    """Multiplying c1's input by c > 0 (scaling the stem's weight and bias) leaves it unchanged."""
    torch.manual_seed(0)
    net = TinyNet()
    x = torch.randn(3, 3, 4, 8, 8)
    with ava_penalty(net, ["c1"], measure=measure) as ava:
        net(x)
    before = ava.penalty().item()
    with torch.no_grad():
        net.stem.weight.mul_(scale)
        net.stem.bias.mul_(scale)
    with ava_penalty(net, ["c1"], measure=measure) as ava:
        net(x)
    assert ava.penalty().item() == pytest.approx(before, rel=1e-5)
    assert before < -1e-3  # a real value, not a degenerate 0


@pytest.mark.parametrize("measure", MEASURES)
def test_penalty_bounded_and_extremes(measure: str) -> None:
    net = nn.Sequential(nn.Conv3d(3, 4, 1), nn.Identity(), nn.Conv3d(4, 2, 1))
    for seed in range(5):  # random inputs: inside [-1, 0]
        torch.manual_seed(seed)
        with ava_penalty(net, measure=measure) as ava:
            net(torch.randn(2, 3, 3, 4, 4) * 10 ** (seed - 2))
        assert -1.0 <= ava.penalty().item() <= 0.0
    with torch.no_grad():  # constant activations: no spread at all
        net[0].weight.zero_()
        net[0].bias.fill_(2.0)
    with ava_penalty(net, measure=measure) as ava:
        net(torch.randn(2, 3, 3, 4, 4))
    assert ava.penalty().item() == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():  # one channel, one frame, one position hold everything: -1
        net[0].bias.zero_()
    x = torch.zeros(2, 3, 3, 4, 4)
    x[:, :, 1, 2, 3] = 1.0
    with torch.no_grad():
        net[0].weight[0] = 1.0
    with ava_penalty(net, measure=measure) as ava:
        net(x)
    assert ava.penalty().item() == pytest.approx(-1.0, abs=1e-6)


@pytest.mark.parametrize(
    "dims,weights",
    [
        (DIMS, None),
        (("channel",), None),
        (("frame", "feature"), {"frame": 3.0}),
        (DIMS, [0.5, 0.0, 2.0]),
    ],
)
def test_recorder_penalty_and_gradient_match_reference(dims, weights) -> None:
    torch.manual_seed(1)
    net = TinyNet()
    x = torch.randn(3, 3, 4, 8, 8)
    with ava_penalty(net, dims=dims, dim_weights=weights) as ava:
        _, inputs = net(x, return_inputs=True)
    got = ava.penalty()
    w = dict(zip(dims, weights, strict=True)) if isinstance(weights, list) else (weights or {})
    w = {d: w.get(d, 1.0) for d in dims}
    w = {d: v for d, v in w.items() if v > 0}
    ref = penalty_torch_ref(inputs, w)
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    g_got = torch.autograd.grad(got, list(net.parameters()), retain_graph=True, allow_unused=True)
    g_ref = torch.autograd.grad(ref, list(net.parameters()), allow_unused=True)
    for a, b in zip(g_got, g_ref, strict=True):
        if b is None:
            assert a is None or torch.count_nonzero(a) == 0
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_recorder_collects_only_while_active_and_training() -> None:
    net = TinyNet()
    rec = AVARecorder(net).attach()
    x = torch.randn(2, 3, 4, 8, 8)
    net(x)  # attached, not started
    assert rec.num_records == 0
    rec.start()
    net(x)
    assert rec.num_records == 2  # c1 and c2, the stem is excluded
    net.eval()
    net(x)
    assert rec.num_records == 2
    rec.start()
    net(x)
    with pytest.raises(RuntimeError, match="training mode"):
        rec.penalty()
    rec.detach()
    assert no_hooks(net)


def test_context_manager_removes_hooks_even_on_error() -> None:
    net = TinyNet()
    with pytest.raises(ZeroDivisionError), ava_penalty(net):
        net(torch.randn(1, 3, 4, 8, 8))
        raise ZeroDivisionError
    assert no_hooks(net)


def test_module_deepcopies_and_pickles_with_hooks_and_records() -> None:
    net = TinyNet()
    rec = AVARecorder(net).attach()
    rec.start()
    net(torch.randn(2, 3, 4, 8, 8))  # records hold non-leaf tensors of the current graph
    clone = copy.deepcopy(net)
    restored = pickle.loads(pickle.dumps(net))
    for other in (clone, restored):
        other(torch.randn(2, 3, 4, 8, 8))  # the copies' hooks are inactive and separate
        torch.testing.assert_close(other.c1.weight, net.c1.weight)
    assert rec.num_records == 2
    rec.detach()


# ----------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"weight": -0.1}, ValueError, "weight must be finite and >= 0"),
        ({"weight": float("nan")}, ValueError, "weight must be finite"),
        ({"weight": "0.1"}, TypeError, "weight must be a float or a callable"),
        ({"dims": ()}, ValueError, "at least one"),
        ({"dims": ("time",)}, ValueError, "unknown dims"),
        ({"dims": ("frame", "frame")}, ValueError, "repeat"),
        ({"dim_weights": {"channel": -1.0}}, ValueError, ">= 0"),
        ({"dim_weights": [1.0, 2.0]}, ValueError, "has 2 entries"),
        ({"dims": ("frame",), "dim_weights": {"channel": 1.0}}, ValueError, "not in dims"),
        ({"dim_weights": {"frame": 0, "channel": 0, "feature": 0}}, ValueError, "all zero"),
        ({"warmup_steps": -5}, ValueError, "warmup_steps"),
        ({"warmup_steps": 2.5}, ValueError, "warmup_steps"),
        ({"weight": lambda s: 0.1, "warmup_steps": 10}, ValueError, "fold it into"),
        ({"measure": "variance"}, ValueError, "unknown measure"),
    ],
)
def test_callback_bad_arguments(kwargs, exc, match) -> None:
    with pytest.raises(exc, match=match):
        AVACallback(**kwargs)


@pytest.mark.parametrize(
    "kwargs,expected",
    [
        ({}, [0.0, DEFAULT_WEIGHT / 2, DEFAULT_WEIGHT, DEFAULT_WEIGHT]),
        ({"weight": 0.3, "warmup_steps": 0}, [0.3, 0.3, 0.3, 0.3]),
        ({"weight": lambda s: 0.01 * s}, [0.0, 0.01 * DEFAULT_WARMUP_STEPS / 2, 0.5, 1.0]),
    ],
)
def test_callback_default_schedule(kwargs, expected) -> None:
    """The default is the measured lambda with a linear warm-up; a callable gets no warm-up."""
    cb = AVACallback(**kwargs)
    steps = [0, DEFAULT_WARMUP_STEPS // 2, DEFAULT_WARMUP_STEPS, 100]
    assert [cb.weight_at(s) for s in steps] == pytest.approx(expected)


def test_recorder_bad_arguments() -> None:
    with pytest.raises(NoConv3dError):
        AVARecorder(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="matches no Conv3d"):
        AVARecorder(TinyNet(), layers="nothing_like_this")
    with pytest.raises(ValueError, match="unknown measure"):
        AVARecorder(TinyNet(), measure="std")
    with pytest.raises(ValueError, match="at least 2"):
        spread(torch.ones(3, 1))


@pytest.mark.parametrize(
    "module,kwargs,exc,match",
    [
        (LitNoConv, {}, NoConv3dError, "AVACallback: .*no nn.Conv3d"),
        (LitTiny, {"layers": "^zzz"}, ValueError, "matches no Conv3d"),
        (LitTiny, {"layers": ["net.stem"]}, ValueError, "stem layers run dense"),
    ],
)
def test_bad_model_or_selection_fails_at_fit_start(module, kwargs, exc, match) -> None:
    model = module()
    with pytest.raises(exc, match=match):
        make_trainer(max_steps=1, callbacks=[AVACallback(**kwargs)]).fit(
            model, DataLoader(make_data(), batch_size=4)
        )
    assert no_hooks(model) and "training_step" not in model.__dict__


def test_two_callbacks_rejected_by_lightning() -> None:
    with pytest.raises(RuntimeError, match="more than one stateful callback of type `AVACallback`"):
        make_trainer(max_steps=1, callbacks=[AVACallback(), AVACallback()])


def test_weight_schedules() -> None:
    const = AVACallback(weight=0.3, warmup_steps=0)
    assert [const.weight_at(s) for s in (0, 7, 10**6)] == [0.3, 0.3, 0.3]
    warm = AVACallback(weight=2.0, warmup_steps=4)
    assert [warm.weight_at(s) for s in range(6)] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.0]
    fn = AVACallback(weight=lambda s: 0.1 * s)
    assert fn.weight_at(3) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="returned -0.1"):
        AVACallback(weight=lambda s: -0.1).weight_at(0)


# ----------------------------------------------------------------------------- Lightning


def _by_hand(
    model: LitTiny, loader: DataLoader, weight: float, steps: int, accumulate: int, precision: str
) -> None:
    """The training Lightning should perform: SGD on (CE + weight * penalty) / accumulate."""
    opt = torch.optim.SGD(model.parameters(), lr=model.lr)
    scaler = torch.amp.GradScaler("cpu") if precision == "16-mixed" else None
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    batches = iter(loader)
    for _ in range(steps):
        for _ in range(accumulate):
            x, y = next(batches)
            ctx = torch.autocast("cpu", dtype=dtype) if dtype else contextlib.nullcontext()
            with ctx:
                logits, inputs = model.net(x, return_inputs=True)
                loss = F.cross_entropy(logits, y)
                loss = loss + weight * penalty_torch_ref(inputs, dict.fromkeys(DIMS, 1.0))
            loss = loss / accumulate
            (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad()


def _plugins(precision: str) -> dict:
    if precision == "16-mixed":  # Trainer(precision="16-mixed") falls back to bf16 on CPU
        return {"plugins": [MixedPrecision("16-mixed", "cpu")]}
    return {"precision": precision}


@pytest.mark.parametrize(
    "precision,ret,accumulate",
    [
        ("32-true", "tensor", 1),
        ("32-true", "tensor", 2),
        ("32-true", "dict", 2),
        ("bf16-mixed", "dict", 2),
        ("16-mixed", "tensor", 2),
    ],
)
def test_parameters_equal_training_on_loss_plus_weighted_penalty(precision, ret, accumulate):
    torch.manual_seed(0)
    model = LitTiny(ret=ret)
    start = copy.deepcopy(model)
    plain = copy.deepcopy(model)
    loader = DataLoader(make_data(8), batch_size=2)
    weight, steps = 0.7, 2
    ava = AVACallback(weight=weight, warmup_steps=0)
    trainer = make_trainer(
        max_steps=steps, accumulate_grad_batches=accumulate, callbacks=[ava], **_plugins(precision)
    )
    trainer.fit(model, loader)
    _by_hand(start, loader, weight, steps, accumulate, precision)
    _by_hand(plain, loader, 0.0, steps, accumulate, precision)
    # fp16: one rounding (2^-10 relative) apart between CPUs' fp16 kernels; seen 4.4e-4 on an
    # Intel Xeon with AVX-512, 2e-4 elsewhere; the penalty moves the weights by ~7e-2
    tol = {"32-true": 1e-6, "bf16-mixed": 2e-3, "16-mixed": 1e-3}[precision]
    moved = 0.0
    for p, q, r in zip(model.parameters(), start.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=tol)
        moved = max(moved, (q - r).abs().max().item())
    assert moved > 20 * tol  # the penalty really changed the training
    assert math.isfinite(trainer.callback_metrics["ava/penalty"].item())
    assert ava.step == steps
    assert no_hooks(model) and "training_step" not in model.__dict__


def test_logs_penalty_weight_and_spreads() -> None:
    ava = AVACallback(weight=0.5, warmup_steps=4)
    trainer = make_trainer(max_steps=3, callbacks=[ava], precision="bf16-mixed")
    trainer.fit(LitTiny(), DataLoader(make_data(), batch_size=2))
    m = trainer.callback_metrics
    for dim in DIMS:
        assert 0.0 <= m[f"ava/spread_{dim}"].item() <= 1.0
    assert -1.0 <= m["ava/penalty"].item() <= 0.0
    assert m["ava/weight"].item() == pytest.approx(0.5 * 2 / 4)  # logged at step 2


def test_manual_optimization_documented_path_matches_by_hand() -> None:
    torch.manual_seed(0)
    model = LitManual(add_term=True)
    start = copy.deepcopy(model)
    loader = DataLoader(make_data(8), batch_size=2)
    make_trainer(max_steps=3, callbacks=[AVACallback(weight=0.7, warmup_steps=0)]).fit(
        model, loader
    )
    _by_hand(start, loader, 0.7, 3, 1, "32-true")
    for p, q in zip(model.parameters(), start.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_manual_optimization_without_the_call_fails_loudly() -> None:
    model = LitManual(add_term=False)
    with pytest.raises(RuntimeError, match="manual optimization.*ava_loss_term"):
        make_trainer(max_steps=2, callbacks=[AVACallback()]).fit(
            model, DataLoader(make_data(), batch_size=2)
        )
    assert no_hooks(model) and "training_step" not in model.__dict__


def test_explicit_term_under_automatic_optimization_fails_loudly() -> None:
    with pytest.raises(RuntimeError, match="counted twice"):
        make_trainer(max_steps=1, callbacks=[AVACallback()]).fit(
            LitCallsTermInAuto(), DataLoader(make_data(), batch_size=2)
        )


def test_hooks_and_training_step_restored_after_exception() -> None:
    model = LitTiny(fail_at=1)
    with pytest.raises(ValueError, match="boom"):
        make_trainer(max_steps=3, callbacks=[AVACallback()]).fit(
            model, DataLoader(make_data(), batch_size=2)
        )
    assert no_hooks(model) and "training_step" not in model.__dict__
    # the user's own method is back and still works
    model.fail_at = None
    assert model.training_step(next(iter(DataLoader(make_data(), batch_size=2))), 0).ndim == 0


class _CopyProbe(L.Callback):
    def __init__(self) -> None:
        self.checked = False

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if self.checked:
            return
        assert pl_module.net.c1._forward_pre_hooks  # attached right now
        clone = copy.deepcopy(pl_module)
        restored = pickle.loads(pickle.dumps(pl_module))
        x = torch.randn(2, 3, 4, 8, 8)
        for other in (clone, restored):
            torch.testing.assert_close(other.net(x), pl_module.net(x))
        self.checked = True


def test_module_deepcopies_and_pickles_while_callback_attached() -> None:
    probe = _CopyProbe()
    make_trainer(max_steps=2, callbacks=[AVACallback(), probe]).fit(
        LitTiny(), DataLoader(make_data(), batch_size=2)
    )
    assert probe.checked


class _WeightProbe(L.Callback):
    def __init__(self) -> None:
        self.weights: list[float] = []

    def on_train_batch_end(self, trainer, *args) -> None:
        self.weights.append(round(trainer.callback_metrics["ava/weight"].item(), 6))


def test_resume_from_checkpoint_continues_warmup(tmp_path) -> None:
    loader = DataLoader(make_data(8), batch_size=2)
    probe = _WeightProbe()
    trainer = make_trainer(max_steps=3, callbacks=[AVACallback(weight=1.0, warmup_steps=10), probe])
    trainer.fit(LitTiny(), loader)
    ckpt = tmp_path / "a.ckpt"
    trainer.save_checkpoint(ckpt)
    assert probe.weights == [0.0, 0.1, 0.2]
    assert torch.load(ckpt, weights_only=False)["callbacks"]["AVACallback"] == {
        "step": 3,
        "skipped_batches": 0,
    }

    probe = _WeightProbe()
    make_trainer(max_steps=6, callbacks=[AVACallback(weight=1.0, warmup_steps=10), probe]).fit(
        LitTiny(), loader, ckpt_path=ckpt
    )
    assert probe.weights == [0.3, 0.4, 0.5]


def test_ava_added_when_resuming_a_dense_checkpoint_starts_its_warmup(tmp_path) -> None:
    loader = DataLoader(make_data(8), batch_size=2)
    trainer = make_trainer(max_steps=3)
    trainer.fit(LitTiny(), loader)
    ckpt = tmp_path / "dense.ckpt"
    trainer.save_checkpoint(ckpt)
    probe = _WeightProbe()
    make_trainer(max_steps=5, callbacks=[AVACallback(weight=1.0, warmup_steps=10), probe]).fit(
        LitTiny(), loader, ckpt_path=ckpt
    )
    assert probe.weights == [0.0, 0.1]  # global_step is 3 and 4, AVA's own step 0 and 1


# ----------------------------------------------------------------------------- package models


def test_unmodified_video_classifier_on_synthetic_data() -> None:
    """The baseline module trains with AVA on tiny_c3d (stem excluded) and comes back unchanged."""
    from lightning_dance.classifier import VideoClassifier
    from lightning_dance.data import SyntheticVideoDataModule

    torch.manual_seed(0)
    model = VideoClassifier("tiny_c3d", num_classes=3, model_kwargs={"width": 0.5})
    dm = SyntheticVideoDataModule(
        num_classes=3, frames=4, size=16, train_size=4, val_size=2, test_size=0, batch_size=2
    )
    ava = AVACallback(weight=0.5, warmup_steps=0)
    trainer = make_trainer(max_steps=2, callbacks=[ava])
    trainer.fit(model, datamodule=dm)
    assert -1.0 < trainer.callback_metrics["ava/penalty"].item() < 0.0
    assert {"ava/spread_frame", "ava/spread_channel", "ava/spread_feature"} <= set(
        trainer.callback_metrics
    )
    assert ava.step == 2
    assert no_hooks(model) and "training_step" not in model.__dict__
    assert type(model).training_step is VideoClassifier.training_step


def test_recorder_on_residual_depthwise_net(small_net: nn.Module, clip: torch.Tensor) -> None:
    """Depthwise, strided and residual-branch inputs are recorded (the stem's is not) and match
    a reference computed from inputs captured by plain hooks; gradients reach the stem."""
    small_net.train()
    captured: list[torch.Tensor] = []
    names = ["conv_a.0", "res.0", "res.3", "down"]
    modules = dict(small_net.named_modules())
    handles = [
        modules[n].register_forward_pre_hook(lambda m, a: captured.append(a[0])) for n in names
    ]
    with ava_penalty(small_net) as ava:
        small_net(clip)
    for h in handles:
        h.remove()
    assert sorted(ava.layers) == sorted(names) and ava.num_records == 4
    pen = ava.penalty()
    ref = penalty_torch_ref(captured, dict.fromkeys(DIMS, 1.0))
    assert pen.item() == pytest.approx(ref.item(), rel=1e-5)
    pen.backward()
    assert small_net.stem[0].weight.grad.abs().sum() > 0


def test_benchmark_quick_mode_runs(tmp_path) -> None:
    """benchmarks/ava_benchmark.py's core on a few tiny clips: the protocol runs end to end."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "ava_benchmark.py"
    spec = importlib.util.spec_from_file_location("ava_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = bench.parse_args(
        ["--quick", "--train-size", "16", "--val-size", "8", "--fractions", "0.5",
         "--dense-cache", str(tmp_path / "dense.pt")]
    )  # fmt: skip
    result = bench.run(args)
    rows = result["results"]
    assert list(rows) == ["dense", "finetune", "ava gini λ=2"]
    for r in rows.values():
        assert 0 <= r["acc"] <= 100
        assert set(r["ablation"]) == set(DIMS) and 0 <= r["variability"]["gini_channel"] <= 1
    assert "acc_cost_pp" in rows["ava gini λ=2"]
    assert (tmp_path / "dense.pt").exists()
    assert bench.run(args)["fit_seconds"]["dense"] == 0.0  # the cached dense start is reused
    assert "| finetune |" in bench.format_table(result)
