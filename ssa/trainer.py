"""The training loop: optimizer, learning-rate schedule, step skeleton, fit/evaluate, checkpoints.

What a step computes belongs to the method (:mod:`ssa.methods`: one file per method behind
one interface); the :class:`Trainer` routes its options to it, runs the optimizer, averages
gradients across ranks, logs the metrics of DESIGN §10 (:mod:`ssa.metrics`) and writes
checkpoints (:mod:`ssa.checkpoint`).
"""

from __future__ import annotations

import copy
import inspect
import math
import os
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import checkpoint, distributed, metrics
from . import methods as _methods
from .convert import paper_init
from .layers import SSALayer
from .local.update import output_error
from .loss import LossConfig
from .methods.base import check_batch, check_output, finite_number, restore_buffers, snapshot_buffers
from .methods.svd_bp import svd_penalty
from .optim import DEFAULT_FACTOR_LR, OPTIMIZERS, check_factor_lr, make_optimizer, make_scheduler  # noqa: F401
from .schedule import RankSchedule

__all__ = ["Trainer", "METHODS"]

METHODS = _methods.METHODS
#: Methods trained by the local, autograd-free step (the others by autograd).
LOCAL_METHODS = tuple(m for m in METHODS if _methods.REGISTRY[m].records)
INITS = ("torch", "paper")
#: Keywords every method takes; the others are routed to the method that declares them.
_COMMON = ("optimizer", "lr", "schedule", "seed", "init", "factor_lr", "backend", "device", "lr_milestones",
           "lr_gamma", "lr_scheduler", "align_every", "measure_memory")


