"""Method comparisons from a YAML config: ``python -m ssa compare --config configs/digits_mlp.yaml``.

Three modes, each training every (variant, seed) on the same data:

* ``compare`` (default) — one variant per entry of ``methods``: the shape of the paper's
  Table 1 (test accuracy mean ± std over seeds, parameters, ranks, training FLOPs per
  iteration, peak memory, wall time; DESIGN §10).
* ``ablation`` — SSA with each loss term dropped in turn (its coefficient set to 0, DESIGN §6)
  and without the rank schedule (§8): the paper's Table 3. Variants ``ssa (full)``,
  ``− align``, ``− ortho``, ``− cos`` / ``− hoyer`` (only where that term is on),
  ``− rank schedule`` (only where the schedule is on).
* ``sweep`` — one SSA run per value of one loss coefficient (the supplement's sensitivity
  figure), plus ``sweep.png``.

Config schema (YAML mapping; every field optional, defaults below; unknown keys, wrong types
and bad values raise ``ValueError("config field '<field>': …")`` naming the field, nested
fields as ``loss.align`` or ``overrides.ssa.lr``):

=================  ====================================================================
``name``           run name, default the file's stem (``"run"`` for a mapping); the CLI's
                   default output folder is ``runs/<name>``
``description``    free text (kept in ``config.yaml``)
``dataset``        one of :func:`ssa.data.available` (``digits``; ``mnist`` needs ``pip install .[data]``)
``data_root``      local folder of cifar10/cifar100/imagefolder (required for those;
                   checked by :func:`check_runtime`, never downloaded), ``~`` expanded
``augment``        random crop (4-pixel padding) + flip of the file datasets (``false``)
``model``          one of :func:`ssa.models.available` (``mlp``)
``model_kwargs``   keyword arguments of the model function, e.g. ``{hidden: [64, 64]}`` (``{}``)
``methods``        list of :data:`ssa.trainer.METHODS`, no repeats (``[ssa, bp]``)
``seeds``          list of distinct ints >= 0 (``[0]``); each seed seeds the data split and
                   shuffle and every method's initialisation
``epochs``         int >= 1 (``30``)
``batch_size``     int >= 1 (``64``)
``optimizer``      ``adam`` | ``adamw`` | ``sgd`` (``adam``)
``lr``             number > 0 (``1e-3``; a YAML string such as ``1e-3`` is read as a number)
``lr_milestones``  increasing epochs >= 1 after which the lr is multiplied by ``lr_gamma`` (``[]``)
``lr_gamma``       number > 0 (``0.1``)
``rank``           initial rank of SSA layers, int >= 1, ``{linear: r, conv: r}`` (clipped to each
                   layer's full rank) or ``null`` (full) (``null``)
``loss``           :class:`ssa.loss.LossConfig`: a preset name (``default``, ``v1``, ``v2``) or a
                   mapping of its fields, optionally with ``preset:`` as the starting point
                   (``default``); stored as the full mapping
``schedule``       ``default`` (:meth:`ssa.RankSchedule.default`, the library's timing), ``false``,
                   or a mapping of :class:`ssa.schedule.RankSchedule` options (``interval``,
                   ``zeta``, ``energy``, ``min_fraction``, ``start_epoch``, ``cap``,
                   ``include_output``, ``stop_epoch``; ``total_epochs`` is ``epochs``); ``true``
                   means the class defaults; ``ssa`` only (``default``)
``memory``         ``store`` | ``recompute`` (``store``)
``reorth_every``   int >= 1 or ``null`` (``null``)
``backend``        ``auto`` | ``reference`` | ``cpu`` | ``cuda`` | ``triton`` (``auto``)
``device``         a torch device string (``cpu``)
``align_every``    measure the gradient alignment angle every this many steps, or ``null``
``measure_memory`` record the peak memory of a training step (``false``)
``sgr_lambda``     reconciliation weight of ``sgr``, number >= 0 or ``null`` (trainer default)
``output_layer``   ``ssa`` | ``dense``: keep the output layer dense (``ssa``)
``init``           ``torch`` | ``paper`` (He for convolutions, Xavier for linear layers) (``torch``)
``factor_lr``      learning-rate multipliers of the SSA factors, e.g. ``{s: 10}``, ``{}`` for none, or
                   ``default`` (the trainer's: ``{s: 3}`` for ssa) (``default``)
``feedback``       ``gaussian`` | ``orthogonal`` structure of the DFA feedback (``gaussian``)
``skip``           qualified names of layers to leave dense (``[]``)
``overrides``      per-method settings, ``{method: {field: value}}`` for the fields ``epochs``,
                   ``batch_size``, ``optimizer``, ``lr``, ``lr_milestones``, ``lr_gamma``, ``rank``,
                   ``loss`` (a mapping without ``preset`` changes the top-level loss), ``schedule``
                   (a mapping changes the top-level schedule), ``memory``, ``reorth_every``,
                   ``backend``, ``align_every``, ``measure_memory``, ``sgr_lambda``,
                   ``output_layer``, ``init``, ``factor_lr``, ``feedback``, ``skip``
``variants``       instead of ``methods``: a list of named variants, each
                   ``{name: <unique>, method: <method>, <overridable fields>}`` over the top level
                   and that method's ``overrides`` (a study: every row in one run, same data,
                   split, shuffle and initial weights)
``truncate``       fractions in (0, 1]: after training, every dense variant is also evaluated
                   with its hidden layers cut by SVD to that fraction of their full rank (the
                   post-hoc low-rank baseline of ``params.png``) (``[]``)
``ablation``       terms dropped by ``--ablation``, among ``align``, ``ortho``, ``cos``, ``hoyer``,
                   ``schedule``; ``null``: every term that is on for ``ssa`` (``null``)
``sweep``          ``{field: <LossConfig coefficient>, values: [numbers >= 0]}`` for ``--sweep``
=================  ====================================================================

Outputs of :func:`run` in ``out``: ``config.yaml`` (the validated config, loadable again),
``results.json`` (per variant: settings, a summary and per seed the final and best test
top-1/top-5, parameters, ranks, training FLOPs per iteration, peak memory, wall time and the
history; rewritten after every finished run), ``history.csv`` (one row per variant, seed and
epoch, every per-epoch scalar; dict entries flattened as ``rank/<layer>``, ``flops/total``,
``grad_angle/<layer>``…), ``table.md`` (also printed) and the PNG plots of
:mod:`ssa.plots`. Means ± sample standard deviations (n − 1; 0 for one seed) over seeds.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import inspect
import io
import json
import math
import os
import re
import statistics
import time

import torch

from . import checkpoint, data, methods, models
from . import trainer as _trainer
from .loss import LossConfig
from .methods.dfa import FEEDBACKS, MEMORY_MODES
from .methods.ssa import OUTPUT_LAYERS
from .optim import OPTIMIZERS
from .schedule import RankSchedule

__all__ = ["MODES", "ABLATION_TERMS", "SWEEP_FIELDS", "OVERRIDABLE", "load_config", "read_config",
           "variants", "check_runtime", "run", "format_table", "tensorboard_writer", "replot", "cost_figure",
           "recorded", "resume_conflicts", "RESUME_FREE", "OUTPUT_FILES"]

MODES = ("compare", "ablation", "sweep")
ABLATION_TERMS = ("align", "ortho", "cos", "hoyer", "schedule")
LOSS_NUMBERS = tuple(f.name for f in dataclasses.fields(LossConfig) if f.type in ("float", float))
SWEEP_FIELDS = LOSS_NUMBERS
PRESETS = ("default", "v1", "v2")
BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")
OVERRIDABLE = ("epochs", "batch_size", "optimizer", "lr", "lr_milestones", "lr_gamma", "rank", "loss",
               "schedule", "memory", "reorth_every", "backend", "align_every", "measure_memory", "sgr_lambda",
               "output_layer", "init", "factor_lr", "feedback", "skip")
_SCHEDULE_FIELDS = {f.name: f.type for f in dataclasses.fields(RankSchedule) if f.name != "total_epochs"}
_ABLATION_LABEL = {"align": "− align", "ortho": "− ortho", "cos": "− cos", "hoyer": "− hoyer",
                   "schedule": "− rank schedule"}


# ---------------------------------------------------------------------------- field validators
def _bad(field: str, expected: str, value) -> ValueError:
    return ValueError(f"config field {field!r}: expected {expected}, got {value!r}")


def _int(field, value, lo=None, none=False):
    if value is None and none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or (lo is not None and value < lo):
        expected = "an int" if lo is None else f"an int >= {lo}"
        raise _bad(field, expected + (" or null" if none else ""), value)
    return value


def _float(field, value, lo=0.0, positive=False, none=False):
    if value is None and none:
        return None
    number = value
    if isinstance(value, str):  # YAML 1.1 reads ``1e-3`` (no dot) as a string
        try:
            number = float(value)
        except ValueError:
            number = None
    ok = (not isinstance(number, bool) and isinstance(number, (int, float)) and math.isfinite(number)
          and (number > lo if positive else number >= lo))
    if not ok:
        expected = f"a number {'>' if positive else '>='} {lo:g}"
        raise _bad(field, expected + (" or null" if none else ""), value)
    return float(number)


def _bool(field, value):
    if not isinstance(value, bool):
        raise _bad(field, "true or false", value)
    return value


def _choice(field, value, choices):
    if not isinstance(value, str) or value not in choices:
        raise _bad(field, f"one of {', '.join(choices)}", value)
    return value


def _str(field, value, none=False):
    if value is None and none:
        return None
    if not isinstance(value, str) or not value:
        raise _bad(field, "a non-empty string" + (" or null" if none else ""), value)
    return value


def _mapping(field, value, expected="a mapping"):
    if not isinstance(value, dict):
        raise _bad(field, expected, value)
    for key in value:
        if not isinstance(key, str):
            raise _bad(field, f"{expected} with string keys", value)
    return value


def _unknown(field, value: dict, allowed) -> None:
    for key in value:
        if key not in allowed:
            where = f"{field}.{key}" if field else key
            raise ValueError(f"config field {where!r}: unknown field; known: {', '.join(allowed)}")


def _name(field, value):
    value = _str(field, value)
    if value in (".", "..") or re.search(r"[/\\\x00]", value):
        raise _bad(field, "a name without path separators", value)
    return value


def _methods(field, value):
    known = _trainer.METHODS
    if not isinstance(value, list) or not value:
        raise _bad(field, f"a non-empty list of methods among {', '.join(known)}", value)
    for i, m in enumerate(value):
        if m not in known:
            raise _bad(f"{field}[{i}]", f"a method among {', '.join(known)}", m)
    if len(set(value)) != len(value):
        raise _bad(field, "a list without repeats", value)
    return list(value)


SEED_LIMIT = 2**32


def _seeds(field, value):
    if not isinstance(value, list) or not value:
        raise _bad(field, "a non-empty list of ints >= 0", value)
    for i, s in enumerate(value):
        if _int(f"{field}[{i}]", s, lo=0) >= SEED_LIMIT:
            raise _bad(f"{field}[{i}]", f"an int in 0..{SEED_LIMIT - 1}", s)
    if len(set(value)) != len(value):
        raise _bad(field, "a list without repeats", value)
    return list(value)


def _milestones(field, value):
    if not isinstance(value, list):
        raise _bad(field, "a list of increasing epochs >= 1", value)
    for i, m in enumerate(value):
        _int(f"{field}[{i}]", m, lo=1)
    if any(b <= a for a, b in zip(value, value[1:])):
        raise _bad(field, "a list of increasing epochs >= 1", value)
    return list(value)


def _device(field, value):
    _str(field, value)
    try:
        torch.device(value)
    except (RuntimeError, ValueError):
        raise _bad(field, "a torch device such as cpu, cuda or cuda:1", value) from None
    return value


def _data_root(field, value):
    value = _str(field, value, none=True)
    return None if value is None else os.path.expanduser(value)


def _class_error(field: str, err: Exception) -> ValueError:
    """A LossConfig / RankSchedule error (``"Cls: name must …"``) as a config error naming the field."""
    match = re.match(r"\w+: (\w+) ", str(err))
    sub = match.group(1) if match else None
    where = "epochs" if sub == "total_epochs" else f"{field}.{sub}" if sub else field
    message = str(err).split(": ", 1)[-1].replace("total_epochs", "epochs")
    return ValueError(f"config field {where!r}: {message}")


def _loss(field, value, base: dict | None = None) -> dict:
    """A preset name or a mapping → the full LossConfig field mapping."""
    if isinstance(value, str):
        value = {"preset": value}
    _mapping(field, value, f"a preset name ({', '.join(PRESETS)}) or a mapping of LossConfig fields")
    names = [f.name for f in dataclasses.fields(LossConfig)]
    _unknown(field, value, ["preset", *names])
    if "preset" in value:
        start = LossConfig.preset(_choice(f"{field}.preset", value["preset"], PRESETS)).to_dict()
    else:
        start = dict(base) if base is not None else LossConfig().to_dict()
    for key, v in value.items():
        if key in LOSS_NUMBERS:
            start[key] = _float(f"{field}.{key}", v)
        elif key != "preset":
            start[key] = v
    try:
        return LossConfig(**start).to_dict()
    except (TypeError, ValueError) as err:
        raise _class_error(field, err) from None


def _schedule(field, value, epochs: int, base: dict | bool | str | None = None):
    """``false``/``null`` → ``False``; ``default`` → ``"default"`` (:meth:`RankSchedule.default`);
    ``true`` or a mapping → every RankSchedule option but total_epochs."""
    if value is None or value is False:
        return False
    if value == "default":
        return "default"
    if value is True:
        value = {}
    _mapping(field, value, "false or a mapping of RankSchedule options")
    _unknown(field, value, list(_SCHEDULE_FIELDS))
    options = dict(base) if isinstance(base, dict) else {}
    for key, v in value.items():
        kind = _SCHEDULE_FIELDS[key]
        if kind in ("int", int):
            options[key] = _int(f"{field}.{key}", v, lo=0)
        elif kind == "int | None":
            options[key] = _int(f"{field}.{key}", v, lo=1, none=True)
        elif kind in ("bool", bool):
            options[key] = _bool(f"{field}.{key}", v)
        else:
            options[key] = _float(f"{field}.{key}", v, positive=True)
    try:
        schedule = RankSchedule(epochs, **options)
    except (TypeError, ValueError) as err:
        raise _class_error(field, err) from None
    return {k: v for k, v in schedule.to_dict().items() if k != "total_epochs"}


def _model_kwargs(field, value, model: str, dataset: str):
    """Known keyword arguments of the model function; layer widths (``hidden``) lists of ints >= 1;
    then the model is built on the meta device (no memory, no data) so that any other bad value
    fails here, before anything is written, rather than in the middle of a run."""
    _mapping(field, value)
    fn = getattr(models, model, None)
    if callable(fn):
        params = [p for p in list(inspect.signature(fn).parameters)[2:]]
        _unknown(field, value, params)
    if "hidden" in value:
        hidden = value["hidden"]
        if not isinstance(hidden, (list, tuple)):
            raise _bad(f"{field}.hidden", "a list of layer widths (ints >= 1)", hidden)
        for i, width in enumerate(hidden):
            _int(f"{field}.hidden[{i}]", width, lo=1)
        value = {**value, "hidden": list(hidden)}
    classes, shape = data._DATASETS.get(dataset, (None, None))
    try:
        with torch.device("meta"):
            models.get(model, classes or 10, shape or (3, 32, 32), **value)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"config field {field!r}: model {model!r} cannot be built with {value!r}: "
                         f"{err}") from None
    return dict(value)


def _sweep(field, value):
    if value is None:
        return None
    _mapping(field, value, "null or a mapping {field: <loss coefficient>, values: [...]}")
    _unknown(field, value, ["field", "values"])
    if "field" not in value or "values" not in value:
        raise _bad(field, "a mapping with keys field and values", value)
    name = _choice(f"{field}.field", value["field"], SWEEP_FIELDS)
    values = value["values"]
    if not isinstance(values, list) or not values:
        raise _bad(f"{field}.values", "a non-empty list of numbers >= 0", values)
    values = [_float(f"{field}.values[{i}]", v) for i, v in enumerate(values)]
    if len(set(values)) != len(values):
        raise _bad(f"{field}.values", "a list without repeats", value["values"])
    return {"field": name, "values": values}


def _ablation(field, value):
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        raise _bad(field, f"null or a non-empty list among {', '.join(ABLATION_TERMS)}", value)
    for i, term in enumerate(value):
        _choice(f"{field}[{i}]", term, ABLATION_TERMS)
    if len(set(value)) != len(value):
        raise _bad(field, "a list without repeats", value)
    return list(value)


# ---------------------------------------------------------------------------- the schema
def _defaults() -> dict:
    return {
        "name": "run", "description": None, "dataset": "digits", "data_root": None, "augment": False,
        "model": "mlp", "model_kwargs": {}, "methods": ["ssa", "bp"], "seeds": [0], "epochs": 30,
        "batch_size": 64, "optimizer": "adam", "lr": 1e-3, "lr_milestones": [], "lr_gamma": 0.1, "rank": None,
        "loss": "default", "schedule": "default", "memory": "store", "reorth_every": None,
        "backend": "auto", "device": "cpu", "align_every": None, "measure_memory": False, "sgr_lambda": None,
        "output_layer": "ssa", "init": "torch", "factor_lr": "default", "feedback": "gaussian", "skip": [],
        "overrides": {}, "variants": None, "truncate": [], "ablation": None, "sweep": None,
    }


def _validator(key: str):
    """The validator ``(field, value) -> value`` of a plain overridable field."""
    optimizers = OPTIMIZERS
    memory_modes = MEMORY_MODES
    validators = {
        "epochs": lambda f, v: _int(f, v, lo=1),
        "batch_size": lambda f, v: _int(f, v, lo=1),
        "optimizer": lambda f, v: _choice(f, v, optimizers),
        "lr": lambda f, v: _float(f, v, positive=True),
        "lr_milestones": _milestones,
        "lr_gamma": lambda f, v: _float(f, v, positive=True),
        "rank": _rank,
        # the trainer's constants where it exports them (it is being split into ssa.methods)
        "output_layer": lambda f, v: _choice(f, v, OUTPUT_LAYERS),
        "init": lambda f, v: _choice(f, v, _trainer.INITS),
        "feedback": lambda f, v: _choice(f, v, FEEDBACKS),
        "factor_lr": _factor_lr,
        "skip": _skip,
        "memory": lambda f, v: _choice(f, v, memory_modes),
        "reorth_every": lambda f, v: _int(f, v, lo=1, none=True),
        "backend": lambda f, v: _choice(f, v, BACKENDS),
        "align_every": lambda f, v: _int(f, v, lo=1, none=True),
        "measure_memory": _bool,
        "sgr_lambda": lambda f, v: _float(f, v, none=True),
    }
    return validators[key]


def _rank(field, value):
    if isinstance(value, dict):
        _unknown(field, value, ["linear", "conv"])
        return {k: _int(f"{field}.{k}", v, lo=1, none=True) for k, v in value.items()}
    return _int(field, value, lo=1, none=True)


def _factor_lr(field, value):
    if value == "default":
        return value
    _mapping(field, value, "default or a mapping {U|s|V: multiplier}")
    _unknown(field, value, ["U", "s", "V"])
    return {k: _float(f"{field}.{k}", v, positive=True) for k, v in value.items()}


def _skip(field, value):
    if not isinstance(value, list):
        raise _bad(field, "a list of layer names", value)
    return [_str(f"{field}[{i}]", v) for i, v in enumerate(value)]


def _truncate(field, value):
    if not isinstance(value, list):
        raise _bad(field, "a list of fractions in (0, 1]", value)
    out = [_float(f"{field}[{i}]", v, positive=True) for i, v in enumerate(value)]
    if any(v > 1 for v in out):
        raise _bad(field, "a list of fractions in (0, 1]", value)
    return sorted(set(out), reverse=True)


def _variants(field, value, config: dict):
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        raise _bad(field, "null or a non-empty list of {name, method, <fields>}", value)
    out, names = [], set()
    for i, entry in enumerate(value):
        where = f"{field}[{i}]"
        _mapping(where, entry, "a mapping {name, method, <overridable fields>}")
        _unknown(where, entry, ["name", "method", *OVERRIDABLE])
        if "name" not in entry or "method" not in entry:
            raise _bad(where, "a mapping with keys name and method", entry)
        name = _str(f"{where}.name", entry["name"])
        if name in names:
            raise _bad(f"{where}.name", "a name no other variant has", name)
        names.add(name)
        method = _choice(f"{where}.method", entry["method"], _trainer.METHODS)
        fields = {k: v for k, v in entry.items() if k not in ("name", "method")}
        done = _overrides(where, {method: fields}, config, flat=True)[method]
        out.append({"name": name, "method": method, **done})
    return out


def read_config(path) -> dict:
    """The raw mapping of a YAML config file (``FileNotFoundError``; ``ValueError`` if not a mapping)."""
    import yaml

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} not found")
    with open(path) as f:
        try:
            raw = yaml.safe_load(f)
        except yaml.YAMLError as err:
            raise ValueError(f"config file {path!r} is not valid YAML: {err}") from None
    if raw is None:  # an empty file (or only comments) would silently run the default job
        raise ValueError(f"config file {path!r} is empty: give at least the fields that differ from the "
                         "defaults (schema in ssa/compare.py; e.g. configs/digits_mlp.yaml), or '{}' to run "
                         "the defaults")
    if not isinstance(raw, dict):
        raise ValueError(f"config file {path!r}: expected a mapping of fields, got {type(raw).__name__}")
    return raw


def load_config(source, overrides: dict | None = None) -> dict:
    """Validate a config (a YAML path or a mapping) and fill in the defaults; see the module docstring.

    ``overrides`` replace top-level fields before validation (the CLI's ``--epochs``, ``--seeds``…).
    Raises ``ValueError`` naming the field, ``FileNotFoundError`` for a missing file. The result
    validates again to itself (it is what ``config.yaml`` holds).
    """
    if isinstance(source, (str, os.PathLike)):
        raw = read_config(source)
        stem = os.path.splitext(os.path.basename(os.fspath(source)))[0]
    else:
        if not isinstance(source, dict):
            raise TypeError(f"load_config: expected a path or a mapping, got {type(source).__name__}")
        raw, stem = copy.deepcopy(source), "run"
    raw = {**raw, **(overrides or {})}
    for key in raw:
        if not isinstance(key, str):
            raise ValueError(f"config field {key!r}: field names must be strings")
    defaults = _defaults()
    _unknown("", raw, list(defaults))
    c = {**defaults, "name": stem, **raw}
    out: dict = {}
    out["name"] = _name("name", c["name"])
    if isinstance(c.get("variants"), list):  # the methods a study trains (for the checks below)
        c["methods"] = list(dict.fromkeys(v.get("method") for v in c["variants"] if isinstance(v, dict)
                                          and v.get("method") in _trainer.METHODS)) or c["methods"]
    out["description"] = _str("description", c["description"], none=True)
    out["dataset"] = _choice("dataset", c["dataset"], data.available())
    out["data_root"] = _data_root("data_root", c["data_root"])
    out["augment"] = _bool("augment", c["augment"])
    if out["augment"] and out["dataset"] in ("digits", "mnist"):
        raise ValueError(f"config field 'augment': dataset {out['dataset']!r} has no augmentation "
                         "(set augment: false)")
    out["model"] = _choice("model", c["model"], models.available())
    out["model_kwargs"] = _model_kwargs("model_kwargs", c["model_kwargs"], out["model"], out["dataset"])
    out["methods"] = _methods("methods", c["methods"])
    out["seeds"] = _seeds("seeds", c["seeds"])
    out["epochs"] = _validator("epochs")("epochs", c["epochs"])
    out["batch_size"] = _int("batch_size", c["batch_size"], lo=1)
    for key in ("optimizer", "lr", "lr_milestones", "lr_gamma", "rank", "output_layer", "init", "factor_lr",
                "feedback", "skip"):
        out[key] = _validator(key)(key, c[key])
    out["loss"] = _loss("loss", c["loss"])
    out["schedule"] = _schedule("schedule", c["schedule"], out["epochs"])
    for key in ("memory", "reorth_every", "backend"):
        out[key] = _validator(key)(key, c[key])
    out["device"] = _device("device", c["device"])
    for key in ("align_every", "measure_memory", "sgr_lambda"):
        out[key] = _validator(key)(key, c[key])
    out["overrides"] = _overrides("overrides", c["overrides"], out)
    if c["variants"] is not None and "methods" in raw and raw["methods"] != c["methods"]:
        raise ValueError("config field 'variants': give either methods or variants, not both (methods, "
                         "when present, must list the variants' methods in order)")
    out["variants"] = _variants("variants", c["variants"], out)
    out["truncate"] = _truncate("truncate", c["truncate"])
    out["ablation"] = _ablation("ablation", c["ablation"])
    out["sweep"] = _sweep("sweep", c["sweep"])
    return out


def _overrides(field, value, config: dict, flat: bool = False) -> dict:
    _mapping(field, value, "a mapping {method: {field: value}}")
    out = {}
    for method, fields in value.items():
        where = field if flat else f"{field}.{method}"
        if method not in _trainer.METHODS:
            raise ValueError(f"config field {where!r}: unknown method; known: {', '.join(_trainer.METHODS)}")
        _mapping(where, fields, f"a mapping of fields among {', '.join(OVERRIDABLE)}")
        for key in fields:
            if key not in OVERRIDABLE:
                raise ValueError(f"config field '{where}.{key}': not overridable per method; "
                                 f"overridable: {', '.join(OVERRIDABLE)}")
        done = {}
        for key in OVERRIDABLE:  # schema order: ``schedule`` is checked against the method's ``epochs``
            if key not in fields:
                continue
            if key == "loss":
                done[key] = _loss(f"{where}.loss", fields[key], base=config["loss"])
            elif key == "schedule":
                epochs = done.get("epochs", config["epochs"])
                done[key] = _schedule(f"{where}.schedule", fields[key], epochs, base=config["schedule"])
            else:
                done[key] = _validator(key)(f"{where}.{key}", fields[key])
        if "epochs" in done and "schedule" not in done and isinstance(config["schedule"], dict):
            try:  # the top-level schedule must fit the method's epochs
                RankSchedule(done["epochs"], **config["schedule"])
            except ValueError as err:
                raise ValueError(f"config field '{where}.epochs': {str(err).split(': ', 1)[-1]}") from None
        out[method] = done
    return out


# ---------------------------------------------------------------------------- variants
def settings(config: dict, method: str) -> dict:
    """The overridable fields for ``method``: the top level with ``overrides[method]`` applied."""
    s = {k: copy.deepcopy(config[k]) for k in OVERRIDABLE}
    s.update(copy.deepcopy(config["overrides"].get(method, {})))
    return s


def variants(config: dict, mode: str = "compare") -> list[dict]:
    """The variants a mode trains: ``[{"name", "method", "settings", ("value")}]``.

    Raises ``ValueError`` naming the field when the config does not allow the mode (no
    ``sweep:`` for ``sweep``; an ablation term that is already off).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "compare":
        if config.get("variants"):
            out = []
            for v in config["variants"]:
                s = settings(config, v["method"])
                s.update(copy.deepcopy({k: x for k, x in v.items() if k not in ("name", "method")}))
                out.append({"name": v["name"], "method": v["method"], "settings": s})
            return out
        return [{"name": m, "method": m, "settings": settings(config, m)} for m in config["methods"]]
    base = settings(config, "ssa")
    if mode == "sweep":
        sweep = config["sweep"]
        if sweep is None:
            raise ValueError("config field 'sweep': required by the sweep mode, e.g. "
                             "sweep: {field: align, values: [0.001, 0.01, 0.1]}")
        out = []
        for value in sweep["values"]:
            s = copy.deepcopy(base)
            s["loss"] = _loss("sweep.values", {sweep["field"]: value}, base=s["loss"])
            out.append({"name": f"{sweep['field']}={value:g}", "method": "ssa", "settings": s,
                        "value": value})
        return out
    on = {t: base["loss"][t] > 0 for t in ("align", "ortho", "cos", "hoyer")}
    on["schedule"] = bool(base["schedule"])
    terms = config["ablation"]
    if terms is None:
        terms = [t for t in ABLATION_TERMS if on[t] and not (t == "hoyer" and not on["schedule"])]
    for term in terms:
        if not on[term]:
            what = "schedule is false" if term == "schedule" else f"loss.{term} is 0"
            raise ValueError(f"config field 'ablation': term {term!r} is already off for ssa ({what})")
    out = [{"name": "ssa (full)", "method": "ssa", "settings": base}]
    for term in terms:
        s = copy.deepcopy(base)
        if term == "schedule":
            s["schedule"] = False
        else:
            s["loss"] = {**s["loss"], term: 0.0}
        out.append({"name": _ABLATION_LABEL[term], "method": "ssa", "settings": s})
    return out


def check_runtime(config: dict) -> None:
    """Checks that need the machine: data present (``data_root``), CUDA device.

    Raises ``ValueError`` naming the field; ``run`` and the CLI call it before writing anything.
    """
    try:
        data.check(config["dataset"], config["data_root"], config["augment"])
    except (FileNotFoundError, ValueError, ImportError) as err:
        raise ValueError(f"config field 'data_root': {err}") from None
    if torch.device(config["device"]).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"config field 'device': {config['device']!r} but no CUDA device is available")


