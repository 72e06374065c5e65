"""Triton backend: registers ``ssa_kernels::<op>_triton`` for the three ops of DESIGN §3, §5, §6.

Importing needs Triton (an ImportError propagates: ``ssa_kernels._backends`` reports the
backend unavailable) and touches no GPU. Each op is built from the one schema in
``_ops.SCHEMAS`` as a ``torch.library.triton_op`` (from the annotated entry points of
``_entry``): its launcher calls only torch ops and ``wrap_triton``-ed kernels, so
``torch.compile`` traces into it and sees the kernels. The
fake kernel is the shared one of ``_ops.FAKES`` (cheap, and the same metadata for every
family) and the autograd formulas are those of every family (``_ops.register_autograd``).

On the CPU the kernels run under ``TRITON_INTERPRET=1``. There ``@triton.jit`` makes
interpreted functions that ``wrap_triton`` cannot trace, so the launchers are registered
as opaque ``torch.library.custom_op``s instead: same schema, same eager behaviour.
"""

from __future__ import annotations

import os

import torch
import triton  # noqa: F401  (fail here, not at the first launch, when Triton is missing)

from .. import _ops
from . import _entry, dfa_project, factor_grads, lowrank_linear

#: The plain launcher of each op (one module per op, same name except svd_factor_grads).
LAUNCHERS = {
    "lowrank_linear": lowrank_linear.lowrank_linear,
    "dfa_project": dfa_project.dfa_project,
    "svd_factor_grads": factor_grads.svd_factor_grads,
}


def _register() -> None:
    interpreted = os.environ.get("TRITON_INTERPRET", "0") == "1"
    for op, entry in _entry.ENTRIES.items():
        name = _ops.qualname(op, "triton")
        if interpreted:
            opdef = torch.library.custom_op(name, entry, mutates_args=(), schema=_ops.SCHEMAS[op])
        else:  # schema inferred from the entry's annotations (torch 2.11 ignores schema=)
            opdef = torch.library.triton_op(name, entry, mutates_args=())
        opdef.register_fake(_ops.FAKES[op])
        _ops.register_autograd(op, "triton")


_register()

__all__ = ["LAUNCHERS", "dfa_project", "factor_grads", "lowrank_linear"]
