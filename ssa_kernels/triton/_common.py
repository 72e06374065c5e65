"""Helpers shared by the Triton kernels: activations, dot precision and launch sizes.

Activation codes follow ``reference.ACTIVATIONS`` (DESIGN §2). ``f'`` is read from the
output ``h = f(a)`` exactly as ``reference.activation_grad`` does (DESIGN §3, §5).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

ACT_CODES = {"none": 0, "relu": 1, "leaky_relu": 2, "tanh": 3, "sigmoid": 4}

#: tl.dot needs every block dimension to be at least 16.
MIN_DOT = 16


@triton.jit
def activate(a, ACT: tl.constexpr, slope):
    """``f(a)`` on an fp32 tile. tanh is ``2 σ(2a) − 1``: not every Triton has tl.tanh.

    As torch: relu(−inf) = 0, leaky_relu(−inf) = −inf, tanh(±inf) = ±1, NaN propagates
    (relu tests ``a <= 0``, false for NaN).
    """
    if ACT == 1:
        a = tl.where(a <= 0, 0.0, a)
    elif ACT == 2:
        a = tl.where(a > 0, a, a * slope)
    elif ACT == 3:
        a = 2.0 * tl.sigmoid(2.0 * a) - 1.0
    elif ACT == 4:
        a = tl.sigmoid(a)
    return a


@triton.jit
def activation_grad(h, ACT: tl.constexpr, slope):
    """``f'(a)`` from ``h = f(a)`` (fp32 tile): relu/leaky use ``h > 0``, as autograd does."""
    if ACT == 0:
        g = tl.full(h.shape, 1.0, tl.float32)
    elif ACT == 1:
        g = tl.where(h > 0, 1.0, 0.0)
    elif ACT == 2:
        g = tl.where(h > 0, 1.0, slope)
    elif ACT == 3:
        g = 1.0 - h * h
    else:
        g = h * (1.0 - h)
    return g


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr, WIDEN: tl.constexpr):
    """``acc + a b`` with fp32 accumulation; ``WIDEN`` multiplies the tiles as fp32 instead.

    The CPU interpreter multiplies bf16 tiles as their raw 16-bit patterns; widening them
    first gives the same products (a product of two bf16 values is exact in fp32).
    """
    if WIDEN:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


def widen(dtype: torch.dtype) -> bool:
    """Whether :func:`mma` must widen tiles of ``dtype``: bf16 under ``TRITON_INTERPRET=1``."""
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1"


def act_code(activation: str) -> int:
    return ACT_CODES[activation]


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of the fp32 × fp32 products.

    fp32 inputs get exact fp32 products unless the user allowed TF32 for matmuls, as
    cuBLAS would. With fp16/bf16 inputs the fp32 operands (``t``, ``w``, the cores) only
    meet values that are already rounded, and TF32 keeps more bits than the inputs have.
    """
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def dot_block(size: int, cap: int) -> int:
    """A power-of-two block covering ``size`` (at most ``cap``), never below ``MIN_DOT``."""
    return max(MIN_DOT, min(cap, triton.next_power_of_2(max(int(size), 1))))


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def target_programs(device: torch.device) -> int:
    """Programs that fill the device: two per SM on a GPU; 1 under the CPU interpreter,
    where more programs only cost time, so no work is split there unless a test asks."""
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    return 2 * _sm_count(index)


def cdiv(a: int, b: int) -> int:
    return (int(a) + int(b) - 1) // int(b)
