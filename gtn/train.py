"""Training a Generative Teaching Network with any meta-gradient strategy, and scoring it.

Such et al., ICML 2020 train the generator by backpropagating through the student's T inner
steps (``unrolled``). The same :func:`distill.condense.meta_train` loop also trains it with
the implicit function theorem (``implicit``: Lorraine, Vicol & Duvenaud, AISTATS 2020), the
first-order trajectory hypergradient with an exact tail (``first-order-tail``), or by
per-class gradient matching of generated vs real batches (``matching``: Medvedev &
D'yakonov, "New Properties of the Data Distillation Method When Working With Tabular Data" /
"Learning to generate synthetic training data using gradient matching and generative
teaching networks", AIST 2021), or by trajectory matching (``trajectory``: Cazenavette et
al., CVPR 2022, with TESLA's constant-memory gradient, Cui et al., ICML 2023: students start at
an expert's initialisation and should land where it is M epochs on), so they can be compared
by peak memory and accuracy.

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
from pathlib import Path

import torch

from distill.data import DatasetInfo, ImageSet
from distill.engine import EvalProtocol, EvalResult, accuracy, evaluate_set
from distill.inner import load_params, student_steps
from distill.metatrain import MetaResult, meta_train
from distill.models import build_model
from distill.progress import Progress
from distill.rng import generator as make_generator
from distill.strategies import RealSampler
from distill.teacher import Batch

from .config import GTNConfig, recipe_config
from .generator import GeneratorError, GeneratorTeacher
from .methods import GTN_METHODS, RECIPES

__all__ = ["GTN_METHODS", "RECIPES", "GTNConfig", "recipe_config", "split_validation",
           "train_gtn", "few_step_accuracy", "fixed_set_accuracy", "make_teacher",
           "save_generator", "load_generator", "GENERATOR_FILES", "validation_evaluator"]

log = logging.getLogger("gtnkit")

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
    # the flat record, by strategy: checkpoints written before the configs nested still match
    extra = {"dataset": train_set.info.name, "gtn": config.flat(named=False)}
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
                    "config": json.dumps(to_jsonable(config.as_dict())), "state": state}, buf)
        return atomic_write_bytes(path, buf.getvalue())
    card = {**(meta or {}), "format": GENERATOR_FORMAT, "version": 2, "dataset": info.name,
            "shape": [info.channels, *info.im_size], "num_classes": info.num_classes,
            "class_names": list(info.class_names),
            "normalization": {"mean": list(info.mean), "std": list(info.std)},
            "config": to_jsonable(config.as_dict()), "gtnkit": gtnkit_version(),
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
    config = GTNConfig.from_dict(json.loads(obj["config"]))
    teacher = make_teacher(info, config, seed=0)
    teacher.load_state_dict(obj["state"])
    return teacher, config
