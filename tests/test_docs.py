"""The docs site builds with ``mkdocs build --strict`` (how CI checks it: CI runs pytest)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="the docs extra (pip install -e '.[docs]') is missing")
    pytest.importorskip("mkdocstrings_handlers.python", reason="mkdocstrings[python] is missing")
    site = tmp_path / "site"
    run = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert run.returncode == 0, run.stderr[-4000:]
    # every page of the nav was written, the API pages with their rendered docstrings
    for page in ("index.html", "cli/index.html", "limits/index.html", "budgets/index.html"):
        assert (site / page).is_file(), page
    api = (site / "api" / "index.html").read_text()
    assert 'id="lightning_dance.DANCEWrapper"' in api
    assert "&gt;&gt;&gt;" in api and 'class="highlight"' in api  # examples render as code
    for tier in ("policies", "execution", "export", "data", "models"):
        assert f'id="lightning_dance.{tier}"' in (site / "api" / tier / "index.html").read_text()
    shutil.rmtree(site)


def test_house_docstrings_read_as_google_style():
    sys.path.insert(0, str(ROOT))
    try:
        from docs_tools.griffe_docstrings import rewrite
    finally:
        sys.path.remove(str(ROOT))
    text = "Summary.\n\nArgs:\n    a, b: shared\n    c: own\n\nExample:\n    >>> 1\n    1\n"
    assert rewrite(text) == (
        "Summary.\n\nArgs:\n    a: shared\n    b: shared\n    c: own\n\nExamples:\n    >>> 1\n    1"
    )
