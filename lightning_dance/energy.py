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

from dataclasses import dataclass

import torch

__all__ = ["EnergyModel", "MEMORY_PJ_PER_32BIT", "MAC_PJ"]

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
    """

    mac_pj: float = MAC_PJ["fp32"]
    byte_pj: float = MEMORY_PJ_PER_32BIT["dram"] / 4
    bytes_per_element: int = 4
    name: str = "fp32/dram @45nm (Horowitz 2014)"
    copy_byte_pj: float | None = None

    def __post_init__(self) -> None:
        if self.mac_pj < 0 or self.byte_pj < 0 or (self.copy_byte_pj or 0) < 0:
            raise ValueError("energies must be >= 0")
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
