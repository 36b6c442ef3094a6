"""A GTN run's configuration: the GTN's own fields, nesting the meta-training loop's
configuration (:class:`~distill.metatrain.MetaConfig`, which holds the strategy's
:class:`~distill.strategies.StrategyConfig`) instead of copying their fields.

The flat names users know from ``gtn train``'s options, the recipes and ``config.json``
(``meta_lr``, ``real_batch``, ``unroll_tail``, ...) are one table, :data:`FLAT`: each names
the nested field it stands for. ``GTNConfig(meta_lr=5e-3, real_batch=512, ...)`` takes them,
``config.meta_lr`` reads them, and :meth:`GTNConfig.flat` is the flat record that
``config.json``, saved generators and checkpoint fingerprints hold (the same form as before
the configs nested, so older checkpoints still resume and older generators still load).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, make_dataclass, replace
from typing import Any

from distill.data import DatasetInfo
from distill.metatrain import MetaConfig
from distill.models import parse_model_spec
from distill.store import ADDED_LATER, NOT_IN_RESULT
from distill.strategies import StrategyConfig
from distill.trajectory import TrajectoryConfig

from .generator import GeneratorConfig, GeneratorError
from .methods import DEFAULT_METHOD, GTN_METHODS

__all__ = ["GTNConfig", "GTN_META", "FLAT", "recipe_config"]

#: The GTN's defaults of the loop and the strategy knobs, where they differ from the library's
#: (each GTN default lives here): Adam on the generator at 1e-3, 200 meta-iterations, a
#: checkpoint every 10; the student scored on 128 real images, 64 real images per class for
#: matching, Neumann step 0.02 (what ``gtn train`` and ``gtn compare`` always ran with;
#: the strategy's own default, 0.01, is ``distill --method ift``'s).
GTN_META = MetaConfig(strategy=DEFAULT_METHOD, iterations=200, optimizer="adam", lr=1e-3,
                      momentum=0.0, checkpoint_every=10,
                      strategy_config=StrategyConfig(real_batch=128, real_per_class=64,
                                                     neumann_alpha=0.02))

#: Flat option name -> (``"meta"`` | ``"strategy"``, the field of MetaConfig / StrategyConfig).
FLAT: dict[str, tuple[str, str]] = {
    "meta_iterations": ("meta", "iterations"), "meta_lr": ("meta", "lr"),
    "meta_schedule": ("meta", "schedule"), "meta_lr_floor": ("meta", "lr_floor"),
    **{k: ("strategy", k) for k in ("mixed_sample", "mixed_at", "step_size_grad", "unroll_tail",
                                    "grad_clip", "intermediate_every", "intermediate_weight",
                                    "real_batch")},
    "match_real_per_class": ("strategy", "real_per_class"),
    "match_curriculum": ("strategy", "match_curriculum"),
    # "validation" sits here in the flat record (a GTN field)
    **{k: ("strategy", k) for k in ("checkpoint_steps", "recompute", "neumann_terms",
                                    "neumann_alpha")},
    **{k: ("meta", k) for k in ("checkpoint_every", "eval_every", "memory_iterations",
                                "memory_check")},
    "ift_solver": ("strategy", "ift_solver"),
    "compile": ("strategy", "compile"),
    # trajectory matching's (:class:`~distill.trajectory.TrajectoryConfig`)
    "experts": ("strategy", "experts"), "expert_epochs": ("strategy", "expert_epochs"),
    "online_experts": ("strategy", "online_experts"),
    "trajectory_gradient": ("strategy", "gradient"),
}
#: The GTN's trajectory matching: every student starts at the expert's initialisation (epoch 0,
#: as the few-step protocol's students start fresh), and Adam steps the learned step sizes
#: like every other generator parameter (no separate lr of the lr).
GTN_TRAJECTORY = dict(max_start_epoch=1, lr_lr=None)
#: Flat names only the trajectory strategy reads (with their values for the other methods).
_TRAJECTORY_ONLY = {k: getattr(TrajectoryConfig(), FLAT[k][1])
                    for k in ("experts", "expert_epochs", "online_experts",
                              "trajectory_gradient")}
_MARKS = {"recompute": ADDED_LATER, "memory_check": NOT_IN_RESULT, "ift_solver": ADDED_LATER,
          "compile": ADDED_LATER,
          **{k: ADDED_LATER for k in _TRAJECTORY_ONLY}}


def _value(meta: MetaConfig, section: str, name: str) -> Any:
    holder = meta if section == "meta" else meta.strategy_config
    if not hasattr(holder, name):  # a trajectory knob of another strategy's config
        return getattr(TrajectoryConfig(), name)
    return getattr(holder, name)


@dataclass(frozen=True, init=False)
class GTNConfig:
    """A GTN run (defaults: the paper's where it states them).

    Attributes:
        method: a GTN method (:data:`gtn.methods.GTN_METHODS`: its strategy trains the
            generator).
        inner_steps: T student steps per meta-iteration (paper: 32 for MNIST).
        batch_size: generated images per student step (paper: 128).
        curriculum: ``none`` | ``all-shuffled`` | ``shuffled-batch`` | ``full``.
        generator: the generator's architecture.
        learn_labels: learn soft labels of the curriculum.
        inner_lr, inner_momentum: the student's per-step lr and momentum (the teacher's
            initial values: learned by unrolled backprop, and by ``step_size_grad``).
        student: zoo spec of the student; ``width_choices`` randomises its width each
            meta-iteration (a ``width`` option of the spec is then overridden).
        validation: training images held out for validation (never the test set).
        meta: the meta-training loop (its ``strategy_config``: the strategy's knobs); its
            ``strategy`` is the method's. Defaults: :data:`GTN_META`.

    Flat names (:data:`FLAT`) are accepted as keywords and read as attributes:
    ``meta_iterations``, ``meta_lr``, ``meta_schedule``, ``meta_lr_floor``,
    ``checkpoint_every``, ``eval_every``, ``memory_iterations``, ``memory_check`` (the loop's
    ``iterations``, ``lr``, ...; :class:`~distill.metatrain.MetaConfig`) and ``real_batch``,
    ``match_real_per_class`` (``real_per_class``), ``match_curriculum``, ``mixed_sample``,
    ``mixed_at``, ``step_size_grad``, ``unroll_tail``, ``grad_clip``, ``intermediate_every``,
    ``intermediate_weight``, ``checkpoint_steps``, ``recompute``, ``neumann_terms``,
    ``neumann_alpha`` (:class:`~distill.strategies.StrategyConfig`, documented there).
    """

    method: str
    inner_steps: int
    batch_size: int
    curriculum: str
    generator: GeneratorConfig
    learn_labels: bool
    inner_lr: float
    inner_momentum: float
    student: str
    width_choices: tuple[int, ...] | None
    validation: int
    meta: MetaConfig

    def __init__(self, method: str = DEFAULT_METHOD, inner_steps: int = 32,
                 batch_size: int = 128, curriculum: str = "full",
                 generator: GeneratorConfig | None = None, learn_labels: bool = False,
                 inner_lr: float = 0.02, inner_momentum: float = 0.5,
                 student: str = "convnet:width=32",
                 width_choices: tuple[int, ...] | None = None, validation: int = 10000,
                 meta: MetaConfig | None = None, **flat: Any) -> None:
        unknown = sorted(set(flat) - set(FLAT))
        if unknown:
            raise TypeError(f"GTNConfig got unexpected options {', '.join(unknown)}")
        if method not in GTN_METHODS:
            raise GeneratorError(f"unknown GTN method {method!r}; choose from "
                                 f"{', '.join(GTN_METHODS)}")
        meta = meta or GTN_META
        changes: dict[str, dict[str, Any]] = {"meta": {}, "strategy": {}}
        for name, value in flat.items():
            section, target = FLAT[name]
            changes[section][target] = value
        base = meta.strategy_config
        if GTN_METHODS[method].strategy == "trajectory":
            if not isinstance(base, TrajectoryConfig):
                base = TrajectoryConfig(**{**{f.name: getattr(base, f.name)
                                              for f in fields(StrategyConfig)},
                                           **GTN_TRAJECTORY})
        else:
            own_knobs = sorted(k for k in flat if k in _TRAJECTORY_ONLY
                               and flat[k] != _TRAJECTORY_ONLY[k])
            if own_knobs:
                raise GeneratorError(f"{', '.join(own_knobs)} belong to trajectory matching: "
                                     f"they need method 'trajectory', not {method!r}")
            for k in _TRAJECTORY_ONLY:
                changes["strategy"].pop(FLAT[k][1], None)
        strategy = replace(base, **changes["strategy"]) if changes["strategy"] else base
        meta = replace(meta, **changes["meta"], strategy=GTN_METHODS[method].strategy,
                       strategy_config=strategy)  # a ConfigError for a bad option
        own = dict(method=method, inner_steps=inner_steps, batch_size=batch_size,
                   curriculum=curriculum, generator=generator or GeneratorConfig(),
                   learn_labels=learn_labels, inner_lr=inner_lr, inner_momentum=inner_momentum,
                   student=student, width_choices=width_choices, validation=validation,
                   meta=meta)
        for name, value in own.items():
            object.__setattr__(self, name, value)
        self._check()

    def __getattr__(self, name: str) -> Any:  # the flat names, read-only
        if name in FLAT:
            return _value(self.__dict__["meta"], *FLAT[name])
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def strategy(self) -> str:
        """The meta-gradient strategy's name (the method's)."""
        return GTN_METHODS[self.method].strategy

    @property
    def strategy_config(self) -> StrategyConfig:
        return self.meta.strategy_config

    def _check(self) -> None:
        if self.inner_steps < 1:
            raise GeneratorError(f"inner steps T must be >= 1, got {self.inner_steps}")
        parse_model_spec(self.student)
        s, strategy = self.strategy_config, self.strategy
        if s.intermediate_every and strategy != "unrolled":
            raise GeneratorError("intermediate losses (--intermediate-every) are unrolled's: "
                                 "they need --method unrolled")
        if s.recompute and strategy != "unrolled":
            raise GeneratorError("--recompute rebuilds unrolled backprop's steps: it needs "
                                 "--method unrolled")
        if s.ift_solver != "neumann" and (strategy != "implicit" or s.mixed_at != "final"):
            raise GeneratorError("the implicit system's solver (--ift-solver) is the implicit "
                                 "function theorem's: it needs --method implicit")
        if s.intermediate_every and s.checkpoint_steps is not None:
            raise GeneratorError("intermediate losses do not combine with gradient "
                                 "checkpointing (--checkpoint-steps); choose one")

    def check(self, info: DatasetInfo) -> None:
        """Refuse settings that cannot run on data set ``info`` (one-line GeneratorError)."""
        if self.batch_size < 2:
            raise GeneratorError(f"batch size (--batch-size) must be >= 2 (the generator's "
                                 f"batch norm needs two images), got {self.batch_size}")
        if self.strategy == "matching" and self.batch_size < 2 * info.num_classes:
            raise GeneratorError(
                f"matching generates batch size / classes images per class and needs at least "
                f"2: batch size (--batch-size) must be >= {2 * info.num_classes} for "
                f"{info.num_classes} classes, got {self.batch_size}")

    def meta_config(self) -> MetaConfig:
        """The meta-training loop's configuration. T, the inner schedule, lr and momentum are
        the teacher's (:func:`~gtn.train.make_teacher`); matching's loops default to the
        teacher's T match-then-step rounds."""
        return self.meta

    def flat(self, named: bool = True) -> Any:
        """The flat record of this configuration (a frozen dataclass named ``GTNConfig`` with
        one field per option, in the order and with the marks of the flat configuration
        gtnkit had before the configs nested): what config.json and saved generators hold.

        ``named=False`` puts the strategy's name where the method's is: the form checkpoint
        fingerprints hold. What a checkpoint continues is fixed by the strategy and the
        options, whatever the method is called, so checkpoints written before the method
        table had ``unrolled-recompute`` and ``first-order-tail`` (then ``unrolled`` with
        ``recompute``, ``implicit`` with its recipe) resume under the new names."""
        values = {**{k: getattr(self, k) for k in _OWN}, **{
            k: _value(self.meta, *where) for k, where in FLAT.items()}}
        if not named:
            values["method"] = self.strategy
        return _Flat(**{k: values[k] for k in _FLAT_ORDER})

    def as_dict(self) -> dict[str, Any]:
        """:meth:`flat` as a plain dict (config.json's ``gtn``)."""
        return asdict(self.flat())

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> GTNConfig:
        """Read :meth:`as_dict` back (JSON: the generator config a dict, lists for tuples)."""
        raw = dict(raw)
        if isinstance(raw.get("generator"), dict):
            raw["generator"] = GeneratorConfig(**raw["generator"])
        if raw.get("width_choices") is not None:
            raw["width_choices"] = tuple(raw["width_choices"])
        return cls(**raw)


