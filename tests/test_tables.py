"""One table per concept: the CLI's choices, help texts, option scopes and defaults are read
from the library's registries, never kept beside them."""

from __future__ import annotations

import re

import click
import pytest

from cli import main


def _option(command: click.Command, name: str) -> click.Option:
    return next(p for p in command.params if isinstance(p, click.Option) and p.name == name)


def _command(*path: str) -> click.Command:
    cmd: click.Command = main
    ctx = click.Context(main)
    for name in path:
        assert isinstance(cmd, click.Group)
        found = cmd.get_command(ctx, name)
        assert found is not None, name
        cmd = found
    return cmd


def _help(*path: str) -> str:
    from click.testing import CliRunner

    r = CliRunner().invoke(main, [*path, "--help"], terminal_width=10_000)
    assert r.exit_code == 0, r.output
    return re.sub(r"\s+", " ", r.output)


# ------------------------------------------------------------------ condensation
def test_every_condensation_method_is_a_distill_choice_with_its_help_line():
    from distill.methods import METHODS

    cmd = _command("distill")
    assert list(_option(cmd, "method").type.choices) == list(METHODS)
    text = _help("distill")
    for name, m in METHODS.items():
        assert f"{name}: {m.help}" in text, name


def test_the_method_table_names_registered_strategies_protocols_and_optimisers():
    from distill.condense import condense_config
    from distill.kip import KIP_DEFAULTS
    from distill.methods import KERNEL_METHODS, METHODS
    from distill.protocols import PROTOCOLS, default_protocol
    from distill.strategies import STRATEGIES

    for name, m in METHODS.items():
        assert m.protocol in PROTOCOLS and default_protocol(name) == m.protocol
        if not m.strategy:  # a closed form (label solve)
            continue
        assert m.strategy in STRATEGIES, name
        cfg = condense_config(name)
        assert (cfg.strategy, cfg.optimizer, cfg.lr, cfg.momentum) == \
            (m.strategy, m.optimizer, m.lr, m.momentum)
        assert isinstance(cfg.strategy_config, STRATEGIES[m.strategy].config_class)
    assert KIP_DEFAULTS == {"optimizer": METHODS["kip"].optimizer, "lr": METHODS["kip"].lr,
                            "momentum": METHODS["kip"].momentum}
    assert set(KERNEL_METHODS) == {"kip", "ls"}


def test_distill_option_defaults_are_the_strategy_config_defaults():
    from distill.strategies import StrategyConfig

    cmd, bare = _command("distill"), StrategyConfig()
    for name in ("real_batch", "distance", "inner_lr", "neumann_terms", "neumann_alpha"):
        assert _option(cmd, name).default == getattr(bare, name), name


def test_every_registered_strategy_is_in_the_contract_test():
    from distill.strategies import STRATEGIES

    from . import test_contract

    marks = test_contract.test_every_strategy_trains_every_teacher.pytestmark
    names = next(m.args[1] for m in marks if m.name == "parametrize" and m.args[0] == "name")
    assert set(names) == set(STRATEGIES) and {"matching", "distribution", "unrolled",
                                              "implicit", "kip"} <= set(STRATEGIES)


def test_a_strategy_registers_where_it_is_defined_and_only_once():
    from distill.strategies import STRATEGIES, Strategy, register_strategy

    for name, cls in STRATEGIES.items():
        assert cls.name == name
    with pytest.raises(ValueError, match="already registered"):
        @register_strategy("matching")
        class Impostor(Strategy):
            pass
    assert STRATEGIES["matching"].__name__ == "Matching"


# ------------------------------------------------------------------ GTN
def test_every_gtn_method_is_a_train_choice_and_a_compare_row_with_its_help():
    from gtn.compare import COMPARE_METHODS
    from gtn.methods import GTN_METHODS, RECIPES

    train = _command("gtn", "train")
    assert list(_option(train, "method").type.choices) == list(GTN_METHODS)
    assert list(COMPARE_METHODS) == list(GTN_METHODS) == list(RECIPES)
    assert _option(_command("gtn", "compare"), "methods").default == ",".join(GTN_METHODS)
    text, compare = _help("gtn", "train"), _help("gtn", "compare")
    for name, m in GTN_METHODS.items():
        assert f"{name}: {m.help} ({m.reference})" in text, name
        assert f"{name}: {m.help}" in compare, name
        assert RECIPES[name] == {**m.recipe, **m.defines}


