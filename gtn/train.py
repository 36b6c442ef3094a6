"""Training a Generative Teaching Network with any meta-gradient strategy, and scoring it.

Such et al., ICML 2020 train the generator by backpropagating through the student's T inner
steps (``unrolled``). The same :func:`distill.condense.meta_train` loop also trains it with
the implicit function theorem (``implicit``: Lorraine, Vicol & Duvenaud, AISTATS 2020) or by
per-class gradient matching of generated vs real batches (``matching``: Medvedev &
D'yakonov, "New Properties of the Data Distillation Method When Working With Tabular Data" /
"Learning to generate synthetic training data using gradient matching and generative
teaching networks", AIST 2021), so the three can be compared by peak memory and accuracy.

The real training split is cut into a meta-training part and a held-out **validation** part
(never the test set) on which periodic evaluations are made.

Two ways to score a trained generator:

* :func:`few_step_accuracy`: the paper's protocol: a fresh student trained for the T inner
  steps on the generator's curriculum with the learned lr / momentum;
* :func:`fixed_set_accuracy`: a fixed generated data set of the same size (T x batch images)
  trained on with the DC evaluation protocol.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from distill.data import DatasetInfo, ImageSet
from distill.engine import EvalProtocol, EvalResult, accuracy, evaluate_set
from distill.inner import load_params, student_steps
from distill.metatrain import MetaConfig, MetaResult, meta_train
from distill.models import build_model, parse_model_spec
from distill.progress import Progress
from distill.rng import generator as make_generator
from distill.store import ADDED_LATER, NOT_IN_RESULT
from distill.strategies import RealSampler, StrategyConfig
from distill.teacher import Batch

from .generator import GeneratorConfig, GeneratorError, GeneratorTeacher

__all__ = ["GTN_METHODS", "GTNConfig", "split_validation", "train_gtn", "few_step_accuracy",
           "fixed_set_accuracy", "make_teacher", "save_generator", "load_generator",
           "GENERATOR_FILES", "validation_evaluator"]

log = logging.getLogger("gtnkit")

# The meta-gradient strategies a GTN is trained with (distill.strategies names) and their help.
GTN_METHODS = {
    "unrolled": "backprop through the T student steps (Such et al., ICML 2020)",
    "implicit": "implicit function theorem, Neumann series (Lorraine et al., AISTATS 2020)",
    "matching": "per-class gradient matching (Medvedev & D'yakonov, AIST 2021)",
}


# The training recipe per method, measured on MNIST (bench/gtn_recipe.py, bench/gtn_long.py):
# Adam at 5e-3 with cosine decay to 10 % (the official GTN code: 0.02, cosine), the student
# scored on 512 real images; unrolled adds the official intermediate losses; implicit takes
# the first-order trajectory gradient with an exact tail of 5 steps and learns the step sizes
# (the implicit gradient does not reach them, and the theorem's fixed point is far from a
# 10-step student): 94.1 against unrolled's 94.8 % (MNIST, T = 10, 1000 meta-iterations).
# Implicit also clips its meta-gradient to norm 0.5: at T = 32 (tail of 10) that stopped the
# meta-loss jumps that left the unclipped run 7 points behind, and at T = 10 it cost nothing
# (MNIST 94.4 against 94.1, CIFAR-10 36.3 against 36.0).
# Matching follows the curriculum at the step sizes real data trains best with (lr 0.05,
# momentum 0.8: the best of a 15-point grid for real batches at T = 10): 76.0 -> 85+ %; it
# imitates real gradients, so real balanced batches at those step sizes (87.7 %) bound it.
RECIPES: dict[str, dict] = {
    "unrolled": dict(meta_lr=5e-3, meta_schedule="cosine", real_batch=512,
                     intermediate_every=1),
    "implicit": dict(meta_lr=5e-3, meta_schedule="cosine", real_batch=512,
                     mixed_at="trajectory", step_size_grad=True, unroll_tail=5, grad_clip=0.5),
    "matching": dict(meta_lr=5e-3, meta_schedule="cosine", match_curriculum=True,
                     inner_lr=0.05, inner_momentum=0.8),
}


@dataclass(frozen=True)
class GTNConfig:
    """A GTN run (defaults: the paper's where it states them).

    Attributes:
        method: ``unrolled`` | ``implicit`` | ``matching``.
        inner_steps: T student steps per meta-iteration (paper: 32 for MNIST).
        batch_size: generated images per student step (paper: 128).
        curriculum: ``none`` | ``all-shuffled`` | ``shuffled-batch`` | ``full``.
        student: zoo spec of the student; ``width_choices`` randomises its width each
            meta-iteration (a ``width`` option of the spec is then overridden).
        meta_iterations, meta_lr: Adam on the generator (and curriculum, lr, momentum).
        meta_schedule, meta_lr_floor: the meta-lr over the run (``constant`` or ``cosine``
            down to ``meta_lr_floor`` x ``meta_lr``; the official code: cosine to 10 %).
        mixed_sample, mixed_at: ``implicit``: estimate the mixed term from this many of the
            T batches (unbiased; ``None``: all), and where to evaluate it (``final``: the
            implicit function theorem; ``trajectory``: first-order, each batch at the student
            state it trained).
        step_size_grad: ``implicit`` learns the per-step lr and momentum too, by the
            first-order trajectory hypergradient (the implicit gradient does not reach them).
        unroll_tail: ``implicit`` with ``mixed_at="trajectory"``: backpropagate exactly
            through the last this many inner steps (memory of k steps, not T), first-order
            trajectory gradient before them (0: off).
        grad_clip: clip the generator's meta-gradient to this L2 norm (``None``: off).
        intermediate_every, intermediate_weight: ``unrolled`` also scores the student on
            the real batch after every ``intermediate_every``-th inner step and adds
            ``intermediate_weight`` x their mean to the meta-loss (the official code's
            intermediate losses; 0: off).
        real_batch: real images the student is scored on (unrolled / implicit).
        match_real_per_class: real images per class whose gradient the generated images of
            that class must match, per step (matching).
        match_curriculum: ``matching`` matches the T curriculum batches in order at the
            states a student trained on them passes through, stepping it with the teacher's
            lr and momentum (``False``: fresh per-class noise at each round and a plain SGD
            student at lr 0.01, as DC trains; the learned curriculum is then never trained).
        validation: training images held out for validation (never the test set).
        checkpoint_steps: gradient checkpointing of ``unrolled`` in segments of this size.
        memory_check: refuse, before any work, a run whose learned curriculum or meta-step
            cannot fit in the memory free on the device (``MetaConfig.memory_check``).
        recompute: ``unrolled`` keeps each inner step's student state only and rebuilds the
            steps one at a time in the backward pass: the same gradient (intermediate losses
            included) at the memory of one step, flat in T (``StrategyConfig.recompute``).
        neumann_terms, neumann_alpha: the IFT series.
    """

    method: str = "unrolled"
    inner_steps: int = 32
    batch_size: int = 128
    curriculum: str = "full"
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    learn_labels: bool = False
    inner_lr: float = 0.02
    inner_momentum: float = 0.5
    student: str = "convnet:width=32"
    width_choices: tuple[int, ...] | None = None
    meta_iterations: int = 200
    meta_lr: float = 1e-3
    meta_schedule: str = "constant"
    meta_lr_floor: float = 0.1
    mixed_sample: int | None = None
    mixed_at: str = "final"
    step_size_grad: bool = False
    unroll_tail: int = 0
    grad_clip: float | None = None
    intermediate_every: int = 0
    intermediate_weight: float = 1.0
    real_batch: int = 128
    match_real_per_class: int = 64
    match_curriculum: bool = False
    validation: int = 10000
    checkpoint_steps: int | None = None
    recompute: bool = field(default=False, metadata=ADDED_LATER)
    neumann_terms: int = 5
    neumann_alpha: float = 0.01
    checkpoint_every: int = 10
    eval_every: int = 0
    memory_iterations: int = 1
    # not in the repr: the legacy fingerprint of old checkpoints is the dataclass repr
    memory_check: bool = field(default=True, repr=False, metadata=NOT_IN_RESULT)

    def __post_init__(self) -> None:
        if self.method not in GTN_METHODS:
            raise GeneratorError(f"unknown GTN method {self.method!r}; choose from "
                                 f"{', '.join(GTN_METHODS)}")
        if self.inner_steps < 1:
            raise GeneratorError(f"inner steps T must be >= 1, got {self.inner_steps}")
        if self.meta_iterations < 1:
            raise GeneratorError(f"meta_iterations must be >= 1, got {self.meta_iterations}")
        parse_model_spec(self.student)
        if self.intermediate_every and self.method != "unrolled":
            raise GeneratorError("intermediate losses (--intermediate-every) are unrolled's: "
                                 "they need --method unrolled")
        if self.recompute and self.method != "unrolled":
            raise GeneratorError("--recompute rebuilds unrolled backprop's steps: it needs "
                                 "--method unrolled")
        if self.recompute and self.checkpoint_steps is not None:
            raise GeneratorError("--recompute rebuilds every step already: it does not "
                                 "combine with gradient checkpointing (--checkpoint-steps)")
        if self.intermediate_every and self.checkpoint_steps is not None:
            raise GeneratorError("intermediate losses do not combine with gradient "
                                 "checkpointing (--checkpoint-steps); choose one")
        self.meta_config()  # one-line ConfigError for a bad schedule, clip or weight

    def check(self, info: DatasetInfo) -> None:
        """Refuse settings that cannot run on data set ``info`` (one-line GeneratorError)."""
        if self.batch_size < 2:
            raise GeneratorError(f"batch size (--batch-size) must be >= 2 (the generator's "
                                 f"batch norm needs two images), got {self.batch_size}")
        if self.method == "matching" and self.batch_size < 2 * info.num_classes:
            raise GeneratorError(
                f"matching generates batch size / classes images per class and needs at least "
                f"2: batch size (--batch-size) must be >= {2 * info.num_classes} for "
                f"{info.num_classes} classes, got {self.batch_size}")

    def meta_config(self) -> MetaConfig:
        """The meta-training loop's configuration. T, the inner schedule, lr and momentum are
        the teacher's (:func:`make_teacher`); matching's loops default to the teacher's T
        match-then-step rounds."""
        return MetaConfig(
            strategy=self.method, iterations=self.meta_iterations,
            optimizer="adam", lr=self.meta_lr, momentum=0.0,
            checkpoint_every=self.checkpoint_every, eval_every=self.eval_every,
            memory_iterations=self.memory_iterations, memory_check=self.memory_check,
            schedule=self.meta_schedule,
            lr_floor=self.meta_lr_floor,
            strategy_config=StrategyConfig(
                real_batch=self.real_batch, real_per_class=self.match_real_per_class,
                grad_clip=self.grad_clip, step_size_grad=self.step_size_grad,
                mixed_sample=self.mixed_sample, mixed_at=self.mixed_at,
                unroll_tail=self.unroll_tail, intermediate_every=self.intermediate_every,
                intermediate_weight=self.intermediate_weight,
                match_curriculum=self.match_curriculum,
                checkpoint_steps=self.checkpoint_steps, recompute=self.recompute,
                neumann_terms=self.neumann_terms,
                neumann_alpha=self.neumann_alpha))


def recipe_config(method: str, recipe: bool = True, **options: object) -> GTNConfig:
    """A :class:`GTNConfig` for ``method`` with the method's training recipe
    (:data:`RECIPES`) under ``options`` (``recipe=False``: the bare dataclass defaults).
    ``mixed_at`` other than ``trajectory`` drops the recipe's exact tail, which needs it."""
    if method not in RECIPES:
        raise GeneratorError(f"unknown GTN method {method!r}; choose from "
                             f"{', '.join(RECIPES)}")
    base = dict(RECIPES[method]) if recipe else {}
    if options.get("mixed_at", base.get("mixed_at")) != "trajectory" and \
            "unroll_tail" not in options:
        base.pop("unroll_tail", None)  # a tail needs the trajectory head; the IFT has none
    return GTNConfig(method=method, **{**base, **options})


def split_validation(train_set: ImageSet, n: int) -> tuple[ImageSet, ImageSet]:
    """(meta-training part, validation part): a fixed random ``n`` images held out."""
    total = train_set.labels.numel()
    if not 0 < n < total:
        raise GeneratorError(f"validation size must be between 1 and {total - 1}, got {n}")
    perm = torch.randperm(total, generator=make_generator(0, "gtn-validation"))
    return train_set.subset(perm[n:].sort().values), train_set.subset(perm[:n].sort().values)


def make_teacher(info: DatasetInfo, config: GTNConfig, seed: int) -> GeneratorTeacher:
    """The generator teacher of ``config`` for data set ``info``, initialised from ``seed``."""
    return GeneratorTeacher(info, config.inner_steps, config.batch_size, config.curriculum,
                            config.generator, config.learn_labels, config.inner_lr,
                            config.inner_momentum, generator=make_generator(seed, "generator"))


def _student_factory(info: DatasetInfo, config: GTNConfig, device: torch.device
                     ) -> Callable[[torch.Generator], torch.nn.Module]:
    def make(gen: torch.Generator) -> torch.nn.Module:
        overrides = {}
        if config.width_choices:
            i = int(torch.randint(len(config.width_choices), (1,), generator=gen))
            overrides["width"] = config.width_choices[i]
        return build_model(config.student, info.channels, info.num_classes, info.im_size,
                           generator=gen, **overrides).to(device)
    return make


def validation_evaluator(val: ImageSet, config: GTNConfig, seed: int,
                         device: torch.device | str = "cpu"
                         ) -> Callable[[GeneratorTeacher, int], dict]:
    """``evaluate(teacher, iteration)``: one student's few-step accuracy on ``val`` (logged),
    ``{"validation_accuracy": %}``; seeds of its own (the run's stream is not touched)."""
    images, labels = val.images.to(device), val.labels.to(device)

    def evaluate(teacher: GeneratorTeacher, iteration: int) -> dict:
        acc = few_step_accuracy(teacher, config.student, images, labels, seed, 1)[0]
        log.info("meta-iteration %d: validation %.2f %%", iteration, acc)
        return {"validation_accuracy": acc}

    return evaluate


def _check_curriculum_fits(info: DatasetInfo, config: GTNConfig,
                           device: torch.device) -> None:
    """A learned curriculum holds T x batch noise vectors (and label logits): with its
    gradient and Adam's two moments, four copies. Refused before it is allocated when it
    cannot fit (:func:`distill.memory.check_fits`)."""
    from distill.memory import check_fits

    per_image = (config.generator.noise_dim if config.curriculum != "none" else 0) + \
        (info.num_classes if config.learn_labels else 0)
    estimate = 4 * 4 * config.inner_steps * config.batch_size * per_image
    check_fits(estimate, device,
               f"the learned curriculum of T = {config.inner_steps} batches of "
               f"{config.batch_size} (with its gradient and Adam's moments)",
               "a smaller --inner-steps or --batch-size, or --curriculum none")


def train_gtn(train_set: ImageSet, config: GTNConfig, seed: int = 0,
              device: torch.device | str = "cpu", checkpoint: str | Path | None = None,
              resume: bool = False, progress: Progress | None = None,
              evaluate: Callable[[GeneratorTeacher, int], dict] | None = None
              ) -> tuple[GeneratorTeacher, MetaResult, ImageSet]:
    """Meta-train a generator teacher; returns (teacher, run record, validation split).

    Every ``config.eval_every`` meta-iterations ``evaluate(teacher, iteration)`` is called
    (default: :func:`validation_evaluator` on the held-out validation split).
    """
    device = torch.device(device)
    config.check(train_set.info)
    fit, val = split_validation(train_set, config.validation)
    if evaluate is None and config.eval_every:
        evaluate = validation_evaluator(val, config, seed, device)
    if config.memory_check:
        _check_curriculum_fits(train_set.info, config, device)
    teacher = make_teacher(train_set.info, config, seed).to(device)
    extra = {"dataset": train_set.info.name, "gtn": config}
    result = meta_train(teacher, RealSampler(fit, device),
                        _student_factory(train_set.info, config, device), config.meta_config(),
                        seed, checkpoint=checkpoint, resume=resume, progress=progress,
                        evaluate=(lambda it: evaluate(teacher, it)) if evaluate else None,
                        fingerprint_extra=extra, device=device)
    return teacher, result, val


def few_step_accuracy(teacher: GeneratorTeacher, student: str, images: torch.Tensor,
                      labels: torch.Tensor, seed: int, n_students: int = 3) -> list[float]:
    """Test accuracy (%) of fresh students trained T steps on the teacher's curriculum with
    its learned per-step lr and momentum (the GTN paper's protocol)."""
    return steps_accuracy(student, teacher.info,
                          lambda g: teacher.inner_batches(g, graph=False),
                          teacher.lr_tensor().detach().tolist(),
                          float(teacher.momentum_tensor().detach()), images, labels, seed,
                          n_students, "few-step", teacher.log_lr.device)


def steps_accuracy(student: str, info: DatasetInfo,
                   batches: Callable[[torch.Generator], Iterable[Batch]],
                   lrs: list[float], momentum: float, images: torch.Tensor,
                   labels: torch.Tensor, seed: int, n_students: int, stream: str,
                   device: torch.device) -> list[float]:
    """Test accuracy (%) of ``n_students`` fresh students, each trained one SGD step per batch
    of ``batches(g)`` (``g``: the student's own generator, stream ``stream``)."""
    accs = []
    for i in range(n_students):
        g = make_generator(seed, stream, i)
        model = build_model(student, info.channels, info.num_classes, info.im_size,
                            generator=g).to(device)
        model.train()
        state = student_steps(model, [p.detach() for p in model.parameters()], batches(g), lrs,
                              momentum)
        accs.append(100.0 * accuracy(load_params(model, state.params), images, labels))
    return accs


def fixed_set_accuracy(teacher: GeneratorTeacher, protocol: EvalProtocol, images: torch.Tensor,
                       labels: torch.Tensor, seed: int) -> EvalResult:
    """DC-protocol accuracy of a fixed generated set of T x batch images (one curriculum)."""
    g = make_generator(seed, "fixed-set")
    batches = list(teacher.inner_batches(g, graph=False))
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    return evaluate_set(x, y, images, labels, protocol, seed=seed,
                        num_classes=teacher.num_classes)


GENERATOR_FORMAT = "gtnkit.generator"
#: What a run calls its generator, newest first (readers take both).
GENERATOR_FILES = ("generator.safetensors", "generator.pt")


def save_generator(path: str | Path, teacher: GeneratorTeacher, config: GTNConfig,
                   meta: dict | None = None) -> Path:
    """Write a trained teacher atomically: its weights (curriculum, labels, learned lr and
    momentum included) as safetensors with a card (data set, image shape, class names, the
    normalisation of its images, config, ``meta`` such as its evaluation, gtnkit version,
    sha256); under a ``.pt`` name, the torch layout of earlier versions."""
    import io

    from distill.artefacts import content_hash, gtnkit_version, write_safetensors
    from distill.store import atomic_write_bytes, to_jsonable

    info = teacher.info
    state = {k: v.detach().cpu() for k, v in teacher.state_dict().items()}
    if Path(path).suffix == ".pt":
        buf = io.BytesIO()
        torch.save({"format": GENERATOR_FORMAT, "version": 1, "dataset": info.name,
                    "shape": [info.channels, *info.im_size],
                    "config": json.dumps(to_jsonable(asdict(config))), "state": state}, buf)
        return atomic_write_bytes(path, buf.getvalue())
    card = {**(meta or {}), "format": GENERATOR_FORMAT, "version": 2, "dataset": info.name,
            "shape": [info.channels, *info.im_size], "num_classes": info.num_classes,
            "class_names": list(info.class_names),
            "normalization": {"mean": list(info.mean), "std": list(info.std)},
            "config": to_jsonable(asdict(config)), "gtnkit": gtnkit_version(),
            "sha256": content_hash(state)}
    return write_safetensors(path, state, card)


def _read_generator(path: Path) -> dict:
    """The file as the ``.pt`` layout's dict (``dataset``, ``shape``, ``config`` JSON text,
    ``state``), whichever format it is in; checked for NaN/inf and, for safetensors, against
    its card's hash."""
    from distill.artefacts import content_hash, is_safetensors, read_safetensors
    from distill.store import read_tagged

    if path.is_file():
        with open(path, "rb") as f:
            head = f.read(9)
        if is_safetensors(head):
            state, card = read_safetensors(path, "gtnkit generator", GeneratorError)
            if card.get("format") != GENERATOR_FORMAT:
                raise GeneratorError(f"{path} is not a gtnkit generator (card format "
                                     f"{card.get('format')!r})")
            if card.get("sha256") != content_hash(state):
                raise GeneratorError(f"{path}: the tensors do not match the card's sha256 (the "
                                     f"file was changed or damaged)")
            if not isinstance(card.get("config"), dict) or "dataset" not in card or \
                    "shape" not in card:
                raise GeneratorError(f"{path}: its card lacks the config, data set or shape")
            return {**card, "config": json.dumps(card["config"]), "state": state}
    return read_tagged(path, GENERATOR_FORMAT, "gtnkit generator", GeneratorError,
                       missing="no generator at {path}")


def load_generator(path: str | Path, dataset: str | None = None
                   ) -> tuple[GeneratorTeacher, GTNConfig]:
    """Read :func:`save_generator`'s file (either format; a run folder means its generator);
    ``dataset`` checks it makes that data set's shape."""
    from distill.data import DataError, get_info
    from distill.store import find_run_file

    path = find_run_file(path, GENERATOR_FILES)
    obj = _read_generator(path)
    try:
        info = get_info(obj["dataset"])
    except DataError as exc:
        raise GeneratorError(f"{path}: {exc}") from None
    if list(obj["shape"]) != [info.channels, *info.im_size]:
        raise GeneratorError(f"{path}: the card says images of shape {obj['shape']}; "
                             f"{info.name} images are {[info.channels, *info.im_size]}")
    if dataset is not None:
        want = get_info(dataset)
        if (want.channels, *want.im_size) != tuple(obj["shape"]) or \
                want.num_classes != info.num_classes:
            raise GeneratorError(
                f"{path} makes {'x'.join(map(str, obj['shape']))} images of {info.name}, not "
                f"{want.channels}x{want.im_size[0]}x{want.im_size[1]} images of {want.name}")
    raw = json.loads(obj["config"])
    raw["generator"] = GeneratorConfig(**raw["generator"])
    if raw.get("width_choices") is not None:
        raw["width_choices"] = tuple(raw["width_choices"])
    config = GTNConfig(**raw)
    teacher = make_teacher(info, config, seed=0)
    teacher.load_state_dict(obj["state"])
    return teacher, config
