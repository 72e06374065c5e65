"""Measurements the package reports (DESIGN §10).

* :func:`peak_bytes` / :func:`cpu_peak_bytes`: peak memory of a call;
* :func:`layer_shapes`: what every weight layer of a trainer's model sees in one forward;
* :func:`training_flops`: analytic training FLOPs of one iteration, per layer and method;
* :func:`gradient_alignment`: angle between a method's weight-space gradient and BP's;
* :func:`matrix_alignment`: angle between a layer's feedback matrix and the path it replaces.

Angles are in degrees, ``degrees(arccos(clamp(cos, −1, 1)))`` of the flattened cosine,
computed in fp64 as ``2·atan2(‖â − b̂‖, ‖â + b̂‖)`` (the same angle, without arccos's loss
of accuracy near 0° and 180°).
"""

from __future__ import annotations

import contextlib
import copy
import math
import operator
import os
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .baselines import FeedbackConv2d, FeedbackLinear
from .convert import to_dense
from .layers import SSAConv2d, SSALayer, SSALinear
from .local.recording import paused

__all__ = ["cpu_peak_bytes", "peak_bytes", "layer_shapes", "training_flops", "gradient_alignment",
           "matrix_alignment", "dense_forward_flops", "ssa_layer_costs"]

#: Layers whose weights are trained (feedback layers are subclasses of nn.Linear / nn.Conv2d).
WEIGHT_LAYERS = (nn.Linear, nn.Conv2d, SSALayer)


def cpu_peak_bytes(fn) -> int:
    """Peak bytes allocated by ``fn()`` on the CPU, from the profiler's memory events.

    (``tracemalloc`` does not see tensor storage; DESIGN §10.) Events are replayed in time
    order, each op counting its own allocations and frees; the peak is relative to the
    memory in use before the call.
    """
    from torch.profiler import ProfilerActivity, profile

    with _kineto_lines_dropped(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    cur = peak = 0
    for e in events:
        cur += e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        peak = max(peak, cur)
    return peak


#: Lines the profiler's C++ side (kineto) prints on every start/stop of a CPU-only trace.
_KINETO_NOISE = ("profiler_start", "profiler_stop", "gpuGetDeviceCount failed",
                 "Memory block of unknown size was allocated before the profiling started")


@contextlib.contextmanager
def _kineto_lines_dropped():
    """Route file descriptor 2 through a temporary file and put back every line but kineto's
    start/stop chatter (printed from C++, so ``warnings``/``logging`` filters cannot reach it)."""
    import sys
    import tempfile

    try:
        sys.stderr.flush()
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # no real stderr (e.g. captured): nothing to do
        yield
        return
    saved = os.dup(fd)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), fd)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, fd)
            os.close(saved)
            tmp.seek(0)
            keep = [line for line in tmp.read().decode(errors="replace").splitlines(keepends=True)
                    if not any(k in line for k in _KINETO_NOISE)]
            if keep:
                sys.stderr.write("".join(keep))
                sys.stderr.flush()


def peak_bytes(fn, device: str | torch.device = "cpu") -> int:
    """Peak extra bytes allocated during ``fn()`` on ``device`` (CUDA allocator stats or the profiler)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return cpu_peak_bytes(fn)


# ---------------------------------------------------------------------------- helpers
def _check_trainer(fn: str, trainer) -> nn.Module:
    model = getattr(trainer, "model", None)
    rule = getattr(trainer, "rule", None)
    if not isinstance(model, nn.Module) or not callable(getattr(rule, "layer_flops", None)):
        raise TypeError(f"{fn}: trainer must be an ssa.Trainer (with a method object in .rule), "
                        f"got {type(trainer).__name__}")
    return model


def _check_x_shape(fn: str, x_shape) -> tuple[int, ...]:
    try:
        shape = tuple(operator.index(d) for d in x_shape if not isinstance(d, bool))
        ok = len(shape) == len(tuple(x_shape)) and len(shape) >= 2 and min(shape) >= 1
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"{fn}: x_shape must be (batch, *sample_shape): at least 2 positive ints, "
                         f"got x_shape={x_shape!r}")
    return shape


def _weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every weight layer by qualified name, in registration order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, WEIGHT_LAYERS)}


def _local_heads(trainer) -> list[nn.Module]:
    """The trainer's *local modules* (their input is detached, DESIGN §5)."""
    return list(trainer.rule.local_heads())


