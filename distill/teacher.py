"""The teacher protocol: everything a meta-gradient strategy may ask of a teacher.

A *teacher* makes the student's training batches with a graph to its own parameters: the
learnable pixels of dataset condensation (:class:`~distill.synthetic.SyntheticSet`) or a
generator with its curriculum (``gtn.GeneratorTeacher``; Such et al., ICML 2020). Every
strategy of :mod:`distill.strategies` talks to a teacher through this base class only, so any
strategy trains any teacher and none asks ``hasattr(teacher, ...)``. Subclasses implement
:meth:`Teacher.class_batch` and :meth:`Teacher.batch` and set ``num_classes`` and ``steps``;
the rest has defaults, overridden where a teacher knows better:

==========================  ===============================================================
``class_batch(c, g)``       images and targets of class ``c`` (per-class strategies)
``class_batches(g)``        every class's batch (default: class by class)
``batch(size, g)``          a batch of any classes (``None``: the teacher's default size)
``steps``                   T, the student steps of one meta-iteration (its one home)
``order(g)``                the inner schedule: T step choices (default: T ``None``: random
                            batches)
``step_batch(choice, g)``   the batch of one inner step for an entry of ``order``
``inner_batches(g)``        the T batches of ``order``, drawn step by step
``lr_tensor()``             a learned student lr: () or (T,), or ``None`` (use the config's)
``momentum_tensor()``       a learned student momentum, or ``None`` (use the config's)
``has_curriculum``          the T inner batches are T distinct teacher outputs (a GTN, any
                            curriculum mode), so the implicit gradient's mixed term is the
                            mean over all of them, not taken on one batch
``matching_loops()``        (outer, inner) loops of gradient matching (default: T
                            match-then-step rounds, one student epoch between)
==========================  ===============================================================
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import ClassVar

import torch
from torch import nn

__all__ = ["Batch", "StepChoice", "Teacher"]

Batch = tuple[torch.Tensor, torch.Tensor]
# What ``order`` returns per step: ``None`` (a fresh / random batch), a learned batch's index,
# or a (B,) tensor of positions in a learned pool (a GTN's all-shuffled curriculum).
StepChoice = int | torch.Tensor | None


class Teacher(nn.Module):
    """Base class of teachers: the protocol with its defaults (see the module docstring).

    Attributes:
        num_classes: K, the classes the teacher makes images of.
        steps: T, the student steps of one meta-iteration (``order`` has T entries).
        has_curriculum: see the module docstring.
    """

    num_classes: int
    steps: int
    has_curriculum: ClassVar[bool] = False

    def class_batch(self, c: int, generator: torch.Generator) -> Batch:
        """Images (n, C, H, W) and targets (n,) or (n, K) of class ``c``, with graph."""
        raise NotImplementedError

    def class_batches(self, generator: torch.Generator) -> list[Batch]:
        """Every class's :meth:`class_batch`, class 0 first."""
        return [self.class_batch(c, generator) for c in range(self.num_classes)]

    def batch(self, size: int | None, generator: torch.Generator) -> Batch:
        """``size`` images of any classes and their targets (``None``: the default size)."""
        raise NotImplementedError

    def order(self, generator: torch.Generator) -> list[StepChoice]:
        """The inner schedule of one meta-iteration: T step choices (default: random)."""
        return [None] * self.steps

    def step_batch(self, choice: StepChoice, generator: torch.Generator) -> Batch:
        """The batch of one inner step for an entry of :meth:`order` (default: random)."""
        return self.batch(None, generator)

    def inner_batches(self, generator: torch.Generator,
                      order: Sequence[StepChoice] | None = None, *,
                      graph: bool = True) -> Iterator[Batch]:
        """The batches of ``order`` (default: a fresh :meth:`order`), each drawn when the
        consumer reaches its step, so only one is alive at a time; ``graph=False`` draws them
        without a graph to the teacher (a student trained on constants)."""
        for choice in self.order(generator) if order is None else order:
            with contextlib.nullcontext() if graph else torch.no_grad():
                batch = self.step_batch(choice, generator)
            yield batch

    def lr_tensor(self) -> torch.Tensor | None:
        """The learned student learning rate, () or (T,), with graph; ``None``: not learned."""
        return None

    def momentum_tensor(self) -> torch.Tensor | None:
        """The learned student momentum () with graph; ``None``: not learned."""
        return None

    def matching_loops(self) -> tuple[int, int]:
        """(outer, inner) loops of gradient matching when the config leaves them unset."""
        return self.steps, 1