def test_gtn_methods_say_what_they_compute():
    from gtn import recipe_config
    from gtn.methods import GTN_METHODS

    ift = recipe_config("implicit")
    assert (ift.strategy, ift.mixed_at, ift.unroll_tail, ift.step_size_grad) == \
        ("implicit", "final", 0, False)
    assert "Lorraine" in GTN_METHODS["implicit"].reference
    tail = recipe_config("first-order-tail", recipe=False)  # its definition stays
    assert (tail.strategy, tail.mixed_at, tail.unroll_tail, tail.step_size_grad) == \
        ("implicit", "trajectory", 5, True)
    assert "Shaban" in GTN_METHODS["first-order-tail"].reference
    assert recipe_config("unrolled-recompute", recipe=False).recompute
    traj = recipe_config("trajectory", recipe=False)
    assert (traj.strategy, traj.trajectory_gradient, traj.strategy_config.max_start_epoch,
            traj.strategy_config.lr_lr) == ("trajectory", "tesla", 1, None)
    assert "Cazenavette" in GTN_METHODS["trajectory"].reference


def test_gtn_train_scopes_and_defaults_come_from_the_tables():
    from distill.strategies import STRATEGIES
    from gtn import GTNConfig
    from gtn.commands import OPTION_SCOPES
    from gtn.methods import GTN_METHODS

    for m in GTN_METHODS.values():
        assert m.strategy in STRATEGIES
    implicit = {n for n, m in GTN_METHODS.items() if m.strategy == "implicit"}
    assert set(OPTION_SCOPES["unroll_tail"]) == implicit == {"implicit", "first-order-tail"}
    cmd, bare = _command("gtn", "train"), GTNConfig()
    for name in ("batch_size", "student", "meta_iterations", "meta_lr_floor", "validation",
                 "neumann_terms", "neumann_alpha", "checkpoint_every", "eval_every",
                 "intermediate_weight"):
        assert _option(cmd, name).default == getattr(bare, name), name
    assert bare.neumann_alpha == 0.02  # the GTN's (gtn train / compare always ran with it)


def test_gtn_config_nests_the_loop_and_strategy_configs():
    from dataclasses import fields, replace

    from distill.metatrain import MetaConfig
    from gtn import GTNConfig
    from gtn.config import FLAT

    names = {f.name for f in fields(GTNConfig)}
    assert "meta" in names and not names & set(FLAT)  # no copied field
    cfg = GTNConfig(method="first-order-tail", meta_lr=5e-3, real_batch=64, unroll_tail=2,
                    mixed_at="trajectory")
    assert isinstance(cfg.meta, MetaConfig) and cfg.meta.lr == cfg.meta_lr == 5e-3
    assert cfg.meta.strategy == "implicit" and cfg.meta.strategy_config.real_batch == 64
    assert replace(cfg, unroll_tail=3).meta.strategy_config.unroll_tail == 3
    assert GTNConfig.from_dict(cfg.as_dict()) == cfg
    with pytest.raises(TypeError, match="unexpected"):
        GTNConfig(meta_learning_rate=1.0)


def test_renamed_methods_keep_their_checkpoints_and_stale_compare_cells_rerun():
    # a checkpoint's fingerprint names the strategy, so `gtn train --method implicit` runs of
    # the former recipe resume as first-order-tail, and unrolled --recompute as
    # unrolled-recompute; an old compare state's recipe `implicit` cells are not reused
    from gtn import GTNConfig, recipe_config
    from gtn.compare import _definitions, _still_valid

    old = GTNConfig(method="implicit", inner_steps=4, meta_lr=5e-3, meta_schedule="cosine",
                    real_batch=512, mixed_at="trajectory", step_size_grad=True, unroll_tail=5,
                    grad_clip=0.5)
    assert recipe_config("first-order-tail", inner_steps=4).flat(named=False) == \
        old.flat(named=False)
    assert recipe_config("unrolled-recompute").flat(named=False) == \
        recipe_config("unrolled", recompute=True).flat(named=False)
    assert recipe_config("implicit", inner_steps=4).flat(named=False) != old.flat(named=False)
    cells = {f"{m}/T=8": {"method": m} for m in ("unrolled", "implicit", "matching")}
    legacy = {"cells": cells}  # written before the method table had definitions
    assert set(_still_valid(legacy, _definitions(True), True)) == {"unrolled/T=8",
                                                                   "matching/T=8"}
    assert set(_still_valid(legacy, _definitions(False), False)) == set(cells)
    now = {"cells": cells, "definitions": _definitions(True)}
    assert set(_still_valid(now, _definitions(True), True)) == set(cells)
    changed = {**_definitions(True), "matching": {"inner_lr": 1.0}}
    assert set(_still_valid({"cells": cells, "definitions": changed}, _definitions(True),
                            True)) == {"unrolled/T=8", "implicit/T=8"}


def test_nas_proxy_kinds_are_one_table():
    from gtn.nas import PROXY_KINDS
    from gtn.nas.proxies import PROXY_ARGS, parse_proxy, proxy_forms

    assert PROXY_KINDS == tuple(PROXY_ARGS)
    assert _option(_command("nas"), "proxies").metavar == proxy_forms("|")
    for kind, arg in PROXY_ARGS.items():
        assert parse_proxy(f"{kind}:x" if arg else kind).kind == kind