def _model_like(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters(), None)
    return (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.get_default_dtype())


class _Untouched:
    """Puts back, on exit, what a measuring forward or a ``feedback_matrix()`` call could move: the
    global RNG (CPU and the model's CUDA device), the train/eval flags and the ``brsf``
    layers' generators and drawn magnitudes."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.model, self.device = model, device

    def __enter__(self):
        self.rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        self.modes = [(m, m.training) for m in self.model.modules()]
        self.feedback = [(m, m._gen.get_state(), m._magnitude) for m in self.model.modules()
                         if isinstance(m, (FeedbackLinear, FeedbackConv2d))]
        return self

    def __exit__(self, *exc) -> None:
        torch.set_rng_state(self.rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state(self.cuda_rng, self.device)
        for m, training in self.modes:
            m.training = training
        for m, state, magnitude in self.feedback:
            m._gen.set_state(state)
            m._magnitude = magnitude


def _angle(a: Tensor | None, b: Tensor | None) -> float:
    """Degrees between flattened ``a`` and ``b``; nan when either is missing, zero or non-finite."""
    if a is None or b is None:
        return math.nan
    a, b = a.detach().double().flatten(), b.detach().double().flatten()
    if a.shape != b.shape:
        raise ValueError(f"angle of tensors with {a.numel()} and {b.numel()} elements")
    na, nb = float(a.norm()), float(b.norm())
    if not (na > 0 and nb > 0 and math.isfinite(na) and math.isfinite(nb)):
        return math.nan
    # = arccos(clamp(cos, −1, 1)), in the form that stays accurate near 0° and 180° (arccos
    # of a cosine rounded at 1 − 2⁻⁵³ would read 1e-6° for parallel vectors)
    a, b = a / na, b / nb
    return math.degrees(2.0 * math.atan2(float((a - b).norm()), float((a + b).norm())))


# ---------------------------------------------------------------------------- shapes
def layer_shapes(trainer, x_shape) -> dict[str, dict]:
    """What every weight layer of ``trainer.model`` sees in one forward (DESIGN §10).

    One eval-mode forward of a zero tensor of shape ``(1, *x_shape[1:])`` on the model's
    device and dtype, recorded by temporary forward hooks (removed afterwards, whatever
    happens) on every ``nn.Linear``, ``nn.Conv2d`` (feedback layers of :mod:`ssa.baselines`
    included), :class:`~ssa.SSALinear` and :class:`~ssa.SSAConv2d`. The trainer's own hooks
    stay idle (no tape is active during the forward); train/eval flags, the global RNG and
    the ``brsf`` feedback draws are as before the call. Autograd is on during the forward
    (nothing is backpropagated) so that ``input_grad`` can be read off; the inputs of the
    trainer's local modules are detached, as in its step.

    Args:
        trainer: an :class:`ssa.Trainer`.
        x_shape: the shape of a training batch, ``(batch, *sample_shape)``; only
            ``sample_shape`` is used here.

    Returns:
        ``{name: info}`` in execution order, for the layers that ran (a layer called twice
        is described by its first call; ``calls`` counts them), ``info`` holding:
        ``name``; ``kind`` (``"linear"`` / ``"conv"``); ``type`` (class name); ``in``, ``out``
        (features, or channels); ``rows`` (rows per sample a linear layer maps: 1 for a
        2-D input, the sequence length for ``(B, L, n)``; 1 for a conv); ``kernel``,
        ``stride``, ``groups`` (conv, else ``None``/``None``/1); ``in_size``, ``out_size``
        (``(H, W)`` of the input and output maps, conv only); ``t_size`` (``(Ho, W + pad_l +
        pad_r)`` of the intermediate map ``t`` of an :class:`SSAConv2d`, DESIGN §4); ``rank``
        (SSA layers, else ``None``); ``order`` (0-based execution order); ``calls``;
        ``trainable`` (its weight / factors require a gradient); ``input_grad`` (its input
        depends on trainable parameters, so backpropagation needs its input-gradient);
        ``local`` (name of the enclosing local module of the trainer, or ``None``);
        ``is_output`` (the last layer in execution order).

    Raises:
        ValueError: ``x_shape`` is not a shape of at least 2 positive ints, or the model
            cannot run a sample of that shape.
    """
    return _layer_shapes("layer_shapes", trainer, x_shape)


def _layer_shapes(fn: str, trainer, x_shape) -> dict[str, dict]:
    model = _check_trainer(fn, trainer)
    shape = _check_x_shape(fn, x_shape)
    device, dtype = _model_like(model)
    layers = _weight_layers(model)
    names = {m: n for n, m in model.named_modules()}
    owner: dict[nn.Module, str] = {}
    local = _local_heads(trainer)
    for head in local:
        for m in head.modules():
            if isinstance(m, WEIGHT_LAYERS):
                owner.setdefault(m, names.get(head, ""))
    info: dict[str, dict] = {}

    def record(name: str, module: nn.Module, inputs, output) -> None:
        if name in info:
            info[name]["calls"] += 1
            return
        info[name] = _describe(name, module, inputs[0], output, len(info), owner.get(module))

    def detach(module, args):
        return tuple(a.detach() if isinstance(a, Tensor) else a for a in args)

    handles = []
    with _Untouched(model, device):
        try:
            for name, m in layers.items():
                handles.append(m.register_forward_hook(partial(record, name)))
            for head in local:
                handles.append(head.register_forward_pre_hook(detach))
            model.eval()
            x = torch.zeros((1, *shape[1:]), device=device, dtype=dtype)
            with paused(), torch.enable_grad():
                try:
                    model(x)
                except (RuntimeError, ValueError, TypeError, IndexError) as e:
                    raise ValueError(f"{fn}: the model cannot run a sample of x_shape={x_shape!r} "
                                     f"(as shape {tuple(x.shape)}): {e}") from e
        finally:
            for h in handles:
                h.remove()
    if info:
        info[list(info)[-1]]["is_output"] = True
    return info


def _describe(name: str, m: nn.Module, x: Tensor, out: Tensor, order: int, local: str | None) -> dict:
    trainable = (m.U if isinstance(m, SSALayer) else m.weight).requires_grad
    rec = dict(name=name, kind="linear", type=type(m).__name__, rows=1, kernel=None, stride=None, groups=1,
               in_size=None, out_size=None, t_size=None, rank=m.rank if isinstance(m, SSALayer) else None,
               order=order, calls=1, trainable=bool(trainable), input_grad=bool(x.requires_grad),
               local=local, is_output=False)
    if isinstance(m, (nn.Conv2d, SSAConv2d)):
        rec.update(kind="conv", kernel=tuple(m.kernel_size), stride=tuple(m.stride), groups=int(m.groups),
                   **{"in": m.in_channels, "out": m.out_channels},
                   in_size=tuple(x.shape[-2:]), out_size=tuple(out.shape[-2:]))
        if isinstance(m, SSAConv2d):
            _, _, pl, pr = m._pads
            rec["t_size"] = (int(out.shape[-2]), int(x.shape[-1]) + pl + pr)
    else:
        rec.update(**{"in": m.in_features, "out": m.out_features}, rows=max(1, x.numel() // m.in_features))
    return rec


# ---------------------------------------------------------------------------- FLOPs
def training_flops(trainer, x_shape) -> dict[str, int]:
    """Analytic training FLOPs of one iteration of ``trainer.method`` (DESIGN §10), per layer.

    Forward plus update of every weight layer of :func:`layer_shapes` for a batch of
    ``B = x_shape[0]``, at the layers' *current* ranks (SSA's count falls as ranks are cut).
    A multiply-add is 2 FLOPs. Only matrix products and convolutions are counted:
    elementwise work (activations and their derivatives, softmax, error, bias sums,
    dropout, ``brsf``'s redraw), norms, pooling and the optimizer step are not.

    Notation: ``C`` classes, ``d`` out features / channels, ``F`` the forward of the dense
    layer (linear: ``2·p·m·n``, ``p = B·rows``, ``m`` out, ``n`` in; conv:
    ``2·B·Ho·Wo·N·(C_in/groups)·kh·kw``). "First layer" below means a layer whose input needs
    no gradient (``input_grad`` false: the first layer in execution order of a chain).

    * ``bp``, ``fa``, ``usf``, ``brsf``: ``F`` + weight-gradient ``F`` + input-gradient ``F``
      (``fa``/``usf``/``brsf`` through ``B``, same cost); first layer ``F + F``.
    * ``dfa``, ``drtp``: ``F + F`` + feedback projection ``2·B·C·d`` (``B e`` or ``B y``), none
      for the output layer (the last one in execution order), which gets the error itself.
    * ``sgr``: ``F + F`` + input-gradient ``F`` + double backward ``2F`` of the
      reconciliation penalty (an approximation: one more backward pass and its gradient)
      + local ETF head ``2·2·B·d·C`` (forward and backward of the fixed ``d×C`` head on the
      globally average-pooled output); the first layer has no penalty (nothing before it to
      reconcile with), the output layer no head.
    * ``ssa``, :class:`SSALinear` ``m×n`` of rank ``r``: forward ``2·p·r·(m + n)``; update =
      DFA projection through the factored feedback ``B = P diag(σ) Qᵀ``, ``2·B·k·(C + d)``
      (``k`` = columns of ``P``, or ``min(C, d, r)`` before it is built; none for the output
      layer) + fused factor gradients of DESIGN §6 ``2·p·r·(2m + n) + 2·p·r² + 6·(m + n)·r²``
      (``w = δU``, ``δᵀt``, ``xᵀw``, ``wᵀt``, and the r×r cores of the alignment, ortho and
      Stiefel-projection terms: the count of ``benchmarks/test_ops.py``).
      :class:`SSAConv2d` (``m = N·kw``, ``n = C_in·kh``, ``Wt = W + pad_l + pad_r``):
      ``conv1 = 2·B·r·C_in·kh·Ho·Wt``, ``conv2 = 2·B·N·r·kw·Ho·Wo``; forward ``conv1 + conv2``;
      update = projection + ``2·conv2 + conv1 + 2·B·r²·Ho·Wt + 6·(m + n)·r²`` (the count of
      ``benchmarks/test_conv.py``). Dense layers left in the model count as ``dfa``.
    * ``svd_bp``: forward as ``ssa``; backward ``2 ×`` forward (input- and factor-gradients;
      first layer: factor gradients only, i.e. without ``2·p·n·r``, conv: without ``conv1``)
      + orthogonality-penalty gradient ``2·2·r²·(m + n)``. Dense layers count as ``bp``.

    Layers inside a trainer's local module (``dfa``/``drtp``/``ssa``/``sgr``, e.g. residual
    blocks) add the local backpropagation: one input-gradient (dense: ``F``, SSA: the
    forward's cost) where their input needs one; the module's projection ``2·B·C·d`` (dense
    feedback at its output) is booked on its last layer in execution order. A frozen layer
    costs its forward and, where needed, its input-gradient.

    Each method owns its count (``trainer.rule.layer_flops``, :mod:`ssa.methods`); this function
    describes the layers and sums.

    Args:
        trainer: an :class:`ssa.Trainer`.
        x_shape: shape of a training batch ``(B, *sample_shape)``.

    Returns:
        ``{layer name: FLOPs}`` in execution order, plus ``"total"``.

    Raises:
        TypeError: not a trainer; ValueError: bad ``x_shape`` (see :func:`layer_shapes`).
    """
    fn = "training_flops"
    model = _check_trainer(fn, trainer)
    rule = trainer.rule
    shape = _check_x_shape(fn, x_shape)
    shapes = _layer_shapes(fn, trainer, shape)
    B, C = shape[0], int(trainer.num_classes)
    # The signal of a local module enters at its output: booked on its last layer, once.
    last_of_local: dict[str, str] = {}
    for name, L in shapes.items():
        if L["local"] is not None:
            last_of_local[L["local"]] = name
    output_local = {L["local"] for L in shapes.values() if L["is_output"] and L["local"] is not None}
    out: dict[str, int] = {}
    for name, L in shapes.items():
        module = model.get_submodule(name)
        if L["local"] is None:
            signal = not L["is_output"]
        else:
            signal = last_of_local[L["local"]] == name and L["local"] not in output_local
        out[name] = int(L["calls"] * rule.layer_flops(L, module, B, C, signal))
    out["total"] = sum(out.values())
    return out


def dense_forward_flops(L: dict, B: int) -> int:
    """Forward FLOPs of a dense layer described by :func:`layer_shapes` for a batch of ``B``."""
    if L["kind"] == "linear":
        return 2 * B * L["rows"] * L["out"] * L["in"]
    (Ho, Wo), (kh, kw) = L["out_size"], L["kernel"]
    return 2 * B * Ho * Wo * L["out"] * (L["in"] // L["groups"]) * kh * kw


def ssa_layer_costs(L: dict, B: int) -> tuple[int, int, int, int]:
    """``(forward, V-side product, fused factor-gradient update, 2·2·r²·(m + n))`` of an SSA layer."""
    r = L["rank"]
    if L["kind"] == "linear":
        p, m, n = B * L["rows"], L["out"], L["in"]
        forward, v_side = 2 * p * r * (m + n), 2 * p * n * r
        # benchmarks/test_ops.py::test_svd_factor_grads: w = δU, δᵀt, xᵀw, wᵀt; cores O((m + n) r²)
        update = 2 * p * r * (2 * m + n) + 2 * p * r * r + 6 * (m + n) * r * r
    else:
        (kh, kw), (Ho, Wo), (_, Wt) = L["kernel"], L["out_size"], L["t_size"]
        N, Cin = L["out"], L["in"]
        m, n = N * kw, Cin * kh
        # benchmarks/test_conv.py (module docstring): conv1, conv2, ssa factor grads
        conv1 = 2 * B * r * Cin * kh * Ho * Wt
        conv2 = 2 * B * N * r * kw * Ho * Wo
        forward, v_side = conv1 + conv2, conv1
        update = 2 * conv2 + conv1 + 2 * B * r * r * Ho * Wt + 6 * (m + n) * r * r
    return forward, v_side, update, 4 * r * r * (m + n)


# ---------------------------------------------------------------------------- alignment angles
def _method_weight_grad(layer: nn.Module) -> Tensor | None:
    """A layer's weight-space gradient: ``weight.grad``, or an SSA layer's pseudo-gradient."""
    if not isinstance(layer, SSALayer):
        return layer.weight.grad
    grads = (layer.U.grad, layer.s.grad, layer.V.grad)
    if all(g is None for g in grads):
        return None
    with torch.no_grad():
        U, s, V = layer.U.detach(), layer.s.detach(), layer.V.detach()
        gU, gs, gV = (torch.zeros_like(p) if g is None else g.detach() for g, p in zip(grads, (U, s, V)))
        # gU diag(s) Vᵀ + U diag(gs) Vᵀ + U diag(s) gVᵀ, in the layout of layer.weight
        return layer.weight_from(gU, s, V) + layer.weight_from(U, gs, V) + layer.weight_from(U, s, gV)


def _first_dense(module: nn.Module) -> nn.Module | None:
    """``module`` if it is an ``nn.Linear``/``nn.Conv2d``, else the first one inside it."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            return m
    return None


def gradient_alignment(trainer, x: Tensor, y: Tensor) -> dict[str, float]:
    """Gradient alignment angle per weight layer, in degrees (DESIGN §10).

    The angle between the method's weight-space gradient now in ``.grad`` (call this after
    the method filled the gradients and before ``optimizer.step()``) and the BP gradient of
    the mean cross-entropy on the same batch, ``degrees(arccos(clamp(cos, −1, 1)))`` with
    ``cos = ⟨g, g_BP⟩ / (‖g‖ ‖g_BP‖)`` over the flattened weights. The method's gradient is
    ``weight.grad`` for dense layers and, for SSA layers, the W-space pseudo-gradient
    ``gU diag(s) Vᵀ + U diag(gs) Vᵀ + U diag(s) gVᵀ`` (for :class:`SSAConv2d` in the kernel
    layout of ``layer.weight``). The BP gradient comes from a twin: a deep copy of the model
    made dense by :func:`ssa.to_dense`, in the same train/eval modes, one forward of ``x``
    and ``F.cross_entropy(twin(x).float(), y).backward()``. Dropout draws of the twin
    differ from those of the method's forward (the global RNG is restored afterwards, so the
    run does not shift); BatchNorm uses batch statistics in both.

    Nothing of the trainer changes: its model, ``.grad``s, modes and RNG are as before.

    Args:
        trainer: an :class:`ssa.Trainer`.
        x: the batch the gradients were computed on.
        y: its labels, 1-D integers.

    Returns:
        ``{layer name: degrees}`` for every weight layer (registration order); ``nan`` where
        the method's gradient is missing (``None``) or zero, or BP's is (layer frozen, or
        not reached by the loss).

    Raises:
        TypeError / ValueError: ``x`` or ``y`` not tensors, ``y`` not 1-D integer labels, or
            batch sizes that differ.
    """
    fn = "gradient_alignment"
    model = _check_trainer(fn, trainer)
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise TypeError(f"{fn}: x and y must be Tensors, got {type(x).__name__} and {type(y).__name__}")
    if y.dim() != 1 or y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise ValueError(f"{fn}: y must be 1-D integer class labels, got shape {tuple(y.shape)} "
                         f"dtype {y.dtype}")
    if x.dim() < 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"{fn}: x has {x.shape[0] if x.dim() else 0} samples but y has {y.shape[0]}")
    device, _ = _model_like(model)
    x, y = x.to(device), y.to(device).long()
    layers = _weight_layers(model)
    mine = {name: _method_weight_grad(m) for name, m in layers.items()}
    with _Untouched(model, device):
        twin = copy.deepcopy(model)
        special = (SSALayer, FeedbackLinear, FeedbackConv2d)
        twin = twin.to_dense() if isinstance(twin, special) else to_dense(twin)
        for p in twin.parameters():
            p.grad = None
        with paused(), torch.enable_grad():  # the trainer's (copied) hooks stay idle
            F.cross_entropy(twin(x).float(), y).backward()
    out = {}
    for name in layers:
        dense = _first_dense(twin.get_submodule(name))
        out[name] = _angle(mine[name], dense.weight.grad if dense is not None else None)
    return out


