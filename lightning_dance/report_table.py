"""The text table of a :class:`~lightning_dance.report.MacReport`: per-layer rows and totals.

:func:`render_table` turns :meth:`MacReport.to_dict <lightning_dance.report.MacReport.to_dict>`
into a rich table (plain aligned columns without rich).

Example:
    >>> human(1234567), human(-2500.0), human(12)
    ('1.23M', '-2.5K', '12')
    >>> print(plain_table(["layer", "ratio"], [["conv1", "0.500"]]))
    layer  ratio
    ------------
    conv1  0.500
"""

from __future__ import annotations

import io
from typing import Any

from lightning_dance.masks import DIMS

__all__ = ["human", "plain_table", "render_table", "table_rows"]


def human(x: float) -> str:
    """``x`` with 3 significant digits and a K / M / G suffix (``1234567`` -> ``1.23M``)."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def table_rows(d: dict[str, Any]) -> tuple[list[str], list[list[str]], list[str]]:
    """The header, per-layer rows and totals lines of a :meth:`MacReport.to_dict` ``d``."""
    header = ["layer", "conv", "input CxTxHxW", "dense MACs", "exec MACs", "ratio",
              "kept t", "kept c", "kept f"]  # fmt: skip
    rows = [
        [
            layer["name"],
            layer["conv"],
            "x".join(map(str, layer["input_shape"])),
            human(layer["dense_macs"]),
            human(layer["executed_macs_mean"]),
            f"{layer['macs_ratio']:.3f}",
            *(f"{layer['kept'][dim]:.2f}" if dim in layer["masked_dims"] else "-" for dim in DIMS),
        ]
        for layer in d["layers"]
    ]
    totals = [
        f"clips: {d['samples']}  clip: {'x'.join(map(str, d['clip_shape']))}  "
        f"(dense count: {d['count_method']})",
        f"MACs per clip: dense {human(d['dense_macs'])}, executed mean "
        f"{human(d['executed_macs_mean'])} (p5 {human(d['executed_macs_p5'])}, p95 "
        f"{human(d['executed_macs_p95'])}, controller {human(d['controller_macs'])}): "
        f"ratio {d['macs_ratio']:.3f}, saving x{d['macs_saving']:.2f}",
        f"Conv3d memory traffic (analytic model): dense {human(d['dense_bytes'])}B, executed "
        f"{human(d['executed_bytes_mean'])}B (gather/scatter copies "
        f"{human(d['copy_bytes_mean'])}B): saving x{d['traffic_saving']:.2f}",
        f"energy ESTIMATE ({d['energy_model']}): dense {d['dense_energy_pj'] / 1e6:.3g} uJ,"
        f" executed {d['executed_energy_pj_mean'] / 1e6:.3g} uJ: saving "
        f"x{d['energy_saving']:.2f}",
    ]
    m = d.get("measured")
    if m:
        energy = ", ".join(f"{k} x{v:.2f}" for k, v in m["energy_saving"].items())
        totals += [
            f"MEASURED traffic of the executed ops ({m['clips']} clips): dense fast path "
            f"{human(m['dense_bytes'])}B, compact {human(m['compact_bytes_mean'])}B (controller "
            f"{human(m['controller_bytes_mean'])}B): saving x{m['traffic_saving']:.2f}",
            f"energy ESTIMATE of the measured runs, LLC-aware: {energy}",
        ]
    return header, rows, totals


def render_table(d: dict[str, Any], *, rich: bool = True, width: int = 140) -> str:
    """The per-layer table and the totals of a :meth:`MacReport.to_dict` ``d`` as text: a rich
    table (``rich=True`` and rich installed) or plain aligned columns."""
    header, rows, totals = table_rows(d)
    try:
        if not rich:
            raise ImportError
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        return plain_table(header, rows) + "\n" + "\n".join(totals)
    table = Table(title="DANCE MAC report")
    for i, col in enumerate(header):
        table.add_column(col, justify="left" if i < 3 else "right")
    for row in rows:
        table.add_row(*row)
    buffer = io.StringIO()
    console = Console(file=buffer, width=width, force_terminal=False, color_system=None)
    console.print(table)
    for line in totals:
        console.print(line, highlight=False, markup=False)
    return buffer.getvalue().rstrip()


def plain_table(header: list[str], rows: list[list[str]]) -> str:
    """``header`` and ``rows`` as plain left-aligned columns under a dashed line."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
    body = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join([line, "-" * len(line), *body])
