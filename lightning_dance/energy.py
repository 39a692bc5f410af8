"""A first-order energy ESTIMATE from MAC counts and memory traffic (45 nm figures).

Energy = ``macs * mac_pj + bytes * byte_pj + copy_bytes * copy_byte_pj``, where ``copy_bytes``
are the fast path's gather/scatter copies (:attr:`lightning_dance.traffic.Traffic.copy_bytes`),
priced like all other bytes unless told otherwise. It is an estimate for comparing a dense and
a pruned execution of the same network, not a measurement of any device: no caches, no data
reuse beyond what :class:`lightning_dance.traffic.Traffic` counts (each tensor moved once per
layer), one memory level (two when copies are priced apart), no static/leakage power, no
control or address arithmetic, non-MAC ops priced as MACs. Real chips (newer nodes, other
memories) differ in absolute terms; the dense/executed *ratio*, with the memory levels it
assumed, is the figure to report.

Per-operation energies at 45 nm, 0.9 V, from M. Horowitz, "Computing's energy problem (and what
we can do about it)", ISSCC 2014 (keynote, Digest of Technical Papers pp. 10-14):

===========================  ================  =====================================
operation                    energy            used here
===========================  ================  =====================================
8-bit int add / mult         0.03 / 0.2 pJ     int8 MAC = 0.23 pJ
32-bit int add / mult        0.1 / 3.1 pJ      (accumulating int8 in 32 bit: 0.3 pJ)
32-bit float add / mult      0.9 / 3.7 pJ      fp32 MAC = 4.6 pJ
16-bit float add / mult      0.4 / 1.1 pJ      fp16 MAC = 1.5 pJ
64-bit cache read, 8 KB      10 pJ             32-bit: 5 pJ  -> 1.25 pJ/byte
64-bit cache read, 32 KB     20 pJ             32-bit: 10 pJ -> 2.5 pJ/byte
64-bit cache read, 1 MB      100 pJ            32-bit: 50 pJ -> 12.5 pJ/byte
64-bit DRAM read             1.3-2.6 nJ        32-bit: 640 pJ -> 160 pJ/byte
===========================  ================  =====================================

The 32-bit memory figures halve the 64-bit ones; 5 pJ (SRAM) and 640 pJ (DRAM) per 32-bit
access are the values of the 45 nm energy table of Han et al., "Learning both Weights and
Connections for Efficient Neural Networks", NIPS 2015 (Fig. 1, after Horowitz; also Table I of
Han et al., "EIE", ISCA 2016), widely reused since; 640 pJ is the low end of Horowitz's DRAM
range (1.3 nJ per 64 bit, halved).

**Memory levels** (:meth:`EnergyModel.for_target`): an access to a tensor that fits in the
target's last-level cache (LLC) is priced at that cache's energy, not DRAM's. Horowitz's cache
figures grow about as the square root of the capacity (8 KB -> 32 KB: x2 for x4; 32 KB -> 1 MB:
x5 for x32, sqrt gives x5.7), so a cache of ``S`` bytes is priced at
``100 pJ * sqrt(S / 1 MB)`` per 64-bit access (an extrapolation of his table, stated as such;
2 MB: 17.7 pJ/byte, 6 MB: 30.6, 32 MB: 70.7, DRAM: 160). The rule needs the size of each
tensor an op touches: :class:`lightning_dance.bytes.TrafficMeasurement` records the bytes moved
per tensor size (:meth:`EnergyModel.measured_energy_pj`). It is per tensor and optimistic: a
tensor that fits is assumed to be in the cache when an op touches it (true for a producer's
output read by the next op, for weights only when the whole working set stays cached from clip
to clip); one that does not fit is priced at DRAM for every byte. :data:`TARGETS`:

=====================  ===========================================  ===========================
target                 last-level cache                             source
=====================  ===========================================  ===========================
``jetson_nano``        2 MB L2 shared by the 4 Cortex-A57 cores     NVIDIA Jetson Nano data sheet
                                                                    (DA-09366-001): "2 MB L2"
``snapdragon_8_gen_1`` 6 MB L3 of the CPU cluster (DSU), behind it  Qualcomm product brief;
                       a 4 MB system-level cache                    AnandTech, "Snapdragon 8 Gen 1
                                                                    performance preview" (2021)
``this_machine``       the largest data/unified cache of cpu0 in    read at run time
                       ``/sys/devices/system/cpu/cpu0/cache``
=====================  ===========================================  ===========================

Example:
    >>> e = EnergyModel.fp32()
    >>> e.energy_pj(macs=1_000, bytes_moved=400)  # 1000 * 4.6 + 400 * 160
    68600.0
    >>> EnergyModel.fp32(copies="sram_8kb").energy_pj(1_000, 400, copy_bytes=40)  # + 40 * 1.25
    68650.0
    >>> e.ratio(dense_macs=100, dense_bytes=40, executed_macs=50, executed_bytes=20)
    2.0
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from lightning_dance.bytes import TrafficMeasurement

__all__ = [
    "EnergyModel",
    "MAC_PJ",
    "MEMORY_PJ_PER_32BIT",
    "TARGETS",
    "Target",
    "cache_pj_per_byte",
    "reported_models",
    "this_machine_llc_bytes",
]

#: Energy of one 32-bit access per memory level (pJ), from Horowitz 2014 (see module doc).
MEMORY_PJ_PER_32BIT: dict[str, float] = {
    "sram_8kb": 5.0,
    "sram_32kb": 10.0,
    "sram_1mb": 50.0,
    "dram": 640.0,
}

#: Energy of one multiply-accumulate (mult + add) per arithmetic (pJ), Horowitz 2014.
MAC_PJ: dict[str, float] = {
    "fp32": 3.7 + 0.9,
    "fp16": 1.1 + 0.4,
    "int8": 0.2 + 0.03,
}

_BYTES = {"fp32": 4, "fp16": 2, "int8": 1}
_MB = 1 << 20


def cache_pj_per_byte(capacity: int) -> float:
    """Energy per byte of an access to a cache of ``capacity`` bytes: Horowitz's 100 pJ per
    64-bit read of a 1 MB cache scaled by ``sqrt(capacity / 1 MB)`` (see the module doc).

    Example:
        >>> cache_pj_per_byte(1 << 20), round(cache_pj_per_byte(2 << 20), 2)
        (12.5, 17.68)
    """
    if capacity <= 0:
        raise ValueError(f"a cache capacity must be > 0 bytes, got {capacity}")
    return 100.0 / 8 * math.sqrt(capacity / _MB)


@dataclass(frozen=True)
class Target:
    """A device's last-level cache, for :meth:`EnergyModel.for_target`."""

    name: str
    llc_bytes: int
    llc: str
    source: str