class Trainer:
    """Trains ``model`` for ``num_classes``-way classification with SSA or a baseline.

    Args:
        model: a plain PyTorch model, changed in place into the form the method trains (``ssa``:
            its ``nn.Linear`` / ``nn.Conv2d`` become SSA layers, :func:`ssa.convert`; ``bp``: SSA
            layers back to dense). Layers frozen with ``requires_grad_(False)`` stay frozen (not
            trained, not cut by the rank schedule).
        num_classes: classes ``C`` of the output (the model's last dimension).
        method: one of :data:`METHODS`; each is described in its file under :mod:`ssa.methods`
            (``ssa``, ``bp``, ``svd_bp``, ``dfa``/``drtp``, ``fa``/``usf``/``brsf``, ``sgr``).
        optimizer: ``"adam"`` (``fused=True`` where torch supports it), ``"adamw"``, ``"sgd"``
            (momentum 0.9), or a callable ``params -> torch.optim.Optimizer``; ``lr`` for the named ones.
        schedule: ``"default"`` (:meth:`RankSchedule.default` for the epochs :meth:`fit` trains;
            ``ssa`` only, none for the others), a :class:`RankSchedule` (``ssa``) or ``None``.
        seed: seeds the conversion, the fixed random matrices of every method and ``torch``'s RNG.
        loss, rank, skip, output_layer, reorth_every: ``ssa`` and (but ``reorth_every``) ``svd_bp``:
            :class:`LossConfig`; initial rank (``None``, an int or ``{"linear": r, "conv": r}``, each
            layer at most its full rank); layers left dense; ``"dense"`` keeps the last layer dense;
            re-orthonormalise every this many steps. See :mod:`ssa.methods.ssa`.
        memory, feedback: ``"store"``/``"recompute"`` (DESIGN §5) and ``"gaussian"``/``"orthogonal"``
            direct feedback (``ssa``, ``dfa``, ``drtp``).
        local_modules, freeze_norms: modules (or names) trained as *local modules* (input detached,
            signal at the output, autograd inside; also any class with ``ssa_local = True``), and
            norms left untrained (``ssa``, ``dfa``, ``drtp``, ``sgr``).
        init: ``"torch"`` or ``"paper"`` (He for convolutions, Xavier for linear layers, zero biases,
            drawn from ``seed`` before any conversion; every method gets the same).
        factor_lr: learning-rate multipliers of the SSA factors, e.g. ``{"s": 10.0}`` (``ssa``,
            ``svd_bp``; named optimizers). ``"default"``: :data:`DEFAULT_FACTOR_LR` for ``ssa`` with a
            named optimizer, nothing otherwise (docs/fidelity.md).
        backend: ``ssa_kernels`` backend for every op.
        device: move the model there first.
        lr_milestones, lr_gamma: ``× lr_gamma`` after each listed epoch (``MultiStepLR``).
        lr_scheduler: instead, a callable ``optimizer -> LRScheduler`` stepped once per epoch.
        sgr_lambda: the reconciliation weight of ``sgr``.
        align_every: measure the gradient alignment angle (:func:`ssa.metrics.gradient_alignment`)
            every this many steps into the history as ``"grad_angle"``.
        measure_memory: the peak memory of each epoch's first step into the history as ``"peak_mem"``.

    An option that does not apply to the chosen method, given a value other than its default,
    raises ``ValueError`` naming the methods it applies to (:func:`ssa.methods.applicable` filters a
    shared set of options). The hooks a local method installs on the model are removed by
    :meth:`close` (or ``with Trainer(...) as tr:``, or when the trainer is garbage collected);
    several trainers may hold one model.
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
        cls = _methods.get(method)
        given = _methods.route(method, {k: v for k, v in locals().items() if k in _ROUTED}, _DEFAULTS)
        if loss is None:
            loss = LossConfig()
        if not isinstance(loss, LossConfig):
            raise TypeError(f"Trainer: loss must be a LossConfig, got {type(loss).__name__}")
        default_schedule = isinstance(schedule, str)
        if default_schedule:
            if schedule != "default":
                raise ValueError(f"Trainer: schedule must be 'default', a RankSchedule or None, "
                                 f"got {schedule!r}")
            schedule = None
        elif schedule is not None and "schedule" not in cls.options:
            raise ValueError(f"Trainer: a rank schedule needs method='ssa', got {method!r}")
        _check_int_or_none("reorth_every", reorth_every)
        _check_int_or_none("align_every", align_every)
        if not (finite_number(lr) and lr > 0):
            raise ValueError(f"Trainer: lr must be a positive finite number, got {lr!r}")
        if init not in INITS:
            raise ValueError(f"Trainer: init must be one of {INITS}, got {init!r}")
        if not isinstance(measure_memory, bool):
            raise TypeError(f"Trainer: measure_memory must be a bool, got {type(measure_memory).__name__}")
        self.factor_lr = check_factor_lr(factor_lr, method, isinstance(optimizer, str),
                                         "factor_lr" in cls.options)
        self.num_classes, self.method, self.loss, self.seed = num_classes, method, loss, seed
        self.backend, self.lr, self.init = backend, float(lr), init
        self.align_every, self.measure_memory = align_every, measure_memory
        self._angles: list[dict[str, float]] = []  # gradient angles measured in the current epoch
        options = {k: v for k, v in {**given, "schedule": schedule, "loss": loss}.items() if k in cls.options}
        self.rule = cls(method, _methods.Context(num_classes, seed, loss, backend), **options)
        self.rule.default_schedule = default_schedule
        torch.manual_seed(seed)
        if device is not None:
            model = model.to(device)
        if init == "paper":
            paper_init(model)
        self.model = self.rule.prepare(model)
        self.step_count, self.epoch, self.history, self.best_acc, self.closed = 0, 0, [], -1.0, False
        self.optimizer = make_optimizer(optimizer, self.rule.parameters(self.model), self.lr,
                                        self.factor_lr, model)
        self.lr_scheduler = make_scheduler(self.optimizer, lr_milestones, lr_gamma, lr_scheduler)

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Remove the hooks the method installed on the model (the model keeps its trained form);
        a closed trainer refuses to train."""
        self.rule.close()
        self.closed = True

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ what the method holds
    @property
    def schedule(self) -> RankSchedule | None:
        return getattr(self.rule, "schedule", None)

    @schedule.setter
    def schedule(self, value) -> None:
        if "schedule" not in self.rule.options:
            raise ValueError(f"Trainer: a rank schedule needs method='ssa', got {self.method!r}")
        self.rule.schedule = value

    @property
    def units(self) -> list:
        """The units a local method trains (:class:`ssa.local.Unit`); empty for the others."""
        return list(getattr(self.rule, "units", ()))

    @property
    def feedback(self) -> dict[str, Tensor]:
        """The method's fixed random matrices by name (dense DFA feedback ``B``; sgr's ETF heads)."""
        return getattr(self.rule, "matrices", {})

    @property
    def memory(self) -> str:
        return getattr(self.rule, "memory", "store")

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

    def _check_batch(self, x: Tensor, y: Tensor) -> None:
        check_batch(x, y, self.num_classes)

    # ------------------------------------------------------------------ your own loop (local methods)
    def error(self, z: Tensor, y: Tensor) -> Tensor:
        """``e = (softmax(z) − onehot(y)) / p`` (DESIGN §5), the gradient of the mean cross-entropy."""
        return output_error(z, y)

    def record(self):
        """Context manager: a forward inside it records what :meth:`local_backward` needs.

        For your own loop::

            with trainer.record():
                z = model(x)
            trainer.local_backward(z, y)      # fills .grad of every trained parameter
            optimizer.step(); optimizer.zero_grad()
        """
        if not self.rule.records:
            raise RuntimeError(f"Trainer.record: only methods {LOCAL_METHODS} record; for {self.method!r} "
                               "use autograd")
        return self.rule.record()

    def local_backward(self, z: Tensor, y: Tensor) -> Tensor:
        """The local update of every unit from the forward recorded by :meth:`record`.

        Accumulates into ``.grad`` (averaged across ranks under ``torch.distributed``); returns the
        mean cross-entropy of ``z``. Raises ``RuntimeError`` when nothing was recorded.
        """
        if not self.rule.records:
            raise RuntimeError(f"Trainer.local_backward: only methods {LOCAL_METHODS} record")
        self._check_batch(z, y)
        loss = self.rule.local_backward(z, y, self.step_count)
        distributed.all_reduce_mean(self.rule.parameters(self.model))
        return loss

    def svd_penalty(self) -> Tensor:
        """``svd_bp``'s regulariser on this model (:func:`ssa.methods.svd_bp.svd_penalty`)."""
        return svd_penalty(self.model, self.loss)

    # ------------------------------------------------------------------ one step
    def step(self, x: Tensor, y: Tensor) -> dict:
        """One training step on a batch; returns ``{"loss", "acc", "n"}`` of the batch (before the step).

        A non-finite loss raises ``FloatingPointError`` with nothing changed: no update, and the
        running statistics of norms put back as they were before the batch.
        """
        if self.closed:
            raise RuntimeError("Trainer.step: this trainer was closed (its hooks are removed); "
                               "make a new one")
        self._check_batch(x, y)
        dev = self.device
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        stats = snapshot_buffers(self.model)  # norm statistics, put back if the step fails
        self.rule.step_count, self.rule.epoch = self.step_count, self.epoch
        try:
            z, loss = self.rule.gradients(self.model, x, y)
        except FloatingPointError:
            restore_buffers(stats)
            self.optimizer.zero_grad(set_to_none=True)
            raise
        distributed.all_reduce_mean(self.rule.parameters(self.model))
        if self.align_every and self.step_count % self.align_every == 0:
            self._angles.append(metrics.gradient_alignment(self, x, y))  # .grad filled, before the update
        self.optimizer.step()
        self.step_count += 1
        self.rule.after_step(self.model, self.step_count)
        with torch.no_grad():
            acc = (z.argmax(1) == y).float().mean()
        return {"loss": float(loss), "acc": float(acc), "n": int(y.shape[0])}

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
            check_output(z, self.num_classes)
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
        """Apply the method's per-epoch work (``ssa``: the rank schedule) and step the learning-rate
        schedule after epoch ``self.epoch``. Returns the layers cut and their new ranks."""
        cut = self.rule.end_epoch(self.model, self.epoch, self.optimizer)
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.epoch += 1
        self.rule.epoch = self.epoch
        return cut

    def epoch_metrics(self, x_shape) -> dict:
        """``params``, ``flops`` (per layer and ``"total"``, one iteration of batch shape ``x_shape``),
        ``grad_angle`` (mean per layer over the epoch's measured steps) and ``matrix_angle``
        (DESIGN §10, :mod:`ssa.metrics`)."""
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
        ``checkpoint_dir``, writes ``best.pt`` when the validation accuracy improves and then
        ``latest.pt``, after every epoch (atomically, rank 0 only under ``torch.distributed``);
        ``resume=True`` continues from ``latest.pt`` there (same numbers as an uninterrupted run
        on the CPU). A non-finite loss stops the run with ``FloatingPointError`` and leaves the
        last good checkpoint in place. A loader that yields no batch raises ``ValueError``.
        """
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"Trainer.fit: epochs must be an int >= 1, got {epochs!r}")
        self.rule.set_epochs(epochs)
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
                    stats = {}
                    peak = metrics.peak_bytes(lambda x=x, y=y, o=stats: o.update(self.step(x, y)),
                                              self.device)
                else:
                    stats = self.step(x, y)
                loss_sum += stats["loss"] * stats["n"]
                acc_sum += stats["acc"] * stats["n"]
                count += stats["n"]
            if x_shape is None:
                raise ValueError(f"Trainer.fit: train_loader yielded no batch in epoch {self.epoch + 1}")
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
                acc = distributed.from_rank0(val.get("acc"))  # every rank decides alike: a collective write
                if acc is not None and acc > self.best_acc:
                    self.best_acc = acc
                    # best.pt first: a run that dies before latest.pt redoes this epoch and rewrites it
                    self.save_checkpoint(os.path.join(checkpoint_dir, "best.pt"), train_loader)
                self.save_checkpoint(latest, train_loader)
        return self.history

    # ------------------------------------------------------------------ state
    def settings(self) -> dict:
        """What a resumed run must share with the run that wrote the checkpoint."""
        return {"method": self.method, "num_classes": self.num_classes, "loss": self.loss.to_dict(),
                "factor_lr": dict(self.factor_lr), "seed": self.seed,
                "groups_lr": [g.get("initial_lr", g["lr"]) for g in self.optimizer.param_groups]}

    def state_dict(self) -> dict:
        """Model, ranks, the method's state, optimizer, schedules, RNG, epoch, history and settings."""
        return {
            "format": checkpoint.FORMAT, "method": self.method, "num_classes": self.num_classes,
            "model": self.model.state_dict(), "ranks": self.ranks(),
            "optimizer": self.optimizer.state_dict(),
            "feedback": {}, "schedule": None, **self.rule.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
            "loss": self.loss.to_dict(), "epoch": self.epoch, "step": self.step_count,
            "history": copy.deepcopy(self.history), "best_acc": self.best_acc, "settings": self.settings(),
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        }

    def check_state_dict(self, state: dict) -> None:
        """Raise ``ValueError`` if :meth:`load_state_dict` would fail or mix settings; changes nothing."""
        checkpoint.check_trainer_state(self, state)

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output; truncated layers are resized first.

        Everything is checked first (:meth:`check_state_dict`): a checkpoint that does not fit
        raises ``ValueError`` with the trainer and model unchanged.
        """
        self.check_state_dict(state)
        checkpoint.load_model_state(self.model, state["model"], what="checkpoint 'model'")
        self.optimizer.load_state_dict(state["optimizer"])
        self.rule.load_state_dict(state)
        if self.lr_scheduler is not None:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.epoch, self.step_count = int(state["epoch"]), int(state["step"])
        self.rule.epoch, self.rule.step_count = self.epoch, self.step_count
        self.history, self.best_acc = copy.deepcopy(state["history"]), float(state["best_acc"])
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"].get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])

    def save_checkpoint(self, path: str, train_loader=None) -> None:
        """Write :meth:`state_dict` (plus the loader's shuffle RNG) atomically to ``path``
        (:func:`ssa.checkpoint.save`: rank 0 writes under ``torch.distributed``)."""
        state = self.state_dict()
        gen = getattr(train_loader, "generator", None)
        state["rng"]["loader"] = gen.get_state() if isinstance(gen, torch.Generator) else None
        checkpoint.save(state, path)

    def load_checkpoint(self, path: str, train_loader=None) -> None:
        """Read ``path`` without running code (:func:`ssa.checkpoint.load`) and restore it (every rank
        reads)."""
        state = checkpoint.load(path, map_location=self.device)
        try:
            self.load_state_dict(state)
        except ValueError as err:
            raise ValueError(f"checkpoint {path!r}: {err}") from None
        gen = getattr(train_loader, "generator", None)
        if isinstance(gen, torch.Generator) and state["rng"].get("loader") is not None:
            gen.set_state(state["rng"]["loader"])


_DEFAULTS = {k: p.default for k, p in inspect.signature(Trainer.__init__).parameters.items()
             if p.default is not inspect.Parameter.empty}
#: Keywords routed to the methods that declare them.
_ROUTED = frozenset(_DEFAULTS) - frozenset(_COMMON) - {"method"}


def _check_int_or_none(name: str, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"Trainer: {name} must be None or an int >= 1, got {value!r}")
