"""The training gates' noise stream: one generator per device type, checkpointed.

The Gumbel noise of the training gates comes from these generators rather than the global RNG,
so that a resumed fit draws the noise an uninterrupted one would, whatever else used the global
RNG in between (data loaders do, and Lightning does not checkpoint it). Each generator is seeded
from the global RNG at its first use, so ``seed_everything`` fixes the stream. Copies and
pickles start afresh (they reseed at first use).

Example:
    >>> import torch
    >>> noise = GateNoise()
    >>> _ = torch.manual_seed(0)
    >>> first = torch.rand(3, generator=noise.generator("cpu"))
    >>> saved = noise.state()
    >>> again = GateNoise()
    >>> again.set_state(saved)
    >>> torch.equal(torch.rand(3, generator=noise.generator("cpu")),
    ...             torch.rand(3, generator=again.generator("cpu")))
    True
"""

from __future__ import annotations

import torch

__all__ = ["GateNoise"]


class GateNoise:
    """Per-device-type generators of the gates' noise, with checkpointable state."""

    def __init__(self) -> None:
        self._rngs: dict[str, torch.Generator] = {}  # device type -> generator
        self._pending: dict[str, torch.Tensor] = {}  # states to apply at first use

    def __getstate__(self) -> dict:
        return {"_rngs": {}, "_pending": {}}  # a copy or a pickle reseeds at first use

    def generator(self, device: torch.device | str) -> torch.Generator:
        """The generator on ``device`` (made, and seeded or restored, at first use)."""
        device = torch.device(device)
        gen = self._rngs.get(device.type)
        if gen is None:
            gen = torch.Generator(device=device)
            state = self._pending.pop(device.type, None)
            if state is not None:
                gen.set_state(state)
            else:  # from the global RNG, so that seed_everything / manual_seed fix the stream
                gen.manual_seed(int(torch.randint(0, 2**62, (), dtype=torch.int64)))
            self._rngs[device.type] = gen
        return gen

    def state(self) -> dict[str, torch.Tensor]:
        """``{device type: generator state}`` of the generators used so far (and of states
        loaded but not used yet), for checkpoints."""
        states = dict(self._pending)
        states.update({k: g.get_state() for k, g in self._rngs.items()})
        return states

    def set_state(self, states: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`state` (applied to each device type's generator now, or when it is
        first used)."""
        self._rngs.clear()
        self._pending = {k: v.detach().cpu().to(torch.uint8) for k, v in states.items()}
