"""ssa.convert / ssa.to_dense: swap a model's nn.Linear layers for SSALinear in place and back."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import ssa


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class Net(nn.Module):
    """Linears at several depths: a Sequential, a custom block, a ModuleDict, a ModuleList."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Linear(8, 6), nn.Tanh())
        self.block = Block(6)
        self.heads = nn.ModuleDict({"a": nn.Linear(6, 4), "b": nn.Linear(6, 3, bias=False)})
        self.extra = nn.ModuleList([nn.Linear(4, 4)])

    def forward(self, x):
        h = self.block(self.stem(x))
        return torch.cat([self.extra[0](self.heads["a"](h)), self.heads["b"](h)], -1)


NAMES = ["stem.0", "block.fc1", "block.fc2", "heads.a", "heads.b", "extra.0"]


def net(seed=0) -> Net:
    torch.manual_seed(seed)
    return Net()


def ssa_layers(model) -> dict[str, ssa.SSALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, ssa.SSALinear)}


def dense_linears(model) -> list[str]:
    return [n for n, m in model.named_modules() if type(m) is nn.Linear]


def test_converts_every_linear_in_place_with_the_same_output():
    model = net()
    x = torch.randn(5, 8)
    want = model(x)
    tanh = model.stem[1]
    out = ssa.convert(model)
    assert out is model
    assert list(ssa_layers(model)) == NAMES and dense_linears(model) == []
    assert model.stem[1] is tanh
    assert all(m.rank == min(m.in_features, m.out_features) for m in ssa_layers(model).values())
    assert model.heads["b"].bias is None
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)


def test_low_rank():
    model = net()
    dense = {n: m.weight.detach().clone() for n, m in model.named_modules() if type(m) is nn.Linear}
    ssa.convert(model, rank=2)
    layers = ssa_layers(model)
    assert list(layers) == NAMES and all(m.rank == m.r0 == 2 for m in layers.values())
    for n, m in layers.items():  # the best rank-2 approximation of each dense weight
        S = torch.linalg.svdvals(dense[n].double())
        torch.testing.assert_close((m.weight.double() - dense[n].double()).norm(), S[2:].norm(),
                                   rtol=1e-5, atol=1e-6)


def test_rank_larger_than_a_layer_is_capped_at_its_full_rank():
    model = net()
    full = {n: min(m.in_features, m.out_features) for n, m in model.named_modules() if type(m) is nn.Linear}
    ssa.convert(model, rank=4)  # heads.b is 6 -> 3: it keeps its full rank 3
    assert {n: m.rank for n, m in ssa_layers(model).items()} == {n: min(4, f) for n, f in full.items()}
    assert model.heads["b"].rank == 3


def test_a_frozen_layer_stays_frozen_through_convert_and_back():
    model = net()
    model.heads["b"].requires_grad_(False)
    ssa.convert(model)
    frozen = model.heads["b"]
    assert not any(p.requires_grad for p in frozen.parameters())
    assert all(p.requires_grad for n,
               m in ssa_layers(model).items() if n != "heads.b" for p in m.parameters())
    ssa.to_dense(model)
    assert not model.heads["b"].weight.requires_grad


@pytest.mark.parametrize("rank", [0, -1, 2.0, True])
def test_bad_rank(rank):
    with pytest.raises(ValueError, match="rank"):
        ssa.convert(net(), rank=rank)


def test_skip_by_name():
    model = net()
    ssa.convert(model, skip=["heads.a", "block"])  # a prefix skips the subtree
    assert dense_linears(model) == ["block.fc1", "block.fc2", "heads.a"]
    assert list(ssa_layers(model)) == ["stem.0", "heads.b", "extra.0"]
    model = net()
    ssa.convert(model, skip="stem.0")  # one name as a plain string
    assert dense_linears(model) == ["stem.0"]
    model = net()
    with pytest.raises(ValueError, match="'block.fc'"):  # not a module path: refused, naming it
        ssa.convert(model, skip=["block.fc"])
    assert dense_linears(model) == NAMES and not ssa_layers(model)  # checked before anything is swapped


def test_skip_by_type():
    model = net()
    ssa.convert(model, skip=[Block, nn.ModuleList])
    assert dense_linears(model) == ["block.fc1", "block.fc2", "extra.0"]
    model = net()
    ssa.convert(model, skip=nn.Linear)
    assert dense_linears(model) == NAMES and not ssa_layers(model)


