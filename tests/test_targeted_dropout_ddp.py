"""TargetedDropoutCallback under DDP: 2 CPU processes on gloo.

The training runs in a subprocess executing this file (``__main__`` below; see ``ddp_utils``).
Each rank drops the units the attention ranks lowest on its own clips (the probe of
``test_attention.KnownNet`` sees an input with known attention: channels of magnitude 1-4 and
the blocks of weight 1-2 are the candidates), DDP averages the gradients, and both ranks must
end with the same weights, their hooks removed and the step count of the whole fit.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from ddp_utils import ddp_trainer, run_ddp_script, save_rank  # noqa: E402
from test_attention import C, KnownNet, _loader  # noqa: E402

STEPS = 4


def _train_ddp(out: Path) -> None:
    from lightning_dance.targeted_dropout import TargetedDropoutCallback

    torch.manual_seed(0)
    net = KnownNet()
    cb = TargetedDropoutCallback(rate=1.0, fraction=0.5, grid=2)
    trainer = ddp_trainer(max_steps=STEPS, callbacks=[cb])
    trainer.fit(net, _loader(64))
    state = {k: v.detach().clone() for k, v in net.state_dict().items() if k != "known"}
    state["step"] = cb.step
    state["hooks_left"] = sum(len(m._forward_pre_hooks) for m in net.modules())
    state["seen"] = torch.cat(net.seen)
    save_rank(trainer, state, out)


@pytest.mark.slow
def test_ddp_ranks_drop_the_low_ranked_units_and_agree(tmp_path: Path) -> None:
    r0, r1 = run_ddp_script(__file__, tmp_path)
    for r in (r0, r1):
        assert r["hooks_left"] == 0 and r["step"] == STEPS
        x = r["seen"]  # what reached the probe in training: rate 1 drops every candidate
        assert x.shape[0] == STEPS * 8  # each rank: its half of the clips, 8 a step
        kept = x.abs().sum(dim=(2, 3, 4)) > 0  # [N, C]
        assert not kept[:, : C // 2].any() and kept[:, C // 2 :].all()
    for name in r0:
        if name not in ("step", "hooks_left", "seen"):
            torch.testing.assert_close(r0[name], r1[name], rtol=0, atol=0)  # ranks agree


if __name__ == "__main__":
    _train_ddp(Path(sys.argv[1]))
