"""A Generative Teaching Network trained by trajectory matching (``gtn train --method
trajectory``), and the implicit method's conjugate-gradient solver through the GTN config and
the CLI.

The trajectory strategy's two gradients are checked against each other and against finite
differences on pixels in ``test_trajectory.py``; here the same comparison runs with the
generator as the teacher (unrolled autograd through the T steps vs TESLA's rebuilt steps, the
generator's weights, learned curriculum and step sizes all reached).
"""

from __future__ import annotations

import json

import pytest
import torch

import distill.data
from distill.experts import ExpertConfig, ExpertError, train_experts
from distill.rng import generator as make_generator
from distill.strategies import RealSampler, make_strategy
from gtn import GTNConfig, recipe_config, train_gtn
from gtn.generator import GeneratorConfig, GeneratorError
from gtn.train import _student_factory, make_teacher

from .conftest import make_tiny_set
from .test_cli import assert_one_line_error, run

MODEL = "convnet:width=4,depth=1,first_pad=1"
SMALL = dict(inner_steps=3, batch_size=20, generator=GeneratorConfig(noise_dim=4, width_fc=8,
                                                                      width_conv=4),
             student=MODEL, validation=20)


def _teacher_grads(gradient: str, curriculum: str) -> list[torch.Tensor]:
    """The generator's meta-gradient of one trajectory-matching step (an SGD at lr 0 keeps the
    gradient in ``.grad`` and moves nothing)."""
    data = make_tiny_set(per_class=8)
    cfg = recipe_config("trajectory", curriculum=curriculum, trajectory_gradient=gradient,
                        expert_epochs=2, **SMALL)
    teacher = make_teacher(data.info, cfg, seed=0)
    strategy = make_strategy(cfg.strategy, cfg.strategy_config)
    make_student = _student_factory(data.info, cfg, torch.device("cpu"))
    params = [p for p in teacher.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.0)
    strategy.step(teacher, opt, RealSampler(data), make_student, make_generator(0, "t"))
    return [p.grad.clone() for p in params]


@pytest.mark.parametrize("curriculum", ["full", "none"])
def test_tesla_and_unrolled_give_the_generator_the_same_gradient(curriculum):
    unrolled = _teacher_grads("unrolled", curriculum)
    tesla = _teacher_grads("tesla", curriculum)
    assert len(unrolled) == len(tesla) > 3
    assert sum(float(g.abs().sum()) for g in unrolled) > 0  # the loss reaches the generator
    # float32 through T double-backward steps; parameters whose gradient is zero in exact
    # arithmetic (a bias before batch norm) carry rounding only: atol on the global scale
    scale = max(float(g.abs().max()) for g in unrolled)
    for a, b in zip(unrolled, tesla):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5 * scale)


def test_trajectory_matching_brings_the_students_towards_the_expert():
    """With one expert and a learned curriculum every meta-iteration scores the same draw, so
    the meta-loss is a function of the generator alone: training must lower it."""
    cfg = recipe_config("trajectory", curriculum="full", expert_epochs=2, online_experts=1,
                        meta_iterations=30, meta_lr=0.01, eval_every=0, **SMALL)
    _, res, _ = train_gtn(make_tiny_set(per_class=8), cfg, seed=0)
    assert res.losses[-1] < 0.9 * res.losses[0], res.losses


def test_online_experts_hold_exactly_the_epochs_the_targets_need():
    cfg = recipe_config("trajectory", expert_epochs=2, online_experts=1, **SMALL)
    data = make_tiny_set(per_class=8)
    strategy = make_strategy(cfg.strategy, cfg.strategy_config)
    buffer = strategy.buffer(RealSampler(data),
                             _student_factory(data.info, cfg, torch.device("cpu")))
    assert buffer.epochs == 2  # start epoch 0 only (the GTN setting), target epoch 2


def test_experts_of_another_model_are_refused_in_one_line(tmp_path):
    data = make_tiny_set(per_class=8)
    folder = tmp_path / "experts"
    train_experts(data, folder, 1, ExpertConfig(model="mlp:width=8", epochs=1, augment=""))
    cfg = recipe_config("trajectory", expert_epochs=1, experts=str(folder), meta_iterations=1,
                        eval_every=0, **SMALL)
    with pytest.raises(ExpertError, match="do not fit the student"):
        train_gtn(data, cfg, seed=0)


