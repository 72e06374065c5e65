"""``SSALinear``: a drop-in ``nn.Linear`` kept as SVD factors ``W = U diag(s) Vᵀ`` (DESIGN §2-§7)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

import ssa_kernels

__all__ = ["SSALinear", "ACTIVATIONS"]

#: Activations fused into the forward kernel (their derivative is computable from the output).
ACTIVATIONS = ("none", "relu", "leaky_relu", "tanh", "sigmoid")

_MODULE_OF = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


def _seed_from_global() -> int:
    """A seed drawn from torch's global RNG, so ``torch.manual_seed`` makes layers reproducible."""
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


def _check_int(name: str, value, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"SSALinear: {name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"SSALinear: {name} must be >= {low}, got {value}")
    return value


def _activation_name(activation) -> str:
    if activation is None:
        return "none"
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"SSALinear: activation must be None or one of {ACTIVATIONS}, got {activation!r}")
    return activation


def random_frame(m: int, n: int, r: int, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Rank-``r`` SVD factors of a Gaussian ``m×n`` matrix with unit-norm columns (DESIGN §6)."""
    B = torch.randn(m, n, generator=gen, dtype=torch.float64)
    B = B / B.norm(dim=0, keepdim=True).clamp_min(1e-12)
    BU, BS, BVh = torch.linalg.svd(B, full_matrices=False)
    return BU[:, :r].float(), BS[:r].float(), BVh[:r].t().float()


class SSALinear(nn.Module):
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
        W, b, (BU, BS, BV) = _draw(self.seed, out_features, in_features, r0)
        U, s, Vh = torch.linalg.svd(W, full_matrices=False)
        self.U = nn.Parameter(U[:, :r0].to(**factory).contiguous())
        self.s = nn.Parameter(s[:r0].to(**factory))
        self.V = nn.Parameter(Vh[:r0].t().to(**factory).contiguous())
        if bias:
            self.bias = nn.Parameter(b.to(**factory))
        else:
            self.register_parameter("bias", None)
        self.register_buffer("target_U", BU.to(**factory))
        self.register_buffer("target_s", BS.to(**factory))
        self.register_buffer("target_V", BV.to(**factory))
        self.register_buffer("feedback_P", None)
        self.register_buffer("feedback_sigma", None)
        self.register_buffer("feedback_Q", None)

    # ------------------------------------------------------------------ views
    @property
    def rank(self) -> int:
        return self.s.shape[0]

    @property
    def weight(self) -> Tensor:
        """The dense weight ``U diag(s) Vᵀ`` (out×in), a detached read-only view."""
        with torch.no_grad():
            return ((self.U * self.s) @ self.V.t()).detach()

    def extra_repr(self) -> str:
        act = "" if self.activation == "none" else f", activation={self.activation!r}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.bias is not None}{act}")

    def ortho_error(self) -> float:
        """``‖UᵀU − I‖_F``."""
        with torch.no_grad():
            U = self.U.float()
            return float((U.t() @ U - torch.eye(self.rank, device=U.device)).norm())

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"SSALinear: input must be a Tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"SSALinear: input must have {self.in_features} features in its last "
                             f"dimension (in_features), got shape {tuple(x.shape)}")
        from . import _tape  # local import: _tape imports this module

        tape = _tape.active()
        if tape is not None:  # the trainer records what the local update needs
            return tape.linear(self, x)
        lead = x.shape[:-1]
        h, _ = self.lowrank(x.reshape(-1, self.in_features))
        return h.reshape(*lead, self.out_features)

    def lowrank(self, x2: Tensor, factors: tuple[Tensor, ...] | None = None) -> tuple[Tensor, Tensor]:
        """``(h, t)`` of the fused op for a 2-D input (``factors`` overrides ``U, s, V, bias``)."""
        U, s, V, b = factors if factors is not None else (self.U, self.s, self.V, self.bias)
        return ssa_kernels.lowrank_linear(x2, U, s, V, b, self.activation, self.backend,
                                          negative_slope=self.negative_slope)

    # ------------------------------------------------------------------ feedback
    def init_feedback(self, num_classes: int) -> None:
        """Build the DFA feedback ``B = P diag(σ) Qᵀ`` (d×C) from the alignment frame (DESIGN §5).

        ``k = min(C, out_features, r0)``: ``P`` = the leading ``k`` target columns, ``σ`` their
        singular values rescaled so that ``‖B‖_F² = C``, ``Q`` a seeded random orthonormal
        C×k. Idempotent for the same ``num_classes``.
        """
        C = _check_int("num_classes", num_classes, 2)
        if self.feedback_Q is not None and self.feedback_Q.shape[0] == C:
            return
        gen = torch.Generator().manual_seed(self.seed + 1)
        k = min(C, self.out_features, self.r0)
        if self.target_U.shape[1] >= k and self.target_U.dtype in (torch.float32, torch.float64):
            BU, BS = self.target_U, self.target_s  # the frame itself (its leading columns, exact)
        else:  # targets already cut below k, or rounded to half precision: draw the frame again
            _, _, (BU, BS, _) = _draw(self.seed, self.out_features, self.in_features, self.r0)
        sigma = BS[:k].double()
        sigma = sigma * math.sqrt(C) / sigma.norm()
        Q = torch.linalg.qr(torch.randn(C, k, generator=gen, dtype=torch.float64))[0]
        like = dict(device=self.U.device, dtype=self.U.dtype)
        self.feedback_P = BU[:, :k].to(**like).contiguous()
        self.feedback_sigma = sigma.to(**like)
        self.feedback_Q = Q.to(**like).contiguous()

    @property
    def has_feedback(self) -> bool:
        return self.feedback_Q is not None

    # ------------------------------------------------------------------ factor surgery
    @torch.no_grad()
    def _set_factors(self, U: Tensor, s: Tensor, V: Tensor) -> None:
        # param.data is replaced: a user's optimizer keeps holding the same Parameters.
        self.U.data = U.contiguous()
        self.s.data = s.contiguous()
        self.V.data = V.contiguous()

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
        self._set_factors(U, s, V)

    @torch.no_grad()
    def truncate(self, rank: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Keep the leading ``rank`` singular triplets (DESIGN §8).

        Re-orthonormalises and sorts by ``s`` first, so the result is the best rank-``rank``
        approximation of the current ``W``; slices the alignment targets to ``rank`` columns
        and, since the kept columns are new directions, drops ``optimizer``'s state of
        ``U, s, V`` (pass the optimizer that holds them).
        """
        rank = _check_int("rank", rank)
        if rank > self.rank:
            raise ValueError(f"SSALinear.truncate: rank must be <= the current rank {self.rank}, got {rank} "
                             "(a rank cannot grow)")
        self.reorthonormalize(sort=True)
        self._set_factors(self.U[:, :rank], self.s[:rank], self.V[:, :rank])
        self.target_U = self.target_U[:, :rank].contiguous()
        self.target_s = self.target_s[:rank].contiguous()
        self.target_V = self.target_V[:, :rank].contiguous()
        if optimizer is not None:
            for p in (self.U, self.s, self.V):
                optimizer.state.pop(p, None)

    def _resize(self, rank: int) -> None:
        """Make room for ``rank`` triplets (values overwritten by a following load)."""
        like = dict(device=self.U.device, dtype=self.U.dtype)
        self._set_factors(torch.zeros(self.out_features, rank, **like), torch.zeros(rank, **like),
                          torch.zeros(self.in_features, rank, **like))
        self.target_U = torch.zeros(self.out_features, rank, **like)
        self.target_s = torch.zeros(rank, **like)
        self.target_V = torch.zeros(self.in_features, rank, **like)

    # ------------------------------------------------------------------ state
    def get_extra_state(self) -> dict:
        return {"r0": self.r0, "frozen_rank": self.frozen_rank, "seed": self.seed,
                "activation": self.activation, "negative_slope": self.negative_slope}

    def set_extra_state(self, state: dict) -> None:
        self.r0 = int(state["r0"])
        self.frozen_rank = bool(state["frozen_rank"])
        self.seed = int(state["seed"])
        self.activation = state.get("activation", self.activation)
        self.negative_slope = float(state.get("negative_slope", self.negative_slope))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        # A checkpoint of a truncated layer loads into a freshly built (full-rank) one.
        key = prefix + "s"
        if key in state_dict and state_dict[key].dim() == 1 and state_dict[key].shape[0] != self.rank:
            self._resize(int(state_dict[key].shape[0]))
        for name in ("feedback_P", "feedback_sigma", "feedback_Q"):
            if prefix + name in state_dict and getattr(self, name) is None:
                ref = state_dict[prefix + name]
                setattr(self, name, torch.empty(ref.shape, device=self.U.device, dtype=self.U.dtype))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

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
        with torch.no_grad():
            U, s, Vh = torch.linalg.svd(W.double(), full_matrices=False)
            r = layer.rank
            layer._set_factors(U[:, :r].to(W.dtype), s[:r].to(W.dtype), Vh[:r].t().to(W.dtype))
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.detach())
        layer.train(linear.training)
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
        if self.activation == "none":
            return linear
        if self.activation == "leaky_relu":
            return nn.Sequential(linear, nn.LeakyReLU(self.negative_slope))
        return nn.Sequential(linear, _MODULE_OF[self.activation]())


def _draw(seed: int, m: int, n: int, r0: int):
    """The seeded draws of a layer: dense init ``W, b`` (``nn.Linear``'s distribution) and targets."""
    gen = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(n)  # nn.Linear's init: kaiming_uniform(a=√5), and its bias
    W = (torch.rand(m, n, generator=gen, dtype=torch.float64) * 2 - 1) * bound
    b = (torch.rand(m, generator=gen, dtype=torch.float64) * 2 - 1) * bound
    return W, b, random_frame(m, n, r0, gen)


@torch.no_grad()
def _permute_state(optimizer: torch.optim.Optimizer, layer: SSALinear, perm: Tensor) -> None:
    for p, dim in ((layer.U, 1), (layer.s, 0), (layer.V, 1)):
        state = optimizer.state.get(p)
        if not state:
            continue
        for key, value in state.items():
            if isinstance(value, Tensor) and value.shape == p.shape:
                state[key] = value.index_select(dim, perm.to(value.device))