def _direct_feedback(trainer, name: str, layer: nn.Module) -> Tensor | None:
    """``B_i`` (d × C) of a direct-feedback layer, or ``None`` before it exists."""
    if isinstance(layer, SSALayer) and layer.feedback_P is not None:
        return (layer.feedback_P * layer.feedback_sigma) @ layer.feedback_Q.t()
    return trainer.rule.direct_feedback(name, layer)


def matrix_alignment(trainer) -> dict[str, float]:
    """Matrix alignment angle per layer, in degrees (DESIGN §10).

    * Direct feedback (``dfa``, ``drtp``, ``ssa``): for every hidden layer ``i``, the angle
      between its feedback ``B_i`` (``d_i × C``: ``P diag(σ) Qᵀ`` of an SSA layer,
      ``trainer.feedback[name]`` of a dense one) and the backward path it replaces,
      ``(W_N ⋯ W_{i+1})ᵀ`` — the product of the dense weights of the layers after it
      (module registration order, which is the forward order of :mod:`ssa.models`),
      nonlinearities ignored, flattened cosine. Defined only when every layer after ``i``
      is a linear layer and their shapes compose from ``d_i`` to ``C`` (a convolution
      after ``i``, or a flatten that changes the width, leaves ``i`` out); layers whose
      feedback is not built yet (dense feedback appears at the first step) are left out,
      and so are layers inside a trainer's local module (their feedback belongs to the
      module, not to the layer); the output layer has no entry.
    * Layer-to-layer feedback (``fa``, ``usf``, ``brsf``): for every feedback layer ``j``
      but the first, the angle between ``B_j`` (``layer.feedback_matrix()``, the shape of
      ``W_j``; the matrix that carries the error to layer ``j − 1`` in place of ``W_j``)
      and ``W_j``, keyed by layer ``j``'s name.
    * ``bp``, ``svd_bp``, ``sgr``: no feedback matrix, ``{}``.

    Which case applies is the method's ``feedback_kind`` (:class:`ssa.methods.Method`).

    Returns:
        ``{layer name: degrees}``.

    Raises:
        TypeError: not a trainer.
    """
    fn = "matrix_alignment"
    model = _check_trainer(fn, trainer)
    kind = trainer.rule.feedback_kind
    layers = list(_weight_layers(model).items())
    out: dict[str, float] = {}
    if kind == "layer":
        feedback = [(n, m) for n, m in layers if isinstance(m, (FeedbackLinear, FeedbackConv2d))]
        with _Untouched(model, _model_like(model)[0]), torch.no_grad():
            for name, layer in feedback[1:]:
                out[name] = _angle(layer.feedback_matrix(), layer.weight)
        return out
    if kind != "direct":
        return out
    with torch.no_grad():
        for i, (name, layer) in enumerate(layers[:-1]):
            B = _direct_feedback(trainer, name, layer)
            after = [m for _, m in layers[i + 1:]]
            if B is None or B.dim() != 2 or not all(isinstance(m, (nn.Linear, SSALinear)) for m in after):
                continue
            Ws = [m.weight.detach().double() for m in after]  # each out × in
            dims = [B.shape[0]] + [W.shape[0] for W in Ws]
            if any(W.shape[1] != dims[j] for j, W in enumerate(Ws)) or dims[-1] != B.shape[1]:
                continue
            M = Ws[0]
            for W in Ws[1:]:
                M = W @ M  # W_N ⋯ W_{i+1}: C × d_i
            out[name] = _angle(B, M.t())
    return out


