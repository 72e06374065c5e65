"""Property-based tests (hypothesis) of the public ops of ssa_kernels.

1. Argument checking: random valid inputs of every op run on every CPU backend (no error,
   outputs of the documented shapes and dtypes); one thing made wrong at a time (a tied
   dimension, the number of dims, the dtype, the device, a non-tensor, a non-finite or
   non-number scalar, an unknown option, an unknown keyword, a bad convolution geometry, a
   rank above ``min(m, n)``) raises a TypeError/ValueError whose message names the argument.
2. The ``cpu`` backend against the reference on random valid inputs (float32 and float64,
   every activation, with and without bias, ``cos``, alignment/ortho/Hoyer, every scaling
   and projection, random convolution geometries).

Deterministic (``derandomize=True``, no example database) and small, so the file runs in
well under a minute on one core.
"""

from __future__ import annotations

import inspect
import math
import re
from dataclasses import dataclass, field

import pytest
import torch
from _helpers import ACTIVATIONS, PROJECTIONS, SCALINGS, orthonormal

import ssa_kernels
from ssa_kernels import _checks
from ssa_kernels import reference as ref

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

FAST = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FEW = settings(FAST, max_examples=8)

OPS = ("lowrank_linear", "dfa_project", "svd_factor_grads", "lowrank_conv2d", "svd_conv_factor_grads")
CPU_BACKENDS = {op: [b for b in ssa_kernels.available_backends("cpu", op) if b != "triton"] for op in OPS}
HAS_CPU = {op: "cpu" in CPU_BACKENDS[op] for op in OPS}
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
SCALARS = {  # the float options of each op, with a valid value
    "lowrank_linear": ("negative_slope",),
    "dfa_project": ("negative_slope", "cos"),
    "svd_factor_grads": ("ce", "align", "ortho", "hoyer", "hoyer_eps", "eps"),
    "lowrank_conv2d": ("negative_slope",),
    "svd_conv_factor_grads": ("ce", "align", "ortho", "hoyer", "hoyer_eps", "eps"),
}
POSITIVE = ("hoyer_eps", "eps")  # > 0; negative_slope >= 0; the others any finite number


@dataclass
class Call:
    """One call of a public op: keyword arguments and, per tensor, what each dim is tied to.

    ``dims[name][i]`` is a group name (the same name on two tensors: the sizes must agree),
    ``"!"`` (a size derived from other arguments, e.g. the output height of ``t``) or ``None``
    (free: batch dims, spatial dims of a convolution input).
    """

    op: str
    kw: dict
    dims: dict = field(default_factory=dict)
    fixed_ndim: tuple = ()  # tensors whose number of dims is fixed

    def __call__(self, **override):
        return getattr(ssa_kernels, self.op)(**(self.kw | override))

    def tensors(self):
        return [k for k, v in self.kw.items() if isinstance(v, torch.Tensor)]

    def tied(self, name: str, dim: int) -> list[str]:
        """The other present tensors a change of ``name``'s dim ``dim`` contradicts ([] if free)."""
        group = self.dims[name][dim]
        if group is None:
            return []
        if group == "!":
            return [name]
        return [k for k in self.tensors() if k != name and group in self.dims.get(k, ())]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _t(g, *shape, dtype=torch.float64, scale=1.0):
    return (scale * torch.randn(*shape, dtype=torch.float64, generator=g)).to(dtype)


def _factors(g, m, n, r, dtype):
    U = orthonormal(m, r, g).to(dtype)
    V = orthonormal(n, r, g).to(dtype)
    s = (0.5 + torch.rand(r, dtype=torch.float64, generator=g)).to(dtype)
    return U, s, V


def _targets(g, m, n, k, dtype):
    return (orthonormal(m, min(k, m), g)[:, :k] if k <= m else _t(g, m, k)).to(dtype), \
        (0.5 + torch.rand(k, dtype=torch.float64, generator=g)).to(dtype), \
        (orthonormal(n, min(k, n), g)[:, :k] if k <= n else _t(g, n, k)).to(dtype)


# ------------------------------------------------------------------ strategies of valid calls
small = st.integers