#: Targets with the size of their last-level cache (sources in the module docstring).
TARGETS: dict[str, Target] = {
    "jetson_nano": Target(
        "jetson_nano", 2 * _MB, "2 MB L2 shared by 4x Cortex-A57",
        "NVIDIA Jetson Nano module data sheet DA-09366-001",
    ),
    "snapdragon_8_gen_1": Target(
        "snapdragon_8_gen_1", 6 * _MB, "6 MB L3 (CPU cluster), then a 4 MB system-level cache",
        "Qualcomm Snapdragon 8 Gen 1 product brief; AnandTech performance preview, Dec. 2021",
    ),
}  # fmt: skip


def this_machine_llc_bytes(root: str | Path = "/sys/devices/system/cpu/cpu0/cache") -> int:
    """The largest data or unified cache of cpu0 (sysfs ``index*/size``), in bytes.

    Example:
        >>> this_machine_llc_bytes() > 0
        True
    """
    sizes = []
    for index in sorted(Path(root).glob("index*")):
        try:
            kind = (index / "type").read_text().strip()
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        if kind in ("Data", "Unified") and size[:-1].isdigit():
            scale = {"K": 1 << 10, "M": _MB, "G": 1 << 30}.get(size[-1].upper())
            sizes.append(int(size[:-1]) * scale if scale else int(size))
    if not sizes:
        raise RuntimeError(
            f"no cache sizes under {root}: name a target from TARGETS "
            f"({', '.join(TARGETS)}) or give EnergyModel(cache_bytes=...) yourself"
        )
    return max(sizes)


