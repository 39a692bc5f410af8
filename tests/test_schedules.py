import itertools

import pytest

from lightning_dance.schedules import (
    check_schedules,
    noise_scale,
    training_progress,
    warmup_budget,
)


class FakeTrainer:
    def __init__(self, total, step):
        self.estimated_stepping_batches, self.global_step = total, step


def test_progress_is_steps_done_over_the_trainers_total():
    assert training_progress(FakeTrainer(40, 10)) == 0.25
    assert training_progress(FakeTrainer(40, 50)) == 1.0  # capped
    assert training_progress(FakeTrainer(40, 10), step=30) == 0.75
    assert training_progress(FakeTrainer(float("inf"), 10)) is None
    assert training_progress(FakeTrainer(0, 0)) is None
    assert training_progress(None) is None


def test_noise_falls_linearly_to_zero_over_the_anneal_fraction():
    assert [noise_scale(0.5, p) for p in (0.0, 0.25, 0.5, 0.9)] == [1.0, 0.5, 0.0, 0.0]
    assert noise_scale(0.5, None) == 1.0  # unknown progress: full noise
    assert noise_scale(0.0, 0.0) == 0.0  # no noise at all


def test_warmup_budget_is_the_cubic_schedule():
    b, w = 0.35, 0.3
    for p in (0.0, 0.1, 0.2, 0.29):
        assert warmup_budget(b, w, p) == pytest.approx(b + (1 - b) * (1 - p / w) ** 3)
    assert warmup_budget(b, w, 0.0) == 1.0
    assert warmup_budget(b, w, 0.3) == warmup_budget(b, w, 0.9) == b
    assert warmup_budget(b, 0.0, 0.0) == warmup_budget(b, w, None) == b
    steps = [warmup_budget(b, w, i / 100) for i in range(40)]
    assert all(x >= y for x, y in itertools.pairwise(steps))  # never rises


GOOD = dict(noise_anneal=0.7, budget_warmup=0.3, calibrate_every=0, budget_feedback=0.0,
            lr_schedule="cosine", budget_range=None)  # fmt: skip


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ({"noise_anneal": 1.5}, "noise_anneal must be in"),
        ({"budget_warmup": 1.0}, "budget_warmup must be in"),
        ({"calibrate_every": True}, "calibrate_every must be an int"),
        ({"calibrate_every": -1}, "calibrate_every must be an int"),
        ({"budget_feedback": -0.1}, "budget_feedback must be a number"),
        ({"lr_schedule": "step"}, "lr_schedule must be one of"),
        ({"budget_range": (0.3, 0.6)}, "budget_warmup schedules one target budget"),
        ({"budget_warmup": 0.0, "calibrate_every": 5, "budget_range": (0.3, 0.6)},
         "calibrate_every calibrates"),
        ({"budget_warmup": 0.0, "budget_feedback": 1.0, "budget_range": (0.3, 0.6)},
         "budget_feedback steers"),
    ],
)
def test_bad_schedules_are_named(bad, match):
    check_schedules(**GOOD)
    with pytest.raises(ValueError, match=match):
        check_schedules(**{**GOOD, **bad})
