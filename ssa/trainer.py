"""The SSA trainer: autograd-free local updates of every layer (DESIGN §5-§9).

One SSA step (``method="ssa"``):

1. forward through the model with a :class:`_Tape` active: each SSA layer runs the fused
   :func:`ssa_kernels.lowrank_linear` under ``no_grad`` and keeps its input ``x`` and
   ``t = x V`` (and its output ``h``); forward hooks record what the other trained modules
   need (the norm / activation / dropout "tail" after a layer in an ``nn.Sequential``,
   layers left dense, local modules);
2. output error ``e = (softmax(z) − onehot(y)) / p``;
3. for every unit: ``δ`` at its output (``e`` for the unit that produced ``z``, the DFA
   projection ``B e`` otherwise, :func:`ssa_kernels.dfa_project`), carried back through its
   tail, then :func:`ssa_kernels.svd_factor_grads` → ``.grad`` (added to an existing
   ``.grad``, as autograd would);
4. all-reduce of the gradients under ``torch.distributed``; a ``torch.optim`` step.

``memory="recompute"`` runs a first forward that keeps nothing, then a second forward in
which each unit updates as soon as its output exists (peak memory flat in depth).
``method="bp"`` trains the same model densely with autograd; the baselines of DESIGN §9
(``svd_bp``, ``dfa``, ``drtp``, ``fa``, ``usf``, ``brsf``, ``sgr``) run in the same trainer with
the same data, seed and optimizer (see :class:`Trainer`). :meth:`Trainer.fit` logs the metrics
of DESIGN §10 per epoch (:mod:`ssa.metrics`).
"""

from __future__ import annotations

import copy
import math
import os
import time
import weakref
import zlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import ssa_kernels
from ssa_kernels.reference import activation_grad, feedback_signal

from . import _tape
from .baselines import FEEDBACK_MODES, swap_feedback
from .convert import check_rank, check_skip, convert, to_dense
from .layers import SSALayer
from .loss import LossConfig
from .schedule import RankSchedule

__all__ = ["Trainer", "METHODS"]

METHODS = ("ssa", "bp", "svd_bp", "dfa", "drtp", "fa", "usf", "brsf", "sgr")
#: Methods trained by the local, autograd-free step (the others by autograd).
LOCAL_METHODS = ("ssa", "dfa", "drtp")
#: Methods whose trained parameters are those of the trainer's units (layers, their norms,
#: local modules); the others train every parameter that requires a gradient.
UNIT_METHODS = LOCAL_METHODS + ("sgr",)
MEMORY_MODES = ("store", "recompute")
OPTIMIZERS = ("adam", "adamw", "sgd")
OUTPUT_LAYERS = ("ssa", "dense")
#: ``factor_lr="default"`` for ``method="ssa"``: the singular values learn 3× faster (docs/fidelity.md).
DEFAULT_FACTOR_LR = {"s": 3.0}
INITS = ("torch", "paper")
FEEDBACKS = ("gaussian", "orthogonal")

#: Activation modules folded into the preceding SSA layer's fused kernel.
FUSIBLE = {nn.ReLU: "relu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.LeakyReLU: "leaky_relu"}
#: Parameter-free elementwise modules allowed in a layer's tail (derivative by local autograd
#: when not in FUSIBLE).
ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.ELU, nn.Softplus,
               nn.Mish, nn.Hardtanh, nn.ReLU6, nn.Hardswish, nn.Identity)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)
DROPOUTS = (nn.Dropout, nn.Dropout2d)
#: Layers the trainer updates (SSA layers, and dense ones by plain DFA).
DENSE = (nn.Linear, nn.Conv2d)


@dataclass(eq=False)
class _Unit:
    """One locally trained piece: an SSA layer, a dense layer, or a local module (+ tail)."""

    name: str
    kind: str  # "ssa" | "dense" | "local"
    head: nn.Module
    tail: list = field(default_factory=list)
    cap: dict | None = None
    out_ref: object = None  # weakref to the unit's output in the last forward
    is_output: bool = False

    @property
    def last(self) -> nn.Module:
        return self.tail[-1] if self.tail else self.head


class _Tape:
    """Routes SSA layer forwards and module hooks of one trainer during one forward."""

    def __init__(self, trainer: Trainer, mode: str, e: Tensor | None = None) -> None:
        self.trainer, self.mode, self.e = trainer, mode, e  # mode: store | light | apply
        self.local: list[_Unit] = []
        self.seen: set[int] = set()

    def once(self, unit: _Unit) -> None:
        """A unit's update needs its one input and output: refuse a second call in one forward."""
        if id(unit) in self.seen:
            raise RuntimeError(f"Trainer: module {unit.name!r} ran twice in one forward; SSA's local update "
                               "needs one call per layer per forward (declare the enclosing module in "
                               "local_modules=, or use separate layers)")
        self.seen.add(id(unit))

    # SSALinear.forward / SSAConv2d.forward land here while the tape is active.
    def ssa(self, layer: SSALayer, x: Tensor) -> Tensor:
        x2 = layer.flat_input(x)
        if self.local:  # inside a local module: autograd to x, factor gradients by the fused op
            owner = self.local[-1]
            if self.mode == "light":
                with torch.no_grad():
                    h, _ = layer.lowrank(x2)
                return layer.shape_output(h, x)
            b = layer.bias.detach() if layer.bias is not None else None
            h, t = layer.lowrank(x2, (layer.U.detach(), layer.s.detach(), layer.V.detach(), b))
            if h.requires_grad:
                h.retain_grad()
            else:
                h = h.detach().requires_grad_(True)
            owner.cap.setdefault("inner", []).append((layer, x2.detach(), t.detach(), h))
            return layer.shape_output(h, x)
        unit = self.trainer._unit_of.get(layer)
        with torch.no_grad():
            h, t = layer.lowrank(x2)
        out = layer.shape_output(h, x)
        if unit is None:  # an SSA layer the trainer does not train (frozen)
            return out
        self.once(unit)
        unit.out_ref = weakref.ref(out)
        if self.mode == "light":
            return out
        unit.cap = {"x": x2, "t": t, "h": h, "out": out}
        if not unit.tail and self.mode == "apply":
            self.trainer._update(unit, self.e)
        return out

    def head_hook(self, unit: _Unit, inputs, output) -> None:  # dense layers
        self.once(unit)
        unit.out_ref = weakref.ref(output)
        if self.mode == "light":
            return
        x = inputs[0]
        unit.cap = {"x": x if isinstance(unit.head, nn.Conv2d) else x.reshape(-1, x.shape[-1]), "out": output}
        if not unit.tail and self.mode == "apply":
            self.trainer._update(unit, self.e)

    def tail_hook(self, unit: _Unit, module: nn.Module, inputs, output) -> None:
        if module is unit.last:
            unit.out_ref = weakref.ref(output)
        if self.mode == "light" or unit.cap is None:
            return
        unit.cap[module] = (inputs[0], output)
        if module is unit.last:
            unit.cap["out"] = output
            if self.mode == "apply":
                self.trainer._update(unit, self.e)

    def local_pre(self, unit: _Unit, args):
        self.once(unit)
        self.local.append(unit)
        unit.cap = {} if self.mode != "light" else None
        unit.grad_mode = torch.is_grad_enabled()
        if self.mode != "light":
            torch.set_grad_enabled(True)
        return tuple(a.detach() if isinstance(a, Tensor) else a for a in args)

    def local_post(self, unit: _Unit, output):
        self.local.pop()
        torch.set_grad_enabled(unit.grad_mode)
        detached = output.detach()
        unit.out_ref = weakref.ref(detached)
        if self.mode != "light":
            unit.cap["out"] = output
            if self.mode == "apply":
                self.trainer._update(unit, self.e)
        return detached


