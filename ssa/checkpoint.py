"""Checkpoint files: atomic, distributed-safe writes; safe, checked reads.

* :func:`save` writes a state dict atomically: a temporary file with a unique name in the
  target's folder, ``fsync``, then ``os.replace``. A reader (or a crash) sees the old file or
  the new one, never half of one. Under an initialised ``torch.distributed`` group only rank 0
  of the group writes; every rank then waits until the file is in place (and raises if rank 0
  failed), so ranks launched by ``torchrun`` no longer race on one shared temporary name.
* :func:`load` reads with ``torch.load(..., weights_only=True)``: tensors, numbers, strings,
  ``None`` and plain containers only, so a crafted checkpoint cannot run code. Every failure
  (missing, empty, truncated or corrupt file, unsafe content, not a dict, unknown
  ``"format"``) raises an error that names the file.
* :func:`validate_model_state` checks a model state dict against a model (keys, shapes with the
  rank of SSA layers free to differ, dtypes, SSA extra state) *before* the model is touched and
  raises one ``ValueError`` listing every problem; :func:`load_model_state` validates, then
  loads, and puts the model back as it was should the load itself still fail, so a bad
  checkpoint never leaves a half-resized model.
"""

from __future__ import annotations

import errno
import glob
import os
import pickle
import tempfile
import zipfile
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .layers import ACTIVATIONS, TARGETS, SSALayer

__all__ = ["FORMAT", "CheckpointError", "save", "load", "validate_model_state", "load_model_state",
           "check_trainer_state", "atomic_write", "write_text", "leftovers"]

#: The ``"format"`` the trainer writes into its state dict (``Trainer.state_dict``).
FORMAT = 1

_FEEDBACK = ("feedback_P", "feedback_sigma", "feedback_Q")
_TARGETS = ("target_U", "target_s", "target_V", "target_cols")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: empty, truncated, corrupt, unsafe or of the wrong kind."""


# ---------------------------------------------------------------------------- writing
def save(state: dict, path, *, group=None) -> None:
    """Write ``state`` to ``path`` atomically (``torch.save`` format).

    The bytes go to a uniquely named temporary file in ``path``'s folder (``tempfile.mkstemp``:
    two writers never share a temporary name), are flushed and ``fsync``-ed, and the file is
    moved over ``path`` with ``os.replace`` (atomic on POSIX and Windows); the folder is
    ``fsync``-ed too where the platform allows, so the rename survives a power cut. On any
    failure the temporary file is removed and ``path`` is left as it was. The new file gets
    the mode of the file it replaces, or ``0o666`` less the umask (what ``open`` would give).

    Under an initialised ``torch.distributed`` process group (``group``, default the world),
    only the group's rank 0 writes, and every rank of the group returns only once the file is
    in place: rank 0 broadcasts the outcome after ``os.replace`` (a collective, so every rank
    of the group must call :func:`save`, as with any collective). Other ranks raise
    ``RuntimeError`` if rank 0 failed; ``state`` is ignored on them (they may pass their own,
    identical, state). Without a process group, or with one rank, this is a plain atomic write.
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"checkpoint.save: state must be a dict, got {type(state).__name__}")
    path = os.fspath(path)
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        _atomic_save(state, path)
        return
    error = None
    if dist.get_rank(group) == 0:
        try:
            _atomic_save(state, path)
        except Exception as exc:  # noqa: BLE001 - told to every rank, then raised here
            error = exc
    status = [None if error is None else f"{type(error).__name__}: {error}"]
    # Rank 0 sends only after os.replace: no rank leaves before the file is complete.
    dist.broadcast_object_list(status, group=group, group_src=0, weights_only=True)
    if error is not None:
        raise error
    if status[0] is not None:
        raise RuntimeError(f"checkpoint.save: rank 0 failed to write {path!r}: {status[0]}")


def _new_file_mode(path: str) -> int:
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _atomic_save(state, path: str) -> None:
    atomic_write(path, lambda f: torch.save(state, f))