def _make_trainer(model, classes: int, method: str, s: dict, seed: int, device: str):
    if method != "ssa" or not s["schedule"]:
        schedule = None
    elif s["schedule"] == "default":
        schedule = RankSchedule.default(s["epochs"])
    else:
        schedule = RankSchedule(s["epochs"], **s["schedule"])
    extra = {k: s[k] for k in ("output_layer", "init", "factor_lr", "feedback", "skip") if k in s}
    if "skip" in extra:
        extra["skip"] = tuple(extra["skip"])
    if s["sgr_lambda"] is not None:
        extra["sgr_lambda"] = s["sgr_lambda"]
    # one set of settings for every method: each gets the options that apply to it
    options = methods.applicable(method, dict(
        extra, loss=LossConfig(**s["loss"]), optimizer=s["optimizer"], lr=s["lr"], schedule=schedule,
        memory=s["memory"], reorth_every=s["reorth_every"], seed=seed, rank=s["rank"], backend=s["backend"],
        device=device, lr_milestones=s["lr_milestones"], lr_gamma=s["lr_gamma"], align_every=s["align_every"],
        measure_memory=s["measure_memory"]))
    return _trainer.Trainer(model, classes, method=method, **options)


# ---------------------------------------------------------------------------- results
def _number(x) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float))


