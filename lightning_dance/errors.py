"""The base class of every error lightning-dance raises on purpose.

Each project error also keeps the built-in base it always had (``ValueError`` for bad inputs,
``RuntimeError`` for failures while running), so existing ``except ValueError`` clauses still
catch it, while ``except DanceError`` catches all of them.

Example:
    >>> from lightning_dance.errors import DanceError
    >>> from lightning_dance.layers import NoConv3dError
    >>> issubclass(NoConv3dError, DanceError), issubclass(NoConv3dError, ValueError)
    (True, True)
"""

from __future__ import annotations

__all__ = ["DanceError"]


class DanceError(Exception):
    """Base class of the errors lightning-dance raises (catch it to handle any of them)."""
