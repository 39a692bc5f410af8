"""oneDNN's cache of compiled convolution kernels, sized for per-clip shapes.

PyTorch runs CPU convolutions through oneDNN, which compiles a kernel (a "primitive") for each
convolution shape it meets and keeps the last 1024 (``ONEDNN_PRIMITIVE_CACHE_CAPACITY``). A
pruner whose keep counts vary per clip (``threshold``, ``attention``) gives each Conv3d many
shapes: over a stream of clips a model soon uses more than 1024, and then every call compiles
its kernels again. Measured (``docs/benchmarks.md``, Intel Xeon, 2 threads, 8x112x112): the
benchmark's per-clip DANCE models ran at 0.53-0.58x of dense with the default capacity and at
1.02-1.15x with 16384, static models unchanged; 1600 distinct small convs took 0.6 s a sweep
against 0.13 s once cached. A cached kernel costs about 25 KB (1600 added 39 MB).

Importing ``lightning_dance`` therefore raises oneDNN's default to :data:`CAPACITY` (at most
about 200 MB) unless the variable is set already. oneDNN reads it when it compiles its first
kernel in the process: import ``lightning_dance`` before running any model, or set the variable
in the environment yourself (then it is left as it is).

Example:
    >>> import os
    >>> import lightning_dance
    >>> capacity() == int(os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"])
    True
"""

from __future__ import annotations

import os

__all__ = ["CAPACITY", "capacity", "raise_default"]

#: the cache size set at import unless ``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` is set
CAPACITY = 8192
_VARIABLE = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"


def raise_default(size: int = CAPACITY) -> int:
    """Set ``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` to ``size`` unless it is set; returns the value."""
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    return int(os.environ.setdefault(_VARIABLE, str(size)))


def capacity() -> int | None:
    """The capacity the environment asks oneDNN for (``None``: oneDNN's default, 1024)."""
    value = os.environ.get(_VARIABLE)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None