def atomic_write(path, write) -> None:
    """Call ``write(f)`` on a binary file that then replaces ``path`` atomically.

    A uniquely named temporary file in ``path``'s folder (``.<name>.<random>.tmp``), flushed and
    ``fsync``-ed, moved over ``path`` with ``os.replace``, the folder ``fsync``-ed: a reader or a
    crash sees the old file or the new one, never half of one; two writers never share a
    temporary. On failure the temporary is removed and ``path`` is left as it was; a killed
    process leaves it behind (:func:`leftovers` finds it). The new file keeps the mode of the one
    it replaces, or ``0o666`` less the umask.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), _new_file_mode(path))
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(folder)


def write_text(path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` with :func:`atomic_write` (results, histories, configs)."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def leftovers(path) -> list[str]:
    """Temporaries of :func:`atomic_write` for ``path`` that a killed process left in its folder."""
    folder, base = os.path.split(os.path.abspath(os.fspath(path)))
    return sorted(glob.glob(os.path.join(glob.escape(folder), f".{glob.escape(base)}.*.tmp")))


def _fsync_dir(folder: str) -> None:
    """Make the rename durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(folder, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- reading
def load(path, map_location=None, *, format: int | tuple[int, ...] | None = FORMAT) -> dict:
    """Read a checkpoint written by :func:`save` (or ``torch.save``) without running any code.

    ``torch.load(path, map_location, weights_only=True)``: tensors, numbers, strings,
    ``None``, lists, tuples and dicts load; anything else (classes, functions, ``os.system``,
    ``builtins.exec`` ...) is refused. The result must be a dict; with ``format`` (an int or a
    tuple of ints; default :data:`FORMAT`) its ``"format"`` entry must be one of them
    (``format=None``: no check, for state dicts of other kinds).

    Raises ``FileNotFoundError`` (missing file) or :class:`CheckpointError` (a ``ValueError``:
    empty, truncated or corrupt file, unsafe content, not a dict, wrong ``"format"``), each
    naming ``path``.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, f"checkpoint file not found: {path!r}", path)
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, f"checkpoint path is a folder, not a file: {path!r}", path)
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointError(f"checkpoint {path!r} is empty (0 bytes): the write that made it was "
                              "interrupted, or it is not a checkpoint")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        msg = str(exc)
        if "weights only" in msg.lower() or "weights_only" in msg.lower():
            detail = _unsafe_detail(msg)
            raise CheckpointError(f"checkpoint {path!r} was refused: it holds objects other than tensors, "
                                  f"numbers, strings and plain containers, which could run code when "
                                  f"loaded ({detail}); only load it with weights_only=False if you "
                                  f"trust its source") from exc
        raise CheckpointError(f"checkpoint {path!r} ({size} bytes) is corrupt or truncated: {msg}") from exc
    except (EOFError, RuntimeError, zipfile.BadZipFile, ValueError, OSError, TypeError,
            AttributeError, IndexError, KeyError) as exc:
        if isinstance(exc, OSError) and not isinstance(exc, zipfile.BadZipFile) and exc.filename:
            raise
        raise CheckpointError(f"checkpoint {path!r} ({size} bytes) could not be read: it is truncated or "
                              f"corrupt ({type(exc).__name__}: {exc or 'unexpected end of file'})") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path!r} holds a {type(state).__name__}, not a dict")
    if format is not None:
        allowed = (format,) if isinstance(format, int) else tuple(format)
        got = state.get("format")
        if got not in allowed:
            raise CheckpointError(f"checkpoint {path!r} has format {got!r}; this version reads "
                                  f"{' or '.join(map(str, allowed))}"
                                  + (" (no 'format' entry: not a trainer checkpoint?)"
                                     if got is None else ""))
    return state


def _unsafe_detail(msg: str) -> str:
    """The line of torch's refusal that names the offending global (``posix.system`` ...)."""
    lines = [line.strip() for line in msg.splitlines() if line.strip()]
    for line in lines:
        if "GLOBAL" in line or "Unsupported" in line or "WeightsUnpickler error" in line:
            return line
    return lines[0] if lines else "unsafe content"


# ---------------------------------------------------------------------------- model state
def validate_model_state(model: nn.Module, state_dict: Mapping, *, what: str = "state dict") -> None:
    """Check that ``model.load_state_dict(state_dict)`` (strict) would succeed, without touching
    ``model``; raise ``ValueError`` listing every problem otherwise.

    Checked: missing and unexpected keys; every entry a tensor (except ``_extra_state``);
    shapes equal to the model's, except the rank of SSA layers (:class:`ssa.SSALayer`), which
    resize on load: ``U (m×r)``, ``s (r)``, ``V (n×r)`` may hold any ``1 <= r <= min(m, n)``
    (the same ``r`` in all three; ``m, n`` fixed), the DFA feedback ``feedback_P (d×k)``,
    ``feedback_sigma (k)``, ``feedback_Q (C×k)`` any consistent ``k`` (``d`` fixed) and the
    alignment targets ``target_U (m×k)``, ``target_s (k)``, ``target_V (n×k)`` (optional),
    ``target_cols (k)`` any consistent ``k <= r``, with column indices in ``[0, r)``; these
    buffers may be present in the checkpoint and absent (``None``) in the model, and the
    targets absent in the checkpoint (the layer drops its own); dtypes of the same kind
    (floating point, complex, integer, bool) as the model's; the SSA layers' extra state
    (``r0``, ``frozen_rank``, ``seed``, ``activation``, ``targets``).
    """
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"{what}: expected a dict of tensors, got {type(state_dict).__name__}")
    problems: list[str] = []
    expected = model.state_dict()
    ssa_layers = {name + "." if name else "": m for name, m in model.named_modules()
                  if isinstance(m, SSALayer)}
    seen: set[str] = set()
    for prefix, layer in ssa_layers.items():
        seen.update(_check_ssa_layer(layer, prefix, state_dict, problems))
    extra_suffix = "_extra_state"
    missing = [k for k in expected if k not in state_dict and k not in seen]
    unexpected = [k for k in state_dict if k not in expected and k not in seen]
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(map(str, unexpected))}")
    for key, ref in expected.items():
        if key in seen or key not in state_dict:
            continue
        value = state_dict[key]
        if key.endswith(extra_suffix) and not isinstance(ref, Tensor):
            continue
        if not isinstance(value, Tensor):
            problems.append(f"{key}: expected a tensor, got {type(value).__name__}")
            continue
        if value.shape != ref.shape:
            problems.append(f"{key}: shape {tuple(value.shape)} in the checkpoint, "
                            f"{tuple(ref.shape)} in the model")
        if _kind(value.dtype) != _kind(ref.dtype):
            problems.append(f"{key}: dtype {value.dtype} in the checkpoint, {ref.dtype} in the model")
    if problems:
        raise ValueError(f"{what} does not fit the model ({len(problems)} problem"
                         f"{'s' if len(problems) > 1 else ''}):\n  " + "\n  ".join(problems))