def _run_result(seed: int, trainer, hist: list[dict], final: dict, wall: float) -> dict:
    flops = hist[-1].get("flops") if hist else None
    peaks = [h["peak_mem"] for h in hist if _number(h.get("peak_mem"))]
    flops_total = flops.get("total") if isinstance(flops, dict) else flops if _number(flops) else None
    return {"seed": seed, "test_acc": final["acc"], "test_top5": final["top5"], "test_loss": final["loss"],
            "best_test_acc": max((h["val_acc"] for h in hist if h.get("val_acc") is not None),
                                 default=final["acc"]),
            "params": trainer.param_count(), "ranks": trainer.ranks(), "flops": flops_total,
            "peak_mem": peaks[-1] if peaks else None, "wall_s": wall, "epochs": len(hist),
            "history": copy.deepcopy(hist)}


def _stats(values: list) -> dict | None:
    values = [v for v in values if _number(v)]
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def _summary(runs: list[dict]) -> dict:
    out = {k: _stats([r[k] for r in runs])
           for k in ("test_acc", "test_top5", "best_test_acc", "params", "flops", "peak_mem", "wall_s")}
    layers = list(dict.fromkeys(n for r in runs for n in r["ranks"]))
    out["ranks"] = {n: statistics.fmean(r["ranks"][n] for r in runs if n in r["ranks"]) for n in layers}
    cut = [t for r in runs for t in r.get("truncated", [])]
    fractions = sorted({t["fraction"] for t in cut}, reverse=True)
    if fractions:
        out["truncated"] = [{"fraction": f,
                             "params": _stats([t["params"] for t in cut if t["fraction"] == f]),
                             "acc": _stats([t["acc"] for t in cut if t["fraction"] == f])} for f in fractions]
    return out


