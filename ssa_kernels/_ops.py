"""Schemas of every ssa_kernels op, defined once, beside their fake kernels and autograd.

Each op exists once per implementation family, so that ``backend=`` can force any of
them and ``torch.compile`` sees a distinct op::

    ssa_kernels::<op>_ref      pure PyTorch (reference.py), every device
    ssa_kernels::<op>_native   C++ (CPU) and CUDA kernels from csrc/, TORCH_LIBRARY_IMPL only
    ssa_kernels::<op>_triton   Triton kernels (ssa_kernels/triton/), torch.library.triton_op

The schemas live here and nowhere else: C++ registers implementations only, and the
Triton ops are built from the same strings. ``lowrank_linear_*`` and ``lowrank_conv2d_*`` carry
the autograd formula of DESIGN §3/§4; ``dfa_project_*``, ``svd_factor_grads_*`` and
``svd_conv_factor_grads_*`` are autograd-free and their backward raises.
"""

from __future__ import annotations

import torch

from . import reference as ref

NAMESPACE = "ssa_kernels"
FAMILIES = ("ref", "native", "triton")

SCHEMAS = {
    "lowrank_linear": (
        "(Tensor x, Tensor U, Tensor s, Tensor V, Tensor? bias, str activation, "
        "float negative_slope) -> (Tensor, Tensor)"
    ),
    "dfa_project": (
        "(Tensor e, Tensor P, Tensor sigma, Tensor Q, Tensor h, Tensor? a, str activation, "
        "float negative_slope, float cos) -> Tensor"
    ),
    "svd_factor_grads": (
        "(Tensor x, Tensor t, Tensor delta, Tensor U, Tensor s, Tensor V, Tensor? BU, "
        "Tensor? BS, Tensor? BV, float ce, float align, float ortho, float hoyer, "
        "float hoyer_eps, str scaling, str projection, float eps) -> "
        "(Tensor, Tensor, Tensor, Tensor)"
    ),
    "lowrank_conv2d": (
        "(Tensor x, Tensor U, Tensor s, Tensor V, Tensor? bias, int[] kernel_size, int[] stride, "
        "int[] padding, int[] dilation, str activation, float negative_slope) -> (Tensor, Tensor)"
    ),
    "svd_conv_factor_grads": (
        "(Tensor x, Tensor t, Tensor delta, Tensor U, Tensor s, Tensor V, int[] kernel_size, "
        "int[] stride, int[] padding, int[] dilation, Tensor? BU, Tensor? BS, Tensor? BV, float ce, "
        "float align, float ortho, float hoyer, float hoyer_eps, str scaling, str projection, "
        "float eps) -> (Tensor, Tensor, Tensor, Tensor)"
    ),
}

#: Ops with a Triton implementation. The convolution ops have none: their two convolutions
#: are cuDNN/ATen calls and the epilogue around them is an M×r pass, which a Triton kernel
#: would not speed up ("triton where it pays"); backend="triton" refuses them by name.
TRITON_OPS = ("lowrank_linear", "dfa_project", "svd_factor_grads")

_lib = torch.library.Library(NAMESPACE, "FRAGMENT")


def qualname(op: str, family: str) -> str:
    return f"{NAMESPACE}::{op}_{family}"


# ---------------------------------------------------------------- fake kernels


def _fake_lowrank_linear(x, U, s, V, bias, activation, negative_slope):
    h = x.new_empty((x.shape[0], U.shape[0]))
    t = x.new_empty((x.shape[0], V.shape[1]), dtype=ref.acc_dtype(x.dtype))
    return h, t


def _fake_dfa_project(e, P, sigma, Q, h, a, activation, negative_slope, cos):
    return torch.empty_like(h, memory_format=torch.contiguous_format)


def _fake_svd_factor_grads(x, t, delta, U, s, V, BU, BS, BV, ce, align, ortho, hoyer,
                           hoyer_eps, scaling, projection, eps):
    return (U.new_empty(U.shape), U.new_empty(s.shape), U.new_empty(V.shape),
            U.new_empty((U.shape[0],)))


