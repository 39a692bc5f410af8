"""The confidence cascade of ``benchmarks/cascade.py``: its threshold meets the mean cost."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "cascade.py"


@pytest.fixture(scope="module")
def cascade():
    spec = importlib.util.spec_from_file_location("cascade", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("pareto", None)


def _brute_force(conf, low, high, target):
    """The most clips escalated (least confident first) whose mean cost is within target."""
    best = 0
    for k in range(len(conf) + 1):
        up = torch.zeros(len(conf), dtype=torch.bool)
        up[conf.argsort()[:k]] = True
        if float((low + up * high).mean()) <= target + 1e-9:
            best = k
    return best


@pytest.mark.parametrize("seed", range(20))
def test_threshold_escalates_the_most_clips_the_target_allows(cascade, seed):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 12, (), generator=g))
    conf = torch.rand(n, generator=g)
    low = 0.1 + 0.3 * torch.rand(n, generator=g)  # per-clip costs vary (a dynamic stage)
    high = 0.3 + 0.7 * torch.rand(n, generator=g)
    target = float(torch.rand((), generator=g)) * 1.5
    tau = cascade.threshold_for(conf, low, high, target)
    up = conf < tau
    assert int(up.sum()) == _brute_force(conf, low, high, target)
    if up.any():
        assert float((low + up * high).mean()) <= target + 1e-6


def test_threshold_edges(cascade):
    conf = torch.tensor([0.3, 0.9, 0.6])
    ones = torch.ones(3)
    assert cascade.threshold_for(conf, 0.5 * ones, ones, 0.4) == float("-inf")  # cheap is over
    assert cascade.threshold_for(-conf - 5, 0.5 * ones, ones, 0.4) == float("-inf")  # any score
    assert cascade.threshold_for(conf, 0.5 * ones, ones, 1.5) == float("inf")  # all escalate
