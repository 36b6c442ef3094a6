"""The GTN methods: one table, read by the library, ``gtn train --method`` (choices, help and
the recipe epilog) and ``gtn compare --methods`` (its rows).

A :class:`GTNMethod` is a meta-gradient strategy (:mod:`distill.strategies`) with the options
that *define* what it computes (``defines``: kept with ``--no-recipe``) and the training recipe
measured for it (``recipe``: the meta-optimiser and batch sizes; ``--no-recipe`` drops them).
Options given explicitly override both (:func:`gtn.config.recipe_config`).

The recipes were measured on MNIST (bench/experiments/gtn_recipe.py, bench/gtn_long.py; readings in
docs/results/gtn.md): Adam at 5e-3 with cosine decay to 10 % (the official GTN code: 0.02,
cosine), the student scored on 512 real images; unrolled adds the official intermediate
losses. ``implicit`` is the implicit function theorem as published (Neumann series at the
trained student): 79.8 % (MNIST, T = 10, 1000 meta-iterations) where unrolled reaches 94.4;
its mixed term comes from one of the T batches (an unbiased estimate, as the AIST 2021 code
takes it): 79.4 % against 79.4 % from all T (and from 2), at about half the CPU time per
meta-step (0.46 against 0.88 s, side by side, docs/results/speed.md);
the Hessian-free ``first-order-tail`` takes the first-order trajectory gradient with an exact
tail of 5 steps and learns the step sizes (the implicit gradient does not reach them, and the
theorem's fixed point is far from a 10-step student): 94.1 % against unrolled's 94.8 %.
It also clips its meta-gradient to norm 0.5: at T = 32 (tail of 10) that stopped the
meta-loss jumps that left the unclipped run 7 points behind, and at T = 10 it cost nothing
(MNIST 94.4 against 94.1, CIFAR-10 36.3 against 36.0). Matching follows the curriculum at the
step sizes real data trains best with (lr 0.05, momentum 0.8: the best of a 15-point grid for
real batches at T = 10): 76.0 -> 85+ %; it imitates real gradients, so real balanced batches
at those step sizes (87.7 %) bound it. ``trajectory`` (trajectory matching, MTT's loss, with
TESLA's exact constant-memory gradient) never scores the student on real data: real data
reaches the generator only through the experts, trained on the meta-training split (in memory
unless ``experts`` names a folder of ``gtnkit experts``). Its students start at an expert's
initialisation, and the few-step protocol's at a fresh one: with a handful of experts the
generator can fit their starts, and the benchmark reads how far that carries to fresh students:
MNIST T = 10, 1000 meta-iterations, 4 experts of 1 epoch (M = 1): 88.7 %, where the experts
themselves score 90.7 % after that epoch (docs/results/gtn.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["GTNMethod", "GTN_METHODS", "RECIPES", "DEFAULT_METHOD"]

#: The tuned meta-optimiser every recipe starts from.
_META = dict(meta_lr=5e-3, meta_schedule="cosine")


@dataclass(frozen=True)
class GTNMethod:
    """A way to train a generator teacher.

    Attributes:
        name: its ``--method`` / config name.
        strategy: the meta-gradient strategy (:data:`distill.strategies.STRATEGIES`).
        help: one line for ``--help``: what is computed.
        reference: the paper(s).
        memory: how a meta-step's memory grows with the inner steps T.
        defines: :class:`~gtn.config.GTNConfig` options that make it this method (kept with
            ``--no-recipe``).
        recipe: the measured training recipe (:class:`~gtn.config.GTNConfig` options).
    """

    name: str
    strategy: str
    help: str
    reference: str
    memory: str
    defines: dict[str, Any] = field(default_factory=dict)
    recipe: dict[str, Any] = field(default_factory=dict)

    def options(self, recipe: bool = True) -> dict[str, Any]:
        """The options this method sets: its definition, and its recipe unless ``recipe`` is
        false."""
        return {**(self.recipe if recipe else {}), **self.defines}


GTN_METHODS: dict[str, GTNMethod] = {m.name: m for m in (
    GTNMethod("unrolled", "unrolled", "backprop through the T student steps",
              "Such et al., ICML 2020", "O(T)",
              recipe=dict(_META, real_batch=512, intermediate_every=1)),
    GTNMethod("unrolled-recompute", "unrolled",
              "unrolled backprop with every step rebuilt in the backward pass (the same "
              "gradient; flat memory)",
              "Such et al., ICML 2020; Griewank 1992", "O(1) + T small states",
              defines=dict(recompute=True),
              recipe=dict(_META, real_batch=512, intermediate_every=1)),
    GTNMethod("implicit", "implicit",
              "implicit function theorem as published: Neumann series for the inverse "
              "Hessian at the trained student",
              "Lorraine, Vicol & Duvenaud, AISTATS 2020", "O(1)",
              defines=dict(mixed_at="final"),
              recipe=dict(_META, real_batch=512, mixed_sample=1)),
    GTNMethod("first-order-tail", "implicit",
              "first-order trajectory hypergradient with an exact tail of the last steps and "
              "learned step sizes (no Hessian)",
              "truncated backprop: Shaban et al., AISTATS 2019", "O(tail)",
              defines=dict(mixed_at="trajectory", step_size_grad=True, unroll_tail=5),
              recipe=dict(_META, real_batch=512, grad_clip=0.5)),
    GTNMethod("matching", "matching", "per-class gradient matching",
              "Medvedev & D'yakonov, AIST 2021", "O(1)",
              recipe=dict(_META, match_curriculum=True, inner_lr=0.05, inner_momentum=0.8)),
    GTNMethod("trajectory", "trajectory",
              "trajectory matching: the T steps on generated batches from an expert's "
              "initialisation should land where the expert is M epochs on (TESLA's "
              "constant-memory gradient)",
              "Cazenavette et al., CVPR 2022; Cui et al., ICML 2023", "O(1) + T small states",
              defines=dict(trajectory_gradient="tesla"),
              recipe=dict(_META, expert_epochs=1, online_experts=4)),
)}

#: The method of a bare :class:`~gtn.config.GTNConfig` and of ``gtn train``.
DEFAULT_METHOD = "unrolled"

#: Every method's options with its recipe (derived from :data:`GTN_METHODS`).
RECIPES: dict[str, dict[str, Any]] = {name: m.options() for name, m in GTN_METHODS.items()}
