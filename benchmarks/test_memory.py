"""Training memory of whole models: SSA (``store`` and ``recompute``) against dense BP (issue 6, target 6).

One steady-state :meth:`ssa.Trainer.step` (Adam state already built) of

* an MLP of ``depth`` linear layers (``width → … → width → 10``, ReLU), SSA layers truncated
  to rank ``RANK`` (the output layer keeps its 10);
* SmallConv and VGG-13 on 3×32×32 inputs, SSA layers truncated to ``min(rank, RANK)``.

Peak memory is absolute, as issue 6 defines it: on CUDA ``reset_peak_memory_stats`` before
the step and ``max_memory_allocated`` after it (parameters, optimizer state, batch and
everything the step allocates); on the CPU the bytes held between steps (parameters,
gradients, buffers, optimizer state, batch) plus the profiler's peak of the step
(:func:`ssa.metrics.cpu_peak_bytes`). The time of the step is recorded too. Sizes: issue 6's
on a GPU (width 4096, batch 4096, r = 64; convnets batch 128); a scaled-down set on the CPU.
"""

from __future__ import annotations

import pytest
import torch
from _common import device, run
from torch import nn

import ssa
from ssa.metrics import cpu_peak_bytes

DEV = device()
C = 10
RANK = 64
if DEV == "cuda":
    WIDTH, BATCH, DEPTHS, CONV_BATCH = 4096, 4096, (4, 8, 16), 128
else:
    WIDTH, BATCH, DEPTHS, CONV_BATCH = 512, 512, (4, 8, 16), 8
CASES = ("bp", "ssa-store", "ssa-recompute")


def _mlp(depth: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(depth - 1):
        layers += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(WIDTH, C))


def _trainer(model: nn.Module, case: str) -> ssa.Trainer:
    if case == "bp":
        return ssa.Trainer(model, C, method="bp", device=DEV)
    tr = ssa.Trainer(model, C, method="ssa", memory=case.split("-")[1], device=DEV)
    for layer in tr.ssa_layers().values():
        if layer.rank > RANK:
            layer.truncate(RANK, tr.optimizer)
    return tr


def _bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _held(tr: ssa.Trainer, x, y) -> int:
    """Bytes held between steps: parameters and their gradients, buffers (SSA targets, feedback),
    optimizer state, batch."""
    state = [v for s in tr.optimizer.state.values() for v in s.values()]
    params = list(tr.model.parameters())
    return _bytes(params + [p.grad for p in params] + list(tr.model.buffers()) + state + [x, y])


def _absolute_peak(tr: ssa.Trainer, x, y, fn) -> int:
    if DEV == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _held(tr, x, y) + cpu_peak_bytes(fn)


def _measure(benchmark, model_name: str, model: nn.Module, case: str, x, **shape) -> None:
    torch.manual_seed(0)
    tr = _trainer(model, case)
    x = x.to(DEV)
    y = torch.arange(x.shape[0], device=DEV) % C
    step = lambda: tr.step(x, y)  # noqa: E731
    for _ in range(2):  # Adam state, allocator warm
        step()
    peak = _absolute_peak(tr, x, y, step)
    params = _bytes(tr.model.parameters())
    # What grows with the parameters alone: what is held between steps and, on the CPU, the
    # step's fresh gradients too (the profiler does not see the old ones freed: they were
    # allocated before it started).
    share = _held(tr, x, y) + (params if DEV != "cuda" else 0)
    run(benchmark, step, DEV, 0.0, 0.0, op="training_memory", provider=case,
        shape=dict(model=model_name, batch=x.shape[0], **shape), dtype="torch.float32",
        peak_abs_bytes=peak, param_bytes=params, param_share_bytes=share)


@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("case", CASES)
def test_mlp_training_memory(benchmark, case, depth):
    torch.manual_seed(0)
    _measure(benchmark, "mlp", _mlp(depth), case, torch.randn(BATCH, WIDTH), depth=depth, width=WIDTH,
             r=RANK)


@pytest.mark.parametrize("model_name", ["smallconv", "vgg13"])
@pytest.mark.parametrize("case", CASES)
def test_convnet_training_memory(benchmark, case, model_name):
    torch.manual_seed(0)
    model = ssa.models.get(model_name, C, (3, 32, 32))
    _measure(benchmark, model_name, model, case, torch.randn(CONV_BATCH, 3, 32, 32), r=RANK)
