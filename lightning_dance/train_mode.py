"""Training what is trained: a network handed over in eval mode is put in train mode at fit start.

Lightning keeps each submodule's own train/eval flag through ``Trainer.fit`` (it no longer calls
``.train()`` on the whole module). A model put in eval mode before it is wrapped (``model.eval()``
after loading weights is common) would then be fine-tuned with its BatchNorm statistics frozen
and its dropout off, with nothing but Lightning's generic warning to say so. In this project's
benchmark a Torch-Pruning model fine-tuned that way gave the same prediction for every clip
(16.6% top-1 on six classes, chance). :class:`~lightning_dance.classifier.VideoClassifier` and
:class:`~lightning_dance.wrapper.DANCEWrapper` call :func:`train_at_fit_start` from
``on_fit_start``: modules left in eval mode are switched to train mode, with one warning that
says so and how to keep a backbone frozen (``DANCEWrapper(freeze_backbone=True)``).

Example:
    >>> import warnings, torch.nn as nn
    >>> net = nn.Sequential(nn.Conv3d(3, 4, 1), nn.BatchNorm3d(4)).eval()
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     train_at_fit_start(net, "the model")
    True
    >>> net[1].training, "eval mode" in str(caught[0].message)
    (True, True)
    >>> train_at_fit_start(net, "the model")  # already training: nothing to do
    False
"""

from __future__ import annotations

import warnings

import torch.nn as nn

__all__ = ["train_at_fit_start"]


def train_at_fit_start(module: nn.Module, what: str, frozen_hint: str = "") -> bool:
    """Put ``module`` in train mode (``module.train()``, so that overrides such as a frozen
    backbone apply) if any of its modules is in eval mode; warn once, naming ``what`` and
    ``frozen_hint`` (how to keep parts frozen on purpose), about the modules it switched.
    Returns whether it switched any."""
    in_eval = {name for name, m in module.named_modules() if not m.training}
    if not in_eval:
        return False
    module.train()
    switched = [n or type(module).__name__ for n, m in module.named_modules() if n in in_eval
                and m.training]  # fmt: skip
    if switched:
        warnings.warn(
            f"{what} had {len(switched)} module(s) in eval mode at fit start (e.g. "
            f"{switched[:3]}); they are switched to train mode so that BatchNorm statistics and "
            f"dropout train as the weights do{frozen_hint}",
            UserWarning,
            stacklevel=2,
        )
    return bool(switched)