class Trainer:
    """Trains ``model`` for ``num_classes``-way classification with SSA or a baseline.

    Args:
        model: a plain PyTorch model; ``method="ssa"`` converts its ``nn.Linear`` and
            ``nn.Conv2d`` (groups 1) layers to :class:`SSALinear` / :class:`SSAConv2d` (in place,
            keeping existing SSA layers, see :func:`ssa.convert`) and folds an activation module
            that follows an SSA layer in an ``nn.Sequential`` into the layer's fused kernel;
            ``method="bp"`` turns SSA layers back to dense. A convolution's DFA signal is per
            output channel and shared by every position (DESIGN §5); its tail in an
            ``nn.Sequential`` is ``(BatchNorm2d) → activation (→ Dropout)``, a pooling layer
            after it is outside the layer's update (the signal enters before it).
        num_classes: classes ``C`` of the output (the model's last dimension).
        method: ``"ssa"`` (DESIGN §5-§8), ``"bp"`` (dense, autograd), or ``"dfa"``: Direct
            Feedback Alignment (Nøkland, "Direct Feedback Alignment Provides Learning in Deep
            Neural Networks", NeurIPS 2016) on the same model kept dense. As the paper: a fixed
            random feedback matrix per hidden layer carries the output error ``e`` to the
            layer's output, ``δa = (e Bᵀ) ⊙ f'(a)``, and the output layer gets ``e`` itself.
            Differs from it in: ``B`` is Gaussian with unit-norm columns (``‖B‖_F² = C``, the
            scale DESIGN §5 gives SSA), seeded per layer name; a convolution's signal is per
            output channel and shared by every position (DESIGN §5; the paper's convnets
            project onto the whole map); norms, local modules and the optimizer are handled as
            for ``ssa``. No penalties, no rank schedule. ``"fa"``, ``"usf"``, ``"brsf"``:
            layer-to-layer feedback (Lillicrap et al. 2016; Liao et al. 2016), every
            ``nn.Linear`` / ``nn.Conv2d`` swapped for a layer whose backward sends the error
            down through ``B`` instead of ``W``, trained by autograd (:mod:`ssa.baselines`).
            ``"svd_bp"``: the SSA factors ``(U, s, V)`` (same conversion and initial rank as
            ``ssa``) trained by backprop through the low-rank forward, with the orthogonality
            penalty of Yang et al., "Learning Low-rank Deep Neural Networks via Singular Vector
            Orthogonality Regularization and Singular Value Sparsification", CVPR-W 2020
            (:meth:`svd_penalty`: ``loss.ortho·(‖UᵀU − I‖² + ‖VᵀV − I‖²)`` and, with
            ``loss.hoyer > 0``, their Hoyer sparsity on ``s``). Differs from it in: no energy-based
            rank pruning (a rank schedule is ``ssa``'s only), the penalty is not divided by ``r²``.
            ``"drtp"``: Direct Random Target Projection (Frenkel, Lefebvre & Bol, "Learning
            Without Feedback: Fixed Random Learning Signals Allow for Feedforward Training of
            Deep Neural Networks", Front. Neurosci. 2021): as ``dfa`` but every hidden layer
            receives a fixed projection of the one-hot target instead of the error; the output
            layer gets ``e``, as in the paper. Same ``B`` as ``dfa``. Differs from it in: the
            target is centred, ``δa = (((1/C − y*)/p) Bᵀ) ⊙ f'(a)`` — the error ``e`` at the
            uninformed output ``softmax = 1/C`` (the paper projects ``y*`` itself, the sign of
            ``e`` at the target being its rationale). Uncentred, the mean column of ``B`` is
            pushed into every sample at every step and never cancels: measured here, LeNet on
            digits stays at chance for 10 epochs (centred: up to 52 %). With ReLU units the
            hidden activations still grow without bound (the signal never vanishes; the paper
            uses saturating ``tanh`` units): 92 % on the digits MLP after 30 epochs but a
            rising training loss (tanh: 95.6 %).
            ``"sgr"``: Successive Gradient Reconciliation (Yang et al., "Towards Interpretable
            Deep Local Learning with Successive Gradient Reconciliation", ICML 2024), in its
            BP-free form: every unit (a layer with its tail, or a local module) gets its input
            detached; the unit before unit ``j`` is trained on ``L_{j−1}``, the cross-entropy of a
            fixed simplex-ETF classifier on unit ``j``'s input ``a_j`` (global average pooling
            first for feature maps; no learnable head), the output unit on the model's loss;
            unit ``j`` also gets the reconciliation penalty
            ``sgr_lambda · p · ‖∂L_j/∂a_j − sg(∂L_{j−1}/∂a_j)‖²`` — its own loss's gradient
            with respect to its input pulled toward the previous unit's gradient at its output,
            held constant (gradient isolation kept). Autograd runs inside each unit only (plus
            the double backward of the penalty). Differs from the paper in: the local heads are
            fixed ETFs for every method setting (the paper's local-BP setting has learnable
            auxiliary networks); the squared distance is scaled by the batch size ``p`` so that
            ``sgr_lambda`` does not depend on it; every unit's graph lives until the step's one
            backward, so this form saves no memory over BP (the paper's saving comes from
            training modules one at a time). Units must form a chain (each unit's input
            produced by the previous one; residual blocks are local modules).
        loss: :class:`LossConfig` (coefficients and gradient form).
        optimizer: ``"adam"`` (``fused=True`` where torch supports it), ``"adamw"``, ``"sgd"``
            (momentum 0.9), or a callable ``params -> torch.optim.Optimizer``.
        lr: learning rate for the named optimizers.
        schedule: ``"default"`` (:meth:`RankSchedule.default` for the number of epochs :meth:`fit`
            trains; a loop of your own without :meth:`fit` gets no rank schedule from it), a
            :class:`RankSchedule` (``ssa`` only) or ``None`` (no rank reduction). Other methods
            have no rank schedule (``"default"`` means none for them).
        memory: ``"store"`` or ``"recompute"`` (DESIGN §5; same update, memory flat in depth).
        reorth_every: re-orthonormalise every SSA layer every this many steps (``None``: never).
        seed: seeds the conversion, the feedback of dense/local units and ``torch``'s RNG.
        local_modules: modules (or their qualified names) trained as *local modules*: input
            detached, DFA signal at the output, autograd inside (DESIGN §5). Modules whose
            class sets ``ssa_local = True`` (the residual blocks of :mod:`ssa.models`) are
            local modules too.
        freeze_norms: leave the affine parameters of norms after SSA layers untrained.
        rank: initial rank of converted layers: ``None`` (full), an int, or per layer type
            ``{"linear": r, "conv": r}`` (clipped to each layer's full rank; a missing key: full),
            see :func:`ssa.convert`.
        output_layer: ``"ssa"`` or ``"dense"``: keep the output layer (the model's last
            ``nn.Linear`` / ``nn.Conv2d``, checked at the first step) dense. It gets the true error
            ``e`` either way, so dense it is trained exactly as by BP.
        init: ``"torch"`` (the layers' own initialisation) or ``"paper"``: the SSA papers' He
            (Kaiming normal, fan-in) for convolutions and Xavier (Glorot uniform) for linear layers,
            zero biases, drawn from ``seed`` before any conversion (every method gets the same).
        factor_lr: learning-rate multipliers of the SSA factors, e.g. ``{"s": 10.0}`` (keys among
            ``"U"``, ``"s"``, ``"V"``; the named optimizers only). ``"default"``: ``{"s": 3.0}``
            for ``method="ssa"`` with a named optimizer (:data:`DEFAULT_FACTOR_LR`), nothing
            otherwise — Adam moves every entry by about ``lr`` per step, which turns the unit-norm
            columns of ``U``, ``V`` (entries ~``1/√m``) several times faster, relatively, than the
            singular values (~1); ``docs/fidelity.md`` measured ×3 for ``s`` as the best of ×1/×3/×10.
        feedback: structure of the DFA feedback ``B`` (hidden SSA layers and dense DFA/DRTP
            layers): ``"gaussian"`` (a Gaussian with unit-norm columns, DESIGN §5) or
            ``"orthogonal"`` (orthonormal columns: all singular values equal, same ``‖B‖_F² = C``).
        skip: names or types of ``nn.Linear`` / ``nn.Conv2d`` layers to leave dense (trained by
            plain DFA).
        backend: ``ssa_kernels`` backend for every op.
        device: move the model there first.
        lr_milestones, lr_gamma: step decay of the learning rate, ``× lr_gamma`` after each
            listed epoch (``torch.optim.lr_scheduler.MultiStepLR``; the papers' recipe is
            ``(20, 40, 60)``, ÷10).
        lr_scheduler: instead, a callable ``optimizer -> torch.optim.lr_scheduler.LRScheduler``
            stepped once per epoch. Either is saved in checkpoints.
        sgr_lambda: the reconciliation weight λ of ``method="sgr"`` (0 drops the penalty).
        align_every: measure the gradient alignment angle (DESIGN §10,
            :func:`ssa.metrics.gradient_alignment`, against a BP twin of the model, for
            measurement only) every this many steps; the epoch's mean per layer goes into the
            history as ``"grad_angle"``. ``None``: not measured.
        measure_memory: measure the peak memory of the first step of every epoch
            (:func:`ssa.metrics.peak_bytes`: CUDA allocator statistics, or the profiler's memory
            events on the CPU) into the history as ``"peak_mem"`` (bytes).

    Other trainable parameters outside SSA layers, dense layers, norms after a layer and
    local modules make ``method="ssa"`` (and ``"dfa"``) raise (freeze them with ``requires_grad_(False)`` or
    declare their module local).
    """

    def __init__(self, model: nn.Module, num_classes: int, method: str = "ssa",
                 loss: LossConfig | None = None,
                 optimizer="adam", lr: float = 1e-3, schedule: RankSchedule | str | None = "default",
                 memory: str = "store", reorth_every: int | None = None, seed: int = 0, *,
                 local_modules=(), freeze_norms: bool = False, rank=None, skip=(),
                 output_layer: str = "ssa", init: str = "torch", factor_lr: dict | str | None = "default",
                 feedback: str = "gaussian", backend: str = "auto", device=None, lr_milestones=(),
                 lr_gamma: float = 0.1,
                 lr_scheduler=None, sgr_lambda: float = 1.0, align_every: int | None = None,
                 measure_memory: bool = False) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Trainer: model must be an nn.Module, got {type(model).__name__}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"Trainer: num_classes must be an int >= 2, got {num_classes!r}")
        if method not in METHODS:
            raise ValueError(f"Trainer: method must be one of {METHODS}, got {method!r}")
        if memory not in MEMORY_MODES:
            raise ValueError(f"Trainer: memory must be one of {MEMORY_MODES}, got {memory!r}")
        if loss is None:
            loss = LossConfig()
        if not isinstance(loss, LossConfig):
            raise TypeError(f"Trainer: loss must be a LossConfig, got {type(loss).__name__}")
        if isinstance(schedule, str):
            if schedule != "default":
                raise ValueError(f"Trainer: schedule must be 'default', a RankSchedule or None, "
                                 f"got {schedule!r}")
            self._default_schedule = method == "ssa"
            schedule = None
        else:
            self._default_schedule = False
        if schedule is not None and not isinstance(schedule, RankSchedule):
            raise TypeError("Trainer: schedule must be 'default', a RankSchedule or None, "
                            f"got {type(schedule).__name__}")
        if schedule is not None and method != "ssa":
            raise ValueError(f"Trainer: a rank schedule needs method='ssa', got {method!r}")
        if reorth_every is not None and (isinstance(reorth_every, bool) or not isinstance(reorth_every, int)
                                         or reorth_every < 1):
            raise ValueError(f"Trainer: reorth_every must be None or an int >= 1, got {reorth_every!r}")
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise ValueError(f"Trainer: lr must be a positive finite number, got {lr!r}")
        if not (isinstance(sgr_lambda, (int, float)) and not isinstance(sgr_lambda, bool)
                and math.isfinite(sgr_lambda) and sgr_lambda >= 0):
            raise ValueError(f"Trainer: sgr_lambda must be a finite number >= 0, got {sgr_lambda!r}")
        if align_every is not None and (isinstance(align_every, bool) or not isinstance(align_every, int)
                                        or align_every < 1):
            raise ValueError(f"Trainer: align_every must be None or an int >= 1, got {align_every!r}")
        if output_layer not in OUTPUT_LAYERS:
            raise ValueError(f"Trainer: output_layer must be one of {OUTPUT_LAYERS}, got {output_layer!r}")
        if init not in INITS:
            raise ValueError(f"Trainer: init must be one of {INITS}, got {init!r}")
        if feedback not in FEEDBACKS:
            raise ValueError(f"Trainer: feedback must be one of {FEEDBACKS}, got {feedback!r}")
        if isinstance(factor_lr, str):
            if factor_lr != "default":
                raise ValueError(f"Trainer: factor_lr must be 'default', a mapping or None, "
                                 f"got {factor_lr!r}")
            named = isinstance(optimizer, str)
            factor_lr = dict(DEFAULT_FACTOR_LR) if method == "ssa" and named else {}
        factor_lr = dict(factor_lr or {})
        for key, value in factor_lr.items():
            if key not in ("U", "s", "V"):
                raise ValueError(f"Trainer: factor_lr keys must be among 'U', 's', 'V', got {key!r}")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"Trainer: factor_lr[{key!r}] must be a positive number, got {value!r}")
        if factor_lr and method not in ("ssa", "svd_bp"):
            raise ValueError(f"Trainer: factor_lr applies to SSA factors (method 'ssa' or 'svd_bp'), "
                             f"got method={method!r}")
        rank = check_rank(rank, "Trainer")
        skip = check_skip(model, skip, "Trainer")
        if not isinstance(measure_memory, bool):
            raise TypeError(f"Trainer: measure_memory must be a bool, got {type(measure_memory).__name__}")
        self.num_classes, self.method, self.loss, self.memory = num_classes, method, loss, memory
        self.schedule, self.reorth_every, self.seed, self.backend = schedule, reorth_every, seed, backend
        self.freeze_norms, self.lr = freeze_norms, float(lr)
        self.sgr_lambda, self.align_every = float(sgr_lambda), align_every
        self.measure_memory = measure_memory
        self.output_layer, self.init, self.factor_lr = output_layer, init, factor_lr
        self.feedback_form = feedback
        self._angles: list[dict[str, float]] = []  # gradient angles measured in the current epoch
        self._sgr_pairs: list | None = None  # (input, detached leaf) per unit while an sgr forward runs
        self._target: Tensor | None = None  # drtp: the batch's −onehot(y)/p
        torch.manual_seed(seed)
        if device is not None:
            model = model.to(device)
        self.model = model
        self.step_count, self.epoch, self.history, self.best_acc = 0, 0, [], -1.0
        self._hooks: list = []
        self.units: list[_Unit] = []
        self._unit_of: dict[nn.Module, _Unit] = {}
        self.feedback: dict[str, Tensor] = {}
        if init == "paper":
            _paper_init(model)
        self._dense_output: str | None = None
        if output_layer == "dense" and method in ("ssa", "svd_bp"):
            self._dense_output = _last_layer(model)
            skip = skip + (self._dense_output,)
            parent, _, child = self._dense_output.rpartition(".")
            holder = model.get_submodule(parent) if parent else model
            if isinstance(getattr(holder, child), SSALayer):
                setattr(holder, child, getattr(holder, child).to_dense())
        if method in ("ssa", "svd_bp"):
            convert(model, rank=rank, skip=skip, seed=seed)
            for layer in model.modules():
                if isinstance(layer, SSALayer):
                    layer.backend = backend
            if method == "ssa":
                self._prepare_ssa(local_modules)
        elif method in ("dfa", "drtp", "sgr"):  # every layer dense, trained from a local signal
            to_dense(model)
            self._prepare_ssa(local_modules)
            if method == "sgr":
                self._prepare_sgr()
        else:
            to_dense(model)
            if method in FEEDBACK_MODES:  # layer-to-layer feedback, trained by autograd
                swap_feedback(model, method, seed)
        self.optimizer = self._make_optimizer(optimizer)
        self.lr_scheduler = self._make_scheduler(lr_milestones, lr_gamma, lr_scheduler)

    # ------------------------------------------------------------------ preparation
    def _prepare_ssa(self, local_modules) -> None:
        model = self.model
        names = {m: n for n, m in model.named_modules()}
        local = [m for m in model.modules() if getattr(m, "ssa_local", False) is True]
        for item in local_modules:
            mod = model.get_submodule(item) if isinstance(item, str) else item
            if mod not in names:
                raise ValueError(f"Trainer: local module {item!r} is not a submodule of the model")
            if mod not in local:
                local.append(mod)
        inside_local = set()
        for mod in local:
            inside_local.update(m for m in mod.modules() if m is not mod)
        self._fold_activations(inside_local)
        handled: set[int] = set()
        tails_of: dict[nn.Module, list] = self._tails(inside_local)
        for mod in local:
            if mod in inside_local:
                continue  # nested in another local module: part of it
            unit = _Unit(names[mod], "local", mod)
            self._add_unit(unit)
            handled.update(id(p) for p in mod.parameters())
        for name, mod in model.named_modules():
            if mod in inside_local or mod in self._unit_of:
                continue
            if isinstance(mod, SSALayer) or (isinstance(mod, DENSE) and mod.weight.requires_grad):
                kind = "ssa" if isinstance(mod, SSALayer) else "dense"
                unit = _Unit(name, kind, mod, tails_of.get(mod, []))
                self._add_unit(unit)
                handled.update(id(p) for p in mod.parameters(recurse=False))
                for t in unit.tail:
                    if isinstance(t, NORMS) and not self.freeze_norms:
                        handled.update(id(p) for p in t.parameters())
        if not self.units:
            raise ValueError(f"Trainer: method={self.method!r} found no layer it can train (no nn.Linear / "
                             "nn.Conv2d / SSA layer and no local module)")
        if self.method == "ssa" and not any(u.kind in ("ssa", "local") for u in self.units):
            raise ValueError("Trainer: method='ssa' found no SSA layer to train")
        frozen_norms = {id(p) for u in self.units for t in u.tail if isinstance(t, NORMS)
                        for p in t.parameters()} if self.freeze_norms else set()
        orphans = [n for n, p in model.named_parameters()
                   if p.requires_grad and id(p) not in handled and id(p) not in frozen_norms]
        if orphans:
            raise ValueError(f"Trainer: method={self.method!r} cannot train parameters {orphans[:5]}"
                             f"{' …' if len(orphans) > 5 else ''}: only SSA layers, dense "
                             "nn.Linear/nn.Conv2d, "
                             "norms right after a layer and local modules are trained; declare their module "
                             "in local_modules= or freeze them with requires_grad_(False)")
        self._handled = handled
        for u in self.units:
            if u.kind == "ssa":
                u.head.feedback_form = self.feedback_form
                u.head.set_targets(self.loss.targets, self.num_classes)
            elif u.kind == "local":  # SSA layers inside a local module have no feedback of their own
                for layer in u.head.modules():
                    if isinstance(layer, SSALayer):
                        layer.set_targets("frame" if self.loss.targets == "frame" else "none")

    def _fold_activations(self, inside_local) -> None:
        for parent in self.model.modules():
            if not isinstance(parent, nn.Sequential) or parent in inside_local:
                continue
            keys = list(parent._modules.keys())
            for i, key in enumerate(keys[:-1]):
                layer, nxt = parent._modules[key], parent._modules[keys[i + 1]]
                if isinstance(layer, SSALayer) and layer.activation == "none" and type(nxt) in FUSIBLE:
                    layer.activation = FUSIBLE[type(nxt)]
                    if isinstance(nxt, nn.LeakyReLU):
                        layer.negative_slope = float(nxt.negative_slope)
                    parent._modules[keys[i + 1]] = nn.Identity()

    def _tails(self, inside_local) -> dict:
        tails = {}
        for parent in self.model.modules():
            if not isinstance(parent, nn.Sequential) or parent in inside_local:
                continue
            mods = list(parent._modules.values())
            for i, mod in enumerate(mods):
                if not isinstance(mod, DENSE + (SSALayer,)):
                    continue
                tail = []
                for nxt in mods[i + 1:]:
                    if isinstance(nxt, NORMS) and not tail:
                        tail.append(nxt)
                    elif isinstance(nxt, ELEMENTWISE + DROPOUTS):
                        tail.append(nxt)
                    else:
                        break
                while tail and isinstance(tail[-1], nn.Identity):
                    tail.pop()
                tails[mod] = tail
        return tails

    def _add_unit(self, unit: _Unit) -> None:
        self.units.append(unit)
        self._unit_of[unit.head] = unit
        mine = self

        def active():
            tape = _tape.active()
            return tape if tape is not None and tape.trainer is mine else None

        if unit.kind == "dense":
            def head_hook(module, inputs, output, unit=unit):
                tape = active()
                if tape is not None:
                    tape.head_hook(unit, inputs, output)
            self._hooks.append(unit.head.register_forward_hook(head_hook))
        if unit.kind == "local":
            def pre(module, args, unit=unit):
                tape = active()
                return tape.local_pre(unit, args) if tape is not None else None

            def post(module, args, output, unit=unit):
                tape = active()
                return tape.local_post(unit, output) if tape is not None else None
            self._hooks.append(unit.head.register_forward_pre_hook(pre))
            self._hooks.append(unit.head.register_forward_hook(post))
        for t in unit.tail:
            def tail_hook(module, inputs, output, unit=unit):
                tape = active()
                if tape is not None:
                    tape.tail_hook(unit, module, inputs, output)
            self._hooks.append(t.register_forward_hook(tail_hook))
        if unit.kind in ("dense", "local"):
            self.feedback[unit.name] = None  # built at the first step, when d is known

    def _trainable(self) -> list[nn.Parameter]:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.method in UNIT_METHODS:
            params = [p for p in params if id(p) in self._handled]
        return params

    def _make_optimizer(self, optimizer) -> torch.optim.Optimizer:
        params = self._trainable()
        if callable(optimizer) and not isinstance(optimizer, str):
            if self.factor_lr:
                raise ValueError("Trainer: factor_lr applies to the named optimizers; with an optimizer "
                                 "callable, build the parameter groups in it")
            opt = optimizer(params)
            if not isinstance(opt, torch.optim.Optimizer):
                raise TypeError("Trainer: an optimizer callable must return a torch.optim.Optimizer")
            return opt
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"Trainer: optimizer must be one of {OPTIMIZERS} or a callable, "
                             f"got {optimizer!r}")
        if self.factor_lr:  # one group per learning rate (SSA factors by name)
            role = {id(getattr(m, k)): k for m in self.model.modules() if isinstance(m, SSALayer)
                    for k in ("U", "s", "V")}
            groups: dict[float, list] = {}
            for p in params:
                groups.setdefault(self.lr * self.factor_lr.get(role.get(id(p)), 1.0), []).append(p)
            params = [{"params": ps, "lr": lr} for lr, ps in groups.items()]
        if optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=0.9)
        cls = torch.optim.Adam if optimizer == "adam" else torch.optim.AdamW
        try:
            return cls(params, lr=self.lr, fused=True)
        except (RuntimeError, ValueError, TypeError):  # fused kernels unsupported for this device/dtype
            return cls(params, lr=self.lr)

    def _make_scheduler(self, milestones, gamma, factory):
        milestones = tuple(milestones or ())
        if any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in milestones):
            raise ValueError(f"Trainer: lr_milestones must be ints >= 1 (epochs), got {milestones!r}")
        if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma > 0):
            raise ValueError(f"Trainer: lr_gamma must be a positive finite number, got {gamma!r}")
        if factory is not None:
            if milestones:
                raise ValueError("Trainer: give lr_milestones or lr_scheduler, not both")
            sched = factory(self.optimizer)
            if not isinstance(sched, torch.optim.lr_scheduler.LRScheduler):
                raise TypeError("Trainer: lr_scheduler must return a torch.optim.lr_scheduler.LRScheduler")
            return sched
        if milestones:
            return torch.optim.lr_scheduler.MultiStepLR(self.optimizer, sorted(milestones),
                                                        gamma=float(gamma))
        return None

    # ------------------------------------------------------------------ queries
    def ssa_layers(self) -> dict[str, SSALayer]:
        """The model's SSA layers (:class:`SSALinear`, :class:`SSAConv2d`) by qualified name."""
        return {n: m for n, m in self.model.named_modules() if isinstance(m, SSALayer)}

    def ranks(self) -> dict[str, int]:
        return {n: m.rank for n, m in self.ssa_layers().items()}

    def ortho_errors(self) -> dict[str, float]:
        return {n: m.ortho_error() for n, m in self.ssa_layers().items()}

    def param_count(self) -> int:
        """Trainable parameters as the model stands (factors count ``(m + n + 1) r``)."""
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    @property
    def device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    # ------------------------------------------------------------------ checks
    def _check_batch(self, x: Tensor, y: Tensor) -> None:
        if not isinstance(x, Tensor) or not isinstance(y, Tensor):
            raise TypeError("Trainer: x and y must be Tensors")
        if y.dim() != 1 or y.dtype not in (torch.int64, torch.int32, torch.uint8, torch.int16, torch.int8):
            raise ValueError(f"Trainer: y must be a 1-D integer tensor of class labels, got shape "
                             f"{tuple(y.shape)} dtype {y.dtype}")
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"Trainer: x has {x.shape[0]} samples but y has {y.shape[0]}")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise ValueError(f"Trainer: labels must be in [0, num_classes={self.num_classes}), got range "
                             f"[{int(y.min())}, {int(y.max())}]")

    def _check_output(self, z: Tensor) -> None:
        if not isinstance(z, Tensor) or z.dim() != 2 or z.shape[1] != self.num_classes:
            shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise ValueError(f"Trainer: the model output must be (batch, num_classes={self.num_classes}), "
                             f"got {shape}: num_classes does not match the output layer")

    # ------------------------------------------------------------------ the local update
    def error(self, z: Tensor, y: Tensor) -> Tensor:
        """``e = (softmax(z) − onehot(y)) / p`` (DESIGN §5), the gradient of the mean cross-entropy."""
        p = z.shape[0]
        e = z.float().softmax(1)
        e[torch.arange(p, device=z.device), y] -= 1
        return (e / p).to(z.dtype)

    def record(self):
        """Context manager: a forward inside it records what :meth:`local_backward` needs.

        For your own loop::

            with trainer.record():
                z = model(x)
            trainer.local_backward(z, y)      # fills .grad of every trained parameter
            optimizer.step(); optimizer.zero_grad()
        """
        if self.method not in LOCAL_METHODS:
            raise RuntimeError(f"Trainer.record: only methods {LOCAL_METHODS} record; for 'bp' use autograd")
        self._clear()
        return _tape.activate(_Tape(self, "store"))

    @torch.no_grad()
    def local_backward(self, z: Tensor, y: Tensor) -> Tensor:
        """The SSA update of every unit from the forward recorded by :meth:`record`.

        Accumulates into ``.grad`` (and all-reduces under ``torch.distributed``); returns
        the mean cross-entropy of ``z``.
        """
        loss, e = self._output_error(z, y)
        for unit in self.units:
            if unit.cap is not None:
                self._update(unit, e)
        self._clear()
        self._all_reduce()
        return loss

    def _output_error(self, z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Checks, the mean cross-entropy (non-finite: raise) and ``e``; marks the output unit."""
        self._check_output(z)
        self._check_batch(z, y)
        loss = F.cross_entropy(z.float(), y)
        self._raise_if_nonfinite(loss)
        self._mark_output(z)
        if self.method == "drtp":  # DRTP: hidden layers see the projected (centred) target, not e
            target = torch.full_like(z, 1.0 / (z.shape[1] * y.shape[0]))
            target[torch.arange(y.shape[0], device=z.device), y] -= 1.0 / y.shape[0]
            self._target = target
        return loss, self.error(z, y)

    def _mark_output(self, z: Tensor) -> None:
        for unit in self.units:
            unit.is_output = unit.out_ref is not None and unit.out_ref() is z
        if self._dense_output is not None:
            found = [u.name for u in self.units if u.is_output]
            if found and found[0] != self._dense_output:
                raise ValueError(f"Trainer: output_layer='dense' took {self._dense_output!r} (the model's "
                                 "last nn.Linear / nn.Conv2d) as the output layer, but the output comes from "
                                 f"{found[0]!r}; name the layer in skip= instead")

    def _clear(self) -> None:
        for unit in self.units:
            unit.cap = None

    def _raise_if_nonfinite(self, loss: Tensor) -> None:
        if not torch.isfinite(loss):
            raise FloatingPointError(f"Trainer: non-finite loss ({float(loss)}) at step "
                                     f"{self.step_count + 1}; "
                                     "the step was not applied (the last checkpoint is kept)")

    def _generator(self, key: str) -> torch.Generator:
        """A CPU generator seeded by the trainer's seed and ``key`` (a unit's fixed random matrices)."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(key.encode()))

    def _feedback_dense(self, unit: _Unit, d: int, like: Tensor) -> Tensor:
        B = self.feedback.get(unit.name)
        if B is None or B.shape[0] != d:
            B = torch.randn(d, self.num_classes, generator=self._generator(unit.name), dtype=torch.float64)
            if self.feedback_form == "orthogonal":  # equal singular values (orthonormal columns if d >= C)
                P, _, Qh = torch.linalg.svd(B, full_matrices=False)
                B = P @ Qh
            B = B / B.norm(dim=0, keepdim=True)  # unit-norm columns: ‖B‖_F² = C
            B = B.to(device=like.device, dtype=like.dtype)
            self.feedback[unit.name] = B
        return B

    def _signal(self, unit: _Unit, out: Tensor, e: Tensor) -> Tensor:
        """``δ`` at the unit's output: ``e`` for the output unit, the DFA projection otherwise."""
        if unit.is_output:
            if out.shape != e.shape:
                raise ValueError(f"Trainer: output unit {unit.name} has shape {tuple(out.shape)}, expected "
                                 f"{tuple(e.shape)}")
            return e.to(out.dtype)
        chan = 1 if out.dim() == 4 else out.dim() - 1  # conv maps: channels; sequences: features
        d = out.shape[chan]
        e = (self._target if self.method == "drtp" else e).to(out.dtype)
        if unit.kind == "ssa":
            L = unit.head
            dh = feedback_signal(e, L.feedback_P, L.feedback_sigma, L.feedback_Q)
        else:
            dh = e @ self._feedback_dense(unit, d, out).t()
        if out.dim() == 2:
            return dh
        shape = [out.shape[0]] + [1] * (out.dim() - 1)
        shape[chan] = d
        return dh.reshape(shape).expand(out.shape)

    def _through_tail(self, unit: _Unit, delta: Tensor) -> Tensor:
        for module in reversed(unit.tail):
            inp, out = unit.cap[module]
            if isinstance(module, nn.Identity):
                continue
            if isinstance(module, DROPOUTS):
                if module.training and module.p > 0:
                    delta = delta * (out != 0).to(delta.dtype) / (1 - module.p)
            elif type(module) in FUSIBLE:
                slope = float(getattr(module, "negative_slope", 0.01))
                delta = delta * activation_grad(out, FUSIBLE[type(module)], slope)
            elif isinstance(module, NORMS):
                self._norm_grads(module, inp, delta)  # the error path treats the norm as forward-only
            else:
                with torch.enable_grad():
                    xi = inp.detach().requires_grad_(True)
                    delta = torch.autograd.grad(module(xi), xi, delta)[0]
        return delta

    def _norm_grads(self, norm: nn.Module, inp: Tensor, delta: Tensor) -> None:
        if self.freeze_norms or norm.weight is None:
            return
        if isinstance(norm, nn.LayerNorm):
            xhat = F.layer_norm(inp, norm.normalized_shape, None, None, norm.eps)
            dims = tuple(range(inp.dim() - len(norm.normalized_shape)))
        else:
            use_batch = norm.training or norm.running_mean is None
            xhat = F.batch_norm(inp, None if use_batch else norm.running_mean,
                                None if use_batch else norm.running_var, None, None, use_batch, 0.0, norm.eps)
            dims = (0,) + tuple(range(2, inp.dim()))
        _accumulate(norm.weight, (delta * xhat).sum(dims))
        if norm.bias is not None:
            _accumulate(norm.bias, delta.sum(dims))

    def _hoyer_on(self, layer: SSALayer) -> bool:
        return (self.loss.hoyer > 0 and self.schedule is not None and not layer.frozen_rank
                and self.schedule.hoyer_active(self.epoch))

    def _factor_grads(self, layer: SSALayer, x2: Tensor, t: Tensor, delta: Tensor,
                      is_output: bool = False) -> None:
        kw = self.loss.factor_kwargs(self._hoyer_on(layer))
        # DESIGN §6: feedback targets exist only where the layer has a DFA signal (not the output layer).
        aligned = kw["align"] > 0 and layer.has_targets and not (is_output and layer.targets == "feedback")
        order = layer.target_order() if aligned else None
        if not aligned:
            kw["align"] = 0.0
            gU, gs, gV, gb = layer.factor_grads(x2, t, delta, **kw)
        elif order is None:
            kw.update(layer.op_targets(layer.U.detach(), layer.V.detach()))
            gU, gs, gV, gb = layer.factor_grads(x2, t, delta, **kw)
        else:  # targets on columns a sort moved: run the (column-equivariant) op on permuted factors
            U, s_, V = (layer.U.detach()[:, order], layer.s.detach()[order], layer.V.detach()[:, order])
            kw.update(layer.op_targets(U, V))
            gU, gs, gV, gb = layer.factor_grads(x2, t.index_select(1, order), delta, factors=(U, s_, V), **kw)
            inv = torch.argsort(order)
            gU, gs, gV = gU[:, inv], gs[inv], gV[:, inv]
        _accumulate(layer.U, gU)
        _accumulate(layer.s, gs)
        _accumulate(layer.V, gV)
        if layer.bias is not None:
            _accumulate(layer.bias, gb)

    @torch.no_grad()
    def _update(self, unit: _Unit, e: Tensor) -> None:
        cap = unit.cap
        if unit.kind == "local":
            self._update_local(unit, e)
        else:
            out = cap["out"]
            layer = unit.head
            fused = (unit.kind == "ssa" and not unit.tail and not unit.is_output
                     and cap["h"].shape == out.shape)
            if fused:  # the fully fused path: projection + activation mask (+ cosine) in one op
                a = layer.preactivation(cap["t"]) if self.loss.cos > 0 else None
                delta = ssa_kernels.dfa_project(e.to(out.dtype), layer.feedback_P, layer.feedback_sigma,
                                                layer.feedback_Q, cap["h"], layer.activation, a=a,
                                                cos=float(self.loss.cos), negative_slope=layer.negative_slope,
                                                backend=self.backend)
            else:
                delta = self._through_tail(unit, self._signal(unit, out, e))
                if unit.kind == "ssa" and layer.activation != "none":
                    h = cap["h"].reshape(delta.shape)
                    delta = delta * activation_grad(h, layer.activation, layer.negative_slope)
            if unit.kind == "ssa":
                self._factor_grads(layer, cap["x"], cap["t"], delta, unit.is_output)
            elif isinstance(layer, nn.Conv2d):  # plain DFA of a dense conv: its own weight-gradient
                with torch.enable_grad():
                    w = layer.weight.detach().requires_grad_(True)
                    gw = torch.autograd.grad(layer._conv_forward(cap["x"], w, None), w, delta)[0]
                _accumulate(layer.weight, gw)
                if layer.bias is not None:
                    _accumulate(layer.bias, delta.sum((0, 2, 3)) if delta.dim() == 4 else delta.sum((1, 2)))
            else:
                d2 = delta.reshape(-1, delta.shape[-1])
                _accumulate(layer.weight, d2.t() @ cap["x"])
                if layer.bias is not None:
                    _accumulate(layer.bias, d2.sum(0))
        unit.cap = None

    def _update_local(self, unit: _Unit, e: Tensor) -> None:
        cap = unit.cap
        out = cap["out"]
        delta = self._signal(unit, out.detach(), e)
        if out.requires_grad:
            with torch.enable_grad():
                torch.autograd.backward(out, delta)
        for layer, x2, t, h in cap.get("inner", []):
            g = h.grad if h.grad is not None else torch.zeros_like(h)
            fprime = activation_grad(h.detach(), layer.activation, layer.negative_slope)
            self._factor_grads(layer, x2, t, g * fprime)

    def _all_reduce(self) -> None:
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        world = dist.get_world_size()
        for p in self._trainable():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(world)

    # ------------------------------------------------------------------ one step
    def step(self, x: Tensor, y: Tensor) -> dict:
        """One training step on a batch; returns ``{"loss", "acc", "n"}`` of the batch (before the step)."""
        self._check_batch(x, y)
        dev = self.device
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        if self.method == "sgr":
            z, loss = self._sgr_step(x, y)
            self._all_reduce()
        elif self.method not in LOCAL_METHODS:  # bp, svd_bp and the layer-to-layer feedback methods
            z = self.model(x)
            self._check_output(z)
            loss = F.cross_entropy(z.float(), y)
            self._raise_if_nonfinite(loss.detach())
            objective = loss + self.svd_penalty() if self.method == "svd_bp" else loss
            objective.backward()
            self._all_reduce()
        elif self.memory == "store":
            with self.record():
                z = self.model(x)
            loss = self.local_backward(z, y)
        else:
            z, loss = self._recompute_step(x, y)
        if self.align_every and self.step_count % self.align_every == 0:
            from .metrics import gradient_alignment

            self._angles.append(gradient_alignment(self, x, y))  # .grad filled, before the update
        self.optimizer.step()
        self.step_count += 1
        if self.method == "ssa" and self.reorth_every and self.step_count % self.reorth_every == 0:
            for layer in self.ssa_layers().values():
                layer.reorthonormalize()
        with torch.no_grad():
            acc = (z.argmax(1) == y).float().mean()
        return {"loss": float(loss.detach()), "acc": float(acc), "n": int(y.shape[0])}

    def svd_penalty(self) -> Tensor:
        """``svd_bp``'s regulariser: ``ortho·Σ(‖UᵀU − I‖² + ‖VᵀV − I‖²) + hoyer·Σ H(s)`` over SSA layers.

        The orthogonality penalty of Yang et al. 2020 (unnormalised, as DESIGN §6 writes it for
        SSA) and, with ``loss.hoyer > 0``, the smoothed Hoyer sparsity ``H(s) = Σ√(s² + ε²)/‖s‖``
        of DESIGN §6 on the singular values, active in every epoch.
        """
        total = torch.zeros((), device=self.device)
        for layer in self.ssa_layers().values():
            if self.loss.ortho > 0:
                for F_ in (layer.U, layer.V):
                    eye = torch.eye(F_.shape[1], device=F_.device, dtype=F_.dtype)
                    total = total + self.loss.ortho * (F_.t() @ F_ - eye).pow(2).sum()
            if self.loss.hoyer > 0:
                s = layer.s
                hoyer = torch.sqrt(s * s + self.loss.hoyer_eps ** 2).sum() / s.norm().clamp_min(1e-30)
                total = total + self.loss.hoyer * hoyer
        return total.float()

    # ------------------------------------------------------------------ sgr
    def _prepare_sgr(self) -> None:
        """Pre-hooks cutting the graph at every unit's input while an ``sgr`` forward runs."""
        mine = self

        def pre(module, args, unit):
            pairs = mine._sgr_pairs
            if pairs is None:
                return None
            if any(name == unit.name for name, _, _ in pairs):
                raise RuntimeError(f"Trainer: module {unit.name!r} ran twice in one forward; sgr's local "
                                   "losses need one call per layer per forward")
            x = args[0]
            if not isinstance(x, Tensor):
                raise TypeError(f"Trainer: sgr needs a Tensor input to {unit.name!r}, got {type(x).__name__}")
            leaf = x.detach().requires_grad_(True)
            pairs.append((unit.name, x, leaf))
            return (leaf,) + tuple(args[1:])

        for unit in self.units:
            self._hooks.append(unit.head.register_forward_pre_hook(
                lambda module, args, unit=unit: pre(module, args, unit)))

    def _etf(self, name: str, d: int, like: Tensor) -> Tensor:
        """The fixed local classifier (d×C) of the unit consuming ``name``'s input: a simplex ETF.

        ``E = √(C/(C−1))·P(I − 11ᵀ/C)``, ``P`` a seeded d×C matrix with orthonormal columns
        (unit-norm columns, pairwise cosine ``−1/(C−1)``). With ``d < C`` no ETF exists in
        ``d`` dimensions: ``P`` then has orthonormal rows, a random projection of the C-dim ETF.
        """
        key = f"sgr_head:{name}"
        E = self.feedback.get(key)
        if E is None or E.shape[0] != d:
            C = self.num_classes
            A = torch.randn(max(d, C), min(d, C), generator=self._generator(key), dtype=torch.float64)
            Q = torch.linalg.qr(A)[0]
            P = Q if d >= C else Q.t()  # d×C
            center = torch.eye(C, dtype=torch.float64) - 1.0 / C
            E = math.sqrt(C / (C - 1)) * P @ center
            E = E.to(device=like.device, dtype=torch.float32)
            self.feedback[key] = E
        return E

    def _sgr_head_loss(self, name: str, a: Tensor, y: Tensor) -> Tensor:
        """Cross-entropy of the fixed ETF head on ``a`` (global average pooling first for maps)."""
        f = a.float()
        if f.dim() == 4:
            f = f.mean((2, 3))
        elif f.dim() > 2:  # sequences: features last
            f = f.reshape(f.shape[0], -1, f.shape[-1]).mean(1)
        return F.cross_entropy(f @ self._etf(name, f.shape[1], f), y)

    def _sgr_step(self, x: Tensor, y: Tensor):
        """One ``sgr`` step: local ETF losses and the reconciliation penalty, by local autograd."""
        self._sgr_pairs = []
        try:
            z = self.model(x)
        finally:
            pairs, self._sgr_pairs = self._sgr_pairs, None
        self._check_output(z)
        loss = F.cross_entropy(z.float(), y)
        self._raise_if_nonfinite(loss.detach())
        # heads[j]: the loss of the unit *before* unit j, on unit j's input a_j (None for the data).
        heads = [self._sgr_head_loss(name, a, y) if a.requires_grad else None for name, a, _ in pairs]
        total, p = loss, y.shape[0]
        for j, (name, a, leaf) in enumerate(pairs):
            if heads[j] is None:
                continue
            total = total + heads[j]
            if self.sgr_lambda == 0:
                continue
            own = heads[j + 1] if j + 1 < len(pairs) else loss  # unit j's own local loss
            g_next = torch.autograd.grad(own, leaf, retain_graph=True, create_graph=True,
                                         allow_unused=True)[0]
            if g_next is None:
                raise RuntimeError(f"Trainer: sgr needs the units to form a chain, but the loss after "
                                   f"{name!r} does not depend on its input (declare branching parts as "
                                   "local_modules=)")
            g_prev = torch.autograd.grad(heads[j], a, retain_graph=True)[0]  # a constant (stop-gradient)
            total = total + self.sgr_lambda * p * (g_next.float() - g_prev.float()).pow(2).sum()
        total.backward()
        return z, loss

    @torch.no_grad()
    def _recompute_step(self, x: Tensor, y: Tensor):
        """DESIGN §5 ``recompute``: a light forward for ``e``, then a forward that updates as it goes."""
        rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if x.is_cuda else None
        # Buffers a forward may update (norm statistics, a user's running averages) are put back
        # before the second forward; SSA layers' buffers (targets, feedback) never change in one.
        stats = {f"{mn}.{bn}" if mn else bn: buf.clone() for mn, mod in self.model.named_modules()
                 if not isinstance(mod, SSALayer) for bn, buf in mod.named_buffers(recurse=False)}
        self._clear()
        with _tape.activate(_Tape(self, "light")):
            z = self.model(x)
        loss, e = self._output_error(z, y)
        del z
        for name, buf in self.model.named_buffers():  # the second forward must see the same statistics
            if name in stats:
                buf.copy_(stats[name])
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        with _tape.activate(_Tape(self, "apply", e)):  # units keep is_output from the first pass
            z = self.model(x)
        self._clear()
        self._all_reduce()
        return z, loss

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, loader) -> dict:
        """Mean cross-entropy, top-1 and top-5 accuracy (fractions in [0, 1]) over ``loader``."""
        was_training = self.model.training
        self.model.eval()
        dev = self.device
        total = loss = correct = top5 = 0.0
        k = min(5, self.num_classes)
        for x, y in loader:
            x, y = x.to(dev), y.to(dev)
            self._check_batch(x, y)
            z = self.model(x)
            self._check_output(z)
            loss += float(F.cross_entropy(z.float(), y, reduction="sum"))
            correct += float((z.argmax(1) == y).sum())
            top5 += float((z.topk(k, 1).indices == y[:, None]).any(1).sum())
            total += y.shape[0]
        self.model.train(was_training)
        if total == 0:
            raise ValueError("Trainer.evaluate: the loader yielded no samples")
        return {"loss": loss / total, "acc": correct / total, "top5": top5 / total}

    # ------------------------------------------------------------------ epochs
    def end_epoch(self) -> dict[str, int]:
        """Apply the rank schedule (and step the learning-rate schedule) after epoch ``self.epoch``.

        Returns the layers cut and their new ranks.
        """
        cut = {}
        if self.schedule is not None:
            for unit in self.units:
                if unit.kind != "ssa":
                    continue
                new = self.schedule.step_layer(unit.head, self.epoch, is_output=unit.is_output,
                                               optimizer=self.optimizer)
                if new is not None:
                    cut[unit.name] = new
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.epoch += 1
        return cut

    def epoch_metrics(self, x_shape) -> dict:
        """``params``, ``flops`` (per layer and ``"total"``, one iteration of batch shape ``x_shape``),
        ``grad_angle`` (mean per layer over the epoch's measured steps) and ``matrix_angle``
        (DESIGN §10, :mod:`ssa.metrics`)."""
        from . import metrics

        angles: dict[str, float] = {}
        for name in dict.fromkeys(n for a in self._angles for n in a):
            vals = [a[name] for a in self._angles if name in a and math.isfinite(a[name])]
            angles[name] = sum(vals) / len(vals) if vals else float("nan")
        self._angles = []
        return {"params": self.param_count(),
                "flops": metrics.training_flops(self, x_shape) if x_shape is not None else {},
                "grad_angle": angles, "matrix_angle": metrics.matrix_alignment(self)}

    def fit(self, train_loader, epochs: int, val_loader=None, checkpoint_dir=None, progress: bool = False,
            resume: bool = False) -> list[dict]:
        """Train for ``epochs`` epochs (in total, counting resumed ones); returns the history.

        Each epoch appends ``{"epoch", "train_loss", "train_acc", "val_loss", "val_acc",
        "val_top5", "time_s", "ranks", "ortho", "cut", "peak_mem", "params", "flops",
        "grad_angle", "matrix_angle"}`` (see :meth:`epoch_metrics`; ``peak_mem`` is ``None``
        unless ``measure_memory``, ``grad_angle`` empty unless ``align_every``). With
        ``checkpoint_dir``, writes
        ``latest.pt`` after every epoch and ``best.pt`` when the validation accuracy improves;
        ``resume=True`` continues from ``latest.pt`` there (same numbers as an uninterrupted run
        on the CPU). A non-finite loss stops the run with ``FloatingPointError`` and leaves the
        last good checkpoint in place.
        """
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"Trainer.fit: epochs must be an int >= 1, got {epochs!r}")
        if self._default_schedule and self.schedule is None:  # the library's default timing
            self.schedule = RankSchedule.default(epochs)
        latest = os.path.join(checkpoint_dir, "latest.pt") if checkpoint_dir else None
        if resume:
            if latest is None:
                raise ValueError("Trainer.fit: resume=True needs checkpoint_dir")
            if os.path.exists(latest):
                self.load_checkpoint(latest, train_loader)
        if checkpoint_dir:
            os.makedirs(checkpoint_dir, exist_ok=True)
        start = time.perf_counter() - (self.history[-1]["time_s"] if self.history else 0.0)
        try:
            from tqdm.auto import tqdm
        except ImportError:  # pragma: no cover
            tqdm = None
        while self.epoch < epochs:
            batches = train_loader
            if progress and tqdm is not None:
                batches = tqdm(train_loader, desc=f"{self.method} epoch {self.epoch + 1}/{epochs}",
                               leave=False)
            loss_sum = acc_sum = count = 0.0
            x_shape, peak, self._angles = None, None, []
            for x, y in batches:
                first, x_shape = x_shape is None, x_shape or tuple(x.shape)
                if first and self.measure_memory:  # the epoch's first step, under the memory probe
                    from .metrics import peak_bytes

                    stats = {}
                    peak = peak_bytes(lambda x=x, y=y, o=stats: o.update(self.step(x, y)), self.device)
                else:
                    stats = self.step(x, y)
                loss_sum += stats["loss"] * stats["n"]
                acc_sum += stats["acc"] * stats["n"]
                count += stats["n"]
            costs = self.epoch_metrics(x_shape)  # at this epoch's ranks, before a cut
            cut = self.end_epoch()
            val = self.evaluate(val_loader) if val_loader is not None else {}
            row = {"epoch": self.epoch, "train_loss": loss_sum / max(count, 1),
                   "train_acc": acc_sum / max(count, 1),
                   "val_loss": val.get("loss"), "val_acc": val.get("acc"), "val_top5": val.get("top5"),
                   "time_s": time.perf_counter() - start, "ranks": self.ranks(), "ortho": self.ortho_errors(),
                   "cut": cut, "peak_mem": peak, **costs}
            self.history.append(row)
            if progress:
                msg = f"{self.method} epoch {self.epoch}/{epochs}: train loss {row['train_loss']:.4f}"
                if val:
                    msg += f", val acc {val['acc']:.4f}"
                (tqdm.write if tqdm is not None else print)(msg)
            if checkpoint_dir:
                improved = val.get("acc") is not None and val["acc"] > self.best_acc
                if improved:
                    self.best_acc = val["acc"]
                self.save_checkpoint(latest, train_loader)
                if improved:
                    self.save_checkpoint(os.path.join(checkpoint_dir, "best.pt"), train_loader)
        return self.history

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Model, ranks, feedback, optimizer, schedule, RNG, epoch and history."""
        return {
            "format": 1, "method": self.method, "num_classes": self.num_classes,
            "model": self.model.state_dict(), "ranks": self.ranks(),
            "optimizer": self.optimizer.state_dict(),
            "feedback": {k: v for k, v in self.feedback.items() if v is not None},
            "schedule": self.schedule.to_dict() if self.schedule is not None else None,
            "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
            "loss": self.loss.to_dict(), "epoch": self.epoch, "step": self.step_count,
            "history": copy.deepcopy(self.history), "best_acc": self.best_acc,
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output; truncated layers are resized first."""
        if state.get("method") != self.method:
            raise ValueError(f"Trainer.load_state_dict: checkpoint of method {state.get('method')!r}, "
                             f"this trainer is {self.method!r}")
        if state.get("num_classes") != self.num_classes:
            raise ValueError(f"Trainer.load_state_dict: checkpoint for {state.get('num_classes')} classes, "
                             f"this trainer has {self.num_classes}")
        self.model.load_state_dict(state["model"])  # SSA layers resize themselves to the saved rank
        self.optimizer.load_state_dict(state["optimizer"])
        self.feedback.update({k: v.to(self.device) for k, v in state["feedback"].items()})
        if state.get("schedule") is not None:
            self.schedule = RankSchedule(**state["schedule"])
        if self.lr_scheduler is not None and state.get("lr_scheduler") is not None:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.epoch, self.step_count = int(state["epoch"]), int(state["step"])
        self.history, self.best_acc = copy.deepcopy(state["history"]), float(state["best_acc"])
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"].get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])

    def save_checkpoint(self, path: str, train_loader=None) -> None:
        """Write :meth:`state_dict` (plus the loader's shuffle RNG) atomically to ``path``."""
        state = self.state_dict()
        gen = getattr(train_loader, "generator", None)
        state["rng"]["loader"] = gen.get_state() if isinstance(gen, torch.Generator) else None
        tmp = path + ".tmp"
        torch.save(state, tmp)
        os.replace(tmp, path)

    def load_checkpoint(self, path: str, train_loader=None) -> None:
        state = torch.load(path, map_location=self.device, weights_only=False)
        self.load_state_dict(state)
        gen = getattr(train_loader, "generator", None)
        if isinstance(gen, torch.Generator) and state["rng"].get("loader") is not None:
            gen.set_state(state["rng"]["loader"])


