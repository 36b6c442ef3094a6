"""The student zoo: shapes on every data set shape, seeded init, spec parsing, and use under
torch.func and higher (which later meta-gradient strategies need)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distill.models import (
    ModelError,
    available_models,
    build_model,
    init_parameters,
    parse_model_spec,
)

SHAPES = [(1, 28, 28), (3, 32, 32)]


@pytest.mark.parametrize("name", available_models())
@pytest.mark.parametrize("shape", SHAPES)
def test_shapes_and_gradients(name, shape):
    model = build_model(name, shape[0], 10, shape[1:], generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, *shape)
    assert model(x).shape == (2, 10)
    assert model.embed(x).shape == (2, model.feature_dim)
    F.cross_entropy(model(x), torch.tensor([1, 2])).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_every_model_of_the_brief_is_there():
    assert set(available_models()) == {"convnet", "mlp", "lenet", "alexnet", "vgg11", "resnet18"}


@pytest.mark.parametrize("norm", ["none", "batch", "instance", "group", "layer"])
@pytest.mark.parametrize("act", ["relu", "sigmoid", "leakyrelu"])
@pytest.mark.parametrize("pool", ["avg", "max", "none"])
def test_convnet_variants(norm, act, pool):
    spec = f"convnet:width=8,depth=2,norm={norm},act={act},pool={pool}"
    model = build_model(spec, 3, 4, (16, 16))
    assert model(torch.randn(3, 3, 16, 16)).shape == (3, 4)
    assert model.feature_dim == 8 * (4 * 4 if pool != "none" else 16 * 16)


def _conv(cin: int, cout: int, k: int, bias: bool = True) -> int:
    return cin * k * k * cout + (cout if bias else 0)


def _published(name: str, ch: int) -> tuple[int, int]:
    """(embedding size, parameter count) of the DC reference's networks (``networks.py`` of
    VICO-UoE/DatasetCondensation, default settings, 10 classes), written out by hand."""
    if name == "convnet":  # width 128, depth 3, instance norm; 28 px padded to 32: 32->16->8->4
        feat = 128 * 4 * 4
        body = _conv(ch, 128, 3) + 2 * _conv(128, 128, 3) + 3 * 2 * 128
    elif name == "mlp":
        feat = 128
        body = (28 * 28 if ch == 1 else 32 * 32 * 3) * 128 + 128 + 128 * 128 + 128
    elif name == "lenet":  # conv5 pads 2 on digits: 28 -> 14 -> 10 -> 5
        feat = 84
        body = _conv(ch, 6, 5) + _conv(6, 16, 5) + 16 * 5 * 5 * 120 + 120 + 120 * 84 + 84
    elif name == "alexnet":  # 192 x 4 x 4 on both shapes
        feat = 192 * 4 * 4
        body = (_conv(ch, 128, 5) + _conv(128, 192, 5) + _conv(192, 256, 3)
                + _conv(256, 192, 3) + _conv(192, 192, 3))
    elif name == "vgg11":  # cfg A, instance norm after every conv, 512 x 1 x 1
        feat, cin, body = 512, ch, 0
        for cout in (64, 128, 256, 256, 512, 512, 512, 512):
            body += _conv(cin, cout, 3) + 2 * cout
            cin = cout
    else:  # resnet18: no-bias convs, instance norm, BasicBlocks [2, 2, 2, 2], 512-d
        feat, body, cin = 512, _conv(ch, 64, 3, False) + 2 * 64, 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            for b in range(2):
                s = stride if b == 0 else 1
                body += _conv(cin, planes, 3, False) + _conv(planes, planes, 3, False) + 4 * planes
                if s != 1 or cin != planes:
                    body += _conv(cin, planes, 1, False) + 2 * planes
                cin = planes
    return feat, body + feat * 10 + 10


@pytest.mark.parametrize("name", available_models())
@pytest.mark.parametrize("shape", SHAPES)
def test_published_networks_feature_sizes_and_parameter_counts(name, shape):
    feat, params = _published(name, shape[0])
    model = build_model(name, shape[0], 10, shape[1:])
    assert model.feature_dim == feat
    assert sum(p.numel() for p in model.parameters()) == params


def test_dc_convnet_sees_digits_as_32_pixels():
    """The published first conv pads 1-channel images by 3: its output is 32 x 32."""
    model = build_model("convnet", 1, 10, (28, 28))
    assert model.features[0].padding == (3, 3)
    assert model.features[0](torch.zeros(1, 1, 28, 28)).shape[-2:] == (32, 32)
    older = build_model("convnet:first_pad=1", 1, 10, (28, 28))
    assert older.feature_dim == 128 * 3 * 3
    assert build_model("convnet", 3, 10, (32, 32)).features[0].padding == (1, 1)
    with pytest.raises(ModelError, match="first_pad"):
        build_model("convnet:first_pad=-1", 1, 10, (28, 28))


@pytest.mark.determinism
def test_seeded_init_is_reproducible_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a = build_model("convnet:width=8", 1, 10, (28, 28), generator=torch.Generator().manual_seed(1))
    b = build_model("convnet:width=8", 1, 10, (28, 28), generator=torch.Generator().manual_seed(1))
    c = build_model("convnet:width=8", 1, 10, (28, 28), generator=torch.Generator().manual_seed(2))
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))
    torch.random.set_rng_state(state)


def test_init_matches_torch_default_bounds():
    lin = torch.nn.Linear(400, 3)
    init_parameters(lin, torch.Generator().manual_seed(0))
    bound = 1 / 400 ** 0.5
    assert lin.weight.abs().max() <= bound and lin.weight.abs().max() > 0.9 * bound
    assert lin.weight.std().item() == pytest.approx(bound / 3 ** 0.5, rel=0.05)


def test_spec_parsing_and_errors():
    assert parse_model_spec("ConvNet:width=64, depth=4,norm=batch") == (
        "convnet", {"width": 64, "depth": 4, "norm": "batch"})
    with pytest.raises(ModelError, match="convnet"):
        build_model("gpt", 1, 10, (28, 28))
    with pytest.raises(ModelError, match="no option 'colour'; its options are: width, depth"):
        build_model("convnet:colour=red", 1, 10, (28, 28))
    with pytest.raises(ModelError, match="norm"):
        build_model("convnet:norm=foo", 1, 10, (28, 28))
    with pytest.raises(ModelError, match="KEY=VALUE"):
        parse_model_spec("convnet:width")
    with pytest.raises(ModelError, match="pixel"):
        build_model("convnet:depth=6", 1, 10, (28, 28))


@pytest.mark.parametrize("name", ["convnet:width=8", "mlp"])
def test_functional_call_and_higher(name):
    import higher
    from torch.func import functional_call

    model = build_model(name, 1, 10, (28, 28), generator=torch.Generator().manual_seed(0))
    x, y = torch.randn(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    params = dict(model.named_parameters())
    torch.testing.assert_close(functional_call(model, params, (x,)), model(x))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    xs = x.clone().requires_grad_()
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        diffopt.step(F.cross_entropy(fmodel(xs), y))
        meta = F.cross_entropy(fmodel(x), y)
        (g,) = torch.autograd.grad(meta, xs)
    assert g.shape == xs.shape and g.abs().sum() > 0  # gradient flows through the SGD step


@pytest.mark.parametrize("spec", ["convnet:norm=batch", "mlp", "lenet", "alexnet",
                                  "vgg11:width=8", "resnet18:width=8"])
def test_seeded_build_neither_reads_nor_moves_the_global_rng(spec):
    def build():
        return build_model(spec, 3, 10, (32, 32), generator=torch.Generator().manual_seed(7))

    torch.manual_seed(1)
    a = build()
    after = torch.rand(3)  # the global stream continues as if nothing had been built
    torch.manual_seed(1)
    assert torch.equal(after, torch.rand(3))
    torch.manual_seed(2)  # another global state: the same weights (all from the generator)
    b = build()
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), k
