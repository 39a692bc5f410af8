"""The example notebooks (``examples/*.ipynb``) are valid, output-free and run end to end.

Each notebook is executed as a notebook: cell by cell in a Jupyter kernel (``nbclient``, the
``python3`` kernel of this interpreter; the test checks the kernel's ``sys.executable``), with
``LIGHTNING_DANCE_QUICK=1`` (tiny sizes), one thread, an empty working directory and a private
temporary folder. The notebooks end with ``assert``s on their results (compact output equals the
masked model's, MAC ratio below 1, reloaded exports match, the corrupt video is named, the demo's
files exist) and a final ``notebook NN: ok`` line; the test also checks that they leave no files
behind. The stored notebooks are never written to: outputs stay out of git.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))
CELL_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


def test_examples_exist():
    assert len(NOTEBOOKS) >= 3, f"expected the example notebooks in {EXAMPLES}"


def _source(cell: dict) -> str:
    source = cell["source"]
    return source if isinstance(source, str) else "".join(source)


def load_notebook(path: Path) -> dict:
    """The notebook's JSON, checked against the nbformat-4 structure (no outputs stored)."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    assert nb["nbformat"] == 4 and isinstance(nb["nbformat_minor"], int)
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    assert nb["metadata"]["kernelspec"]["language"] == "python"
    assert isinstance(nb["cells"], list) and nb["cells"]
    ids = []
    for i, cell in enumerate(nb["cells"]):
        where = f"{path.name} cell {i}"
        assert cell["cell_type"] in ("code", "markdown", "raw"), where
        assert isinstance(cell["metadata"], dict), where
        source = cell["source"]
        assert isinstance(source, str) or all(isinstance(s, str) for s in source), where
        if nb["nbformat_minor"] >= 5:
            assert CELL_ID.match(cell["id"]), where
            ids.append(cell["id"])
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [], f"{where}: outputs are stored"
            assert cell["execution_count"] is None, f"{where}: execution count is stored"
            assert not any(
                line.lstrip().startswith(("!", "%")) for line in _source(cell).splitlines()
            ), f"{where}: IPython magics cannot run as a script"
        else:
            assert "outputs" not in cell and "execution_count" not in cell, where
    assert len(ids) == len(set(ids)), f"{path.name}: duplicate cell ids"
    return nb


def notebook_script(nb: dict) -> str:
    return "\n\n".join(_source(c) for c in nb["cells"] if c["cell_type"] == "code") + "\n"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_structure(path: Path):
    script = notebook_script(load_notebook(path))
    compile(script, str(path), "exec")  # a syntax error is reported with the notebook's name
    assert "LIGHTNING_DANCE_QUICK" in script, "the notebook must offer the quick sizes"
    assert f'print("notebook {path.name[:2]}: ok")' in script, "the last cell confirms its checks"


def _outputs_text(nb) -> str:
    """The text the executed notebook printed (stdout / stderr streams and plain-text results)."""
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                parts.append(out.get("text", ""))
            elif "data" in out and "text/plain" in out["data"]:
                parts.append(out["data"]["text/plain"])
    return "".join(parts)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path: Path, tmp_path: Path, monkeypatch):
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")

    load_notebook(path)  # the stored file: structure checked, no outputs
    nb = nbformat.read(path, as_version=4)
    # one more cell, in memory only: which interpreter the kernel runs
    nb.cells.append(nbformat.v4.new_code_cell(
        "import sys, lightning_dance\nprint('kernel:', sys.executable, lightning_dance.__file__)"
    ))  # fmt: skip
    number = path.name[:2]
    cwd, tmp = tmp_path / "cwd", tmp_path / "tmp"
    cwd.mkdir()
    tmp.mkdir()
    # the kernel inherits this environment; it imports the package of this checkout (its
    # working directory is elsewhere, and an installed copy may be another checkout's)
    for key, value in dict(LIGHTNING_DANCE_QUICK="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                           TMPDIR=str(tmp)).items():  # fmt: skip
        monkeypatch.setenv(key, value)
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    )
    client = nbclient.NotebookClient(
        nb,
        kernel_name="python3",  # jupyter_client runs its "python" as sys.executable
        timeout=600,
        resources={"metadata": {"path": str(cwd)}},
    )
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as exc:
        pytest.fail(f"{path.name} failed in a cell:\n{str(exc)[-6000:]}")
    printed = _outputs_text(nb)
    tail = f"\n--- outputs ---\n{printed[-4000:]}"
    package = ROOT / "lightning_dance" / "__init__.py"
    assert f"kernel: {sys.executable} {package}" in printed, f"another interpreter or package{tail}"
    assert f"notebook {number}: ok" in printed, tail
    assert not list(cwd.iterdir()), f"{path.name} left files in its working directory{tail}"
    # libraries put their own caches and markers there (torch: torchinductor_<user>; the ONNX
    # export or runtime: a hidden .ses file): only what the notebook made must be gone
    left = [p.name for p in tmp.iterdir() if not p.name.startswith((".", "torchinductor_"))]
    assert not left, f"{path.name} left temporary files behind: {left}{tail}"


def test_notebooks_match_their_generator():
    """``examples/make_notebooks.py`` is the source: the stored notebooks are what it writes."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_notebooks", EXAMPLES / "make_notebooks.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert sorted(f"{stem}.ipynb" for stem in gen.NOTEBOOKS) == [p.name for p in NOTEBOOKS]
    for stem, cells in gen.NOTEBOOKS.items():
        stored = json.loads((EXAMPLES / f"{stem}.ipynb").read_text(encoding="utf-8"))
        assert stored == gen.notebook(stem, cells), f"{stem}.ipynb: rerun make_notebooks.py"