def load_model_state(model: nn.Module, state_dict: Mapping, *, what: str = "state dict",
                     restore_on_error: bool = True) -> None:
    """:func:`validate_model_state`, then ``model.load_state_dict(state_dict)``.

    With ``restore_on_error`` (default) a copy of the model's state is kept while loading and
    loaded back should the load still raise (a module with checks of its own), SSA layers
    resizing back to their ranks: the model is either fully loaded or as it was. The copy costs
    one model's worth of memory; ``restore_on_error=False`` skips it.
    """
    validate_model_state(model, state_dict, what=what)
    backup = None
    if restore_on_error:
        backup = {k: v.detach().clone() if isinstance(v, Tensor) else v
                  for k, v in model.state_dict().items()}
    try:
        model.load_state_dict(state_dict)
    except BaseException:
        if backup is not None:
            _restore(model, backup)
        raise


def _restore(model: nn.Module, backup: dict) -> None:
    for prefix, layer in ((n + "." if n else "", m) for n, m in model.named_modules()
                          if isinstance(m, SSALayer)):
        for name in _FEEDBACK + _TARGETS:  # buffers that were None before the failed load
            if prefix + name not in backup and getattr(layer, name) is not None:
                setattr(layer, name, None)
    model.load_state_dict(backup)


def _kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    if dtype.is_floating_point:
        return "floating point"
    return "integer"


