"""AVACallback under DDP: 2 CPU processes on gloo train the same parameters as a by-hand run.

The training runs in a subprocess executing this file (``__main__`` below; see ``ddp_utils``).
With 8 clips, 2 ranks and 4 clips per rank, each optimizer step sees the whole data set; the
mean of the ranks' gradients of ``CE + weight * penalty`` (both means over samples) equals the
gradient on the full batch, which the test computes by hand in one process.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
from ddp_utils import ddp_trainer, run_ddp_script, save_rank  # noqa: E402
from test_ava import DIMS, LitTiny, make_data, penalty_torch_ref  # noqa: E402

WEIGHT, STEPS = 0.7, 3


def _train_ddp(out: Path) -> None:
    from lightning_dance.ava_callback import AVACallback

    torch.manual_seed(0)
    model = LitTiny(lr=0.5)
    trainer = ddp_trainer(max_steps=STEPS, callbacks=[AVACallback(weight=WEIGHT, warmup_steps=0)])
    trainer.fit(model, DataLoader(make_data(8), batch_size=4))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state["penalty"] = trainer.callback_metrics["ava/penalty"]
    state["hooks_left"] = sum(len(m._forward_pre_hooks) for m in model.modules())
    state["wrapped"] = "training_step" in model.__dict__
    save_rank(trainer, state, out)


@pytest.mark.slow
def test_ddp_two_cpu_processes_agree_with_full_batch_by_hand(tmp_path: Path) -> None:
    r0, r1 = run_ddp_script(__file__, tmp_path)
    for r in (r0, r1):
        assert r["hooks_left"] == 0 and not r["wrapped"]
        assert -1.0 <= r["penalty"].item() < 0.0

    torch.manual_seed(0)
    ref = LitTiny(lr=0.5)
    plain = copy.deepcopy(ref)
    x, y = make_data(8).tensors
    for model, weight in ((ref, WEIGHT), (plain, 0.0)):
        opt = torch.optim.SGD(model.parameters(), lr=model.lr)
        for _ in range(STEPS):
            logits, inputs = model.net(x, return_inputs=True)
            pen = penalty_torch_ref(inputs, dict.fromkeys(DIMS, 1.0))
            (F.cross_entropy(logits, y) + weight * pen).backward()
            opt.step()
            opt.zero_grad()
    moved = 0.0
    for name, p in ref.state_dict().items():
        torch.testing.assert_close(r0[name], r1[name], rtol=0, atol=0)  # ranks agree exactly
        torch.testing.assert_close(r0[name], p, rtol=0, atol=1e-5)
        moved = max(moved, (p - plain.state_dict()[name]).abs().max().item())
    assert moved > 1e-3  # the penalty changed what DDP trained


if __name__ == "__main__":
    _train_ddp(Path(sys.argv[1]))