def _flatten(row: dict) -> dict:
    """Per-epoch scalars of a history row; dict entries as ``<key>/<sub>`` (``ranks`` → ``rank/…``)."""
    out = {}
    for key, value in row.items():
        if isinstance(value, dict):
            prefix = "rank" if key == "ranks" else key
            for sub, x in value.items():
                if x is None or _number(x):
                    out[f"{prefix}/{sub}"] = x
        elif value is None or _number(value):
            out[key] = value
    return out


_HISTORY_HEAD = ["variant", "method", "seed", "epoch", "train_loss", "train_acc", "val_loss", "val_acc",
                 "val_top5", "time_s"]


def _write_history(path: str, results: list[dict]) -> None:
    rows = [(v["variant"], v["method"], r["seed"], _flatten(h)) for v in results for r in v["runs"]
            for h in r["history"]]
    # First-appearance order (model order of layers), grouped by prefix, after the fixed head.
    groups: dict[str, dict[str, None]] = {"": {}}  # plain scalars first, then rank/…, flops/…
    for *_, flat in rows:
        for key in flat:
            if key not in _HISTORY_HEAD:
                groups.setdefault(key.split("/", 1)[0] if "/" in key else "", {})[key] = None
    cols = _HISTORY_HEAD + [k for g in groups.values() for k in g]
    f = io.StringIO(newline="")
    w = csv.writer(f)
    w.writerow(cols)
    for variant, method, seed, flat in rows:
        cells = [variant, method, seed] + [flat.get(c) for c in cols[3:]]
        w.writerow(["" if c is None else c for c in cells])
    checkpoint.write_text(path, f.getvalue())