@torch.no_grad()
def truncated_accuracy(model: nn.Module, loader, fractions, skip_last: bool = True) -> list[dict]:
    """Accuracy of a dense model with its layers cut by SVD after training (the post-hoc baseline).

    For each fraction ``f``: a copy of ``model`` whose every ``nn.Linear`` / ``nn.Conv2d`` (but the
    last, the output layer, when ``skip_last``) is replaced by its best rank-``ceil(f·full)``
    approximation (a kernel as its spatial SVD ``K'``, DESIGN §4), evaluated on ``loader``.
    Parameters are counted as an SSA model holding those ranks would: ``(m + n + 1)·r`` (+ bias)
    for a cut layer, everything else as it is. Returns ``[{"fraction", "params", "acc"}]``.
    """
    from ssa_kernels.functional import factors_from_kernel, kernel_from_factors

    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    if skip_last and names:
        names = names[:-1]
    svds = {}  # one SVD per layer, cut to every fraction
    for name in names:
        W = model.get_submodule(name).weight.detach().double()
        svds[name] = torch.linalg.svd(factors_from_kernel(W) if W.dim() == 4 else W, full_matrices=False)
    device = next(model.parameters()).device
    dense = sum(p.numel() for p in model.parameters())
    out = []
    for f in fractions:
        clone = copy.deepcopy(model).eval()
        params = dense
        for name, (U, s, Vh) in svds.items():
            layer = clone.get_submodule(name)
            m, n = U.shape[0], Vh.shape[1]
            r = max(1, math.ceil(f * min(m, n)))
            if isinstance(layer, nn.Conv2d):
                Wr = kernel_from_factors(U[:, :r], s[:r], Vh[:r].t(), layer.kernel_size)
            else:
                Wr = (U[:, :r] * s[:r]) @ Vh[:r]
            layer.weight.copy_(Wr.to(layer.weight.dtype))
            params += (m + n + 1) * r - m * n
        correct = total = 0
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            correct += int((clone(x).argmax(1) == y).sum())
            total += int(y.shape[0])
        out.append({"fraction": float(f), "params": int(params), "acc": correct / max(total, 1)})
    return out