def _last_layer(model: nn.Module) -> str:
    """Qualified name of the model's last ``nn.Linear`` / ``nn.Conv2d`` / SSA layer (module order)."""
    names = [n for n, m in model.named_modules() if isinstance(m, DENSE + (SSALayer,))]
    if not names:
        raise ValueError("Trainer: output_layer='dense' found no nn.Linear / nn.Conv2d in the model")
    return names[-1]


@torch.no_grad()
def _paper_init(model: nn.Module) -> None:
    """The SSA papers' initialisation: He (Kaiming normal, fan-in, ReLU) for convolutions, Xavier
    (Glorot uniform) for linear layers, zero biases (torch's global RNG, seeded by the trainer)."""
    for m in model.modules():
        if isinstance(m, SSALayer):
            raise ValueError("Trainer: init='paper' initialises dense layers; the model already holds SSA "
                             "layers (build it from nn.Linear / nn.Conv2d, or use init='torch')")
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
        elif isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
        else:
            continue
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def _accumulate(param: nn.Parameter, grad: Tensor) -> None:
    """Add ``grad`` into ``param.grad`` as autograd would."""
    grad = grad.to(param.dtype)
    if param.grad is None:
        param.grad = grad.clone() if grad.data_ptr() == param.data_ptr() else grad.contiguous()
    else:
        param.grad.add_(grad)
