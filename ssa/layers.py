"""``SSALinear`` and ``SSAConv2d``: drop-in ``nn.Linear`` / ``nn.Conv2d`` kept as SVD factors
``W = U diag(s) Vᵀ`` (DESIGN §2-§7; a kernel as its spatial SVD, §4)."""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

import ssa_kernels
from ssa_kernels import functional as _kf

from .loss import TARGETS

__all__ = ["SSALayer", "SSALinear", "SSAConv2d", "ACTIVATIONS", "TARGETS"]

#: Activations fused into the forward kernel (their derivative is computable from the output).
ACTIVATIONS = ("none", "relu", "leaky_relu", "tanh", "sigmoid")

_MODULE_OF = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


def _seed_from_global() -> int:
    """A seed drawn from torch's global RNG, so ``torch.manual_seed`` makes layers reproducible."""
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


def _check_int(name: str, value, low: int = 1, owner: str = "SSALinear") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}: {name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{owner}: {name} must be >= {low}, got {value}")
    return value


def _activation_name(activation, owner: str = "SSALinear") -> str:
    if activation is None:
        return "none"
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"{owner}: activation must be None or one of {ACTIVATIONS}, got {activation!r}")
    return activation


def random_frame(m: int, n: int, r: int, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Rank-``r`` SVD factors of a Gaussian ``m×n`` matrix with unit-norm columns (DESIGN §6)."""
    B = torch.randn(m, n, generator=gen, dtype=torch.float64)
    B = B / B.norm(dim=0, keepdim=True).clamp_min(1e-12)
    BU, BS, BVh = torch.linalg.svd(B, full_matrices=False)
    return BU[:, :r].float(), BS[:r].float(), BVh[:r].t().float()


class SSALayer(nn.Module):
    """What :class:`SSALinear` and :class:`SSAConv2d` share: factors ``U (m×r)``, ``s (r)``,
    ``V (n×r)`` and ``bias`` as ``nn.Parameter``s; alignment targets and DFA feedback as
    buffers; rank surgery (:meth:`truncate`, :meth:`reorthonormalize`) and checkpoints that
    resize. ``factor_shape = (m, n)``: rows of ``U`` and ``V`` (``out × in`` for a linear
    layer, ``N·kw × C·kh`` for a convolution). Not used directly.
    """

    _owner = "SSALayer"

    def _init_factors(self, W: Tensor, b: Tensor, r0: int, bias: bool, factory: dict) -> None:
        U, s, Vh = torch.linalg.svd(W, full_matrices=False)
        self.U = nn.Parameter(U[:, :r0].to(**factory).contiguous())
        self.s = nn.Parameter(s[:r0].to(**factory))
        self.V = nn.Parameter(Vh[:r0].t().to(**factory).contiguous())
        if bias:
            self.bias = nn.Parameter(b.to(**factory))
        else:
            self.register_parameter("bias", None)
        self.targets = "none"
        self.feedback_form = "gaussian"  # or "orthogonal": structure of a new feedback (the trainer sets it)
        for name in _TARGET_BUFFERS:
            self.register_buffer(name, None)
        self.register_buffer("feedback_P", None)
        self.register_buffer("feedback_sigma", None)
        self.register_buffer("feedback_Q", None)

    # ------------------------------------------------------------------ views
    @property
    def rank(self) -> int:
        return self.s.shape[0]

    @property
    def factor_shape(self) -> tuple[int, int]:
        """``(m, n)``: rows of ``U`` and of ``V`` (the 2-D shape the SVD is taken of)."""
        raise NotImplementedError

    @property
    def feedback_width(self) -> int:
        """``d``: the width of the DFA signal (output features or output channels)."""
        raise NotImplementedError

    def ortho_error(self) -> float:
        """``‖UᵀU − I‖_F``."""
        with torch.no_grad():
            U = self.U.float()
            return float((U.t() @ U - torch.eye(self.rank, device=U.device)).norm())

    def _check_input(self, x) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"{self._owner}: input must be a Tensor, got {type(x).__name__}")

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        for fn in tuple(getattr(self, "_forward_overrides", {}).values()):
            out = fn(self, x)
            if out is not None:  # a trainer recorded what its local update needs
                return out
        h, _ = self.lowrank(self.flat_input(x))
        return self.shape_output(h, x)

    def register_forward_override(self, fn) -> RemovableHandle:
        """Let ``fn(layer, x)`` run the forward instead (when it returns a Tensor; ``None``: not now).

        How a local learning rule records what its update needs (:mod:`ssa.local`) without the
        layer knowing about it; overrides are tried in registration order. Returns a handle whose
        ``remove()`` uninstalls ``fn``.
        """
        if "_forward_overrides" not in self.__dict__:
            self._forward_overrides = OrderedDict()
        handle = RemovableHandle(self._forward_overrides)
        self._forward_overrides[handle.id] = fn
        return handle

    def flat_input(self, x: Tensor) -> Tensor:
        """The input in the op's layout (2-D rows for a linear layer, a 4-D batch for a conv)."""
        raise NotImplementedError

    def shape_output(self, h: Tensor, x: Tensor) -> Tensor:
        """The op's output in the shape ``x`` asks for."""
        raise NotImplementedError

    def lowrank(self, x: Tensor, factors: tuple[Tensor, ...] | None = None) -> tuple[Tensor, Tensor]:
        """``(h, t)`` of the fused forward op (``factors`` overrides ``U, s, V, bias``)."""
        raise NotImplementedError

    def factor_grads(self, x: Tensor, t: Tensor, delta: Tensor, factors=None, **kw) -> tuple[Tensor, ...]:
        """``(gU, gs, gV, gb)`` of the fused factor-gradient op (``delta``: error at the pre-activation;
        ``factors``: ``(U, s, V)`` in place of the layer's, e.g. with permuted columns)."""
        raise NotImplementedError

    def preactivation(self, t: Tensor) -> Tensor:
        """``a`` recomputed from ``t`` (for the cosine term)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ feedback
    @property
    def has_feedback(self) -> bool:
        return self.feedback_Q is not None

    def _draw_init(self, gen: torch.Generator):
        """The layer's seeded dense init (``W, b`` or ``K, b``) drawn from ``gen``."""
        raise NotImplementedError

    def _frame(self) -> tuple[Tensor, Tensor, Tensor]:
        """The papers' literal targets: rank-``r0`` SVD of a seeded Gaussian with the factors' shape,
        drawn from the layer's seed after its dense init (as the layer always drew them)."""
        gen = torch.Generator().manual_seed(self.seed)
        self._draw_init(gen)
        return random_frame(*self.factor_shape, self.r0, gen)

    def set_targets(self, targets: str, num_classes: int | None = None) -> None:
        """Choose the alignment targets (DESIGN §6) and build them; idempotent.

        ``"feedback"`` (default of :class:`ssa.LossConfig`): ``U[:, :k] → P`` and ``s[:k] → σ`` of
        the layer's own DFA feedback ``B = P diag(σ) Qᵀ`` (``k = min(C, d, r0)``); no target for
        ``V``; none for a convolution (its ``U`` rows are (channel, kernel column) pairs that ``P``
        does not index). ``"frame"``: the papers' literal reading, the leading triplets of the
        SVD of a seeded Gaussian matrix with the factors' shape, for ``U``, ``s`` and ``V`` (the
        feedback then takes its ``P, σ`` from that frame). ``"none"``: no targets. Builds the
        feedback too when ``num_classes`` is given. Targets are attached to columns
        (``target_cols``) and follow them through :meth:`reorthonormalize` (``sort=True``) and
        :meth:`truncate`.
        """
        if targets not in TARGETS:
            raise ValueError(f"{self._owner}: targets must be one of {TARGETS}, got {targets!r}")
        changed = targets != self.targets
        if changed and self.feedback_Q is not None and "frame" in (targets, self.targets):
            for name in ("feedback_P", "feedback_sigma", "feedback_Q"):  # the frame form draws its own
                setattr(self, name, None)
        self.targets = targets
        before = self.feedback_P
        if num_classes is not None:
            self.init_feedback(num_classes)
        rebuilt = targets == "feedback" and self.feedback_P is not before  # new feedback: new targets
        if not changed and not rebuilt and (targets == "none" or self.target_cols is not None):
            return
        like = dict(device=self.U.device, dtype=self.U.dtype)
        U = V = None
        if targets == "feedback" and isinstance(self, SSALinear):
            if self.feedback_P is None:
                raise RuntimeError(f"{self._owner}.set_targets: 'feedback' targets need the feedback "
                                   "(call init_feedback(num_classes) first, or pass num_classes)")
            U, s = self.feedback_P, self.feedback_sigma
        elif targets == "frame":
            U, s, V = self._frame()
        if U is None:
            for name in _TARGET_BUFFERS:
                setattr(self, name, None)
            return
        k = min(U.shape[1], self.rank)
        self.target_U = U[:, :k].to(**like).contiguous()
        self.target_s = s[:k].to(**like).contiguous()
        self.target_V = V[:, :k].to(**like).contiguous() if V is not None else None
        self.target_cols = torch.arange(k, device=self.U.device)

    @property
    def has_targets(self) -> bool:
        return self.target_cols is not None and self.target_cols.numel() > 0

    def target_order(self) -> Tensor | None:
        """``None`` when the targets sit on the leading columns (what the op aligns), else the column
        order that puts the targeted columns first (the op then runs on permuted factors)."""
        cols = self.target_cols
        cached = getattr(self, "_order_of", None)
        if cached is not None and cached[0] is cols and cached[1] == self.rank:
            return cached[2]  # computed once per new target_cols: no host sync on every step
        k = cols.numel()
        order = None
        if not bool((cols == torch.arange(k, device=cols.device)).all()):
            rest = torch.ones(self.rank, dtype=torch.bool, device=cols.device)
            rest[cols] = False
            order = torch.cat([cols, torch.nonzero(rest).flatten()])
        self._order_of = (cols, self.rank, order)
        return order

    @torch.no_grad()
    def op_targets(self, U: Tensor, V: Tensor) -> dict:
        """``BU, BS, BV`` for :func:`ssa_kernels.svd_factor_grads` given the factors in target order.

        Each ``U`` target column takes the sign of the matching ``U`` column (a sign flip from
        re-orthonormalisation is never fought). Without a ``V`` target, ``BV`` is ``V``'s own
        columns, so its pull ``2·align·(V − BV)`` is exactly zero.
        """
        k = self.target_cols.numel()
        BU = self.target_U
        sign = torch.where((U[:, :k] * BU).sum(0) < 0, -1.0, 1.0).to(BU.dtype)
        BV = self.target_V if self.target_V is not None else V[:, :k]
        return {"BU": BU * sign, "BS": self.target_s, "BV": BV}

    def _feedback_current(self, C: int) -> bool:
        """Whether the stored feedback is for ``C`` classes and of the requested ``feedback_form``:
        equal singular values read as ``"orthogonal"`` (one column fits either; the frame form draws
        its own ``σ``), so the answer survives ``.to()`` and checkpoints."""
        if self.feedback_Q is None or self.feedback_Q.shape[0] != C:
            return False
        sigma = self.feedback_sigma
        if self.targets == "frame" or sigma.numel() == 1:
            return True
        equal = bool(torch.allclose(sigma, sigma[:1].expand_as(sigma)))
        return equal == (self.feedback_form == "orthogonal")

    def _set_feedback(self, P: Tensor, sigma: Tensor, Q: Tensor, C: int) -> None:
        sigma = sigma.double()
        sigma = sigma * math.sqrt(C) / sigma.norm()  # ‖B‖_F² = C (DESIGN §5)
        like = dict(device=self.U.device, dtype=self.U.dtype)
        self.feedback_P = P.to(**like).contiguous()
        self.feedback_sigma = sigma.to(**like)
        self.feedback_Q = Q.to(**like).contiguous()

    # ------------------------------------------------------------------ factor surgery
    @torch.no_grad()
    def _set_factors(self, U: Tensor, s: Tensor, V: Tensor) -> None:
        # param.data is replaced: a user's optimizer keeps holding the same Parameters.
        self.U.data = U.contiguous()
        self.s.data = s.contiguous()
        self.V.data = V.contiguous()

    @torch.no_grad()
    def _load_dense(self, W: Tensor, bias: Tensor | None, training: bool) -> None:
        """Factors = the leading ``rank`` triplets of the SVD of the 2-D weight ``W`` (in fp64)."""
        U, s, Vh = torch.linalg.svd(W.double(), full_matrices=False)
        r, dt = self.rank, W.dtype
        self._set_factors(U[:, :r].to(dt), s[:r].to(dt), Vh[:r].t().to(dt))
        if bias is not None:
            self.bias.copy_(bias.detach())
        self.train(training)

    @torch.no_grad()
    def reorthonormalize(self, sort: bool = False, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Restore ``UᵀU = VᵀV = I`` exactly without changing ``W`` (DESIGN §7).

        New columns are matched to the old ones, so optimizer state and alignment targets
        stay attached to the same directions. ``sort=True`` then orders the triplets by
        decreasing ``s`` and permutes ``optimizer``'s state of ``U, s, V`` the same way.
        """
        U, s, V = ssa_kernels.reorthonormalize(self.U.detach(), self.s.detach(), self.V.detach())
        # The SVD returns s >= 0: where a singular value had gone negative, keep its sign (and
        # V's column) as it was, so optimizer state and targets keep meaning the same thing.
        neg = self.s.detach() < 0
        if bool(neg.any()):
            sign = torch.where(neg, -1.0, 1.0).to(s.dtype)
            s, V = s * sign, V * sign
        if sort:
            perm = torch.argsort(s.abs(), descending=True)
            signs = torch.where(s[perm] < 0, -1.0, 1.0).to(s.dtype)
            U, s, V = U[:, perm] * signs, s[perm] * signs, V[:, perm]
            if optimizer is not None:
                _permute_state(optimizer, self, perm)
            if self.target_cols is not None:  # targets follow their columns: old c → new inv[c]
                inv = torch.empty_like(perm)
                inv[perm] = torch.arange(perm.numel(), device=perm.device)
                self.target_cols = inv.to(self.target_cols.device)[self.target_cols]
        self._set_factors(U, s, V)

    @torch.no_grad()
    def truncate(self, rank: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Keep the leading ``rank`` singular triplets (DESIGN §8).

        Re-orthonormalises and sorts by ``s`` first, so the result is the best rank-``rank``
        approximation of the current ``W``; keeps the alignment targets of the kept columns
        and, since the kept columns are new directions, drops ``optimizer``'s state of
        ``U, s, V`` (pass the optimizer that holds them).
        """
        rank = _check_int("rank", rank, owner=self._owner)
        if rank > self.rank:
            raise ValueError(f"{self._owner}.truncate: rank must be <= the current rank {self.rank}, got "
                             f"{rank} (a rank cannot grow)")
        self.reorthonormalize(sort=True)
        self._set_factors(self.U[:, :rank], self.s[:rank], self.V[:, :rank])
        if self.target_cols is not None:
            keep = self.target_cols < rank
            self.target_U = self.target_U[:, keep].contiguous()
            self.target_s = self.target_s[keep].contiguous()
            if self.target_V is not None:
                self.target_V = self.target_V[:, keep].contiguous()
            self.target_cols = self.target_cols[keep].contiguous()
        if optimizer is not None:
            for p in (self.U, self.s, self.V):
                optimizer.state.pop(p, None)

    def _resize(self, rank: int) -> None:
        """Make room for ``rank`` triplets (values overwritten by a following load)."""
        like = dict(device=self.U.device, dtype=self.U.dtype)
        m, n = self.factor_shape
        self._set_factors(torch.zeros(m, rank, **like), torch.zeros(rank, **like),
                          torch.zeros(n, rank, **like))

    # ------------------------------------------------------------------ state
    def get_extra_state(self) -> dict:
        return {"r0": self.r0, "frozen_rank": self.frozen_rank, "seed": self.seed,
                "activation": self.activation, "negative_slope": self.negative_slope, "targets": self.targets}

    def set_extra_state(self, state: dict) -> None:
        self.r0 = int(state["r0"])
        self.frozen_rank = bool(state["frozen_rank"])
        self.seed = int(state["seed"])
        self.activation = state.get("activation", self.activation)
        self.negative_slope = float(state.get("negative_slope", self.negative_slope))
        targets = state.get("targets", self.targets)
        if targets not in TARGETS:
            raise ValueError(f"{self._owner}: checkpoint has unknown targets {targets!r}; known: {TARGETS}")
        self.targets = targets

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        # A checkpoint of a truncated layer loads into a freshly built (full-rank) one.
        key = prefix + "s"
        if key in state_dict and state_dict[key].dim() == 1 and state_dict[key].shape[0] != self.rank:
            self._resize(int(state_dict[key].shape[0]))
        for name in ("feedback_P", "feedback_sigma", "feedback_Q") + _TARGET_BUFFERS:
            current = getattr(self, name)
            if prefix + name in state_dict:
                ref = state_dict[prefix + name]
                if current is None or current.shape != ref.shape:
                    dtype = torch.long if name == "target_cols" else self.U.dtype
                    setattr(self, name, torch.empty(ref.shape, device=self.U.device, dtype=dtype))
            elif name in _TARGET_BUFFERS and current is not None:  # saved without this target
                setattr(self, name, None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _activation_module(self) -> nn.Module | None:
        if self.activation == "none":
            return None
        if self.activation == "leaky_relu":
            return nn.LeakyReLU(self.negative_slope)
        return _MODULE_OF[self.activation]()


class SSALinear(SSALayer):
    """``nn.Linear`` whose weight is kept as SVD factors and trained by SSA.

    Same positional arguments and forward semantics as ``nn.Linear``
    (``y = x Wᵀ + b`` over the last dimension of any-rank ``x``), with
    ``W = U diag(s) Vᵀ``: ``U`` (out×r), ``s`` (r), ``V`` (in×r) and ``bias`` are
    ``nn.Parameter``s. The forward calls :func:`ssa_kernels.lowrank_linear`, which carries an
    autograd formula, so backpropagation through the layer works (BP baselines, local
    modules). Initialisation (DESIGN §3): ``nn.Linear``'s own init, SVD, the leading
    ``rank`` triplets (default full rank ``min(in, out)``).

    ``activation`` (``None``, ``"relu"``, ``"leaky_relu"``, ``"tanh"``, ``"sigmoid"``) is fused
    into the forward kernel; the :class:`ssa.Trainer` folds an activation module that follows
    the layer in an ``nn.Sequential`` into it. Buffers (in ``state_dict``, moved by ``.to()``,
    never parameters): the alignment targets ``target_U, target_s, target_V`` (rank-``r0``
    SVD of a fixed seeded Gaussian matrix, DESIGN §6) and, once the trainer knows the number
    of classes, the DFA feedback factors ``feedback_P, feedback_sigma, feedback_Q``
    (``B = P diag(σ) Qᵀ``, DESIGN §5). ``seed`` fixes the init, targets and feedback; by
    default it is drawn from torch's global RNG.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 rank: int | None = None, activation: str | None = None, negative_slope: float = 0.01,
                 seed: int | None = None, backend: str = "auto") -> None:
        super().__init__()
        _check_int("in_features", in_features)
        _check_int("out_features", out_features)
        full = min(in_features, out_features)
        r0 = full if rank is None else _check_int("rank", rank)
        if r0 > full:
            raise ValueError(f"SSALinear: rank must be <= min(in_features, out_features) = {full}, got {r0}")
        self.in_features, self.out_features = in_features, out_features
        self.activation = _activation_name(activation)
        self.negative_slope = float(negative_slope)
        self.backend = backend
        self.seed = _seed_from_global() if seed is None else int(seed)
        self.r0 = r0
        self.frozen_rank = False
        factory = dict(device=device, dtype=dtype if dtype is not None else torch.get_default_dtype())
        W, b = _draw(self.seed, out_features, in_features)
        self._init_factors(W, b, r0, bias, factory)

    _owner = "SSALinear"

    @property
    def factor_shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    @property
    def feedback_width(self) -> int:
        return self.out_features

    @property
    def weight(self) -> Tensor:
        """The dense weight ``U diag(s) Vᵀ`` (out×in), a detached read-only view."""
        with torch.no_grad():
            return self.weight_from(self.U, self.s, self.V).detach()

    def weight_from(self, U: Tensor, s: Tensor, V: Tensor) -> Tensor:
        """``U diag(s) Vᵀ`` of given factors in this layer's weight layout (out×in)."""
        return (U * s) @ V.t()

    def extra_repr(self) -> str:
        act = "" if self.activation == "none" else f", activation={self.activation!r}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.bias is not None}{act}")

    # ------------------------------------------------------------------ forward
    def _check_input(self, x) -> None:
        super()._check_input(x)
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"SSALinear: input must have {self.in_features} features in its last "
                             f"dimension (in_features), got shape {tuple(x.shape)}")

    def flat_input(self, x: Tensor) -> Tensor:
        return x.reshape(-1, self.in_features)

    def shape_output(self, h: Tensor, x: Tensor) -> Tensor:
        return h.reshape(*x.shape[:-1], self.out_features)

    def lowrank(self, x2: Tensor, factors: tuple[Tensor, ...] | None = None) -> tuple[Tensor, Tensor]:
        """``(h, t)`` of the fused op for a 2-D input (``factors`` overrides ``U, s, V, bias``)."""
        U, s, V, b = factors if factors is not None else (self.U, self.s, self.V, self.bias)
        return ssa_kernels.lowrank_linear(x2, U, s, V, b, self.activation, self.backend,
                                          negative_slope=self.negative_slope)

    def factor_grads(self, x2: Tensor, t: Tensor, delta: Tensor, factors=None, **kw) -> tuple[Tensor, ...]:
        U, s, V = factors if factors is not None else (self.U.detach(), self.s.detach(), self.V.detach())
        return ssa_kernels.svd_factor_grads(x2, t, delta.reshape(x2.shape[0], -1), U, s, V,
                                            backend=self.backend, **kw)

    def preactivation(self, t: Tensor) -> Tensor:
        a = (t.to(self.U.dtype) * self.s) @ self.U.t()
        return a + self.bias if self.bias is not None else a

    def _draw_init(self, gen: torch.Generator):
        return _draw(self.seed, self.out_features, self.in_features, gen)

    # ------------------------------------------------------------------ feedback
    def init_feedback(self, num_classes: int) -> None:
        """Build the DFA feedback ``B = P diag(σ) Qᵀ`` (out_features × C), DESIGN §5.

        ``B`` is a seeded Gaussian with unit-norm columns, factored exactly by its SVD
        (``k = min(C, out_features, r0)`` columns), ``σ`` rescaled so that ``‖B‖_F² = C``. With
        the papers' literal ``"frame"`` targets (:meth:`set_targets`), ``P, σ`` are the frame's
        leading ``k`` triplets and ``Q`` a seeded random orthonormal C×k instead. Idempotent for
        the same ``num_classes`` and target form.
        """
        C = _check_int("num_classes", num_classes, 2)
        if self._feedback_current(C):
            return
        gen = torch.Generator().manual_seed(self.seed + 1)
        k = min(C, self.out_features, self.r0)
        if self.targets == "frame":
            BU, BS, _ = self._frame()
            Q = torch.linalg.qr(torch.randn(C, k, generator=gen, dtype=torch.float64))[0]
            self._set_feedback(BU[:, :k], BS[:k], Q, C)
        else:
            self._set_feedback(*_gaussian_feedback(self.out_features, C, k, gen, self.feedback_form), C)

    # ------------------------------------------------------------------ dense round trip
    @classmethod
    def from_dense(cls, linear: nn.Linear, rank: int | None = None, seed: int | None = None) -> SSALinear:
        """An ``SSALinear`` whose factors are the leading ``rank`` triplets of ``linear.weight``'s SVD.

        At full rank (default) it reproduces ``linear``'s output to fp32 precision.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"SSALinear.from_dense: linear must be an nn.Linear, got {type(linear).__name__}")
        W = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device=W.device,
                    dtype=W.dtype, rank=rank, seed=seed)
        layer._load_dense(W, linear.bias, linear.training)
        return layer

    def to_dense(self) -> nn.Module:
        """An ``nn.Linear`` with weight ``U diag(s) Vᵀ`` and the same bias.

        A fused activation is kept: the result is then ``nn.Sequential(linear, activation)``.
        """
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.U.device, dtype=self.U.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias.detach())
        linear.train(self.training)
        act = self._activation_module()
        return linear if act is None else nn.Sequential(linear, act)


class SSAConv2d(SSALayer):
    """``nn.Conv2d`` whose kernel is kept as its spatial SVD and trained by SSA (DESIGN §4).

    Same arguments and forward semantics as ``nn.Conv2d`` (``groups`` must be 1 and
    ``padding_mode`` ``"zeros"``: grouped convolutions and other padding modes stay dense,
    :func:`ssa.convert` leaves them as they are). The kernel ``K`` (N×C×kh×kw) is viewed as
    ``K'[(n, w), (c, h)] = K[n, c, h, w] = U diag(s) Vᵀ`` with ``U`` (N·kw × r), ``s`` (r),
    ``V`` (C·kh × r) ``nn.Parameter``s, and the forward is two convolutions
    (:func:`ssa_kernels.lowrank_conv2d`), equal to ``conv2d(x, K)`` at full rank
    ``r = min(N·kw, C·kh)`` (the default). Initialisation: ``nn.Conv2d``'s own, then the
    leading ``rank`` triplets of ``K'``'s SVD. Buffers: alignment targets (rank-``r0``
    SVD of a seeded Gaussian ``N·kw × C·kh`` matrix) and, once the trainer knows the
    number of classes, the DFA feedback ``B = P diag(σ) Qᵀ`` (N×C), shared by every
    position of the output map (DESIGN §5). ``activation`` is fused into the forward.
    """

    _owner = "SSAConv2d"

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None, *,
                 rank: int | None = None, activation: str | None = None, negative_slope: float = 0.01,
                 seed: int | None = None, backend: str = "auto") -> None:
        super().__init__()
        fn = "SSAConv2d"
        _check_int("in_channels", in_channels, owner=fn)
        _check_int("out_channels", out_channels, owner=fn)
        kernel, strides, pads, dil = _kf.conv_geometry(fn, kernel_size, stride, padding, dilation,
                                                            groups, padding_mode)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.dilation = kernel, strides, dil
        self.padding = padding if isinstance(padding, str) else (
            (pads[0], pads[2]) if pads[0] == pads[1] and pads[2] == pads[3] else pads)
        self._pads = pads
        self.groups, self.padding_mode = 1, "zeros"
        m, n = out_channels * kernel[1], in_channels * kernel[0]
        full = min(m, n)
        r0 = full if rank is None else _check_int("rank", rank, owner=fn)
        if r0 > full:
            raise ValueError(f"SSAConv2d: rank must be <= min(out_channels·kw, in_channels·kh) = {full}, "
                             f"got {r0}")
        self.activation = _activation_name(activation, fn)
        self.negative_slope = float(negative_slope)
        self.backend = backend
        self.seed = _seed_from_global() if seed is None else int(seed)
        self.r0 = r0
        self.frozen_rank = False
        factory = dict(device=device, dtype=dtype if dtype is not None else torch.get_default_dtype())
        K, b = _draw_conv(self.seed, out_channels, in_channels, kernel)
        self._init_factors(_kf.factors_from_kernel(K), b, r0, bias, factory)

    # ------------------------------------------------------------------ views
    @property
    def factor_shape(self) -> tuple[int, int]:
        return self.out_channels * self.kernel_size[1], self.in_channels * self.kernel_size[0]

    @property
    def feedback_width(self) -> int:
        return self.out_channels

    @property
    def weight(self) -> Tensor:
        """The dense kernel (out_channels × in_channels × kh × kw), a detached read-only view."""
        with torch.no_grad():
            return self.weight_from(self.U, self.s, self.V).detach().contiguous()

    def weight_from(self, U: Tensor, s: Tensor, V: Tensor) -> Tensor:
        """The kernel of given factors in this layer's layout (``K'`` reshaped, DESIGN §4)."""
        return _kf.kernel_from_factors(U, s, V, self.kernel_size)

    def extra_repr(self) -> str:
        act = "" if self.activation == "none" else f", activation={self.activation!r}"
        text = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}")
        if self._pads != (0, 0, 0, 0):
            text += f", padding={self.padding!r}"
        if self.dilation != (1, 1):
            text += f", dilation={self.dilation}"
        return text + f", rank={self.rank}, bias={self.bias is not None}{act}"

    # ------------------------------------------------------------------ forward
    def _check_input(self, x) -> None:
        super()._check_input(x)
        if x.dim() not in (3, 4) or x.shape[-3] != self.in_channels:
            raise ValueError(f"SSAConv2d: input must be (N, C, H, W) or (C, H, W) with C = in_channels = "
                             f"{self.in_channels}, got shape {tuple(x.shape)}")

    def flat_input(self, x: Tensor) -> Tensor:
        return x if x.dim() == 4 else x.unsqueeze(0)

    def shape_output(self, h: Tensor, x: Tensor) -> Tensor:
        return h if x.dim() == 4 else h.squeeze(0)

    def _geometry(self) -> dict:
        return dict(kernel_size=self.kernel_size, stride=self.stride, padding=self._pads,
                    dilation=self.dilation)

    def lowrank(self, x: Tensor, factors: tuple[Tensor, ...] | None = None) -> tuple[Tensor, Tensor]:
        """``(h, t)`` of :func:`ssa_kernels.lowrank_conv2d` for a 4-D input."""
        U, s, V, b = factors if factors is not None else (self.U, self.s, self.V, self.bias)
        return ssa_kernels.lowrank_conv2d(x, U, s, V, b, **self._geometry(), activation=self.activation,
                                          negative_slope=self.negative_slope, backend=self.backend)

    def factor_grads(self, x: Tensor, t: Tensor, delta: Tensor, factors=None, **kw) -> tuple[Tensor, ...]:
        g = self._geometry()
        U, s, V = factors if factors is not None else (self.U.detach(), self.s.detach(), self.V.detach())
        return ssa_kernels.svd_conv_factor_grads(
            x, t, delta.reshape(x.shape[0], self.out_channels, *delta.shape[-2:]), U, s, V,
            g["kernel_size"], g["stride"], g["padding"], g["dilation"], backend=self.backend, **kw)

    def preactivation(self, t: Tensor) -> Tensor:
        _, K2 = _kf.conv_kernels(self.U, self.V, self.kernel_size)
        ts = t.to(self.U.dtype) * self.s[:, None, None]
        return torch.nn.functional.conv2d(ts, K2, self.bias, (1, self.stride[1]), 0, (1, self.dilation[1]))

    # ------------------------------------------------------------------ feedback
    def init_feedback(self, num_classes: int) -> None:
        """Build the DFA feedback ``B = P diag(σ) Qᵀ`` (out_channels × C), DESIGN §5.

        ``B`` is a seeded Gaussian with unit-norm columns, factored exactly by its SVD
        (``k = min(C, out_channels)`` columns), ``σ`` rescaled so that ``‖B‖_F² = C``. The
        projected signal is per output channel and shared by every position. Idempotent
        for the same ``num_classes``.
        """
        C = _check_int("num_classes", num_classes, 2, owner=self._owner)
        if self._feedback_current(C):
            return
        gen = torch.Generator().manual_seed(self.seed + 1)
        k = min(C, self.out_channels)
        self._set_feedback(*_gaussian_feedback(self.out_channels, C, k, gen, self.feedback_form), C)

    def _draw_init(self, gen: torch.Generator):
        return _draw_conv(self.seed, self.out_channels, self.in_channels, self.kernel_size, gen)

    # ------------------------------------------------------------------ dense round trip
    @classmethod
    def from_dense(cls, conv: nn.Conv2d, rank: int | None = None, seed: int | None = None) -> SSAConv2d:
        """An ``SSAConv2d`` from the leading ``rank`` triplets of the SVD of ``conv``'s kernel as ``K'``.

        At full rank (default) it reproduces ``conv``'s output to fp32 precision. ``groups``
        must be 1 and ``padding_mode`` ``"zeros"``.
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"SSAConv2d.from_dense: conv must be an nn.Conv2d, got {type(conv).__name__}")
        K = conv.weight.detach()
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode, device=K.device,
                    dtype=K.dtype, rank=rank, seed=seed)
        layer._load_dense(_kf.factors_from_kernel(K), conv.bias, conv.training)
        return layer

    def to_dense(self) -> nn.Module:
        """An ``nn.Conv2d`` with kernel ``U diag(s) Vᵀ`` reshaped back, and the same bias.

        A fused activation is kept: the result is then ``nn.Sequential(conv, activation)``.
        Asymmetric explicit padding (four values) becomes an ``nn.ZeroPad2d`` in front.
        """
        pads = self._pads
        symmetric = pads[0] == pads[1] and pads[2] == pads[3]
        padding = self.padding if isinstance(self.padding, str) else ((pads[0], pads[2]) if symmetric else 0)
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, padding,
                         self.dilation, bias=self.bias is not None, device=self.U.device, dtype=self.U.dtype)
        with torch.no_grad():
            conv.weight.copy_(self.weight)
            if self.bias is not None:
                conv.bias.copy_(self.bias.detach())
        conv.train(self.training)
        mods = [conv]
        if not isinstance(self.padding, str) and not symmetric:
            mods.insert(0, nn.ZeroPad2d((pads[2], pads[3], pads[0], pads[1])))
        act = self._activation_module()
        if act is not None:
            mods.append(act)
        return mods[0] if len(mods) == 1 else nn.Sequential(*mods)