def _check_ssa_layer(layer: SSALayer, prefix: str, sd: Mapping, problems: list[str]) -> set[str]:
    """Check one SSA layer's entries (rank free); return the keys it took care of."""
    m, n = layer.factor_shape
    d = layer.feedback_width
    keys = {prefix + k for k in ("U", "s", "V") + _FEEDBACK + _TARGETS}

    def tensor(name, kind="floating point"):
        key = prefix + name
        if key not in sd:
            return None
        value = sd[key]
        if not isinstance(value, Tensor):
            problems.append(f"{key}: expected a tensor, got {type(value).__name__}")
            return None
        if _kind(value.dtype) != kind:
            problems.append(f"{key}: dtype {value.dtype}, expected {kind}")
        return value

    def shape_is(name, value, shape):
        if value is not None and tuple(value.shape) != shape:
            shown = tuple("k" if isinstance(x, str) else x for x in shape)
            problems.append(f"{prefix}{name}: shape {tuple(value.shape)}, expected {shown}")
            return False
        return value is not None

    # factors: U (m×r), s (r), V (n×r)
    U, s, V = tensor("U"), tensor("s"), tensor("V")
    for name in ("U", "s", "V"):
        if prefix + name not in sd:
            problems.append(f"missing key: {prefix}{name}")
    r = None
    if s is not None:
        if s.dim() != 1 or not 1 <= s.shape[0] <= min(m, n):
            problems.append(f"{prefix}s: shape {tuple(s.shape)}, expected (r,) with 1 <= r <= {min(m, n)}")
        else:
            r = s.shape[0]
    if r is not None:
        shape_is("U", U, (m, r))
        shape_is("V", V, (n, r))
    else:  # report the fixed dimensions at least
        for name, value, rows in (("U", U, m), ("V", V, n)):
            if value is not None and (value.dim() != 2 or value.shape[0] != rows):
                problems.append(f"{prefix}{name}: shape {tuple(value.shape)}, expected ({rows}, r)")

    # feedback: P (d×k), sigma (k), Q (C×k); required when the layer has one
    P, sig, Q = (tensor(k) for k in _FEEDBACK)
    present = [k for k in _FEEDBACK if prefix + k in sd]
    if present and len(present) != 3:
        problems.append(f"{prefix}: feedback incomplete, has {present} of {list(_FEEDBACK)}")
    elif not present and layer.feedback_P is not None:
        problems.append(f"missing keys: {', '.join(prefix + k for k in _FEEDBACK)} "
                        "(the layer has a feedback)")
    if sig is not None and P is not None and Q is not None:
        if sig.dim() != 1:
            problems.append(f"{prefix}feedback_sigma: shape {tuple(sig.shape)}, expected (k,)")
        else:
            k = sig.shape[0]
            shape_is("feedback_P", P, (d, k))
            if Q.dim() != 2 or Q.shape[1] != k:
                problems.append(f"{prefix}feedback_Q: shape {tuple(Q.shape)}, expected (C, {k})")

    # alignment targets: U (m×k), s (k), V (n×k, optional), cols (k) with k <= r
    tU, ts, tV = tensor("target_U"), tensor("target_s"), tensor("target_V")
    cols = tensor("target_cols", kind="integer")
    need = [k for k in ("target_U", "target_s", "target_cols") if prefix + k in sd]
    if need and len(need) != 3:
        problems.append(f"{prefix}: targets incomplete, has {need} of "
                        "['target_U', 'target_s', 'target_cols']")
    elif not need and prefix + "target_V" in sd:
        problems.append(f"{prefix}target_V without target_U, target_s, target_cols")
    if cols is not None and ts is not None:
        if cols.dim() != 1:
            problems.append(f"{prefix}target_cols: shape {tuple(cols.shape)}, expected (k,)")
        else:
            k = cols.shape[0]
            shape_is("target_s", ts, (k,))
            shape_is("target_U", tU, (m, k))
            shape_is("target_V", tV, (n, k))
            if r is not None and k > r:
                problems.append(f"{prefix}target_cols: {k} targets for rank {r}")
            elif r is not None and k and _kind(cols.dtype) == "integer":
                lo, hi = int(cols.min()), int(cols.max())
                if lo < 0 or hi >= r:
                    problems.append(f"{prefix}target_cols: column indices in [{lo}, {hi}], "
                                    f"expected in [0, {r})")

    # extra state (set_extra_state runs after the tensors are copied: a bad one would leave a
    # half-loaded layer)
    ekey = prefix + "_extra_state"
    keys.add(ekey)
    if ekey not in sd:
        problems.append(f"missing key: {ekey}")
    else:
        extra = sd[ekey]
        if not isinstance(extra, Mapping):
            problems.append(f"{ekey}: expected a dict, got {type(extra).__name__}")
        else:
            for name in ("r0", "frozen_rank", "seed"):
                if name not in extra:
                    problems.append(f"{ekey}: no {name!r}")
            for name in ("r0", "seed"):
                if name in extra and (isinstance(extra[name], bool) or not isinstance(extra[name], int)):
                    problems.append(f"{ekey}[{name!r}]: expected an int, got {extra[name]!r}")
            if "activation" in extra and extra["activation"] not in ACTIVATIONS:
                problems.append(f"{ekey}: unknown activation {extra['activation']!r}; known: {ACTIVATIONS}")
            if "targets" in extra and extra["targets"] not in TARGETS:
                problems.append(f"{ekey}: unknown targets {extra['targets']!r}; known: {TARGETS}")
            if "negative_slope" in extra and not isinstance(extra["negative_slope"], (int, float)):
                problems.append(f"{ekey}['negative_slope']: expected a number, "
                                f"got {extra['negative_slope']!r}")

    # bias and anything else the layer holds are checked like any other module's entries
    return keys

