"""Plain PyTorch models for the trainer (no SSA layers: :class:`ssa.Trainer` converts them).

Every model is built from ``torch.nn`` modules only. Structural conventions the SSA trainer
relies on (kept by every builder here, checked in ``tests/test_models.py``):

* outside residual blocks, each layer and what follows it (norm, activation, pooling) are
  modules of **one flat** ``nn.Sequential`` in forward order — no functional activations
  and no module object used twice;
* residual blocks are :class:`BasicBlock` instances (``ssa_local = True``), trained by the
  trainer as one *local module* each;
* the model's last module is the ``nn.Linear`` producing the ``(batch, num_classes)`` logits;
* a convolution followed by a BatchNorm has ``bias=False`` (as in torchvision).

Convnets take ``in_shape = (C, H, W)`` and adapt to it: digits are ``(1, 8, 8)``, CIFAR
``(3, 32, 32)``. A 2×2 max-pool is left out wherever the feature map is already smaller
than 2 on a side (so 8×8 inputs go through the five pools of VGG-13), and the size of the
first fully connected layer is measured by running a zero tensor through the features.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["get", "available", "mlp", "lenet", "smallconv", "vgg13", "BasicBlock", "ResNet",
           "resnet20", "resnet32", "resnet56"]

_ACTS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "leaky_relu": nn.LeakyReLU}


def mlp(num_classes: int, in_shape, hidden=(256, 256), activation: str = "relu") -> nn.Sequential:
    """``Flatten → (Linear → activation) × len(hidden) → Linear`` (DESIGN §6: 64-256-256-10 on digits).

    Any ``in_shape`` works: the input is flattened to ``prod(in_shape)`` features.
    """
    if activation not in _ACTS:
        raise ValueError(f"mlp: activation must be one of {sorted(_ACTS)}, got {activation!r}")
    sizes = [math.prod(in_shape), *hidden]
    layers: list[nn.Module] = [nn.Flatten()]
    for n, m in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(n, m), _ACTS[activation]()]
    layers.append(nn.Linear(sizes[-1], num_classes))
    return nn.Sequential(*layers)


# ---------------------------------------------------------------------------- helpers
def _chw(name: str, in_shape) -> tuple[int, int, int]:
    """``in_shape`` as ``(C, H, W)`` of positive ints, or a ValueError naming the model."""
    shape = tuple(in_shape)
    if len(shape) != 3 or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape):
        raise ValueError(f"{name}: in_shape must be (C, H, W) of positive ints for a convnet, "
                         f"got in_shape={tuple(in_shape)!r}")
    return shape


def _can_pool(h: int, w: int) -> bool:
    """A 2×2 max-pool is applied only where both sides are at least 2."""
    return h >= 2 and w >= 2


def _init_torchvision_style(model: nn.Module, linear_std: float | None = None) -> None:
    """torchvision's init: convs kaiming_normal (fan_out, relu), BatchNorm 1/0, and, with
    ``linear_std``, Linear N(0, linear_std²) with zero bias (else PyTorch's default)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear_std is not None:
            nn.init.normal_(m.weight, 0.0, linear_std)
            nn.init.zeros_(m.bias)


@torch.no_grad()
def _flat_features(features: nn.Module, in_shape) -> int:
    """Features per sample after ``features``, measured with a zero tensor in eval mode.

    Eval mode keeps BatchNorm running statistics untouched and allows 1×1 maps at batch 1.
    """
    was_training = features.training
    features.eval()
    try:
        return features(torch.zeros(1, *in_shape)).numel()
    finally:
        features.train(was_training)


def _sequential(features: list[nn.Module], classifier: list[nn.Module]) -> nn.Sequential:
    """``nn.Sequential(features=Sequential(...), classifier=Sequential(...))``: two flat parts."""
    return nn.Sequential(OrderedDict([("features", nn.Sequential(*features)),
                                      ("classifier", nn.Sequential(*classifier))]))


# ---------------------------------------------------------------------------- LeNet-5
def lenet(num_classes: int, in_shape) -> nn.Sequential:
    """LeNet-5 (LeCun, Bottou, Bengio & Haffner 1998), with ReLU and max-pooling.

    ``features``: conv(6, 5×5) → ReLU → MaxPool2 → conv(16, 5×5) → ReLU → MaxPool2;
    ``classifier``: Flatten → Linear(·, 120) → ReLU → Linear(120, 84) → ReLU → Linear(84, C).

    Padding rule: if the input's shorter side is at least 32 both convolutions are
    unpadded ("valid", the original 32×32 LeNet-5: 32→28→14→10→5, 16·5·5 = 400 features);
    otherwise both use padding 2 ("same": only the pools shrink, e.g. 8→4→2 on digits,
    16·2·2 = 64 features; 28×28 MNIST gives 16·7·7). A pool is skipped where the map is
    already smaller than 2 on a side. The flattened size is measured by running a zero
    tensor through ``features``. PyTorch default initialisation.
    """
    c, h, w = _chw("lenet", in_shape)
    pad = 0 if min(h, w) >= 32 else 2
    layers: list[nn.Module] = []
    for cin, cout in ((c, 6), (6, 16)):
        layers += [nn.Conv2d(cin, cout, 5, padding=pad), nn.ReLU()]
        h, w = h + 2 * pad - 4, w + 2 * pad - 4
        if _can_pool(h, w):
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
    features = nn.Sequential(*layers)
    flat = _flat_features(features, in_shape)
    classifier = [nn.Flatten(), nn.Linear(flat, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
                  nn.Linear(84, num_classes)]
    return _sequential(list(features), classifier)


# ---------------------------------------------------------------------------- SmallConv
def smallconv(num_classes: int, in_shape) -> nn.Sequential:
    """SmallConv, the small CIFAR convnet used as a baseline in direct-feedback-alignment studies.

    ``features``: (conv3×3(96) → ReLU → MaxPool2) → (conv3×3(192) → ReLU → MaxPool2) →
    (conv3×3(512) → ReLU → MaxPool2); ``classifier``: Flatten → Linear(·, 1024) → ReLU →
    Linear(1024, C). Convolutions have padding 1 (size kept) and a bias (no norms); a pool is
    skipped where the map is already smaller than 2 on a side (so 8×8 digits give
    8→4→2→1, 512 features; CIFAR 32→16→8→4, 512·4·4 = 8192). PyTorch default initialisation.
    """
    c, h, w = _chw("smallconv", in_shape)
    layers: list[nn.Module] = []
    for cin, cout in ((c, 96), (96, 192), (192, 512)):
        layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU()]
        if _can_pool(h, w):
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
    flat = _flat_features(nn.Sequential(*layers), in_shape)
    classifier = [nn.Flatten(), nn.Linear(flat, 1024), nn.ReLU(), nn.Linear(1024, num_classes)]
    return _sequential(layers, classifier)


# ---------------------------------------------------------------------------- VGG-13
_VGG13 = [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]


def vgg13(num_classes: int, in_shape) -> nn.Sequential:
    """VGG-13 with BatchNorm (Simonyan & Zisserman 2015, configuration B), CIFAR variant.

    ``features``: cfg ``[64, 64, M, 128, 128, M, 256, 256, M, 512, 512, M, 512, 512, M]``,
    each number a conv3×3 (padding 1, ``bias=False``) → BatchNorm2d → ReLU, each ``M`` a
    MaxPool2 (skipped where the map is already smaller than 2 on a side: 8×8 digits keep
    three of the five pools). ``classifier``: Flatten → Linear(512·h·w, C) — the single
    linear head of the common CIFAR VGGs (512 features on both 32×32 and 8×8 inputs),
    not ImageNet's 4096-4096 MLP. Initialisation as torchvision's VGG: convs
    ``kaiming_normal_(mode="fan_out", nonlinearity="relu")``, BatchNorm weight 1 / bias 0,
    Linear weight ``N(0, 0.01)`` / bias 0.
    """
    c, h, w = _chw("vgg13", in_shape)
    layers: list[nn.Module] = []
    cin = c
    for v in _VGG13:
        if v == "M":
            if _can_pool(h, w):
                layers.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            continue
        layers += [nn.Conv2d(cin, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU()]
        cin = v
    flat = _flat_features(nn.Sequential(*layers), in_shape)
    model = _sequential(layers, [nn.Flatten(), nn.Linear(flat, num_classes)])
    _init_torchvision_style(model, linear_std=0.01)
    return model


# ---------------------------------------------------------------------------- CIFAR ResNets
class BasicBlock(nn.Module):
    """The ResNet basic block (He, Zhang, Ren & Sun 2016): two conv3×3-BN, residual addition.

    ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``; ``conv1`` has the block's stride.
    The shortcut is the identity when the shape is kept, otherwise a projection
    conv1×1(stride) → BatchNorm ("option B" of the paper).
    """

    # The SSA trainer trains each residual block as one *local module*: its input is
    # detached, the DFA error enters at the block's output, and local autograd inside the
    # block reaches its layers (so the functional ReLU and the addition below are fine).
    ssa_local = True

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """The CIFAR ResNet of He et al. 2016 (§4.2), depth ``6n + 2``.

    ``stem`` = Sequential(conv3×3(16), BatchNorm2d, ReLU); ``layer1..3`` = Sequential of ``n``
    :class:`BasicBlock` s with 16 / 32 / 64 channels, stride 2 at the first block of stages
    2 and 3; ``head`` = Sequential(AdaptiveAvgPool2d(1), Flatten, Linear(64, C)).
    Projection shortcuts (option B) where the shape changes. Initialisation as torchvision's
    ResNets: convs ``kaiming_normal_(mode="fan_out", nonlinearity="relu")``, BatchNorm
    weight 1 / bias 0, the Linear at PyTorch's default.
    """

    def __init__(self, n: int, num_classes: int, in_shape) -> None:
        super().__init__()
        c, _, _ = _chw(f"resnet{6 * n + 2}", in_shape)
        self.stem = nn.Sequential(nn.Conv2d(c, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        cin = 16
        for i, (cout, stride) in enumerate(((16, 1), (32, 2), (64, 2)), start=1):
            blocks = [BasicBlock(cin if j == 0 else cout, cout, stride if j == 0 else 1) for j in range(n)]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            cin = cout
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))
        _init_torchvision_style(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer3(self.layer2(self.layer1(self.stem(x)))))


def resnet20(num_classes: int, in_shape) -> ResNet:
    """ResNet-20 for CIFAR (He et al. 2016, §4.2: n = 3 blocks per stage; ≈0.27 M parameters)."""
    return ResNet(3, num_classes, in_shape)


def resnet32(num_classes: int, in_shape) -> ResNet:
    """ResNet-32 for CIFAR (He et al. 2016, §4.2: n = 5 blocks per stage; ≈0.46 M parameters)."""
    return ResNet(5, num_classes, in_shape)


def resnet56(num_classes: int, in_shape) -> ResNet:
    """ResNet-56 for CIFAR (He et al. 2016, §4.2: n = 9 blocks per stage; ≈0.85 M parameters)."""
    return ResNet(9, num_classes, in_shape)


# ---------------------------------------------------------------------------- registry
_MODELS = {"mlp": mlp, "lenet": lenet, "smallconv": smallconv, "vgg13": vgg13,
           "resnet20": resnet20, "resnet32": resnet32, "resnet56": resnet56}
_CONVNETS = frozenset(_MODELS) - {"mlp"}


def available() -> list[str]:
    """Names accepted by :func:`get` (the known models)."""
    return sorted(_MODELS)


def get(name: str, num_classes: int, in_shape, **kw) -> nn.Module:
    """A plain PyTorch model by name (the trainer converts its ``nn.Linear`` / ``nn.Conv2d`` later).

    * ``"mlp"`` — :func:`mlp` (``hidden=``, ``activation=``); any ``in_shape``, flattened.
    * ``"lenet"`` — :func:`lenet`, LeNet-5 (LeCun et al. 1998).
    * ``"smallconv"`` — :func:`smallconv`, conv96-conv192-conv512-fc1024 (DFA baseline).
    * ``"vgg13"`` — :func:`vgg13`, CIFAR VGG-13 with BatchNorm (Simonyan & Zisserman 2015).
    * ``"resnet20"``, ``"resnet32"``, ``"resnet56"`` — :class:`ResNet` for CIFAR (He et al. 2016),
      residual blocks marked ``ssa_local``.

    Convnets need ``in_shape = (C, H, W)`` (digits ``(1, 8, 8)``, CIFAR ``(3, 32, 32)``) and
    adapt to it. Raises ``ValueError`` for an unknown name, ``num_classes`` < 2, or a bad
    ``in_shape``.
    """
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; known: {available()}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    in_shape = tuple(in_shape)
    if not in_shape or any(not isinstance(d, int) or d < 1 for d in in_shape):
        raise ValueError(f"in_shape must be a tuple of positive ints, got {in_shape!r}")
    if name in _CONVNETS:
        _chw(name, in_shape)
    return _MODELS[name](num_classes, in_shape, **kw)