@st.composite
def geometries(draw):
    """(kernel, stride, padding as given, dilation, padding normalised) of a valid convolution."""
    kh, kw = draw(small(1, 3)), draw(small(1, 3))
    stride = draw(st.sampled_from([1, 2, (1, 2), (2, 1)]))
    dilation = draw(st.sampled_from([1, 1, 2, (1, 2)]))
    forms = ["int", "pair", "four", "valid"] + (["same"] if stride == 1 else [])
    form = draw(st.sampled_from(forms))
    if form == "int":
        padding = draw(small(0, 2))
    elif form == "pair":
        padding = (draw(small(0, 2)), draw(small(0, 2)))
    elif form == "four":
        padding = tuple(draw(small(0, 2)) for _ in range(4))
    else:
        padding = form
    if draw(st.booleans()):  # lists are accepted where tuples are
        stride = list(stride) if isinstance(stride, tuple) else stride
    return (kh, kw), stride, padding, dilation


def t_dtypes(dtype):
    """``t`` as the forward returns it (accumulation dtype) or in the inputs' dtype: both accepted."""
    return st.sampled_from(sorted({dtype, ref.acc_dtype(dtype)}, key=str))


@st.composite
def calls(draw, op, dtypes=FLOATS, options=True):
    """A valid call of ``op`` with random sizes (batch 0 included), dtype and options."""
    dtype = draw(st.sampled_from(dtypes))
    g = _gen(draw(small(0, 2**31 - 1)))
    act = draw(st.sampled_from(ACTIVATIONS + (None,)))
    slope = draw(st.sampled_from([0.0, 0.01, 0.2, 1.5]))
    if op == "lowrank_linear":
        n, m = draw(small(1, 6)), draw(small(1, 6))
        r = draw(small(1, min(m, n)))
        lead = tuple(draw(st.lists(small(0, 3), max_size=2)))
        U, s, V = _factors(g, m, n, r, dtype)
        bias = _t(g, m, dtype=dtype) if draw(st.booleans()) else None
        kw = dict(x=_t(g, *lead, n, dtype=dtype), U=U, s=s, V=V, bias=bias, activation=act,
                  negative_slope=slope)
        dims = dict(x=(None,) * len(lead) + ("n",), U=("m", "r"), s=("r",), V=("n", "r"), bias=("m",))
        return Call(op, kw, dims, ("U", "s", "V", "bias"))
    if op == "dfa_project":
        p, d, C = draw(small(0, 5)), draw(small(1, 6)), draw(small(1, 6))
        k = draw(small(0, min(C, d)))
        spatial = tuple(draw(st.lists(small(0, 3), max_size=2)))
        a = _t(g, p, d, *spatial, dtype=dtype)
        h = ref.activate(a, "none" if act is None else act, slope)
        cos = draw(st.sampled_from([0.0, 0.0, 0.5, -0.3])) if options else 0.0
        with_a = cos != 0.0 or draw(st.booleans())
        kw = dict(e=_t(g, p, C, dtype=dtype), P=_t(g, d, k, dtype=dtype),
                  sigma=(0.5 + torch.rand(k, dtype=torch.float64, generator=g)).to(dtype),
                  Q=_t(g, C, k, dtype=dtype), h=h, activation=act, negative_slope=slope,
                  a=a if with_a else None, cos=cos)
        hd = ("p", "d") + tuple(f"hw{i}" for i in range(len(spatial)))
        dims = dict(e=("p", "C"), P=("d", "k"), sigma=("k",), Q=("C", "k"), h=hd, a=hd)
        return Call(op, kw, dims, ("e", "P", "sigma", "Q"))
    opts = {}
    if options:
        opts = dict(ce=draw(st.sampled_from([1.0, 0.3, 0.0, -1.0])),
                    align=draw(st.sampled_from([0.0, 0.1, 1.0])),
                    ortho=draw(st.sampled_from([0.0, 0.5])), hoyer=draw(st.sampled_from([0.0, 0.05])),
                    hoyer_eps=draw(st.sampled_from([1e-3, 0.5])), eps=draw(st.sampled_from([1e-6, 0.3])),
                    scaling=draw(st.sampled_from(SCALINGS)), projection=draw(st.sampled_from(PROJECTIONS)))
    with_targets = opts.get("align", 0.0) != 0.0 or (options and draw(st.booleans()))
    if op == "svd_factor_grads":
        p, n, m = draw(small(0, 5)), draw(small(1, 6)), draw(small(1, 6))
        r = draw(small(1, min(m, n)))
        U, s, V = _factors(g, m, n, r, dtype)
        x = _t(g, p, n, dtype=dtype)
        t = (x.double() @ V.double()).to(draw(t_dtypes(dtype)))
        kw = dict(x=x, t=t, delta=_t(g, p, m, dtype=dtype, scale=1 / max(p, 1)), U=U, s=s, V=V, **opts)
        k = draw(small(1, 7))
        if with_targets:
            kw.update(zip(("BU", "BS", "BV"), _targets(g, m, n, k, dtype)))
        dims = dict(x=("p", "n"), t=("p", "r"), delta=("p", "m"), U=("m", "r"), s=("r",), V=("n", "r"),
                    BU=("m", "k"), BS=("k",), BV=("n", "k"))
        return Call(op, kw, dims, tuple(dims))
    # convolutions
    kernel, stride, padding, dilation = draw(geometries())
    (kh, kw_), st_, pads, dil = _checks.conv_geometry("test", kernel, stride, padding, dilation)
    C, N = draw(small(1, 3)), draw(small(1, 3))
    m, n = N * kw_, C * kh
    r = draw(small(1, min(m, n)))
    p = draw(small(0, 3))
    # Input at least as large as the dilated kernel (after padding), plus up to 3.
    H = max(1, dil[0] * (kh - 1) + 1 - pads[0] - pads[1]) + draw(small(0, 3))
    W = max(1, dil[1] * (kw_ - 1) + 1 - pads[2] - pads[3]) + draw(small(0, 3))
    U, s, V = _factors(g, m, n, r, dtype)
    x = _t(g, p, C, H, W, dtype=dtype)
    geo = dict(kernel_size=kernel, stride=stride, padding=padding, dilation=dilation)
    if op == "lowrank_conv2d":
        bias = _t(g, N, dtype=dtype) if draw(st.booleans()) else None
        kw = dict(x=x, U=U, s=s, V=V, bias=bias, activation=act, negative_slope=slope, **geo)
        dims = dict(x=("p", "C", None, None), U=("N", "r"), s=("r",), V=("C", "r"), bias=("N",))
        return Call(op, kw, dims, ("x", "U", "s", "V", "bias"))
    h, t = ref.lowrank_conv2d(x.double(), U.double(), s.double(), V.double(), None, (kh, kw_), st_, pads,
                              dil)
    kw = dict(x=x, t=t.to(draw(t_dtypes(dtype))),
              delta=_t(g, *h.shape, dtype=dtype, scale=1 / max(p, 1)), U=U, s=s, V=V, **geo, **opts)
    k = draw(small(1, 7))
    if with_targets:
        kw.update(zip(("BU", "BS", "BV"), _targets(g, m, n, k, dtype)))
    dims = dict(x=("p", "C", None, None), t=("p", "r", "Ho", "!"), delta=("p", "N", "Ho", "!"),
                U=("N", "r"), s=("r",), V=("C", "r"), BU=("N", "k"), BS=("k",), BV=("C", "k"))
    return Call(op, kw, dims, tuple(dims))


