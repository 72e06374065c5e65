"""ssa.data (the embedded digits split of DESIGN §11) and ssa.models (the model zoo)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ssa import data, models

sklearn_datasets = pytest.importorskip("sklearn.datasets")


def _batches(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def test_digits_split_shapes_and_dtypes():
    train, test = data.digits(batch_size=64, seed=0)
    assert len(train.dataset) == 1437 and len(test.dataset) == 360
    xtr, ytr = train.dataset.tensors
    xte, yte = test.dataset.tensors
    assert xtr.shape == (1437, 1, 8, 8) and xte.shape == (360, 1, 8, 8)
    assert xtr.dtype == xte.dtype == torch.float32 and ytr.dtype == yte.dtype == torch.long
    assert set(ytr.tolist()) == set(range(10)) and set(yte.tolist()) <= set(range(10))
    assert sum(len(y) for _, y in train) == 1437 and sum(len(y) for _, y in test) == 360


def test_digits_split_is_the_seeded_permutation_standardised_by_train_stats():
    raw = sklearn_datasets.load_digits()
    x = torch.tensor(raw.data, dtype=torch.float32)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(3))
    tr, te = perm[:1437], perm[1437:]
    mean, std = x[tr].mean(0), x[tr].std(0) + 1e-6
    xtr, ytr, xte, yte = data.digits_tensors(seed=3)
    torch.testing.assert_close(xtr.reshape(1437, 64), (x[tr] - mean) / std)
    torch.testing.assert_close(xte.reshape(360, 64), (x[te] - mean) / std)  # test uses *train* stats
    assert ytr.tolist() == raw.target[tr.numpy()].tolist() and yte.tolist() == raw.target[te.numpy()].tolist()


def test_digits_train_features_have_zero_mean_unit_std():
    xtr = data.digits(seed=0)[0].dataset.tensors[0].reshape(1437, 64)
    assert xtr.mean(0).abs().max() < 1e-5
    std = xtr.std(0)
    constant = std < 1e-3  # pixels that never vary in the training set stay exactly 0
    assert constant.sum() < 64 and (xtr[:, constant] == 0).all()
    torch.testing.assert_close(std[~constant], torch.ones(int((~constant).sum())), atol=1e-4, rtol=0)


def test_digits_batch_order_is_seeded():
    a, b = _batches(data.digits(16, seed=0)[0]), _batches(data.digits(16, seed=0)[0])
    assert len(a) == len(b) == 90 and all(torch.equal(ya, yb) and torch.equal(xa, xb)
                                          for (xa, ya), (xb, yb) in zip(a, b))
    train = data.digits(16, seed=0)[0]
    first, second = _batches(train), _batches(train)  # the shuffle moves on between epochs
    assert not all(torch.equal(y1, y2) for (_, y1), (_, y2) in zip(first, second))
    other = _batches(data.digits(16, seed=1)[0])  # another seed: another split and order
    assert not torch.equal(torch.cat([y for _, y in a]), torch.cat([y for _, y in other]))


def test_digits_test_loader_is_not_shuffled():
    test = data.digits(32, seed=0)[1]
    ys = torch.cat([y for _, y in test])
    assert torch.equal(ys, test.dataset.tensors[1]) and torch.equal(ys, torch.cat([y for _, y in test]))


@pytest.mark.parametrize("bad", [0, -4, 2.5, True, "64"])
def test_digits_rejects_bad_batch_size(bad):
    with pytest.raises(ValueError, match="batch_size"):
        data.digits(batch_size=bad)
    with pytest.raises(ValueError, match="batch_size"):
        data.get("digits", batch_size=bad)


def test_get_dataset_by_name():
    train, test, classes, shape = data.get("digits", batch_size=50, seed=0)
    assert classes == 10 and shape == (1, 8, 8) and train.batch_size == 50
    assert "digits" in data.available()
    with pytest.raises(ValueError, match="digits"):
        data.get("cifar99", batch_size=64, seed=0)


def test_mlp_is_64_256_256_10_plain_pytorch():
    model = models.get("mlp", 10, (1, 8, 8))
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 256), (256, 256), (256, 10)]
    assert all(type(m) is nn.Linear for m in linears)  # no SSA layers: the trainer converts
    assert isinstance(model[0], nn.Flatten)
    assert isinstance(model[2], nn.ReLU) and isinstance(model[4], nn.ReLU)
    assert model(torch.randn(5, 1, 8, 8)).shape == (5, 10)


@pytest.mark.parametrize("activation, cls", [("relu", nn.ReLU), ("tanh", nn.Tanh), ("sigmoid", nn.Sigmoid),
                                             ("leaky_relu", nn.LeakyReLU)])
def test_mlp_hidden_sizes_and_activation(activation, cls):
    model = models.get("mlp", 3, (2, 5), hidden=(7,), activation=activation)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(10, 7), (7, 3)]
    assert sum(isinstance(m, cls) for m in model.modules()) == 1
    assert model(torch.randn(4, 2, 5)).shape == (4, 3)
    assert models.get("mlp", 4, (6,), hidden=()).forward(torch.randn(2, 6)).shape == (2, 4)


def test_models_same_seed_same_weights():
    torch.manual_seed(0)
    a = models.get("mlp", 10, (1, 8, 8))
    torch.manual_seed(0)
    b = models.get("mlp", 10, (1, 8, 8))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_models_bad_arguments():
    assert "mlp" in models.available()
    with pytest.raises(ValueError, match="mlp"):
        models.get("resnet999", 10, (1, 8, 8))
    for bad in (1, 0, True, 2.0):
        with pytest.raises(ValueError, match="num_classes"):
            models.get("mlp", bad, (1, 8, 8))
    with pytest.raises(ValueError, match="activation"):
        models.get("mlp", 10, (1, 8, 8), activation="gelu")
    with pytest.raises(ValueError, match="in_shape"):
        models.get("mlp", 10, (0, 8))
