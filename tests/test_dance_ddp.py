"""DANCEWrapper under DDP: 2 CPU processes on gloo train the controller one process trains on
the same global batch.

The training runs in a subprocess executing this file (``__main__`` below; see ``ddp_utils``).
8 clips, 2 ranks with 4 clips each (Lightning's DistributedSampler, unshuffled): every optimizer
step sees the whole data set, and DDP averages the ranks' gradients. That average equals the
gradient of one process on the batch of 8 when the loss is a mean over clips: so the task loss
only (``budget_weight=bound_weight=0``: ``(mean ratio - budget)^2`` is not a mean over clips)
and no gate noise (``noise_anneal=0``: a rank draws noise for its 4 clips, one process for 8).
The straight-through gates still carry the task loss's gradient to every controller head.
Tolerance: ``atol=1e-5`` on the controller after 3 AdamW steps (float32 sums in another order;
measured 0 to a few 1e-7).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))
from conftest import SmallNet  # noqa: E402
from ddp_utils import ddp_trainer, run_ddp_script, save_rank  # noqa: E402
from test_ava import make_trainer  # noqa: E402

from lightning_dance.wrapper import DANCEWrapper  # noqa: E402

STEPS = 3


def _wrapper() -> DANCEWrapper:
    torch.manual_seed(0)
    return DANCEWrapper(
        SmallNet(), budget=0.5, lr=1e-2, noise_anneal=0.0, budget_weight=0.0, bound_weight=0.0
    )


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(8, 3, 4, 16, 16, generator=g), torch.arange(8) % 4)


def _controller(wrapper: DANCEWrapper) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in wrapper.pruner.controller.state_dict().items()}


def _train_ddp(out: Path) -> None:
    import lightning_dance

    assert Path(lightning_dance.__file__).parents[1] == Path(__file__).resolve().parents[1]
    wrapper = _wrapper()
    trainer = ddp_trainer(max_steps=STEPS)
    trainer.fit(wrapper, DataLoader(_data(), batch_size=4))
    save_rank(trainer, _controller(wrapper), out)


@pytest.mark.slow
def test_ddp_two_cpu_processes_agree_with_one_process_on_the_global_batch(tmp_path: Path):
    r0, r1 = run_ddp_script(__file__, tmp_path)
    start = _controller(_wrapper())
    single = _wrapper()
    make_trainer(max_steps=STEPS).fit(single, DataLoader(_data(), batch_size=8))
    ref = _controller(single)
    moved, diff = 0.0, 0.0
    for name, p in ref.items():
        torch.testing.assert_close(r0[name], r1[name], rtol=0, atol=0)  # ranks agree exactly
        torch.testing.assert_close(r0[name], p, rtol=0, atol=1e-5, msg=name)
        diff = max(diff, (r0[name] - p).abs().max().item())
        moved = max(moved, (p - start[name]).abs().max().item())
    assert moved > 1e-3, moved  # the controller trained
    # the tolerance discriminates: one process on rank 0's half of the data lands elsewhere
    half = _wrapper()
    rank0_clips = TensorDataset(*(t[::2] for t in _data().tensors))
    make_trainer(max_steps=STEPS).fit(half, DataLoader(rank0_clips, batch_size=4))
    assert max((v - r0[k]).abs().max().item() for k, v in _controller(half).items()) > 1e-4
    print(f"max |DDP - single| = {diff:.2e}, max |moved| = {moved:.2e}")


if __name__ == "__main__":
    _train_ddp(Path(sys.argv[1]))
