"""Unit discovery: which pieces of a model a local learning rule trains, and what follows each.

A *unit* is one locally trained piece (DESIGN §5): an SSA layer, a dense ``nn.Linear`` /
``nn.Conv2d``, or a *local module* (input detached, signal at its output, autograd inside),
with its *tail* — the norm / activation / dropout modules right after a layer in an
``nn.Sequential``, through which the signal is carried back to the layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..layers import SSALayer

__all__ = ["Unit", "discover", "fold_activations", "FUSIBLE", "ELEMENTWISE", "NORMS", "DROPOUTS", "DENSE"]

#: Activation modules folded into the preceding SSA layer's fused kernel.
FUSIBLE = {nn.ReLU: "relu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.LeakyReLU: "leaky_relu"}
#: Parameter-free elementwise modules allowed in a layer's tail (derivative by local autograd
#: when not in FUSIBLE).
ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.ELU, nn.Softplus,
               nn.Mish, nn.Hardtanh, nn.ReLU6, nn.Hardswish, nn.Identity)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)
DROPOUTS = (nn.Dropout, nn.Dropout2d)
#: Dense layers a local rule updates (by plain DFA).
DENSE = (nn.Linear, nn.Conv2d)


@dataclass(eq=False)
class Unit:
    """One locally trained piece: an SSA layer, a dense layer, or a local module (+ tail)."""

    name: str
    kind: str  # "ssa" | "dense" | "local"
    head: nn.Module
    tail: list = field(default_factory=list)
    cap: dict | None = None  # what the recording kept of the current forward
    out_ref: object = None  # weakref to the unit's output in the last forward
    is_output: bool = False
    grad_mode: bool = True
    chain: object = None  # during a forward: the tensor the unit's next tail module must receive

    @property
    def last(self) -> nn.Module:
        return self.tail[-1] if self.tail else self.head


def is_trainable_layer(module: nn.Module) -> bool:
    """An SSA layer or dense layer whose weight takes a gradient (a frozen one is not a unit)."""
    if isinstance(module, SSALayer):
        return module.U.requires_grad
    return isinstance(module, DENSE) and module.weight.requires_grad


def fold_activations(model: nn.Module, inside_local=frozenset()) -> None:
    """Fold an activation module that follows an SSA layer in an ``nn.Sequential`` into the layer."""
    for parent in model.modules():
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


def _tails(model: nn.Module, inside_local) -> dict:
    tails = {}
    for parent in model.modules():
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


def discover(model: nn.Module, local_modules=(), freeze_norms: bool = False, owner: str = "Trainer",
             method: str = "ssa") -> tuple[list[Unit], set[int]]:
    """The units of ``model`` and the ids of the parameters they train.

    Local modules: those listed (modules or qualified names) and those whose class sets
    ``ssa_local = True``. Then every trainable SSA / dense layer outside them, with its tail.
    Activations after SSA layers are folded into the layers. Raises ``ValueError`` for a
    trainable parameter no unit trains, a parametrised module shared by two tails, or a
    model without anything to train.
    """
    names = {m: n for n, m in model.named_modules()}
    local = [m for m in model.modules() if getattr(m, "ssa_local", False) is True]
    for item in local_modules:
        try:
            mod = model.get_submodule(item) if isinstance(item, str) else item
        except AttributeError:
            mod = None
        if mod not in names:
            raise ValueError(f"{owner}: local module {item!r} is not a submodule of the model")
        if mod not in local:
            local.append(mod)
    inside_local = set()
    for mod in local:
        inside_local.update(m for m in mod.modules() if m is not mod)
    fold_activations(model, inside_local)
    tails_of = _tails(model, inside_local)
    units: list[Unit] = []
    handled: set[int] = set()
    for mod in local:
        if mod in inside_local:
            continue  # nested in another local module: part of it
        units.append(Unit(names[mod], "local", mod))
        handled.update(id(p) for p in mod.parameters() if p.requires_grad)
    seen = {u.head for u in units}
    tail_owner: dict[nn.Module, str] = {}
    for name, mod in model.named_modules():
        if mod in inside_local or mod in seen or not is_trainable_layer(mod):
            continue
        unit = Unit(name, "ssa" if isinstance(mod, SSALayer) else "dense", mod, tails_of.get(mod, []))
        for t in unit.tail:  # a parametrised module after two layers would mix their updates
            if t in tail_owner and any(True for _ in t.parameters()):
                raise ValueError(f"{owner}: the {type(t).__name__} {names[t]!r} follows both "
                                 f"{tail_owner[t]!r} and {name!r}; a norm with parameters needs one "
                                 "instance per layer")
            tail_owner.setdefault(t, name)
        units.append(unit)
        seen.add(mod)
        handled.update(id(p) for p in mod.parameters(recurse=False) if p.requires_grad)
        for t in unit.tail:
            if isinstance(t, NORMS) and not freeze_norms:
                handled.update(id(p) for p in t.parameters() if p.requires_grad)
    if not units:
        raise ValueError(f"{owner}: method={method!r} found no layer it can train (no trainable nn.Linear / "
                         "nn.Conv2d / SSA layer and no local module)")
    frozen_norms = {id(p) for u in units for t in u.tail if isinstance(t, NORMS)
                    for p in t.parameters()} if freeze_norms else set()
    orphans = [n for n, p in model.named_parameters()
               if p.requires_grad and id(p) not in handled and id(p) not in frozen_norms]
    if orphans:
        raise ValueError(f"{owner}: method={method!r} cannot train parameters {orphans[:5]}"
                         f"{' …' if len(orphans) > 5 else ''}: only SSA layers, dense nn.Linear/nn.Conv2d, "
                         "norms right after a layer and local modules are trained; declare their module "
                         "in local_modules= or freeze them with requires_grad_(False)")
    return units, handled