_OWN = [f.name for f in fields(GTNConfig) if f.name != "meta"]
#: The flat record's field order (the flat GTNConfig's, which checkpoint fingerprints render).
_FLAT_ORDER = ["method", "inner_steps", "batch_size", "curriculum", "generator", "learn_labels",
               "inner_lr", "inner_momentum", "student", "width_choices", "meta_iterations",
               "meta_lr", "meta_schedule", "meta_lr_floor", "mixed_sample", "mixed_at",
               "step_size_grad", "unroll_tail", "grad_clip", "intermediate_every",
               "intermediate_weight", "real_batch", "match_real_per_class", "match_curriculum",
               "validation", "checkpoint_steps", "recompute", "neumann_terms", "neumann_alpha",
               "checkpoint_every", "eval_every", "memory_iterations", "memory_check",
               "ift_solver", "experts", "expert_epochs", "online_experts",
               "trajectory_gradient", "compile"]
_DEFAULTS = GTNConfig()
# memory_check is no part of a fingerprint (NOT_IN_RESULT), the legacy form (a repr) included
_Flat = make_dataclass("GTNConfig", [
    (name, Any, field(default=getattr(_DEFAULTS, name), metadata=_MARKS.get(name, {}),
                      repr=name != "memory_check"))
    for name in _FLAT_ORDER], frozen=True)
_Flat.__module__ = __name__
assert sorted(_FLAT_ORDER) == sorted([*_OWN, *FLAT])


def recipe_config(method: str, recipe: bool = True, **options: Any) -> GTNConfig:
    """A :class:`GTNConfig` for ``method`` with the options that define it and its training
    recipe (:data:`~gtn.methods.GTN_METHODS`; ``recipe=False``: the definition only, on the
    bare defaults), under ``options``."""
    if method not in GTN_METHODS:
        raise GeneratorError(f"unknown GTN method {method!r}; choose from "
                             f"{', '.join(GTN_METHODS)}")
    return GTNConfig(method=method, **{**GTN_METHODS[method].options(recipe), **options})
