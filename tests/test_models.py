"""ssa.models: the convnet zoo (LeNet-5, SmallConv, VGG-13, CIFAR ResNets) and its conventions."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ssa import models

CONVNETS = ["lenet", "smallconv", "vgg13", "resnet20", "resnet32", "resnet56"]
ALL = ["mlp", *CONVNETS]
SHAPES = [((1, 8, 8), 10), ((3, 32, 32), 10), ((3, 32, 32), 100)]


def _build(name, num_classes=10, in_shape=(1, 8, 8)):
    torch.manual_seed(0)
    return models.get(name, num_classes, in_shape)


def _inside_blocks(model):
    return {m for b in model.modules() if isinstance(b, models.BasicBlock) for m in b.modules() if m is not b}


def _parents(model):
    return {child: parent for parent in model.modules() for child in parent.children()}


def test_available_lists_every_model():
    assert models.available() == sorted(ALL)


@pytest.mark.parametrize("in_shape, num_classes", SHAPES, ids=["digits", "cifar10", "cifar100"])
@pytest.mark.parametrize("name", ALL)
def test_logits_and_a_bp_step_reach_every_parameter(name, in_shape, num_classes):
    model = _build(name, num_classes, in_shape)
    last = list(model.modules())[-1]
    assert isinstance(last, nn.Linear) and last.out_features == num_classes  # it gives the logits
    x, y = torch.randn(4, *in_shape), torch.arange(4) % num_classes
    logits = model(x)
    assert logits.shape == (4, num_classes) and torch.isfinite(logits).all()
    nn.functional.cross_entropy(logits, y).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, f"{name}: {pname} got an all-zero gradient"


@pytest.mark.parametrize("name", CONVNETS)
def test_plain_torch_modules_and_bias_rule(name):
    model = _build(name, 10, (3, 32, 32))
    own = (models.BasicBlock, models.ResNet)
    assert all(type(m).__module__.startswith("torch.nn") or isinstance(m, own) for m in model.modules())
    for parent in model.modules():  # a conv followed by a BatchNorm has no bias, others have one
        kids = list(parent.children())
        for a, b in zip(kids, kids[1:] + [None]):
            if isinstance(a, nn.Conv2d) and not isinstance(parent, models.BasicBlock):
                assert (a.bias is None) == isinstance(b, nn.BatchNorm2d)
    for block in model.modules():
        if isinstance(block, models.BasicBlock):
            assert block.conv1.bias is None and block.conv2.bias is None


@pytest.mark.parametrize("in_shape", [(1, 8, 8), (3, 32, 32)])
@pytest.mark.parametrize("name", ALL)
def test_no_module_is_used_twice(name, in_shape):
    model = _build(name, 10, in_shape)
    assert len(list(model.named_modules(remove_duplicate=False))) == len(list(model.named_modules()))
    calls: dict[nn.Module, int] = {}
    hooks = [m.register_forward_hook(lambda m, i, o: calls.__setitem__(m, calls.get(m, 0) + 1))
             for m in model.modules()]
    model(torch.randn(2, *in_shape))
    for h in hooks:
        h.remove()
    named = {m: n for n, m in model.named_modules()}
    assert {named[m]: c for m, c in calls.items() if c != 1} == {}
    assert set(calls) == set(model.modules())  # and every module runs


@pytest.mark.parametrize("in_shape", [(1, 8, 8), (3, 32, 32)])
@pytest.mark.parametrize("name", ALL)
def test_flat_sequential_convention(name, in_shape):
    model = _build(name, 10, in_shape).eval()
    inside, parents = _inside_blocks(model), _parents(model)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and m not in inside:
            parent = parents[m]
            assert type(parent) is nn.Sequential  # flat: no nested containers in that Sequential
            assert not any(isinstance(k, (nn.Sequential, nn.ModuleList)) for k in parent.children())
    # the forward is exactly the flat chain of modules (no hidden functional ops outside blocks)
    chain = [m for m in model.modules()
             if m not in inside and (isinstance(m, models.BasicBlock) or not list(m.children()))]
    x = torch.randn(3, *in_shape)
    h = x
    for m in chain:
        h = m(h)
    torch.testing.assert_close(h, model(x), rtol=0, atol=0)


def _conv_bn_count(cin, cout, k):
    return cin * cout * k * k + 2 * cout


def test_resnet20_parameter_count_by_hand():
    """He et al. report 0.27 M for ResNet-20 with option-A (parameter-free) shortcuts: 269,722.

    Option B adds the two projection shortcuts conv1×1-BN (16→32, 32→64): 512 + 64 + 2048 + 128
    = 2,752 parameters, so 272,474 here.
    """
    stem = _conv_bn_count(3, 16, 3)
    stage1 = 3 * 2 * _conv_bn_count(16, 16, 3)
    stage2 = _conv_bn_count(16, 32, 3) + 5 * _conv_bn_count(32, 32, 3)
    stage3 = _conv_bn_count(32, 64, 3) + 5 * _conv_bn_count(64, 64, 3)
    head = 64 * 10 + 10
    option_a = stem + stage1 + stage2 + stage3 + head
    projections = _conv_bn_count(16, 32, 1) + _conv_bn_count(32, 64, 1)
    assert option_a == 269_722 and projections == 2_752
    model = models.get("resnet20", 10, (3, 32, 32))
    assert sum(p.numel() for p in model.parameters()) == option_a + projections == 272_474


@pytest.mark.parametrize("name, n", [("resnet20", 3), ("resnet32", 5), ("resnet56", 9)])
def test_resnet_depth_blocks_and_shortcuts(name, n):
    model = _build(name, 10, (3, 32, 32))
    assert isinstance(model, models.ResNet)
    assert [type(m) for m in model.stem] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
    assert [type(m) for m in model.head] == [nn.AdaptiveAvgPool2d, nn.Flatten, nn.Linear]
    for i, (channels, stride) in enumerate(((16, 1), (32, 2), (64, 2)), start=1):
        stage = getattr(model, f"layer{i}")
        assert type(stage) is nn.Sequential and len(stage) == n
        assert all(type(b) is models.BasicBlock for b in stage)
        assert [b.conv1.stride for b in stage] == [(stride, stride)] + [(1, 1)] * (n - 1)
        assert all(b.conv2.out_channels == channels for b in stage)
        projected = [isinstance(b.shortcut, nn.Sequential) for b in stage]
        assert projected == [i > 1] + [False] * (n - 1)
        if i > 1:
            conv, bn = stage[0].shortcut
            assert conv.kernel_size == (1, 1) and conv.stride == (2, 2) and conv.bias is None
            assert isinstance(bn, nn.BatchNorm2d)
    weighted = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))
                and not (isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1))]
    assert len(weighted) == 6 * n + 2  # the depth in the name
    # the feature maps: 32×32 → 16×16 → 8×8
    sizes = []
    hooks = [getattr(model, f"layer{i}").register_forward_hook(
        lambda m, i, o: sizes.append(tuple(o.shape[1:]))) for i in (1, 2, 3)]
    model(torch.randn(2, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert sizes == [(16, 32, 32), (32, 16, 16), (64, 8, 8)]


@pytest.mark.parametrize("name", CONVNETS)
def test_residual_blocks_are_ssa_local_basic_blocks(name):
    assert models.BasicBlock.ssa_local is True
    model = _build(name, 10, (1, 8, 8))
    local = [m for m in model.modules() if getattr(m, "ssa_local", False)]
    assert all(type(m) is models.BasicBlock for m in local)
    if name.startswith("resnet"):
        blocks = [b for i in (1, 2, 3) for b in getattr(model, f"layer{i}")]
        assert local == blocks and all(b.ssa_local for b in blocks)
        # nothing outside the stages has a forward of its own besides the model
        inside = _inside_blocks(model)
        assert all(type(m) in (nn.Sequential, models.ResNet) or not list(m.children())
                   for m in model.modules() if m not in inside and type(m) is not models.BasicBlock)
    else:
        assert local == []


def test_lenet_padding_rule():
    def flat(shape):
        return models.get("lenet", 10, shape).classifier[1].in_features

    model = models.get("lenet", 10, (1, 32, 32))
    assert all(m.padding == (0, 0) for m in model.modules() if isinstance(m, nn.Conv2d))
    assert flat((1, 32, 32)) == 16 * 5 * 5  # LeNet-5 proper: 32→28→14→10→5
    assert flat((3, 40, 36)) == 16 * 7 * 6
    assert flat((1, 28, 28)) == 16 * 7 * 7  # "same" below 32: only the pools shrink
    assert flat((1, 8, 8)) == 16 * 2 * 2
    small = models.get("lenet", 10, (1, 8, 8))
    assert all(m.padding == (2, 2) for m in small.modules() if isinstance(m, nn.Conv2d))
    assert [type(m) for m in small.features] == [nn.Conv2d, nn.ReLU, nn.MaxPool2d] * 2
    assert [type(m) for m in small.classifier] == [nn.Flatten, nn.Linear, nn.ReLU,
                                                   nn.Linear, nn.ReLU, nn.Linear]
    assert [m.out_features for m in small.classifier if isinstance(m, nn.Linear)] == [120, 84, 10]
    assert models.get("lenet", 3, (2, 1, 1))(torch.randn(2, 2, 1, 1)).shape == (2, 3)  # pools skipped


def test_smallconv_and_vgg13_layout_and_pool_skipping():
    def pools(model):
        return sum(isinstance(m, nn.MaxPool2d) for m in model.modules())

    big, small = models.get("smallconv", 10, (3, 32, 32)), models.get("smallconv", 10, (1, 8, 8))
    for model, flat, n_pools in ((big, 512 * 4 * 4, 3), (small, 512, 3)):
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        assert [m.out_channels for m in convs] == [96, 192, 512]
        assert all(m.kernel_size == (3, 3) and m.padding == (1, 1) and m.bias is not None for m in convs)
        assert [(m.in_features, m.out_features) for m in model.classifier if isinstance(m, nn.Linear)] == \
            [(flat, 1024), (1024, 10)]
        assert pools(model) == n_pools
    assert pools(models.get("smallconv", 10, (1, 2, 2))) == 1
    vgg_big, vgg_small = models.get("vgg13", 10, (3, 32, 32)), models.get("vgg13", 10, (1, 8, 8))
    for model, n_pools in ((vgg_big, 5), (vgg_small, 3)):
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        assert [m.out_channels for m in convs] == [64, 64, 128, 128, 256, 256, 512, 512, 512, 512]
        assert pools(model) == n_pools
        assert [type(m) for m in model.classifier] == [nn.Flatten, nn.Linear]
        assert model.classifier[1].in_features == 512
    kinds = [type(m) for m in vgg_big.features if not isinstance(m, nn.MaxPool2d)]
    assert kinds == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU] * 10


@pytest.mark.parametrize("name", ["vgg13", "resnet20"])
def test_construction_leaves_batchnorm_statistics_untouched(name):
    model = _build(name, 10, (1, 8, 8))
    assert model.training
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert int(m.num_batches_tracked) == 0 and not m.running_mean.any()
            assert torch.equal(m.running_var, torch.ones_like(m.running_var))
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and not m.bias.any()


@pytest.mark.parametrize("name", ["lenet", "resnet20"])
def test_same_seed_same_weights(name):
    a, b = _build(name), _build(name)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("name", CONVNETS)
@pytest.mark.parametrize("bad", [(64,), (1, 8), (1, 1, 8, 8)])
def test_convnets_reject_a_shape_that_is_not_chw(name, bad):
    with pytest.raises(ValueError, match=r"in_shape.*\(C, H, W\)") as err:
        models.get(name, 10, bad)
    assert name in str(err.value) and repr(bad) in str(err.value)
    builder = getattr(models, name)
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        builder(10, bad)


def test_mlp_still_takes_any_shape_and_bad_arguments_fail():
    assert models.get("mlp", 4, (6,))(torch.randn(2, 6)).shape == (2, 4)
    assert models.get("mlp", 4, (2, 3, 4, 5))(torch.randn(2, 2, 3, 4, 5)).shape == (2, 4)
    with pytest.raises(ValueError, match="unknown model 'resnet18'"):
        models.get("resnet18", 10, (3, 32, 32))
    with pytest.raises(ValueError, match="num_classes"):
        models.get("vgg13", 1, (3, 32, 32))
    with pytest.raises(ValueError, match="in_shape"):
        models.get("lenet", 10, (1, 0, 8))
    with pytest.raises(TypeError):
        models.get("lenet", 10, (1, 8, 8), hidden=(3,))
