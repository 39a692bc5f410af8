"""Video folders as sample lists: class folders, class and split list files, stratified splits.

Layout ``root/<class_name>/<video>.<ext>``; a sample is ``(path, label)``.

Example:
    >>> import os, tempfile
    >>> root = tempfile.mkdtemp()
    >>> for f in ("b/x.mp4", "a/y.avi", "a/.hidden.mp4", "a/notes.txt"):
    ...     os.makedirs(os.path.join(root, os.path.dirname(f)), exist_ok=True)
    ...     open(os.path.join(root, f), "w").close()
    >>> classes, samples = scan_video_folder(root)
    >>> classes, [(os.path.relpath(p, root), y) for p, y in samples]
    (['a', 'b'], [('a/y.avi', 0), ('b/x.mp4', 1)])
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "VIDEO_EXTENSIONS",
    "Sample",
    "check_extensions",
    "find_classes",
    "read_class_list",
    "read_split_list",
    "scan_video_folder",
    "split_by_class",
]

VIDEO_EXTENSIONS: tuple[str, ...] = (
    ".mp4",
    ".avi",
    ".mkv",
    ".webm",
    ".mov",
    ".m4v",
    ".mpg",
    ".mpeg",
    ".ogv",
    ".flv",
    ".wmv",
    ".3gp",
)
Sample = tuple[str, int]


def check_extensions(extensions: Sequence[str]) -> tuple[str, ...]:
    """``extensions`` lower-cased with a leading dot (``("MP4",)`` -> ``(".mp4",)``)."""
    if isinstance(extensions, str) or not extensions:
        raise ValueError(
            f"extensions must be a non-empty sequence like ('.mp4',), got {extensions!r}"
        )
    return tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)


def find_classes(directory: str | Path) -> list[str]:
    """Sorted names of the (non-hidden) class folders in ``directory``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"video folder {str(directory)!r} does not exist or is not a folder"
        )
    entries = [e for e in os.scandir(directory) if not e.name.startswith(".")]
    classes = sorted(e.name for e in entries if e.is_dir())
    if not classes:
        loose = [e.name for e in entries if e.is_file()]
        hint = (
            f" (it holds {len(loose)} file(s) directly, e.g. {loose[0]!r}: videos must sit in one "
            "folder per class, root/<class_name>/<video>)"
            if loose
            else " (it is empty)"
        )
        raise FileNotFoundError(f"no class folders in {str(directory)!r}{hint}")
    return classes


def read_class_list(path: str | Path) -> list[str]:
    """Class names from a file with one ``[index] name`` per line, ordered by index if given.

    UCF101's ``classInd.txt`` (``1 ApplyEyeMakeup``...) reads as its 101 names in that order.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class list {str(path)!r} does not exist")
    rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
    try:
        keyed = [(int(r[0]) if len(r) > 1 else n, r[-1]) for n, r in enumerate(rows)]
    except ValueError as err:
        raise ValueError(
            f"class list {str(path)!r}: lines must be '[index] name' ({err})"
        ) from None
    return [name for _, name in sorted(keyed)]


def scan_video_folder(
    directory: str | Path,
    classes: Sequence[str] | None = None,
    extensions: Sequence[str] = VIDEO_EXTENSIONS,
) -> tuple[list[str], list[Sample]]:
    """List ``(path, label)`` of the videos under ``directory/<class>/``, sorted.

    ``classes`` fixes the class order (e.g. the training folder's); every class folder found in
    ``directory`` must be one of them, and each must hold at least one video.
    """
    exts = check_extensions(extensions)
    found = find_classes(directory)
    classes = list(found if classes is None else classes)
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise ValueError(
            f"{str(directory)!r} has class folders that are not training classes: {unknown[:10]}"
        )
    samples: list[Sample] = []
    for name in found:
        label = classes.index(name)
        files = []
        for dirpath, dirnames, filenames in os.walk(Path(directory) / name, followlinks=True):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            files += [
                os.path.join(dirpath, f)
                for f in filenames
                if not f.startswith(".") and os.path.splitext(f)[1].lower() in exts
            ]
        if not files:
            raise FileNotFoundError(
                f"class folder {str(Path(directory) / name)!r} contains no video files "
                f"(looked for {', '.join(exts)})"
            )
        samples += [(f, label) for f in sorted(files)]
    return classes, samples


def read_split_list(
    list_file: str | Path, root: str | Path, classes: Sequence[str]
) -> list[Sample]:
    """Read a split list (one ``<class>/<file> [label]`` per line, relative to ``root``).

    The label comes from the class folder named in the path (a label column, like UCF101's
    1-based one, is ignored). Blank lines and lines starting with ``#`` are skipped.
    """
    list_file = Path(list_file)
    if not list_file.is_file():
        raise FileNotFoundError(f"split list {str(list_file)!r} does not exist")
    index = {name: i for i, name in enumerate(classes)}
    samples: list[Sample] = []
    for lineno, line in enumerate(list_file.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        rel = line.split()[0].replace("\\", "/")
        name = rel.split("/")[0]
        if "/" not in rel or name not in index:
            raise ValueError(
                f"{str(list_file)!r} line {lineno}: {rel!r} is not '<class>/<file>' with one of "
                f"the class folders of {str(root)!r}"
            )
        samples.append((os.path.join(root, rel), index[name]))
    if not samples:
        raise ValueError(f"split list {str(list_file)!r} names no videos")
    return samples


def split_by_class(
    samples: Sequence[Sample],
    classes: Sequence[str],
    fractions: Sequence[float],
    seed: int = 0,
    group_pattern: str | None = None,
) -> list[list[Sample]]:
    """Split ``samples`` into ``len(fractions) + 1`` parts: the rest first, then one per fraction.

    Per class, the videos (or their groups: the first capture group of ``group_pattern`` in the
    file name, or its whole match; a name without a match is its own group) are shuffled with a
    generator seeded by ``(seed, class name)``; each held-out part takes ``round(n * fraction)``
    groups. The result depends only on the seed, the file names and the class, not on the other
    classes. Every class keeps at least one group in the first part.
    """
    pattern = re.compile(group_pattern) if group_pattern is not None else None
    parts: list[list[Sample]] = [[] for _ in range(len(fractions) + 1)]
    by_class: dict[int, list[Sample]] = {}
    for path, label in samples:
        by_class.setdefault(label, []).append((path, label))
    for label, items in sorted(by_class.items()):
        groups: dict[str, list[Sample]] = {}
        for path, lab in sorted(items):
            name = os.path.basename(path)
            match = pattern.search(name) if pattern is not None else None
            key = (match.group(1) if match.groups() else match.group(0)) if match else name
            groups.setdefault(key, []).append((path, lab))
        keys = sorted(groups)
        random.Random(f"{seed}/{classes[label]}").shuffle(keys)
        counts = [int(len(keys) * f + 0.5) for f in fractions]
        if fractions and sum(counts) >= len(keys) and any(f > 0 for f in fractions):
            raise ValueError(
                f"class {classes[label]!r} has {len(keys)} video group(s): too few to hold out "
                f"fractions {list(fractions)} and keep one for training"
            )
        start = sum(counts)
        parts[0] += [s for k in keys[start:] for s in groups[k]]
        for i, n in enumerate(counts):
            begin = sum(counts[:i])
            parts[i + 1] += [s for k in keys[begin : begin + n] for s in groups[k]]
    return [sorted(p, key=lambda s: (s[1], s[0])) for p in parts]
