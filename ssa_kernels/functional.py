"""The math the ops share with the training layer, as a public, documented API.

The fused ops (:func:`ssa_kernels.lowrank_linear`, :func:`ssa_kernels.dfa_project`, …) compute
whole steps; a training rule built on them also needs a few of their pieces on their own —
an activation's derivative from its output, the DFA signal through factored feedback, the
spatial-SVD layout of a convolution kernel (DESIGN §4). These functions are those pieces,
pure PyTorch, differentiable, on any device and dtype; the ops' reference implementation
uses the same definitions, so a rule and the kernels cannot disagree.

* :func:`activation_grad` — ``f'(a)`` from ``h = f(a)`` for the fusible activations;
* :func:`feedback_signal` — ``δh = ((e Q) ⊙ σ) Pᵀ``, DFA through ``B = P diag(σ) Qᵀ``;
* :func:`factors_from_kernel`, :func:`kernel_from_factors`, :func:`conv_kernels` — a kernel
  ``K`` (N×C×kh×kw) as the matrix ``K'`` (N·kw × C·kh) whose SVD SSAConv2d keeps, and back;
* :func:`conv_geometry` — normalised ``(kernel, stride, padding, dilation)`` of a convolution,
  with the errors the conv ops raise;
* :data:`ACTIVATIONS`, :data:`PROJECTIONS`, :data:`SCALINGS` — the option names the ops accept.
"""

from __future__ import annotations

from ._checks import conv_geometry
from .reference import (
    ACTIVATIONS,
    PROJECTIONS,
    SCALINGS,
    activation_grad,
    conv_kernels,
    factors_from_kernel,
    feedback_signal,
    kernel_from_factors,
)

__all__ = ["ACTIVATIONS", "PROJECTIONS", "SCALINGS", "activation_grad", "conv_geometry", "conv_kernels",
           "factors_from_kernel", "feedback_signal", "kernel_from_factors"]
