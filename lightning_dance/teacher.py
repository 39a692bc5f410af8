"""The training task: which losses a batch trains on, and whether the distillation teacher is fit to teach.

Distillation matches a pruned model's outputs to a dense teacher's, so it copies the teacher's
mistakes too. On the benchmark task (``docs/benchmarks.md``) teachers right on 84-89% of their
own training clips cost the ``threshold`` pruner 6-13 pp of top-1 at budget 0.35 against
training on the labels alone (three seeds), and Torch-Pruning's fine-tuning 6 pp; labels alone
were never worse. So :class:`~lightning_dance.wrapper.DANCEWrapper` trains on the labels when a
batch has them (``task="auto"``) and distils only from unlabelled batches, and
:class:`TeacherCheck` warns when a teacher chosen explicitly is weak on the very clips it
teaches.

Example:
    >>> import torch
    >>> task_losses("auto", has_labels=True), task_losses("auto", has_labels=False)
    ((True, False), (False, True))
    >>> check = TeacherCheck("DANCEWrapper", min_clips=4)
    >>> check.update(torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]]),
    ...              torch.tensor([0, 1, 1, 1]))
    0.5
    >>> check.accuracy, check.is_weak()
    (0.5, True)
"""

from __future__ import annotations

import torch

__all__ = ["TASKS", "WEAK_TEACHER", "TeacherCheck", "task_losses"]

#: the training tasks: ``"auto"`` (labels when the batch has them, else distillation),
#: ``"labels"``, ``"distill"``, ``"both"``
TASKS = ("auto", "labels", "distill", "both")

#: a teacher right on fewer of its training clips than this is called weak (see the module doc)
WEAK_TEACHER = 0.95


def task_losses(task: str, has_labels: bool) -> tuple[bool, bool]:
    """``(cross-entropy, distillation)``: which losses a batch trains on under ``task``.

    Raises ``ValueError`` for an unknown task, or for ``"labels"`` / ``"both"`` on a batch
    without labels (naming the task that needs none).
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if task == "auto":
        return (has_labels, not has_labels)
    if task in ("labels", "both") and not has_labels:
        raise ValueError(
            f"task={task!r} needs labelled batches (clip, label); use task='distill' or 'auto' "
            "to train without labels"
        )
    return (task in ("labels", "both"), task in ("distill", "both"))


class TeacherCheck:
    """How often the distillation teacher's top-1 agrees with the labels it is trained beside.

    Call :meth:`update` with the teacher's logits and the labels of each labelled training
    batch; :meth:`warn_if_weak` (at the end of a training epoch) warns once, naming the fix, when
    the teacher's top-1 over at least ``min_clips`` clips is below ``warn_below``. :meth:`reset`
    starts a new count (at the start of a fit).
    """

    def __init__(self, owner: str, warn_below: float = WEAK_TEACHER, min_clips: int = 64) -> None:
        if not 0.0 <= warn_below <= 1.0:
            raise ValueError(f"warn_below must be in [0, 1], got {warn_below}")
        self.owner, self.warn_below, self.min_clips = owner, warn_below, int(min_clips)
        self.reset()

    def reset(self) -> None:
        self.right, self.seen, self.warned = 0, 0, False

    def update(self, teacher_logits: torch.Tensor, labels: torch.Tensor) -> float:
        """Count one batch; returns the teacher's top-1 on it."""
        hits = int((teacher_logits.argmax(-1) == labels).sum())
        n = int(labels.numel())
        self.right, self.seen = self.right + hits, self.seen + n
        return hits / max(n, 1)

    @property
    def accuracy(self) -> float | None:
        """The teacher's top-1 over the clips counted so far (``None`` before any)."""
        return self.right / self.seen if self.seen else None

    def is_weak(self) -> bool:
        acc = self.accuracy
        return acc is not None and self.seen >= self.min_clips and acc < self.warn_below

    def warn_if_weak(self) -> bool:
        """Warn (once per :meth:`reset`) when the teacher is weak; returns whether it warned."""
        if self.warned or not self.is_weak():
            return False
        from lightning.pytorch.utilities import rank_zero_warn

        rank_zero_warn(
            f"{self.owner}: the distillation teacher is right on only {self.accuracy:.0%} of "
            f"the {self.seen} training clips it has seen (below {self.warn_below:.0%}); "
            "distilling copies its mistakes (on the benchmark such teachers cost 6-13 pp of "
            "top-1 against labels alone). Train on the labels (DANCEWrapper(task='auto' or "
            "'labels'); VideoClassifier without teacher=) or train the teacher longer first."
        )
        self.warned = True
        return True