def _names(message: str, *names: str) -> bool:
    """Whether ``message`` names one of ``names`` as a word (``s`` in "s has shape", not in "shape")."""
    return any(re.search(rf"(?<![A-Za-z0-9_]){re.escape(n)}(?![A-Za-z0-9_])", message) for n in names)


def _raises_naming(call: Call, exc, names, **override):
    with pytest.raises(exc) as info:
        call(**override)
    assert type(info.value) in (TypeError, ValueError), info.value  # not a subclass from deep inside
    msg = str(info.value)
    assert _names(msg, *names), f"{type(info.value).__name__}: {msg!r} names none of {names}"
    return msg


def _expected_shapes(call: Call):
    kw = call.kw
    if call.op == "lowrank_linear":
        lead = kw["x"].shape[:-1]
        return [(*lead, kw["U"].shape[0]), (*lead, kw["U"].shape[1])]
    if call.op == "dfa_project":
        return [tuple(kw["h"].shape)]
    if call.op == "svd_factor_grads":
        return [tuple(kw["U"].shape), tuple(kw["s"].shape), tuple(kw["V"].shape), (kw["U"].shape[0],)]
    kernel, stride, pads, dil = _checks.conv_geometry("test", kw["kernel_size"], kw["stride"], kw["padding"],
                                                      kw["dilation"])
    N = kw["U"].shape[0] // kernel[1]
    if call.op == "lowrank_conv2d":
        x = kw["x"]
        Ho = ref.conv_out_size(x.shape[2], pads[0] + pads[1], kernel[0], stride[0], dil[0])
        Wt = x.shape[3] + pads[2] + pads[3]
        Wo = ref.conv_out_size(Wt, 0, kernel[1], stride[1], dil[1])
        return [(x.shape[0], N, Ho, Wo), (x.shape[0], kw["U"].shape[1], Ho, Wt)]
    return [tuple(kw["U"].shape), tuple(kw["s"].shape), tuple(kw["V"].shape), (N,)]