@dataclass(frozen=True)
class EnergyModel:
    """Energy per MAC and per byte moved; an estimate (see the module docstring).

    Attributes:
        mac_pj: energy of one multiply-accumulate (pJ).
        byte_pj: energy of moving one byte to/from the modeled memory level (pJ).
        bytes_per_element: element size the traffic should be counted with.
        name: a label for reports.
        copy_byte_pj: energy per byte of the fast path's gather/scatter copies
            (:class:`lightning_dance.traffic.Traffic` ``gather_overhead`` + ``scatter_overhead``);
            ``None``: ``byte_pj``. The copies are small and consumed at once, so on a device
            with on-chip SRAM they may never reach DRAM: price them at an SRAM level to model
            that (``preset(..., copies="sram_1mb")``); the default is the pessimistic choice.
        cache_bytes: the target's last-level cache capacity; with it,
            :meth:`measured_energy_pj` prices accesses to tensors up to that size at
            ``cache_byte_pj`` (``None``: no cache, every byte at ``byte_pj``).
        cache_byte_pj: energy per byte of a last-level cache access (``None``:
            :func:`cache_pj_per_byte` of ``cache_bytes``).
    """

    mac_pj: float = MAC_PJ["fp32"]
    byte_pj: float = MEMORY_PJ_PER_32BIT["dram"] / 4
    bytes_per_element: int = 4
    name: str = "fp32/dram @45nm (Horowitz 2014)"
    copy_byte_pj: float | None = None
    cache_bytes: int | None = None
    cache_byte_pj: float | None = None

    def __post_init__(self) -> None:
        energies = (self.mac_pj, self.byte_pj, self.copy_byte_pj or 0, self.cache_byte_pj or 0)
        if min(energies) < 0:
            raise ValueError("energies must be >= 0")
        if self.cache_bytes is not None and self.cache_bytes <= 0:
            raise ValueError(f"cache_bytes must be > 0 (or None: no cache), got {self.cache_bytes}")
        if self.bytes_per_element < 1:
            raise ValueError(f"bytes_per_element must be >= 1, got {self.bytes_per_element}")

    @classmethod
    def preset(
        cls, arithmetic: str = "fp32", memory: str = "dram", copies: str | None = None
    ) -> EnergyModel:
        """A model from the 45 nm table: ``arithmetic`` in fp32/fp16/int8, ``memory`` and
        ``copies`` (the level of gather/scatter copies; ``None``: ``memory``) in
        dram/sram_8kb/sram_32kb/sram_1mb."""
        if arithmetic not in MAC_PJ:
            raise ValueError(f"arithmetic must be one of {sorted(MAC_PJ)}, got {arithmetic!r}")
        for what, level in (("memory", memory), ("copies", copies or memory)):
            if level not in MEMORY_PJ_PER_32BIT:
                raise ValueError(
                    f"{what} must be one of {sorted(MEMORY_PJ_PER_32BIT)}, got {level!r}"
                )
        label = memory if copies in (None, memory) else f"{memory}, copies {copies}"
        return cls(
            mac_pj=MAC_PJ[arithmetic],
            byte_pj=MEMORY_PJ_PER_32BIT[memory] / 4,
            bytes_per_element=_BYTES[arithmetic],
            name=f"{arithmetic}/{label} @45nm (Horowitz 2014)",
            copy_byte_pj=MEMORY_PJ_PER_32BIT[copies] / 4 if copies else None,
        )

    @classmethod
    def fp32(cls, memory: str = "dram", copies: str | None = None) -> EnergyModel:
        return cls.preset("fp32", memory, copies)

    @classmethod
    def int8(cls, memory: str = "dram", copies: str | None = None) -> EnergyModel:
        return cls.preset("int8", memory, copies)

    @classmethod
    def for_target(cls, target: str | Target, arithmetic: str = "fp32") -> EnergyModel:
        """A memory-level-aware model: DRAM at 160 pJ/byte, tensors that fit in ``target``'s
        last-level cache at its cache energy (:func:`cache_pj_per_byte`). ``target``: a key of
        :data:`TARGETS`, ``"this_machine"`` (:func:`this_machine_llc_bytes`) or a
        :class:`Target`.

        Example:
            >>> e = EnergyModel.for_target("jetson_nano")
            >>> e.cache_bytes, round(e.cache_byte_pj, 2), e.name
            (2097152, 17.68, 'fp32, jetson_nano LLC 2 MB / dram @45nm (Horowitz 2014)')
        """
        if isinstance(target, str):
            if target == "this_machine":
                target = Target("this_machine", this_machine_llc_bytes(), "sysfs", "sysfs")
            elif target in TARGETS:
                target = TARGETS[target]
            else:
                raise ValueError(
                    f"unknown target {target!r}: use one of {[*TARGETS, 'this_machine']} or a "
                    "Target(name, llc_bytes, llc, source)"
                )
        base = cls.preset(arithmetic)
        size = f"{target.llc_bytes / _MB:.3g} MB"
        return cls(
            mac_pj=base.mac_pj,
            byte_pj=base.byte_pj,
            bytes_per_element=base.bytes_per_element,
            name=f"{arithmetic}, {target.name} LLC {size} / dram @45nm (Horowitz 2014)",
            cache_bytes=target.llc_bytes,
            cache_byte_pj=cache_pj_per_byte(target.llc_bytes),
        )

    def access_pj_per_byte(self, tensor_bytes: int) -> float:
        """Energy per byte of an access to a tensor of ``tensor_bytes``: cache energy when it
        fits in the last-level cache, else DRAM (``byte_pj``).

        Example:
            >>> e = EnergyModel(cache_bytes=1 << 20)
            >>> e.access_pj_per_byte(4096), e.access_pj_per_byte(4 << 20)
            (12.5, 160.0)
        """
        if self.cache_bytes is not None and tensor_bytes <= self.cache_bytes:
            if self.cache_byte_pj is not None:
                return self.cache_byte_pj
            return cache_pj_per_byte(self.cache_bytes)
        return self.byte_pj

    def measured_energy_pj(self, macs: int | float, traffic: TrafficMeasurement) -> float:
        """Estimated energy (pJ) of ``macs`` multiply-accumulates and the bytes ``traffic``
        (a :class:`lightning_dance.bytes.TrafficMeasurement`) moved, each access priced by the
        size of the tensor it touched (:meth:`access_pj_per_byte`)."""
        moved = sum(b * self.access_pj_per_byte(size)
                    for size, b in traffic.by_tensor_size.items())  # fmt: skip
        return float(macs) * self.mac_pj + moved

    def energy_pj(
        self,
        macs: int | float | torch.Tensor,
        bytes_moved: int | float | torch.Tensor,
        copy_bytes: int | float | torch.Tensor = 0,
    ) -> float | torch.Tensor:
        """Estimated energy (pJ) of ``macs`` multiply-accumulates, ``bytes_moved`` bytes and,
        in addition, ``copy_bytes`` bytes of gather/scatter copies (priced at
        ``copy_byte_pj``)."""
        copy_pj = self.byte_pj if self.copy_byte_pj is None else self.copy_byte_pj
        if any(isinstance(v, torch.Tensor) for v in (macs, bytes_moved, copy_bytes)):
            values = (macs, bytes_moved, copy_bytes)
            m, b, c = (torch.as_tensor(v, dtype=torch.float64) for v in values)
            return m * self.mac_pj + b * self.byte_pj + c * copy_pj
        return (
            float(macs) * self.mac_pj
            + float(bytes_moved) * self.byte_pj
            + float(copy_bytes) * copy_pj
        )

    def ratio(
        self,
        dense_macs: int | float | torch.Tensor,
        dense_bytes: int | float | torch.Tensor,
        executed_macs: int | float | torch.Tensor,
        executed_bytes: int | float | torch.Tensor,
        executed_copy_bytes: int | float | torch.Tensor = 0,
    ) -> float | torch.Tensor:
        """Estimated energy saving factor ``E(dense) / E(executed)`` (> 1 means savings);
        ``executed_bytes`` excludes the copies, given as ``executed_copy_bytes``."""
        return self.energy_pj(dense_macs, dense_bytes) / self.energy_pj(
            executed_macs, executed_bytes, executed_copy_bytes
        )


def reported_models(*extra: str) -> dict[str, EnergyModel]:
    """The energy estimates the benchmarks and reports give side by side: every byte at DRAM
    (``"dram"``), then each cache-aware target of :data:`TARGETS` and the ``extra`` targets
    (e.g. ``"this_machine"``), by :meth:`EnergyModel.for_target`.

    Example:
        >>> list(reported_models("this_machine"))
        ['dram', 'jetson_nano', 'snapdragon_8_gen_1', 'this_machine']
    """
    return {"dram": EnergyModel(), **{t: EnergyModel.for_target(t) for t in (*TARGETS, *extra)}}
