"""The training methods, one file each, behind one interface (:class:`~ssa.methods.base.Method`).

==========  ==============================================  ==========================
name        what                                            file
==========  ==============================================  ==========================
``ssa``     SVD-Space Alignment (DESIGN §5-§8)              :mod:`ssa.methods.ssa`
``bp``      backpropagation, dense                          :mod:`ssa.methods.bp`
``svd_bp``  backpropagation through the SVD factors         :mod:`ssa.methods.svd_bp`
``dfa``     Direct Feedback Alignment                       :mod:`ssa.methods.dfa`
``drtp``    Direct Random Target Projection                 :mod:`ssa.methods.dfa`
``fa``      feedback alignment (layer to layer)             :mod:`ssa.methods.feedback`
``usf``     uniform sign-concordant feedback                :mod:`ssa.methods.feedback`
``brsf``    batchwise random magnitude sign-concordant      :mod:`ssa.methods.feedback`
``sgr``     Successive Gradient Reconciliation              :mod:`ssa.methods.sgr`
==========  ==============================================  ==========================

Adding a method: a new file with a :class:`Method` subclass, and its class in :data:`REGISTRY`.
"""

from __future__ import annotations

from ..loss import LossConfig
from .base import Context, Method
from .bp import BP
from .dfa import DFA, DRTP
from .feedback import Feedback
from .sgr import SGR
from .ssa import SSA
from .svd_bp import SVDBP

__all__ = ["REGISTRY", "METHODS", "Context", "Method", "get", "applicable", "accepting", "route"]

#: name -> the class implementing it.
REGISTRY: dict[str, type[Method]] = {name: cls for cls in (SSA, BP, SVDBP, DFA, DRTP, Feedback, SGR)
                                     for name in cls.names}
#: Every method name, in the order the docs list them.
METHODS = ("ssa", "bp", "svd_bp", "dfa", "drtp", "fa", "usf", "brsf", "sgr")
assert set(METHODS) == set(REGISTRY)


def get(name: str) -> type[Method]:
    """The class of method ``name``; ``ValueError`` naming the known ones otherwise."""
    if name not in REGISTRY:
        raise ValueError(f"Trainer: method must be one of {METHODS}, got {name!r}")
    return REGISTRY[name]


def accepting(option: str) -> tuple[str, ...]:
    """The methods that take Trainer keyword ``option``."""
    return tuple(m for m in METHODS if option in REGISTRY[m].options)


def applicable(method: str, options: dict) -> dict:
    """``options`` without the Trainer keywords that do not apply to ``method`` (for tools that
    build one set of options for several methods, like the CLI)."""
    cls = get(method)
    return {k: v for k, v in options.items() if k not in _ROUTED or k in cls.options}


def route(method: str, given: dict, defaults: dict) -> dict:
    """The options of ``given`` that ``method`` takes; ``ValueError`` for one it does not take that
    differs from its default (``defaults``), naming the methods it applies to."""
    cls = get(method)
    for key, value in given.items():
        if key not in cls.options and not _is_default(value, defaults[key]):
            raise ValueError(f"Trainer: option {key}={value!r} does not apply to method={method!r} "
                             f"(it applies to {', '.join(accepting(key))})")
    return {k: v for k, v in given.items() if k in cls.options}


def _is_default(value, default) -> bool:
    if default is None and isinstance(value, LossConfig):
        return value == LossConfig()
    try:
        return bool(value == default) or (isinstance(default, tuple) and tuple(value) == default)
    except (TypeError, ValueError):
        return False


#: Trainer keywords that only some methods take (the others apply to every method).
_ROUTED = frozenset(k for cls in REGISTRY.values() for k in cls.options)
