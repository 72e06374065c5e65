# ruff: noqa: UP045  (typing.Optional is what infer_schema matches on every torch 2.11-2.14)
"""Annotated entry points of the Triton launchers, one per op of ``_ops.SCHEMAS``.

``torch.library.triton_op`` infers the operator schema from type annotations (torch 2.11
ignores an explicit ``schema=``), so each launcher is wrapped in a function whose
signature spells out exactly that schema. ``test_opcheck`` checks the inferred schema
against ``_ops.SCHEMAS``. No ``from __future__ import annotations`` here: the
annotations must be real types for ``infer_schema``.
"""

from typing import Optional

from torch import Tensor

from . import dfa_project as _dfa
from . import factor_grads as _fg
from . import lowrank_linear as _ll


def lowrank_linear(x: Tensor, U: Tensor, s: Tensor, V: Tensor, bias: Optional[Tensor], activation: str,
                   negative_slope: float) -> tuple[Tensor, Tensor]:
    return _ll.lowrank_linear(x, U, s, V, bias, activation, negative_slope)


def dfa_project(e: Tensor, P: Tensor, sigma: Tensor, Q: Tensor, h: Tensor, a: Optional[Tensor],
                activation: str, negative_slope: float, cos: float) -> Tensor:
    return _dfa.dfa_project(e, P, sigma, Q, h, a, activation, negative_slope, cos)


def svd_factor_grads(x: Tensor, t: Tensor, delta: Tensor, U: Tensor, s: Tensor, V: Tensor,
                     BU: Optional[Tensor], BS: Optional[Tensor], BV: Optional[Tensor], ce: float,
                     align: float, ortho: float, hoyer: float, hoyer_eps: float, scaling: str,
                     projection: str, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _fg.svd_factor_grads(x, t, delta, U, s, V, BU, BS, BV, ce, align, ortho, hoyer, hoyer_eps,
                                scaling, projection, eps)


ENTRIES = {"lowrank_linear": lowrank_linear, "dfa_project": dfa_project,
           "svd_factor_grads": svd_factor_grads}
