"""oneDNN's kernel cache is raised at import, and a user's own setting is kept."""

import os
import subprocess
import sys

import pytest

from lightning_dance import kernel_cache

_SHOW = "import os, lightning_dance; print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'])"


@pytest.mark.parametrize("preset,expected", [(None, str(kernel_cache.CAPACITY)), ("2048", "2048")])
def test_import_raises_the_default_and_keeps_a_users_value(preset, expected):
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    if preset is not None:
        env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = preset
    out = subprocess.run([sys.executable, "-c", _SHOW], env=env, capture_output=True, text=True,
                         check=True, timeout=300)  # fmt: skip
    assert out.stdout.strip() == expected


def test_capacity_reads_the_environment(monkeypatch):
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    assert kernel_cache.capacity() is None
    assert kernel_cache.raise_default(4096) == 4096 == kernel_cache.capacity()
    assert kernel_cache.raise_default(16) == 4096  # already set: kept
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "lots")
    assert kernel_cache.capacity() is None
    with pytest.raises(ValueError, match="size"):
        kernel_cache.raise_default(-1)
