"""A generator as a data set: the images it makes, as a :class:`distill.store.SavedSet` (a torch
``Dataset`` with its card), either ``per_class`` images of every class from seeded noise or
its learned curriculum (the T batches a student is trained on, in step order, with the learned
per-step lr and momentum in the card)."""

from __future__ import annotations

from pathlib import Path

import torch

from distill.rng import generator as make_generator
from distill.store import SavedSet

from .generator import GeneratorError, GeneratorTeacher
from .train import GTNConfig, load_generator

__all__ = ["generator_set", "load_generator_set"]


@torch.no_grad()
def generator_set(teacher: GeneratorTeacher, config: GTNConfig, per_class: int | None = 10,
                  seed: int = 0, curriculum: bool = False, meta: dict | None = None
                  ) -> SavedSet:
    """The images ``teacher`` makes, as a set.

    Args:
        per_class: images per class from fresh noise (eval mode), grouped by class; seeded by
            ``seed`` (the stream ``gtnkit gtn sample`` uses, so the same images).
        curriculum: instead, the learned curriculum: T x batch images in step order
            (``DataLoader(..., batch_size=card["curriculum"]["batch_size"])`` without shuffling
            replays it), hard or learned soft labels, made as the students of meta-training
            saw them (train mode: batch norm on each batch's statistics; the teacher's running
            statistics are left as they were).
        meta: more card entries (e.g. the generator's path).

    Raises:
        GeneratorError: ``curriculum`` for a generator without a learned one (``none``).
    """
    info = teacher.info
    card = {"dataset": info.name, "method": f"gtn-{config.method}", "kind": "generated",
            "seed": seed, **(meta or {})}
    if not curriculum:
        if per_class is None or per_class < 1:
            raise GeneratorError(f"per_class must be >= 1, got {per_class}")
        images, labels = teacher.sample(per_class, make_generator(seed, "sample"))
        return SavedSet(images.cpu(), labels.cpu(), {**card, "ipc": per_class})
    if teacher.curriculum == "none":
        raise GeneratorError("this generator has no learned curriculum (curriculum 'none'); "
                             "sample per_class images instead")
    was = teacher.generator.training
    kept = {k: v.clone() for k, v in teacher.generator.state_dict().items()}
    teacher.generator.train()
    order = list(range(teacher.steps))  # the learned batches in their step order
    batches = list(teacher.inner_batches(make_generator(seed, "sample"), order, graph=False))
    teacher.generator.load_state_dict(kept)
    teacher.generator.train(was)
    images = torch.cat([b[0] for b in batches]).cpu()
    labels = torch.cat([b[1] for b in batches]).cpu()
    lrs = teacher.lr_tensor().detach().cpu().reshape(-1).tolist()
    card.update(kind="curriculum", curriculum={
        "mode": teacher.curriculum, "steps": teacher.steps, "batch_size": teacher.batch_size,
        "lr_per_step": lrs, "momentum": float(teacher.momentum_tensor().detach())})
    return SavedSet(images, labels, card)


def load_generator_set(path: str | Path, per_class: int | None = 10, seed: int = 0,
                       curriculum: bool = False) -> SavedSet:
    """:func:`generator_set` of the generator file (or run folder) at ``path``."""
    teacher, config = load_generator(path)
    return generator_set(teacher, config, per_class, seed, curriculum,
                         meta={"generator": str(path)})