def _fake_lowrank_conv2d(x, U, s, V, bias, kernel_size, stride, padding, dilation, activation,
                         negative_slope):
    kh, kw = kernel_size
    Ho = ref.conv_out_size(x.shape[2], padding[0] + padding[1], kh, stride[0], dilation[0])
    Wt = x.shape[3] + padding[2] + padding[3]
    Wo = ref.conv_out_size(Wt, 0, kw, stride[1], dilation[1])
    h = x.new_empty((x.shape[0], U.shape[0] // kw, Ho, Wo))
    t = x.new_empty((x.shape[0], U.shape[1], Ho, Wt), dtype=ref.acc_dtype(x.dtype))
    return h, t


def _fake_svd_conv_factor_grads(x, t, delta, U, s, V, kernel_size, stride, padding, dilation, BU, BS,
                                BV, ce, align, ortho, hoyer, hoyer_eps, scaling, projection, eps):
    return (U.new_empty(U.shape), U.new_empty(s.shape), U.new_empty(V.shape),
            U.new_empty((U.shape[0] // kernel_size[1],)))


FAKES = {
    "lowrank_linear": _fake_lowrank_linear,
    "dfa_project": _fake_dfa_project,
    "svd_factor_grads": _fake_svd_factor_grads,
    "lowrank_conv2d": _fake_lowrank_conv2d,
    "svd_conv_factor_grads": _fake_svd_conv_factor_grads,
}

# ------------------------------------------------------------------- autograd


def _lowrank_setup_context(ctx, inputs, output):
    x, U, s, V, bias, activation, negative_slope = inputs
    h, t = output
    ctx.save_for_backward(x, U, s, V, h, t)
    ctx.activation = activation
    ctx.negative_slope = negative_slope
    ctx.has_bias = bias is not None


def _lowrank_backward(ctx, grad_h, grad_t):
    x, U, s, V, h, t = ctx.saved_tensors
    gx, gU, gs, gV, gb = ref.lowrank_linear_backward(
        grad_h, grad_t, x, U, s, V, h, t, ctx.activation, ctx.negative_slope)
    return gx, gU, gs, gV, (gb if ctx.has_bias else None), None, None


def _conv_setup_context(ctx, inputs, output):
    x, U, s, V, bias, kernel_size, stride, padding, dilation, activation, negative_slope = inputs
    h, t = output
    ctx.save_for_backward(x, U, s, V, h, t)
    ctx.geometry = (tuple(kernel_size), tuple(stride), tuple(padding), tuple(dilation))
    ctx.activation = activation
    ctx.negative_slope = negative_slope
    ctx.has_bias = bias is not None


def _conv_backward(ctx, grad_h, grad_t):
    x, U, s, V, h, t = ctx.saved_tensors
    gx, gU, gs, gV, gb = ref.lowrank_conv2d_backward(
        grad_h, grad_t, x, U, s, V, h, t, *ctx.geometry, ctx.activation, ctx.negative_slope)
    return (gx, gU, gs, gV, (gb if ctx.has_bias else None)) + (None,) * 6


def _autograd_free(name):
    def setup_context(ctx, inputs, output):
        pass

    def backward(ctx, *grads):
        raise RuntimeError(
            f"ssa_kernels.{name} is autograd-free: it computes the local SSA update itself "
            "(DESIGN §5-§6) and has no backward. Call it on tensors that do not require grad "
            "(e.g. under torch.no_grad() or on .detach()ed inputs).")

    return backward, setup_context


# ------------------------------------------------------------------- reference

_REF_IMPLS = {
    "lowrank_linear": lambda x, U, s, V, bias, activation, negative_slope: ref.lowrank_linear(
        x, U, s, V, bias, activation, negative_slope),
    "dfa_project": lambda e, P, sigma, Q, h, a, activation, negative_slope, cos: ref.dfa_project(
        e, P, sigma, Q, h, activation, negative_slope, a, cos).contiguous(),
    "svd_factor_grads": ref.svd_factor_grads,
    "lowrank_conv2d": ref.lowrank_conv2d,
    "svd_conv_factor_grads": ref.svd_conv_factor_grads,
}


def register_autograd(op: str, family: str) -> None:
    name = qualname(op, family)
    if op == "lowrank_linear":
        torch.library.register_autograd(name, _lowrank_backward,
                                        setup_context=_lowrank_setup_context, lib=_lib)
    elif op == "lowrank_conv2d":
        torch.library.register_autograd(name, _conv_backward, setup_context=_conv_setup_context,
                                        lib=_lib)
    else:
        backward, setup = _autograd_free(op)
        torch.library.register_autograd(name, backward, setup_context=setup, lib=_lib)


def _define_all() -> None:
    for op, schema in SCHEMAS.items():
        for family in ("ref", "native"):
            _lib.define(f"{op}_{family}{schema}")
            torch.library.register_fake(qualname(op, family), FAKES[op], lib=_lib)
            register_autograd(op, family)
        _lib.impl(f"{op}_ref", _REF_IMPLS[op], "CompositeExplicitAutograd")


_define_all()


def get(op: str, family: str):
    """The ``torch.ops`` overload of ``op`` for an implementation family."""
    return getattr(getattr(torch.ops, NAMESPACE), f"{op}_{family}").default


__all__ = ["FAMILIES", "SCHEMAS", "TRITON_OPS", "FAKES", "get", "qualname", "register_autograd"]