_TARGET_BUFFERS = ("target_U", "target_s", "target_V", "target_cols")


def _gaussian_feedback(d: int, C: int, k: int, gen: torch.Generator,
                       form: str = "gaussian") -> tuple[Tensor, Tensor, Tensor]:
    """``P (d×k), σ (k), Q (C×k)`` of a seeded Gaussian ``d×C`` ``B`` with unit-norm columns (exact SVD);
    ``form="orthogonal"``: the same ``P, Q`` with equal singular values."""
    B = torch.randn(d, C, generator=gen, dtype=torch.float64)
    B = B / B.norm(dim=0, keepdim=True).clamp_min(1e-12)
    P, sigma, Qh = torch.linalg.svd(B, full_matrices=False)
    if form == "orthogonal":
        sigma = torch.ones_like(sigma)
    return P[:, :k], sigma[:k], Qh[:k].t()


def _draw_conv(seed: int, N: int, C: int, kernel: tuple[int, int], gen: torch.Generator | None = None):
    """Seeded draws of a conv layer: ``nn.Conv2d``'s init of ``K, b`` (the frame follows, ``_frame``)."""
    gen = gen if gen is not None else torch.Generator().manual_seed(seed)
    kh, kw = kernel
    bound = 1.0 / math.sqrt(C * kh * kw)  # kaiming_uniform(a=√5) over fan_in, and the bias's bound
    K = (torch.rand(N, C, kh, kw, generator=gen, dtype=torch.float64) * 2 - 1) * bound
    b = (torch.rand(N, generator=gen, dtype=torch.float64) * 2 - 1) * bound
    return K, b


def _draw(seed: int, m: int, n: int, gen: torch.Generator | None = None):
    """The seeded draws of a layer: dense init ``W, b`` (``nn.Linear``'s distribution)."""
    gen = gen if gen is not None else torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(n)  # nn.Linear's init: kaiming_uniform(a=√5), and its bias
    W = (torch.rand(m, n, generator=gen, dtype=torch.float64) * 2 - 1) * bound
    b = (torch.rand(m, generator=gen, dtype=torch.float64) * 2 - 1) * bound
    return W, b


@torch.no_grad()
def _permute_state(optimizer: torch.optim.Optimizer, layer: SSALayer, perm: Tensor) -> None:
    for p, dim in ((layer.U, 1), (layer.s, 0), (layer.V, 1)):
        state = optimizer.state.get(p)
        if not state:
            continue
        for key, value in state.items():
            if isinstance(value, Tensor) and value.shape == p.shape:
                state[key] = value.index_select(dim, perm.to(value.device))
