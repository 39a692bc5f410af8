"""The public API: every name in ``lightning_dance.__all__`` resolves, lazily where documented."""

import importlib
import subprocess
import sys

import pytest

import lightning_dance


@pytest.mark.parametrize("name", lightning_dance.__all__)
def test_public_names_resolve(name):
    assert getattr(lightning_dance, name) is not None


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