def _out_dtypes(call: Call):
    dt = next(v for v in call.kw.values() if isinstance(v, torch.Tensor)).dtype
    if call.op in ("lowrank_linear", "lowrank_conv2d"):
        return [dt, ref.acc_dtype(dt)]
    if call.op == "dfa_project":
        return [dt]
    return [call.kw["U"].dtype] * 4


# ------------------------------------------------------------------ 1. argument checking
@pytest.mark.parametrize("op", OPS)
@FAST
@given(data=st.data())
def test_valid_inputs_run_on_every_cpu_backend(op, data):
    call = data.draw(calls(op))
    for backend in CPU_BACKENDS[op]:
        out = call(backend=backend)
        out = [out] if isinstance(out, torch.Tensor) else list(out)
        assert [tuple(o.shape) for o in out] == _expected_shapes(call), backend
        assert [o.dtype for o in out] == _out_dtypes(call), backend


@pytest.mark.parametrize("op", OPS)
@FAST
@given(data=st.data())
def test_a_tied_dimension_changed_alone_is_refused(op, data):
    call = data.draw(calls(op, options=False))
    choices = [(k, i) for k in call.tensors() for i in range(call.kw[k].dim()) if call.tied(k, i)]
    name, dim = data.draw(st.sampled_from(choices))
    old = call.kw[name]
    size = data.draw(small(0, old.shape[dim] + 3).filter(lambda v: v != old.shape[dim]))
    shape = list(old.shape)
    shape[dim] = size
    new = torch.zeros(shape, dtype=old.dtype)
    backend = data.draw(st.sampled_from(CPU_BACKENDS[op]))
    _raises_naming(call, ValueError, [name] + call.tied(name, dim), **{name: new, "backend": backend})


@pytest.mark.parametrize("op", OPS)
@FAST
@given(data=st.data())
def test_a_wrong_number_of_dims_is_refused(op, data):
    call = data.draw(calls(op, options=False))
    name = data.draw(st.sampled_from([k for k in call.fixed_ndim if call.kw.get(k) is not None]))
    old = call.kw[name]
    how = data.draw(st.sampled_from(["lead", "trail", "drop"] if old.dim() else ["lead"]))
    new = old[None] if how == "lead" else old[..., None] if how == "trail" else old.select(-1, 0) \
        if old.shape[-1] else old.sum(-1)
    _raises_naming(call, ValueError, [name], **{name: new})


def _allowed_dtypes(call: Call, name: str):
    anchor = next(v for v in call.kw.values() if isinstance(v, torch.Tensor)).dtype
    return {anchor, ref.acc_dtype(anchor)} if name == "t" else {anchor}


@pytest.mark.parametrize("op", OPS)
@FAST
@given(data=st.data())
def test_a_wrong_dtype_is_refused(op, data):
    call = data.draw(calls(op, options=False))
    name = data.draw(st.sampled_from(call.tensors()))
    bad = [d for d in FLOATS + (torch.int32, torch.int64, torch.bool, torch.complex64, torch.uint8)
           if d not in _allowed_dtypes(call, name)]
    dtype = data.draw(st.sampled_from(bad))
    first = call.tensors()[0]
    # The first tensor is what the others are compared with: changing it names both.
    names = [name] if name != first or not dtype.is_floating_point else call.tensors()
    _raises_naming(call, TypeError, names, **{name: call.kw[name].to(dtype)})


@pytest.mark.parametrize("op", OPS)
@FEW
@given(data=st.data())
def test_a_tensor_on_another_device_is_refused(op, data):
    call = data.draw(calls(op, options=False))
    name = data.draw(st.sampled_from(call.tensors()))
    _raises_naming(call, ValueError, [name], **{name: call.kw[name].to("meta")})