def _write_json(path: str, obj) -> None:
    checkpoint.write_text(path, json.dumps(obj, indent=1))


# ---------------------------------------------------------------------------- the table
def _unit(values: list[float], units: list[tuple[str, float]]) -> tuple[str, float]:
    peak = max((abs(v) for v in values), default=0.0)
    chosen = units[0]
    for name, scale in units:
        if peak >= scale:
            chosen = (name, scale)
    return chosen


def _pm(stat: dict | None, scale: float = 1.0, digits: int | None = 2) -> str:
    if stat is None:
        return "—"
    if digits is None:  # wall times: 0.42 s, 12.3 s, 1234 s
        mean = abs(stat["mean"] / scale)
        digits = 2 if mean < 10 else 1 if mean < 1000 else 0
    return f"{stat['mean'] / scale:.{digits}f} ± {stat['std'] / scale:.{digits}f}"


def _ranks(ranks: dict) -> str:
    if not ranks:
        return "dense"
    return "/".join(f"{r:.0f}" if float(r).is_integer() else f"{r:.1f}" for r in ranks.values())


def format_table(results: dict) -> str:
    """The markdown table of :func:`run`'s results (rows = variants; top-1/top-5 in %, mean ± std)."""
    rows = results["variants"]
    flops_unit = _unit([v["summary"]["flops"]["mean"] for v in rows if v["summary"]["flops"]],
                       [("MFLOP", 1e6), ("GFLOP", 1e9), ("TFLOP", 1e12)])
    head = ["variant", "top-1 (%)", "top-5 (%)", "params", "ranks", f"train {flops_unit[0]}/iter",
            "step peak (MiB)", "wall (s)"]
    body = []
    for v in rows:
        s = v["summary"]
        bad = sum(1 for r in v["runs"] if r.get("diverged"))
        body.append([v["variant"] + (f" ({bad} diverged)" if bad else ""), _pm(s["test_acc"], 0.01),
                     _pm(s["test_top5"], 0.01),
                     f"{s['params']['mean']:,.0f}" if s["params"] else "—", _ranks(s["ranks"]),
                     f"{s['flops']['mean'] / flops_unit[1]:,.2f}" if s["flops"] else "—",
                     f"{s['peak_mem']['mean'] / 2**20:,.2f}" if s["peak_mem"] else "—",
                     _pm(s["wall_s"], 1.0, None)])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    config = results["config"]
    title = (f"{config['name']} ({results['mode']}): {config['model']} on {config['dataset']}, "
             f"{config['epochs']} epochs, seeds {', '.join(map(str, config['seeds']))}; "
             f"test accuracy mean ± std over seeds")
    note = ("FLOPs: analytic, one training iteration (forward + update) in the last epoch, at its ranks. "
            "Step peak: memory allocated during one training step of the last epoch beyond what was "
            "allocated before it (parameters, optimizer state), from the CUDA allocator or the CPU profiler.")
    return "\n".join([title, "", line(head), line(["-" * w for w in widths])] + [line(b) for b in body]
                     + ["", note])


