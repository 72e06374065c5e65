"""Datasets of the training layer (DESIGN §11). Nothing is downloaded at run time."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["digits", "get", "available"]

DIGITS_TRAIN = 1437


def _check_batch_size(batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    return batch_size


def digits_tensors(seed: int = 0):
    """``(x_train, y_train, x_test, y_test)`` of scikit-learn's ``load_digits`` (DESIGN §11).

    A seeded random split of 1437 training and 360 test images; pixels standardised with
    the training set's per-feature mean and standard deviation (+ 1e-6); images ``1×8×8``.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover
        raise ImportError("ssa.data.digits needs scikit-learn (pip install scikit-learn)") from err
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    tr, te = perm[:DIGITS_TRAIN], perm[DIGITS_TRAIN:]
    mean, std = x[tr].mean(0), x[tr].std(0) + 1e-6
    x = ((x - mean) / std).reshape(-1, 1, 8, 8)
    return x[tr], y[tr], x[te], y[te]


def digits(batch_size: int = 64, seed: int = 0, num_workers: int = 0):
    """``(train_loader, test_loader)`` over the embedded digits data.

    The training loader shuffles with its own seeded ``torch.Generator`` (``loader.generator``),
    so the same seed gives the same batches and a checkpoint can restore the shuffle state.
    """
    _check_batch_size(batch_size)
    xtr, ytr, xte, yte = digits_tensors(seed)
    train = DataLoader(TensorDataset(xtr, ytr), batch_size=batch_size, shuffle=True,
                       generator=torch.Generator().manual_seed(seed), num_workers=num_workers)
    test = DataLoader(TensorDataset(xte, yte), batch_size=max(batch_size, 256), shuffle=False,
                      num_workers=num_workers)
    return train, test


_DATASETS = {"digits": (10, (1, 8, 8))}


def available() -> list[str]:
    """Names accepted by :func:`get` (the known datasets)."""
    return sorted(_DATASETS)


def get(name: str, batch_size: int = 64, seed: int = 0, root: str | None = None):
    """``(train_loader, test_loader, num_classes, in_shape)`` of a named dataset (see :func:`available`).

    ``root`` is the local data folder of file-based datasets; the embedded ``"digits"`` ignores it.
    """
    if name not in _DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {available()}")
    train, test = digits(batch_size, seed)
    classes, shape = _DATASETS[name]
    return train, test, classes, shape