REQUIRED = {op: [p.name for p in inspect.signature(getattr(ssa_kernels, op)).parameters.values()
                 if p.default is inspect.Parameter.empty] for op in OPS}


@pytest.mark.parametrize("op", OPS)
@FAST
@given(data=st.data())
def test_a_non_tensor_is_refused(op, data):
    call = data.draw(calls(op, options=False))
    name = data.draw(st.sampled_from(call.tensors()))
    value = call.kw[name]
    choices = [value.tolist(), value.numpy() if value.dtype not in (torch.bfloat16,) else 1.0, 1.0, "x"]
    if name in REQUIRED[op]:
        choices.append(None)
    _raises_naming(call, TypeError, [name], **{name: data.draw(st.sampled_from(choices))})


BAD_NUMBERS = [math.nan, math.inf, -math.inf]
NOT_NUMBERS = ["0.1", None, True, 1 + 1j, [0.1], torch.tensor(0.1)]


@pytest.mark.parametrize("op", OPS)
@FAST
@given(data=st.data())
def test_a_bad_scalar_is_refused(op, data):
    call = data.draw(calls(op, options=False))
    name = data.draw(st.sampled_from(SCALARS[op]))
    kind = data.draw(st.sampled_from(["non-finite", "not a number", "negative"]))
    if kind == "non-finite":
        value, exc = data.draw(st.sampled_from(BAD_NUMBERS)), ValueError
    elif kind == "not a number":
        value, exc = data.draw(st.sampled_from(NOT_NUMBERS)), TypeError
    else:
        if name not in POSITIVE + ("negative_slope",):
            return
        value = data.draw(st.floats(-1e6, 0.0 if name in POSITIVE else -1e-300))
        exc = ValueError
    _raises_naming(call, exc, [name], **{name: value})


@pytest.mark.parametrize("op", OPS)
@FAST
@given(data=st.data())
def test_any_finite_scalar_is_accepted(op, data):
    call = data.draw(calls(op, dtypes=(torch.float64,), options=False))
    name = data.draw(st.sampled_from(SCALARS[op]))
    lo = 1e-300 if name in POSITIVE else 0.0 if name == "negative_slope" else -1e6
    value = data.draw(st.one_of(st.floats(lo, 1e6), st.integers(math.ceil(lo), 10**6)))
    if value == 0 and name in POSITIVE:
        value = 1
    override = {name: value}
    if name == "cos" and value != 0 and call.kw["a"] is None:
        override["a"] = call.kw["h"].clone()
    if name == "align" and value != 0 and call.kw.get("BU") is None:
        U, V = call.kw["U"], call.kw["V"]
        override.update(BU=U.clone(), BS=call.kw["s"].clone(), BV=V.clone())
    for backend in CPU_BACKENDS[op]:
        with torch.no_grad():
            call(backend=backend, **override)


CHOICES = {
    "lowrank_linear": {"activation": ACTIVATIONS, "backend": ()},
    "dfa_project": {"activation": ACTIVATIONS, "backend": ()},
    "svd_factor_grads": {"scaling": SCALINGS, "projection": PROJECTIONS, "backend": ()},
    "lowrank_conv2d": {"activation": ACTIVATIONS, "backend": (), "padding": ("valid", "same")},
    "svd_conv_factor_grads": {"scaling": SCALINGS, "projection": PROJECTIONS, "backend": (),
                              "padding": ("valid", "same")},
}


@pytest.mark.parametrize("op", OPS)
@FAST
@given(data=st.data())
def test_an_unknown_option_is_refused(op, data):
    call = data.draw(calls(op, options=False))
    name = data.draw(st.sampled_from(sorted(CHOICES[op])))
    valid = set(CHOICES[op][name])
    if name == "backend":
        valid |= {"auto", *ssa_kernels._backends.BACKENDS}
    value = data.draw(st.one_of(st.text(max_size=12), st.sampled_from([v.upper() for v in valid] + [
        v + " " for v in valid])).filter(lambda v: v not in valid))
    _raises_naming(call, ValueError, [name], **{name: value})


