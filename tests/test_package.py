"""The public API: every name in ``lightning_dance.__all__`` resolves, lazily where documented."""

import importlib
import subprocess
import sys

import pytest

import lightning_dance


@pytest.mark.parametrize("name", lightning_dance.__all__)
def test_public_names_resolve(name):
    assert getattr(lightning_dance, name) is not None


def test_the_top_level_is_small_and_moved_names_warn():
    """About a dozen names for the steps users take; the names that moved to their modules
    still resolve, with a warning that names the module to import from."""
    assert len(lightning_dance.__all__) <= 16
    from lightning_dance.ava import ava_penalty
    from lightning_dance.layers import NoConv3dError

    for name, obj, module in [("ava_penalty", ava_penalty, "lightning_dance.ava"),
                              ("NoConv3dError", NoConv3dError, "lightning_dance.layers")]:  # fmt: skip
        with pytest.warns(DeprecationWarning, match=f"import it from {module}"):
            assert getattr(lightning_dance, name) is obj
        assert name not in lightning_dance.__all__


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_name"):
        lightning_dance.no_such_name  # noqa: B018


def test_import_does_not_load_export_or_print_warnings():
    code = "import sys, lightning_dance; print('lightning_dance.export' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-W", "always", "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"
    assert "Warning" not in out.stderr, out.stderr


def test_version_matches_the_distribution():
    meta = importlib.metadata.version("lightning-dance")
    assert lightning_dance.__version__ == meta
