"""A Griffe extension for the docs site: reads this project's Google-style docstrings as written.

Two house conventions that Griffe's Google parser does not know, rewritten in the text Griffe
parses (the source stays as it is; ``pytest --doctest-modules`` runs the same examples):

- ``Example:`` (singular) sections: read as ``Examples:``, so their ``>>>`` lines render as code
  (Griffe reads only the plural as an examples section);
- grouped arguments, ``lr, weight_decay: AdamW settings``: one entry per name, each with the
  shared description (Griffe would take ``"lr, weight_decay"`` for one unknown parameter).

Loaded by ``mkdocs.yml`` (``plugins.mkdocstrings.handlers.python.options.extensions``).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_SECTION = re.compile(r"^(\s*)(Args|Arguments|Parameters|Attributes):\s*$")
_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)
_GROUP = re.compile(r"^(\s*)([A-Za-z_]\w*(?:,\s*[A-Za-z_]\w*)+):(\s.*|)$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def split_groups(text: str) -> str:
    """``text`` with each grouped argument entry of its argument sections split per name.

    Example:
        >>> print(split_groups("Args:\\n    a, b: shared\\n        more.\\n    c: own"))
        Args:
            a: shared
                more.
            b: shared
                more.
            c: own
    """
    lines = text.splitlines()
    out: list[str] = []
    section: int | None = None  # indent of the current argument section's header
    i = 0
    while i < len(lines):
        line = lines[i]
        header = _SECTION.match(line)
        if header:
            section = len(header.group(1))
        elif line.strip() and section is not None and _indent(line) <= section:
            section = None
        group = _GROUP.match(line) if section is not None else None
        if group is None or _indent(line) <= section:
            out.append(line)
            i += 1
            continue
        body = []
        j = i + 1
        while j < len(lines) and (not lines[j].strip() or _indent(lines[j]) > _indent(line)):
            body.append(lines[j])
            j += 1
        while body and not body[-1].strip():  # a blank line ends the entry
            j -= 1
            body.pop()
        for name in (n.strip() for n in group.group(2).split(",")):
            out.append(f"{group.group(1)}{name}:{group.group(3)}")
            out.extend(body)
        i = j
    return "\n".join(out)


def rewrite(text: str) -> str:
    """Both rewrites (see the module docstring)."""
    return split_groups(_EXAMPLE.sub(r"\1Examples:", text))


class HouseDocstrings(griffe.Extension):
    """Apply :func:`rewrite` to every docstring Griffe loads."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value)