# ---------------------------------------------------------------------------- running
def tensorboard_writer():
    """``torch.utils.tensorboard.SummaryWriter``; ``ImportError`` without the ``tensorboard`` package."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except (ImportError, ModuleNotFoundError) as err:
        raise ImportError("TensorBoard logging needs the tensorboard package: "
                          "pip install tensorboard") from err
    return SummaryWriter


def _log_tensorboard(writer_cls, folder: str, hist: list[dict]) -> None:
    writer = writer_cls(log_dir=folder)
    try:
        for row in hist:
            step = row.get("epoch")
            for tag, value in _flatten(row).items():
                if tag != "epoch" and value is not None:
                    writer.add_scalar(tag, value, step)
    finally:
        writer.close()


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", name.replace("−", "no")).strip("_") or "variant"


def run(config, out: str, mode: str = "compare", quiet: bool = True, tensorboard: str | None = None,
        plots: bool = True, resume: bool = False) -> dict:
    """Train every (variant, seed) of ``mode`` and write the outputs (module docstring) into ``out``.

    ``config``: a path, a raw mapping or a validated config. Per seed the data loaders are built
    once; before every variant ``torch.manual_seed(seed)`` and the loader's shuffle generator are
    reset, so every variant starts from the same initialisation and sees the same batches.
    ``quiet``: no progress bars or per-run lines (the table is printed anyway). ``tensorboard``:
    a folder for per-epoch scalars (``<folder>/<variant>/seed<k>``). ``resume``: keep the runs of
    an earlier, interrupted ``run`` of the same config and mode in ``out`` (its ``results.json``)
    and train only the missing (variant, seed) pairs; a config or mode that differs from the
    recorded one (:func:`resume_conflicts`) raises ``ValueError`` naming every differing field,
    before anything is written. A run whose loss turns non-finite is kept, marked ``"diverged"`` (the
    message), with the test accuracy of its last good step; the table counts such runs. Returns
    the dict written to ``results.json``.
    """
    import yaml

    config = load_config(config)
    plan = variants(config, mode)
    check_runtime(config)
    writer_cls = tensorboard_writer() if tensorboard else None
    if resume:
        conflicts = resume_conflicts(config, out, mode)
        if conflicts:
            raise ValueError(f"compare: cannot resume the run in {out}: its config or mode differs from "
                             f"this one (another config): {'; '.join(conflicts)}. Resume with the same "
                             "config, or write to another --out")
    os.makedirs(out, exist_ok=True)
    checkpoint.write_text(os.path.join(out, "config.yaml"), yaml.safe_dump(config, sort_keys=False,
                                                                            allow_unicode=True))
    results = {"name": config["name"], "mode": mode, "config": config,
               "variants": [{"variant": v["name"], "method": v["method"], "settings": v["settings"],
                             **({"value": v["value"]} if "value" in v else {}), "runs": [], "summary": None}
                            for v in plan]}
    total, done = len(plan) * len(config["seeds"]), 0
    if resume and os.path.exists(os.path.join(out, "results.json")):
        with open(os.path.join(out, "results.json")) as f:
            earlier = json.load(f)
        # A variant keeps its runs when its name and settings are unchanged (variants may be added).
        kept = {v["variant"]: v["runs"] for v in earlier["variants"]}
        before = {v["variant"]: v["settings"] for v in earlier["variants"]}
        for entry in results["variants"]:
            if before.get(entry["variant"]) != json.loads(json.dumps(entry["settings"])):
                continue
            entry["runs"] = list(kept.get(entry["variant"], []))
            entry["summary"] = _summary(entry["runs"]) if entry["runs"] else None
            done += len(entry["runs"])
    for seed in config["seeds"]:
        loaders: dict[int, tuple] = {}
        for v, entry in zip(plan, results["variants"]):
            if any(r["seed"] == seed for r in entry["runs"]):
                continue  # kept from an interrupted run (resume)
            s = v["settings"]
            batch = s.get("batch_size", config["batch_size"])
            if batch not in loaders:
                loaders[batch] = data.get(config["dataset"], batch, seed, root=config["data_root"],
                                          augment=config["augment"])
            train_loader, test_loader, classes, in_shape = loaders[batch]
            torch.manual_seed(seed)
            train_loader.generator.manual_seed(seed)
            model = models.get(config["model"], classes, in_shape, **config["model_kwargs"])
            trainer = _make_trainer(model, classes, v["method"], s, seed, config["device"])
            start = time.perf_counter()
            diverged = None
            try:
                hist = trainer.fit(train_loader, s["epochs"], val_loader=test_loader, progress=not quiet)
            except FloatingPointError as err:  # a diverging variant is a result too, not a crash
                hist, diverged = trainer.history, str(err)
            wall = time.perf_counter() - start
            result = _run_result(seed, trainer, hist, trainer.evaluate(test_loader), wall)
            result["diverged"] = diverged
            if config.get("truncate") and not trainer.ssa_layers():
                from .metrics import truncated_accuracy

                result["truncated"] = truncated_accuracy(trainer.model, test_loader, config["truncate"])
            entry["runs"].append(result)
            entry["summary"] = _summary(entry["runs"])
            done += 1
            if not quiet:
                print(f"[{done}/{total}] {v['name']} seed {seed}: test acc {100 * result['test_acc']:.2f} % "
                      f"({wall:.1f} s){' DIVERGED' if diverged else ''}", flush=True)
            if writer_cls is not None:
                _log_tensorboard(writer_cls, os.path.join(tensorboard, _safe(v["name"]), f"seed{seed}"), hist)
            _write_json(os.path.join(out, "results.json"), results)  # partial results survive a crash
            _write_history(os.path.join(out, "history.csv"), results["variants"])
            del trainer, model
    table = format_table(results)
    checkpoint.write_text(os.path.join(out, "table.md"), table + "\n")
    written = ["config.yaml", "results.json", "history.csv", "table.md"]
    if plots:
        written += [os.path.basename(p) for p in _plots(results, out)]
    results["files"] = written
    _write_json(os.path.join(out, "results.json"), results)
    print(table)
    print(f"wrote {out}/: {' '.join(written)}")
    return results


# Fields a resume may change: free text and the data's location (the data is the same), plus those
# compared per variant (a variant whose settings changed is trained again, new variants are added).
RESUME_FREE = ("description", "data_root", "sweep", "ablation", "variants")
# What run() writes into ``out`` (what the CLI's --overwrite deletes, nothing else).
OUTPUT_FILES = ("config.yaml", "results.json", "history.csv", "table.md", "curves.png", "ranks.png",
                "grad_angle.png", "matrix_angle.png", "costs.png", "params.png", "sweep.png")


def recorded(out: str) -> tuple[dict, str | None, str] | None:
    """The run recorded in ``out``: ``(config, mode, path)`` from ``results.json`` (written after
    every finished run) or else ``config.yaml`` (written first; mode ``None``), or ``None`` when
    ``out`` holds neither. ``ValueError`` naming the file when it is unreadable."""
    import yaml

    for name in ("results.json", "config.yaml"):
        path = os.path.join(out, name)
        if not os.path.isfile(path):
            continue
        try:
            with open(path) as f:
                raw = json.load(f) if name == "results.json" else {"config": yaml.safe_load(f)}
            return load_config(raw["config"]), raw.get("mode"), path
        except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError) as err:
            raise ValueError(f"{path}: cannot read the earlier run's config to resume it ({err}); "
                             "start anew with another output folder (or the CLI's --overwrite)") from None
    return None


def resume_conflicts(config: dict, out: str, mode: str) -> list[str]:
    """``"<field>: recorded <old>, now <new>"`` for every field in which the validated ``config``
    (and ``mode``) differ from the run recorded in ``out`` (see :func:`recorded`), bar
    :data:`RESUME_FREE`; ``[]`` when they agree or nothing is recorded."""
    found = recorded(out)
    if found is None:
        return []
    earlier, earlier_mode, _ = found
    loose = RESUME_FREE + (("methods",) if config.get("variants") else ())  # derived from the variants
    out_ = [] if earlier_mode in (None, mode) else [f"mode: recorded {earlier_mode}, now {mode}"]
    for key in config:
        if key not in loose and earlier.get(key) != config[key]:
            out_.append(f"{key}: recorded {earlier.get(key)!r}, now {config[key]!r}")
    return out_


def _plots(results: dict, out: str) -> list[str]:
    from . import plots

    curves = {v["variant"]: [r["history"] for r in v["runs"]] for v in results["variants"]}
    paths = [plots.accuracy_curves(curves, os.path.join(out, "curves.png")),
             plots.rank_curves(curves, os.path.join(out, "ranks.png")),
             plots.angle_curves(curves, os.path.join(out, "grad_angle.png"), key="grad_angle",
                                ylabel="angle to the BP gradient (°)"),
             plots.angle_curves(curves, os.path.join(out, "matrix_angle.png"), key="matrix_angle",
                                ylabel="angle of B to the replaced path (°)")]
    model = results["config"]["model"]
    costs = {model: {v["variant"]: {"flops": v["summary"]["flops"], "peak_mem": v["summary"]["peak_mem"]}
                     for v in results["variants"]}}
    paths.append(plots.cost_bars(costs, os.path.join(out, "costs.png")))
    if results["config"].get("truncate"):
        points: dict[str, list] = {}
        for v in results["variants"]:
            s = v["summary"]
            if not s or not s["params"]:
                continue
            points[v["variant"]] = [(s["params"]["mean"], s["test_acc"])]
            for t in s.get("truncated", []):
                points.setdefault(f"{v['variant']} cut by SVD", []).append((t["params"]["mean"], t["acc"]))
        c = results["config"]
        title = f"{c['model']} on {c['dataset']}: accuracy against parameters"
        paths.append(plots.accuracy_vs_params(points, os.path.join(out, "params.png"), title=title))
    if results["mode"] == "sweep":
        sweep = results["config"]["sweep"]
        points = [(v["value"], v["summary"]["test_acc"]) for v in results["variants"]]
        paths.append(plots.sweep_curve(sweep["field"], points, os.path.join(out, "sweep.png")))
    return [p for p in paths if p]


def replot(out: str) -> list[str]:
    """Re-draw the plots of a finished (or partial) run from its ``results.json``; returns their paths."""
    with open(os.path.join(out, "results.json")) as f:
        return _plots(json.load(f), out)


def cost_figure(run_dirs: list[str], path: str) -> str | None:
    """FLOPs and peak-memory bars of several runs (e.g. one config per model), grouped by model.

    Reads each folder's ``results.json``; runs of the same model are merged (later ones win for
    a variant both have). Returns the path, or ``None`` when no run has costs.
    """
    from . import plots

    costs: dict[str, dict] = {}
    for folder in run_dirs:
        with open(os.path.join(folder, "results.json")) as f:
            results = json.load(f)
        per = costs.setdefault(results["config"]["model"], {})
        for v in results["variants"]:
            if v.get("summary"):
                per[v["variant"]] = {"flops": v["summary"]["flops"], "peak_mem": v["summary"]["peak_mem"]}
    return plots.cost_bars(costs, path)