# ---------------------------------------------------------------------------- trainer state
def check_trainer_state(trainer, state) -> None:
    """Raise ``ValueError`` if ``trainer.load_state_dict(state)`` would fail or mix settings.

    Checked without changing anything: method and classes, the entries every trainer state has,
    the recorded settings (``trainer.settings()``: a resume with another lr, loss, seed … is
    refused, naming each), the model state (:func:`validate_model_state`), the optimizer's
    parameter groups, the method's own state and the learning-rate schedule.
    """
    if not isinstance(state, dict):
        raise ValueError(f"Trainer.load_state_dict: expected a dict, got {type(state).__name__}")
    if state.get("method") != trainer.method:
        raise ValueError(f"Trainer.load_state_dict: checkpoint of method {state.get('method')!r}, "
                         f"this trainer is {trainer.method!r}")
    if state.get("num_classes") != trainer.num_classes:
        raise ValueError(f"Trainer.load_state_dict: checkpoint for {state.get('num_classes')} classes, "
                         f"this trainer has {trainer.num_classes}")
    missing = [k for k in ("model", "optimizer", "epoch", "step", "history", "best_acc",
                           "rng") if k not in state]
    if missing:
        raise ValueError(f"Trainer.load_state_dict: the checkpoint lacks {missing}")
    recorded, now = state.get("settings"), trainer.settings()
    if isinstance(recorded, dict):
        differ = [f"{k}: {recorded[k]!r} in the checkpoint, {now[k]!r} here" for k in now
                  if k in recorded and recorded[k] != now[k]]
        if differ:
            raise ValueError("Trainer.load_state_dict: the checkpoint was trained with other settings "
                             "(resume with the same ones, or start a new run):\n  " + "\n  ".join(differ))
    validate_model_state(trainer.model, state["model"], what="checkpoint 'model'")
    opt, mine = state["optimizer"], trainer.optimizer.state_dict()
    groups = opt.get("param_groups") if isinstance(opt, dict) else None
    if (not isinstance(groups, list) or len(groups) != len(mine["param_groups"])
            or any(len(a.get("params", ())) != len(b["params"])
                   for a, b in zip(groups, mine["param_groups"]))):
        raise ValueError("Trainer.load_state_dict: the checkpoint's optimizer has other parameter groups "
                         "than this trainer's (another model, method or optimizer)")
    trainer.rule.check_state_dict(state)
    if (trainer.lr_scheduler is None) != (state.get("lr_scheduler") is None):
        raise ValueError("Trainer.load_state_dict: the checkpoint has "
                         f"{'no' if state.get('lr_scheduler') is None else 'a'} learning-rate schedule, "
                         f"this trainer {'has' if trainer.lr_scheduler is not None else 'has none'}")
