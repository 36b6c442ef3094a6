"""Generative Teaching Networks on tiny generators and students: the three meta-gradients
point the right way (unrolled vs finite differences, implicit vs unrolled on a strongly convex
student, matching zero on coinciding batches), the curricula differ exactly as specified, a
few meta-steps improve the student, and bad input is one typed line."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
import torch
from torch import nn

from distill.data import DatasetInfo, ImageSet, get_info
from distill.engine import classification_loss
from distill.hypergrad import implicit_hypergradient
from distill.matching import matching_loss
from distill.models import build_model
from distill.unrolled import unrolled_loss
from gtn import (
    GeneratorConfig,
    GeneratorError,
    GeneratorTeacher,
    GTNConfig,
    load_generator,
    save_generator,
    train_gtn,
)
from gtn.train import few_step_accuracy

from .conftest import Kill, killer, make_tiny_set

D = torch.float64
TINY_INFO = DatasetInfo("tiny", 1, (4, 4), 2, (0.0,), (1.0,), ("a", "b"), (0, 0), "")
TINY_GEN = GeneratorConfig(noise_dim=3, width_fc=6, width_conv=4)


def teacher(curriculum="full", steps=3, batch=4, info=TINY_INFO, seed=0, **kw):
    return GeneratorTeacher(info, steps, batch, curriculum, kw.pop("config", TINY_GEN),
                            generator=torch.Generator().manual_seed(seed), **kw)


def linear_student(seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(16, 2)
    with torch.no_grad():
        lin.weight.copy_(0.1 * torch.randn(2, 16, generator=g))
        lin.bias.zero_()
    return nn.Sequential(nn.Flatten(), lin).to(D)


def real_batch(seed=1, n=12):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 4, 4, generator=g, dtype=D)
    return x, (x[:, 0, 0, 0] > 0).long()


def test_unrolled_teacher_gradient_matches_finite_differences():
    t = teacher(steps=3).to(D)
    student = linear_student()
    xr, yr = real_batch()

    def meta_loss():
        g = torch.Generator().manual_seed(5)
        return unrolled_loss(student, t.curriculum_batches(g), xr, yr, t.lr_tensor(),
                             momentum=t.momentum_tensor())

    params = [p for p in t.parameters() if p.requires_grad]
    grads = torch.autograd.grad(meta_loss(), params)
    g = torch.Generator().manual_seed(9)
    direction = [torch.randn(p.shape, generator=g, dtype=D) for p in params]
    analytic = sum((gr * v).sum() for gr, v in zip(grads, direction))
    eps = 1e-6
    with torch.no_grad():
        for p, v in zip(params, direction):
            p += eps * v
    plus = meta_loss().detach()
    with torch.no_grad():
        for p, v in zip(params, direction):
            p -= 2 * eps * v
    minus = meta_loss().detach()
    assert analytic.item() == pytest.approx((plus - minus).item() / (2 * eps), rel=1e-5)
    assert all(gr.abs().sum() > 0 for gr in grads[-2:])  # lr and momentum are learned


def test_implicit_agrees_with_a_long_unroll_on_a_strongly_convex_student():
    t = teacher(steps=400, batch=6, config=GeneratorConfig(3, 6, 4, batch_norm=False)).to(D)
    with torch.no_grad():  # one batch at every step: a fixed inner problem
        t.noise[:] = t.noise[0]
        t.log_lr.fill_(torch.tensor(0.5).log().item())
    student = linear_student(1)
    xr, yr = real_batch(2)
    wd = 0.1
    gen_params = list(t.generator.parameters())
    g = torch.Generator().manual_seed(0)
    batches = t.curriculum_batches(g)
    loss = unrolled_loss(student, batches, xr, yr, t.lr_tensor(), momentum=0.0,
                         weight_decay=wd)
    g_unrolled = torch.autograd.grad(loss, gen_params)

    # the same inner optimum by plain gradient descent, then the IFT hypergradient there
    x0, y0 = (b.detach() for b in batches[0])
    w = [p.detach().clone().requires_grad_() for p in student.parameters()]

    def inner(x, weights):
        out = nn.functional.linear(x.flatten(1), *weights)
        return classification_loss(out, y0) + wd / 2 * sum((p ** 2).sum() for p in weights)

    for _ in range(3000):
        gw = torch.autograd.grad(inner(x0, w), w)
        with torch.no_grad():
            for p, d in zip(w, gw):
                p -= 0.5 * d
    x_graph, _ = t.step_batch(0, g)
    outer = classification_loss(nn.functional.linear(xr.flatten(1), *w), yr)
    g_implicit = implicit_hypergradient(inner(x_graph, w), outer, w, gen_params, terms=2000,
                                        alpha=0.5)
    flat = lambda gs: torch.cat([x.flatten() for x in gs])  # noqa: E731
    a, b = flat(g_unrolled), flat(g_implicit)
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.999
    torch.testing.assert_close(a, b, rtol=2e-3, atol=1e-7)


def test_matching_is_zero_when_generated_and_real_batches_coincide():
    info = get_info("mnist")
    t = teacher(info=info, config=GeneratorConfig(8, 16, 8), batch=20)
    net = build_model("convnet:width=4,depth=2", 1, 10, (28, 28),
                      generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        real = [t.class_batch(c, torch.Generator().manual_seed(c))[0] for c in range(10)]
    syn = [t.class_batch(c, torch.Generator().manual_seed(c)) for c in range(10)]
    xs, ys = [x for x, _ in syn], [y for _, y in syn]
    assert matching_loss(net, real, xs, ys, distance="mse").item() < 1e-9
    same = matching_loss(net, real, xs, ys)  # 1 - cos, up to the distance's epsilon
    other = [t.class_batch(c, torch.Generator().manual_seed(100 + c)) for c in range(10)]
    differ = matching_loss(net, real, [x for x, _ in other], [y for _, y in other])
    assert differ.item() > 100 * same.abs().item()


def test_curricula_differ_exactly_as_specified():
    full = teacher("full", steps=4, batch=3)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    assert full.order(g1) == [0, 1, 2, 3] == full.order(g2)
    a, b = full.curriculum_batches(g1), full.curriculum_batches(g2)
    assert all(torch.equal(x[0], y[0]) for x, y in zip(a, b))  # fixed learned batches

    sb = teacher("shuffled-batch", steps=4, batch=3)
    orders = {tuple(sb.order(torch.Generator().manual_seed(s))) for s in range(20)}
    assert len(orders) > 1 and all(sorted(o) == [0, 1, 2, 3] for o in orders)

    al = teacher("all-shuffled", steps=4, batch=3)
    order = al.order(torch.Generator().manual_seed(3))
    flat = torch.cat(order)
    assert sorted(flat.tolist()) == list(range(12))  # every pool vector once
    assert any(set(o.tolist()) != set(range(3 * i, 3 * i + 3)) for i, o in enumerate(order))
    x, y = al.step_batch(order[0], torch.Generator())
    pool = al.noise.reshape(-1, TINY_GEN.noise_dim)
    torch.testing.assert_close(x, al.generator(pool[order[0]], al.batch_labels.repeat(4)[order[0]]))

    none = teacher("none", steps=4, batch=3)
    assert none.noise is None and none.order(g1) == [None] * 4
    n1 = none.step_batch(None, torch.Generator().manual_seed(0))[0]
    n2 = none.step_batch(None, torch.Generator().manual_seed(1))[0]
    assert not torch.allclose(n1, n2)  # fresh noise every step


@pytest.mark.parametrize("method,along", [("unrolled", False), ("implicit", False),
                                          ("matching", False), ("matching", True)])
def test_a_few_meta_steps_improve_the_student(tmp_path, method, along):
    data = make_tiny_set(per_class=30)
    cfg = GTNConfig(method=method, inner_steps=4, batch_size=20, match_real_per_class=10,
                    match_curriculum=along,
                    generator=GeneratorConfig(8, 32, 8), student="convnet:width=4,depth=2",
                    meta_iterations=25, meta_lr=1e-2, real_batch=40, validation=100)
    before = GTNConfig(**{**cfg.__dict__, "meta_iterations": 1, "meta_lr": 1e-12})
    t0, _, val = train_gtn(data, before, seed=0)
    t1, run, val = train_gtn(data, cfg, seed=0, checkpoint=tmp_path / "c.pt")
    acc0 = sum(few_step_accuracy(t0, cfg.student, val.images, val.labels, 0, 4)) / 4
    acc1 = sum(few_step_accuracy(t1, cfg.student, val.images, val.labels, 0, 4)) / 4
    assert acc1 > acc0 + 10, (acc0, acc1)  # unrolled: about +40 points, implicit +15
    if method != "unrolled":
        return

    path = save_generator(tmp_path / "g.pt", t1, cfg)
    loaded, cfg2 = load_generator(path, "mnist")
    assert cfg2 == cfg
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(),
                                                 t1.state_dict().values()))
    with pytest.raises(GeneratorError, match="not 3x32x32 images of cifar10"):
        load_generator(path, "cifar10")
    (tmp_path / "bad.pt").write_bytes(b"junk")
    with pytest.raises(GeneratorError, match="not a readable"):
        load_generator(tmp_path / "bad.pt")


@pytest.mark.parametrize("kwargs,needle", [
    (dict(inner_steps=0), "inner steps"),
    (dict(method="evolution"), "unknown GTN method"),
    (dict(student="gpt"), "gpt"),
])
def test_bad_gtn_config(kwargs, needle):
    with pytest.raises(Exception, match=needle) as info:
        GTNConfig(**kwargs)
    assert "\n" not in str(info.value)


def test_bad_curriculum_and_shape():
    with pytest.raises(GeneratorError, match="unknown curriculum"):
        teacher("zigzag")
    with pytest.raises(GeneratorError, match="divisible by 4"):
        teacher(info=DatasetInfo("odd", 1, (6, 6), 2, (0.0,), (1.0,), ("a", "b"), (0, 0), ""))
    with pytest.raises(GeneratorError, match="learned curriculum"):
        teacher("none", learn_labels=True)


def test_generated_sets_are_usable_image_sets():
    t = teacher(info=get_info("mnist"), config=GeneratorConfig(8, 16, 8))
    x, y = t.sample(3, torch.Generator().manual_seed(0))
    assert x.shape == (30, 1, 28, 28) and torch.equal(y, torch.arange(10).repeat_interleave(3))
    ImageSet(x, y, get_info("mnist")).class_indices(3)  # grouped by class


RECIPES = {"plain": {},
           "recipe": dict(meta_schedule="cosine", grad_clip=1.0, intermediate_every=1),
           "implicit-variants": dict(meta_schedule="cosine", step_size_grad=True,
                                     mixed_at="trajectory", mixed_sample=2),
           "curriculum": dict(match_curriculum=True)}


@pytest.mark.parametrize("method,recipe", [("unrolled", "plain"), ("implicit", "plain"),
                                           ("matching", "plain"), ("matching", "curriculum"),
                                           ("unrolled", "recipe"),
                                           ("implicit", "implicit-variants")])
@pytest.mark.determinism
def test_gtn_resume_after_a_kill_reproduces_the_uninterrupted_run(tmp_path, method, recipe):
    data = make_tiny_set(per_class=12)
    cfg = GTNConfig(method=method, inner_steps=3, batch_size=20, curriculum="full",
                    generator=GeneratorConfig(4, 8, 4), student="convnet:width=4,depth=1",
                    meta_iterations=5, meta_lr=1e-2, real_batch=8, match_real_per_class=4,
                    validation=6, checkpoint_every=2, eval_every=1, **RECIPES[recipe])
    full, r_full, _ = train_gtn(data, cfg, seed=2, checkpoint=tmp_path / "a.pt",
                                evaluate=lambda t, i: {})
    with pytest.raises(Kill):  # killed during iteration 3, after the checkpoint at 2
        train_gtn(data, cfg, seed=2, checkpoint=tmp_path / "b.pt", evaluate=killer(3))
    resumed, r_res, _ = train_gtn(data, cfg, seed=2, checkpoint=tmp_path / "b.pt",
                                  resume=True, evaluate=lambda t, i: {})
    assert r_res.resumed_from == 2 and r_res.losses == r_full.losses
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    other, _, _ = train_gtn(data, cfg, seed=3)
    assert not torch.equal(other.lr_tensor(), full.lr_tensor()) or not all(
        torch.equal(a, b) for a, b in zip(other.parameters(), full.parameters()))


@pytest.mark.determinism
def test_checkpoints_from_before_an_added_option_still_resume(tmp_path):
    """``recompute`` came after checkpoints existed: a checkpoint whose fingerprint lacks it
    (as the code before it wrote) or holds it at its default resumes; another value does not."""
    from dataclasses import asdict

    from distill.metatrain import CheckpointError
    from distill.store import to_jsonable

    data = make_tiny_set(per_class=12)
    cfg = GTNConfig(method="unrolled", inner_steps=3, batch_size=20, curriculum="full",
                    generator=GeneratorConfig(4, 8, 4), student="convnet:width=4,depth=1",
                    meta_iterations=4, meta_lr=1e-2, real_batch=8, validation=6,
                    checkpoint_every=2, eval_every=1)
    full, r_full, _ = train_gtn(data, cfg, seed=2, evaluate=lambda t, i: {})
    with pytest.raises(Kill):
        train_gtn(data, cfg, seed=2, checkpoint=tmp_path / "a.pt", evaluate=killer(3))
    state = torch.load(tmp_path / "a.pt", weights_only=False)
    # memory_check never was part of a fingerprint (NOT_IN_RESULT): the old forms lack it
    meta = {k: v for k, v in asdict(cfg.meta_config()).items() if k != "memory_check"}
    later = ("recompute", "ift_solver")  # options added after checkpoints existed
    before = dict(meta, strategy_config={k: v for k, v in meta["strategy_config"].items()
                                         if k not in later})
    flat = repr(cfg.flat()).replace(", memory_check=True", "")  # the record fingerprints hold
    assert "recompute=False, " in flat
    # the flat record's options added later still (the implicit solver, trajectory matching's)
    flat_later = ("ift_solver", "experts", "expert_epochs", "online_experts",
                  "trajectory_gradient", "compile")
    pattern = ", (" + "|".join(flat_later) + ")=[^,)]*"
    flat_before = re.sub(pattern, "", flat)
    assert "ift_solver" in flat and "ift_solver" not in flat_before
    old_forms = {"without the field": (before, flat_before.replace("recompute=False, ", "")),
                 "with it at its default": (meta, flat)}
    for what, (config, gtn_repr) in old_forms.items():
        state["fingerprint"] = to_jsonable({"config": config, "seed": 2, "extra": {
            "dataset": data.info.name, "gtn": gtn_repr}})
        torch.save(state, tmp_path / "b.pt")
        resumed, r_res, _ = train_gtn(data, cfg, seed=2, checkpoint=tmp_path / "b.pt",
                                      resume=True, evaluate=lambda t, i: {})
        assert r_res.resumed_from == 2 and r_res.losses == r_full.losses, what
        assert all(torch.equal(a, b) for a, b in zip(full.parameters(), resumed.parameters()))
    torch.save(state, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="other options"):
        train_gtn(data, replace(cfg, recompute=True), seed=2, checkpoint=tmp_path / "c.pt",
                  resume=True)


def test_checkpointed_unrolled_gtn_gives_the_same_teacher_gradient():
    from distill.strategies import RealSampler, make_strategy
    from gtn.train import _student_factory, make_teacher

    data = make_tiny_set(per_class=12)
    grads, peaks = [], []
    for steps in (None, 2):
        cfg = GTNConfig(method="unrolled", inner_steps=4, batch_size=20, curriculum="full",
                        generator=GeneratorConfig(4, 8, 4), student="convnet:width=4,depth=1",
                        meta_iterations=1, real_batch=8, validation=6, checkpoint_steps=steps)
        t = make_teacher(data.info, cfg, seed=0)
        strategy = make_strategy("unrolled", cfg.meta_config().strategy_config)
        opt = torch.optim.SGD(t.parameters(), lr=0.0)  # keeps the gradient, moves nothing
        from distill.memory import SavedTensorMeter

        with SavedTensorMeter() as meter:
            strategy.step(t, opt, RealSampler(data, "cpu"),
                          _student_factory(data.info, cfg, "cpu"),
                          torch.Generator().manual_seed(5))
        peaks.append(meter.peak)
        grads.append([p.grad.clone() for p in t.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert peaks[1] < peaks[0]  # checkpointing trades memory for recomputation


def test_class_batches_come_from_one_mixed_forward_pass():
    t = teacher("none", batch=6, info=get_info("mnist"), config=GeneratorConfig(4, 8, 4))
    per = t.class_batches(torch.Generator().manual_seed(0), n=2)
    z = torch.randn(20, 4, generator=torch.Generator().manual_seed(0))
    y = torch.arange(10).repeat_interleave(2)
    whole = t.generator(z, y)  # batch norm over all classes at once
    assert [int(b[1][0]) for b in per] == list(range(10))
    torch.testing.assert_close(torch.cat([b[0] for b in per]), whole)
    alone = t.generator(z[:2], y[:2])  # class 0 normalised on its own: not the same images
    assert not torch.allclose(alone, whole[:2], atol=1e-3)


def test_seeded_teacher_does_not_move_the_global_rng():
    torch.manual_seed(3)
    teacher(info=get_info("mnist"), config=GeneratorConfig(4, 8, 4))
    after = torch.rand(2)
    torch.manual_seed(3)
    assert torch.equal(after, torch.rand(2))


def test_matching_along_the_curriculum_against_a_hand_written_loop():
    """``match_curriculum``: step t matches curriculum batch t class by class at the student
    that torch.optim.SGD (the teacher's lr and momentum) reaches on batches 0..t-1, with one
    teacher update per step; written here independently of the strategy's student_steps."""
    import copy

    from distill.distances import layerwise_cosine
    from distill.strategies import RealSampler, StrategyConfig, make_strategy

    info = TINY_INFO
    g = torch.Generator().manual_seed(3)
    x = torch.randn(20, 1, 4, 4, generator=g)
    y = (x[:, 0, 0, 0] > 0).long()
    real = RealSampler(ImageSet(x, y, info))

    def student(_gen=None):
        return linear_student().float()

    t_lib = teacher(steps=3, batch=4)
    with torch.no_grad():
        t_lib.log_lr.copy_(torch.log(torch.tensor([0.3, 0.1, 0.2])))  # distinct per step
    t_ref = copy.deepcopy(t_lib)
    strategy = make_strategy("matching", StrategyConfig(real_batch=5, match_curriculum=True))
    opt_lib = torch.optim.SGD(t_lib.parameters(), lr=0.05)
    strategy.step(t_lib, opt_lib, real, student, torch.Generator().manual_seed(9))

    opt_ref = torch.optim.SGD(t_ref.parameters(), lr=0.05)
    net = student()
    params = list(net.parameters())
    sgd = torch.optim.SGD(params, lr=1.0, momentum=float(t_ref.momentum_tensor().detach()))
    gen = torch.Generator().manual_seed(9)
    for step in range(3):
        xs, ys = t_ref.step_batch(step, gen)
        total = torch.zeros(())
        for c in range(2):
            xr = real.class_batch(c, 5, gen)
            g_real = torch.autograd.grad(
                classification_loss(net(xr), torch.full((5,), c)), params)
            mine = ys == c
            g_syn = torch.autograd.grad(classification_loss(net(xs[mine]), ys[mine]), params,
                                        create_graph=True)
            total = total + layerwise_cosine(g_syn, g_real)
        opt_ref.zero_grad()
        total.backward()
        opt_ref.step()
        sgd.param_groups[0]["lr"] = float(t_ref.lr_tensor()[step].detach())
        sgd.zero_grad()
        classification_loss(net(xs.detach()), ys).backward()
        sgd.step()

    for (name, a), b in zip(t_lib.state_dict().items(), t_ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    before = teacher(steps=3, batch=4)
    assert all(not torch.equal(before.noise[s], t_lib.noise[s]) for s in range(3))  # trained
