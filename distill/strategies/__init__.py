"""Meta-gradient strategies: how a teacher is told to improve, one protocol, chosen by name.

A *teacher* (:class:`~distill.teacher.Teacher`: a :class:`~distill.synthetic.SyntheticSet`, or a
generator in ``gtn``) makes training batches with a graph to its parameters; strategies ask it
only what its protocol says (per-class batches, the inner schedule, the learned lr and
momentum), so every strategy trains every teacher. The T student steps of ``unrolled`` and
``implicit`` are :func:`distill.inner.student_steps`.

One strategy per module, each registered where it is defined (:func:`register_strategy`):

=============  =====================================================================
name           meta-gradient
=============  =====================================================================
matching       per-class gradient matching (DC: Zhao, Mopuri & Bilen, ICLR 2021)
               — ``dc``; with siamese augmentation ``dsa`` (Zhao & Bilen, ICML 2021)
distribution   embedding-mean matching on random networks (DM: Zhao & Bilen, WACV 2023)
unrolled       backprop through T student steps (DD: Wang et al. 2018), functional SGD
implicit       implicit function theorem + Neumann series (Lorraine, Vicol & Duvenaud,
               AISTATS 2020); no graph across the T student steps
kip            kernel ridge regression (KIP: Nguyen, Chen & Lee, ICLR 2021); the
               regression itself is :mod:`distill.krr`
=============  =====================================================================

:mod:`~distill.strategies.base` holds the sampler, the config, the protocol and the registry;
:mod:`~distill.strategies.stepwise` the step-by-step machinery unrolled and implicit share.
"""

from ..errors import ConfigError, NonFiniteError
from ..synthetic import dc_loops
from ..teacher import Teacher
from .base import (
    MIXED_AT,
    STRATEGIES,
    RealSampler,
    Strategy,
    StrategyConfig,
    StudentFactory,
    check_finite,
    make_strategy,
    register_strategy,
)
from .distribution import Distribution
from .implicit import Implicit
from .kip import KipConfig, KipStrategy
from .matching import BN_REAL_PER_CLASS, Matching, freeze_batch_norm
from .unrolled import Unrolled

__all__ = ["ConfigError", "Teacher", "RealSampler", "NonFiniteError", "StrategyConfig", "Strategy",
           "STRATEGIES", "make_strategy", "register_strategy", "check_finite", "dc_loops",
           "StudentFactory", "MIXED_AT", "Matching", "Distribution", "Unrolled", "Implicit",
           "freeze_batch_norm", "BN_REAL_PER_CLASS", "KipConfig", "KipStrategy"]