@pytest.mark.parametrize("op", OPS)
@FAST
@given(data=st.data())
def test_an_unknown_keyword_is_refused(op, data):
    call = data.draw(calls(op, options=False))
    params = set(inspect.signature(getattr(ssa_kernels, op)).parameters)
    names = st.from_regex(r"[a-z_][a-z0-9_]{0,11}", fullmatch=True)
    name = data.draw(names.filter(lambda v: v not in params))
    _raises_naming(call, TypeError, [name], **{name: 1.0})


BAD_GEOMETRY = {  # parameter: (bad value, exception)
    "kernel_size": [(0, ValueError), ((3, 0), ValueError), (-1, ValueError), (2.0, TypeError),
                    ((1, 2, 3), TypeError), (True, TypeError), ("3", TypeError), (None, TypeError),
                    ((1.0, 1), TypeError), ([], TypeError)],
    "stride": [(0, ValueError), ((1, 0), ValueError), (-2, ValueError), (1.5, TypeError), ((1,), TypeError),
               ((1, 1, 1), TypeError), (False, TypeError), (None, TypeError)],
    "dilation": [(0, ValueError), ((0, 1), ValueError), (2.0, TypeError), ((1, 1, 1), TypeError),
                 ((True, 1), TypeError), (None, TypeError)],
    "padding": [(-1, ValueError), ((0, -1), ValueError), ((0, 0, 0, -1), ValueError), (1.0, TypeError),
                ((1, 1, 1), TypeError), ((0, 0, 0, 1.0), TypeError), ("full", ValueError), (None, TypeError),
                ((0, False), TypeError)],
}


@pytest.mark.parametrize("op", ("lowrank_conv2d", "svd_conv_factor_grads"))
@FAST
@given(data=st.data())
def test_a_bad_convolution_geometry_is_refused(op, data):
    call = data.draw(calls(op, options=False))
    name = data.draw(st.sampled_from(sorted(BAD_GEOMETRY)))
    value, exc = data.draw(st.sampled_from(BAD_GEOMETRY[name]))
    _raises_naming(call, exc, [name], **{name: value})


@pytest.mark.parametrize("op", ("lowrank_conv2d", "svd_conv_factor_grads"))
@FEW
@given(data=st.data())
def test_an_input_smaller_than_the_kernel_is_refused(op, data):
    call = data.draw(calls(op, options=False))
    x = call.kw["x"]
    big = data.draw(small(x.shape[2] + x.shape[3] + 1, 40))
    # A kernel larger than the padded input: the factor shapes follow the kernel so only the size is wrong.
    kh, kw = (big, 1) if data.draw(st.booleans()) else (1, big)
    C, N, r = x.shape[1], 1, 1
    U = torch.ones(N * kw, r, dtype=x.dtype)
    V = torch.ones(C * kh, r, dtype=x.dtype)
    override = dict(U=U, s=torch.ones(r, dtype=x.dtype), V=V, kernel_size=(kh, kw), stride=1, padding=0,
                    dilation=1)
    if op == "lowrank_conv2d":
        override["bias"] = None
    else:
        override.update(BU=None, BS=None, BV=None, align=0.0)
    _raises_naming(call, ValueError, ["x"], **override)


@pytest.mark.parametrize("op", ("lowrank_linear", "svd_factor_grads", "lowrank_conv2d"))
@FEW
@given(m=small(1, 5), n=small(1, 5), extra=small(1, 3), seed=small(0, 1000))
def test_a_rank_above_min_m_n_is_refused(op, m, n, extra, seed):
    g = _gen(seed)
    r = min(m, n) + extra
    U, s, V = _t(g, m, r), _t(g, r), _t(g, n, r)
    if op == "lowrank_linear":
        kw = dict(x=_t(g, 2, n), U=U, s=s, V=V)
    elif op == "svd_factor_grads":
        kw = dict(x=_t(g, 2, n), t=_t(g, 2, r), delta=_t(g, 2, m), U=U, s=s, V=V)
    else:  # 1×1 kernel: m = N, n = C
        kw = dict(x=_t(g, 2, n, 3, 3), U=U, s=s, V=V, kernel_size=1)
    with pytest.raises(ValueError, match=rf"rank r = {r} .* min\(m, n\) = {min(m, n)}"):
        getattr(ssa_kernels, op)(**kw)