def test_existing_ssa_layers_are_kept():
    model = net()
    keep = ssa.SSALinear(6, 4, rank=2, seed=123)
    model.heads["a"] = keep
    state = {k: v.clone() for k, v in keep.state_dict().items() if torch.is_tensor(v)}
    ssa.convert(model, seed=10)
    assert model.heads["a"] is keep and keep.rank == 2 and keep.seed == 123
    assert all(torch.equal(v, keep.state_dict()[k]) for k, v in state.items())
    assert len(ssa_layers(model)) == 6
    assert ssa.convert(model) is model and model.heads["a"] is keep  # a second convert changes nothing


def test_multihead_attention_out_proj_stays_dense_with_a_warning():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(6, 8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            h = self.inp(x)
            return self.head(self.attn(h, h, h, need_weights=False)[0])

    torch.manual_seed(0)
    model = Attn()
    out_proj = model.attn.out_proj
    x = torch.randn(2, 5, 6)
    want = model(x)
    with pytest.warns(UserWarning, match="attn.out_proj"):
        ssa.convert(model)
    assert model.attn.out_proj is out_proj
    assert isinstance(model.inp, ssa.SSALinear) and isinstance(model.head, ssa.SSALinear)
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)


def test_tied_weights_stay_dense_with_a_warning():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)
            self.b.weight = self.a.weight

    model = Tied()
    with pytest.warns(UserWarning, match="tied") as record:
        ssa.convert(model)
    assert sum("tied" in str(w.message) for w in record) == 2
    assert type(model.a) is nn.Linear and type(model.b) is nn.Linear and model.a.weight is model.b.weight
    assert isinstance(model.c, ssa.SSALinear)


def test_a_shared_module_stays_dense_and_shared():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), nn.Sequential(shared), nn.Linear(4, 2))
    with pytest.warns(UserWarning):
        ssa.convert(model)
    assert model[0] is shared and model[2][0] is shared and isinstance(model[3], ssa.SSALinear)


def test_logs_a_count(caplog):
    model = net()
    with caplog.at_level(logging.INFO, logger="ssa"):
        ssa.convert(model, skip=["heads.a"])
    text = " ".join(r.getMessage() for r in caplog.records if r.name == "ssa")
    assert "5 Linear -> SSALinear" in text and "1 left dense" in text and "heads.a" in text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ssa"):
        ssa.convert(nn.Sequential(nn.ReLU()))
    assert "nothing converted" in caplog.text


def test_to_dense_converts_back_with_the_same_output():
    model = net()
    x = torch.randn(5, 8)
    want = model(x)
    ssa.convert(model, seed=3)
    assert ssa.to_dense(model) is model
    assert dense_linears(model) == NAMES and not ssa_layers(model)
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError):
        ssa.to_dense(ssa.SSALinear(3, 3))


def test_to_dense_keeps_a_fused_activation():
    model = nn.Sequential(ssa.SSALinear(5, 4, activation="relu", seed=0), ssa.SSALinear(4, 2, seed=1))
    x = torch.randn(6, 5)
    want = model(x)
    ssa.to_dense(model)
    assert isinstance(model[0], nn.Sequential) and isinstance(model[0][1], nn.ReLU)
    assert type(model[1]) is nn.Linear
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-6)


def test_layer_i_gets_seed_plus_i():
    a, b, c = ssa.convert(net(0), seed=7), ssa.convert(net(1), seed=7), ssa.convert(net(0), seed=8)
    la, lb, lc = ssa_layers(a), ssa_layers(b), ssa_layers(c)
    assert [m.seed for m in la.values()] == list(range(7, 7 + len(NAMES)))
    assert [m.seed for m in lc.values()] == list(range(8, 8 + len(NAMES)))
    for layer in (*la.values(), *lb.values(), *lc.values()):  # targets are built on demand
        assert layer.target_U is None
        layer.set_targets("frame", 5)
    for n in NAMES:  # targets and feedback depend on the seed (and shape) only, not on the dense weights
        for t in ("target_U", "target_s", "target_V", "feedback_P", "feedback_sigma", "feedback_Q"):
            assert torch.equal(getattr(la[n], t), getattr(lb[n], t)), (n, t)
        assert not torch.equal(la[n].target_U, lc[n].target_U)
        assert not torch.equal(la[n].U, lb[n].U)  # the factors do come from the dense weights
    # seeds follow the converted layers only: a skipped or kept layer does not take one
    d = ssa.convert(net(0), seed=0, skip=["stem"])
    assert [m.seed for m in ssa_layers(d).values()] == list(range(len(NAMES) - 1))


def test_bad_models():
    with pytest.raises(TypeError):
        ssa.convert(nn.Linear(3, 3))
    with pytest.raises(TypeError):
        ssa.convert(torch.randn(3))