def test_trajectory_knobs_belong_to_the_trajectory_method():
    with pytest.raises(GeneratorError, match="belong to trajectory matching"):
        GTNConfig(method="unrolled", expert_epochs=2)
    with pytest.raises(GeneratorError, match="--ift-solver"):
        GTNConfig(method="unrolled", ift_solver="cg")
    cg = recipe_config("implicit", ift_solver="cg", neumann_terms=7)
    assert (cg.strategy_config.ift_solver, cg.neumann_terms) == ("cg", 7)
    # the flat record round-trips (config.json, saved generators)
    assert GTNConfig.from_dict(cg.as_dict()) == cg
    traj = recipe_config("trajectory", expert_epochs=2)
    assert GTNConfig.from_dict(traj.as_dict()) == traj
    # a method without them keeps the record's defaults, so older fingerprints still match
    from distill.store import fingerprint_of, fingerprint_repr

    flat = recipe_config("unrolled").flat(named=False)
    assert "experts" not in fingerprint_repr(flat) and "ift_solver" not in fingerprint_of(flat)
    assert "ift_solver" in fingerprint_of(cg.flat(named=False))


@pytest.fixture
def tiny_mnist(monkeypatch):
    monkeypatch.setattr(distill.data, "load_dataset",
                        lambda name, split="train", root=None, download=False:
                        make_tiny_set(per_class=8, name=name))


TINY = ["--inner-steps", 2, "--batch-size", 20, "--student", MODEL, "--meta-iterations", 2,
        "--real-batch", 8, "--validation", 20, "--noise-dim", 4, "--width-fc", 8,
        "--width-conv", 4, "--students", 1]


def test_gtn_train_by_trajectory_matching_on_the_command_line(tmp_path, tiny_mnist):
    experts = tmp_path / "experts"
    r = run("-q", "experts", "--dataset", "mnist", "--model", MODEL, "--experts", 2, "--epochs",
            1, "--batch-size", 16, "--augment", "", "--data-root", tmp_path, "--out", experts)
    assert r.exit_code == 0, r.output
    out = tmp_path / "g"
    r = run("-q", "gtn", "train", "--dataset", "mnist", "--method", "trajectory", *TINY,
            "--experts", experts, "--expert-epochs", 1, "--data-root", tmp_path, "--out", out)
    assert r.exit_code == 0, r.output
    gtn = json.loads((out / "config.json").read_text())["gtn"]
    assert (gtn["method"], gtn["experts"], gtn["expert_epochs"], gtn["trajectory_gradient"]) \
        == ("trajectory", str(experts), 1, "tesla")
    assert len(json.loads((out / "results.json").read_text())["accuracies"]) == 1


def test_gtn_train_implicit_with_conjugate_gradient(tmp_path, tiny_mnist):
    out = tmp_path / "cg"
    r = run("-q", "gtn", "train", "--dataset", "mnist", "--method", "implicit", *TINY,
            "--ift-solver", "cg", "--ift-iterations", 3, "--data-root", tmp_path, "--out", out)
    assert r.exit_code == 0, r.output
    gtn = json.loads((out / "config.json").read_text())["gtn"]
    assert (gtn["ift_solver"], gtn["neumann_terms"]) == ("cg", 3)


@pytest.mark.parametrize("args,needle", [
    (["--experts", "somewhere"], "--experts applies to --method trajectory only"),
    (["--expert-epochs", "2"], "--expert-epochs applies to --method trajectory only"),
    (["--ift-solver", "cg"], "--ift-solver applies to --method implicit only"),
    (["--method", "first-order-tail", "--ift-solver", "cg"],
     "--ift-solver applies to --method implicit only"),
    (["--method", "trajectory", "--trajectory-gradient", "adjoint"], "tesla"),
])
def test_bad_trajectory_and_solver_options_are_one_line(tmp_path, args, needle):
    out = tmp_path / "o"
    r = run("gtn", "train", "--dataset", "mnist", *args, "--data-root", tmp_path, "--out", out)
    assert_one_line_error(r, needle)
    assert not out.exists()


def test_matching_real_images_per_class_is_an_option(tmp_path, tiny_mnist):
    out = tmp_path / "m"
    r = run("-q", "gtn", "train", "--dataset", "mnist", "--method", "matching", *TINY,
            "--match-real-per-class", 5, "--data-root", tmp_path, "--out", out)
    assert r.exit_code == 0, r.output
    assert json.loads((out / "config.json").read_text())["gtn"]["match_real_per_class"] == 5
    r = run("gtn", "train", "--dataset", "mnist", "--match-real-per-class", 5, "--data-root",
            tmp_path, "--out", tmp_path / "u")
    assert_one_line_error(r, "--match-real-per-class applies to --method matching only")
