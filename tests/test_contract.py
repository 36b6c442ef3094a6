"""Contract: every registered strategy trains every teacher kind (a synthetic set; a generator
with each curriculum) on a tiny problem, and the teacher gets a finite, non-zero gradient."""

from __future__ import annotations

import pytest
import torch

from distill.models import build_model
from distill.rng import generator
from distill.strategies import STRATEGIES, RealSampler, StrategyConfig, make_strategy
from distill.synthetic import SyntheticSet
from distill.teacher import Teacher
from gtn import CURRICULA, GeneratorConfig, GeneratorTeacher

from .conftest import make_tiny_set

DATA = make_tiny_set(per_class=4)
INFO = DATA.info
CONFIG = StrategyConfig(real_batch=4, outer_loop=2, inner_loop=1, neumann_terms=2)


def make_teacher(kind: str) -> Teacher:
    g = generator(0, "contract")
    if kind == "synthetic":
        return SyntheticSet.from_real(DATA, 1, g, steps=2, step_size=6)
    return GeneratorTeacher(INFO, steps=2, batch_size=20, curriculum=kind,
                            config=GeneratorConfig(noise_dim=3, width_fc=6, width_conv=4),
                            generator=g)


class Recorder(torch.optim.SGD):
    """An optimiser that keeps the gradient it was asked to apply."""

    def step(self, closure=None):  # noqa: ANN001, ANN201 - torch's signature
        self.seen = [p.grad.clone() for group in self.param_groups for p in group["params"]
                     if p.grad is not None]
        return super().step(closure)


@pytest.mark.parametrize("kind", ["synthetic", *CURRICULA])
@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_trains_every_teacher(name, kind):
    teacher = make_teacher(kind)
    params = [p for p in teacher.parameters() if p.requires_grad]
    optimizer = Recorder(params, lr=1e-3)

    def make_student(g: torch.Generator) -> torch.nn.Module:
        return build_model("convnet:width=4,depth=1", INFO.channels, INFO.num_classes,
                           INFO.im_size, generator=g)

    stats = make_strategy(name, CONFIG).step(teacher, optimizer, RealSampler(DATA),
                                             make_student, generator(1, "contract"))
    assert torch.isfinite(torch.tensor(stats["loss"]))
    assert optimizer.seen, "no gradient reached the teacher"
    assert all(torch.isfinite(g).all() for g in optimizer.seen)
    assert sum(float(g.abs().sum()) for g in optimizer.seen) > 0