@pytest.mark.parametrize("op", ("svd_factor_grads", "svd_conv_factor_grads"))
@FEW
@given(data=st.data())
def test_partial_alignment_targets_are_refused(op, data):
    call = data.draw(calls(op, options=False))
    U, V, s = call.kw["U"], call.kw["V"], call.kw["s"]
    full = dict(BU=U.clone(), BS=s.clone(), BV=V.clone())
    drop = data.draw(st.lists(st.sampled_from(sorted(full)), min_size=1, max_size=2, unique=True))
    override = {k: (None if k in drop else v) for k, v in full.items()}
    _raises_naming(call, ValueError, ["BU", "BS", "BV"], align=data.draw(st.sampled_from([0.0, 0.1])),
                   **override)
    _raises_naming(call, ValueError, ["align"], align=data.draw(st.sampled_from([0.1, -2.0])))


@FEW
@given(data=st.data())
def test_cos_without_a_is_refused(data):
    call = data.draw(calls("dfa_project", options=False))
    cos = data.draw(st.floats(-10, 10).filter(lambda v: v != 0))
    _raises_naming(call, ValueError, ["a"], cos=cos, a=None)


# ------------------------------------------------------------------ 2. cpu against the reference
def _tol(dtype):
    return 1e-10 if dtype == torch.float64 else 2e-5


def _assert_close(got, want, dtype, what):
    want = want.double()
    scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
    tol = _tol(dtype)
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")


def _reference64(call: Call):
    """The reference on the same (already rounded) inputs, in float64."""
    kw = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in call.kw.items()}
    return Call(call.op, kw)(backend="reference")


needs_cpu = {op: pytest.mark.skipif(not HAS_CPU[op], reason="the compiled cpu backend is not built")
             for op in OPS}
DTYPES = [torch.float32, torch.float64]


def _agree(call: Call):
    got = call(backend="cpu")
    want = _reference64(call)
    got = [got] if isinstance(got, torch.Tensor) else list(got)
    want = [want] if isinstance(want, torch.Tensor) else list(want)
    dtype = call.kw["x" if "x" in call.kw else "e"].dtype
    for i, (g_, w) in enumerate(zip(got, want)):
        assert g_.shape == w.shape
        _assert_close(g_, w, dtype, f"{call.op} output {i}")


@needs_cpu["lowrank_linear"]
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTIVATIONS)
@FEW
@given(data=st.data())
def test_cpu_lowrank_linear_matches_reference(act, dtype, data):
    call = data.draw(calls("lowrank_linear", dtypes=(dtype,)))
    call.kw["activation"] = act
    _agree(call)


@needs_cpu["dfa_project"]
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTIVATIONS)
@FEW
@given(data=st.data())
def test_cpu_dfa_project_matches_reference(act, dtype, data):
    call = data.draw(calls("dfa_project", dtypes=(dtype,)))
    a = call.kw["a"] if call.kw["a"] is not None else _t(_gen(0), *call.kw["h"].shape, dtype=dtype)
    call.kw.update(activation=act, a=a, h=ref.activate(a, act, call.kw["negative_slope"]),
                   cos=data.draw(st.sampled_from([0.0, 0.7, 2.0])))
    _agree(call)


@needs_cpu["svd_factor_grads"]
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("projection", PROJECTIONS)
@pytest.mark.parametrize("scaling", SCALINGS)
@FEW
@given(data=st.data())
def test_cpu_svd_factor_grads_matches_reference(scaling, projection, dtype, data):
    call = data.draw(calls("svd_factor_grads", dtypes=(dtype,)))
    call.kw.update(scaling=scaling, projection=projection)
    _agree(call)


@needs_cpu["lowrank_conv2d"]
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTIVATIONS)
@FEW
@given(data=st.data())
def test_cpu_lowrank_conv2d_matches_reference(act, dtype, data):
    call = data.draw(calls("lowrank_conv2d", dtypes=(dtype,)))
    call.kw["activation"] = act
    _agree(call)


@needs_cpu["svd_conv_factor_grads"]
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("projection", PROJECTIONS)
@pytest.mark.parametrize("scaling", SCALINGS)
@FEW
@given(data=st.data())
def test_cpu_svd_conv_factor_grads_matches_reference(scaling, projection, dtype, data):
    call = data.draw(calls("svd_conv_factor_grads", dtypes=(dtype,)))
    call.kw.update(scaling=scaling, projection=projection)
    _agree(call)
