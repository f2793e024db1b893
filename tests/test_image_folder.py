"""Image files in class folders (pyro_bc.data.image_folder): the pixels and labels as written, the classes in
sorted order, greyscale or RGB, and one-line errors for what cannot be read as one data set; a LeNet-5 trained and
compressed on such a folder by the command line."""

import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pyro_bc import load
from pyro_bc.cli import main
from pyro_bc.data.datasets import detect_format, load_data
from pyro_bc.data.image_folder import read_image_folders
from pyro_bc.errors import DataError


def _write(folder, classes: dict[str, int], size=(6, 5), mode="RGB", seed=0, suffix=".png") -> dict:
    """``count`` random images per class folder of ``folder``; returns {path: (pixels as C x H x W, class name)}."""
    rng = np.random.default_rng(seed)
    written = {}
    for name, count in classes.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
            pixels = rng.integers(0, 256, shape, dtype=np.uint8)
            path = folder / name / f"{i:03d}{suffix}"
            Image.fromarray(pixels, mode).save(path)
            written[path] = (pixels.transpose(2, 0, 1) if mode == "RGB" else pixels[None], name)
    return written


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_the_pixels_and_labels_are_those_written_with_the_classes_in_sorted_order(tmp_path, mode):
    train = _write(tmp_path / "train", {"dog": 3, "cat": 2, "zebra": 1}, mode=mode)
    test = _write(tmp_path / "test", {"zebra": 2, "cat": 1}, mode=mode, seed=1)  # a class may have no test images
    (tmp_path / "train" / "cat" / ".DS_Store").write_bytes(b"\0junk")  # not images: skipped
    (tmp_path / "train" / "dog" / "notes.txt").write_text("taken in 2024")
    raw = read_image_folders(tmp_path)
    index = {"cat": 0, "dog": 1, "zebra": 2}  # ImageFolder's numbering: sorted names
    for x, y, written in ((raw.train_x, raw.train_y, train), (raw.test_x, raw.test_y, test)):
        assert x.shape == (len(written), 3 if mode == "RGB" else 1, 5, 6) and x.dtype == np.uint8
        want = sorted(written.items(), key=lambda item: (index[item[1][1]], item[0].name))
        np.testing.assert_array_equal(x, np.stack([pixels for _, (pixels, _) in want]))
        assert y.tolist() == [index[name] for _, (_, name) in want]
    assert raw.n_classes == 3 and detect_format(tmp_path) == "image-folder"
    ds = load_data(tmp_path, val_size=2, seed=0)
    assert (len(ds.train), len(ds.val), len(ds.test), ds.n_classes) == (4, 2, 3, 3)
    assert ds.image_shape == ((3 if mode == "RGB" else 1), 5, 6) and ds.normalisation["kind"] == "per-channel"


def test_greyscale_with_any_colour_image_reads_every_image_as_rgb(tmp_path):
    grey = _write(tmp_path / "train", {"a": 2}, mode="L")
    rgb = _write(tmp_path / "train", {"b": 1}, mode="RGB", seed=1)
    _write(tmp_path / "test", {"a": 1}, mode="L", seed=2)
    raw = read_image_folders(tmp_path)
    assert raw.train_x.shape == (3, 3, 5, 6)
    for k, (pixels, _) in enumerate(list(grey.values()) + list(rgb.values())):
        np.testing.assert_array_equal(raw.train_x[k], np.broadcast_to(pixels, (3, 5, 6)))  # grey: R = G = B


def test_an_rgba_image_loses_its_alpha_and_a_palette_image_its_palette(tmp_path):
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (5, 6, 4), dtype=np.uint8)
    (tmp_path / "train" / "a").mkdir(parents=True)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "train" / "a" / "x.png")
    palette = Image.fromarray(rgba[..., :3], "RGB").quantize(8)
    palette.save(tmp_path / "train" / "a" / "y.png")
    _write(tmp_path / "test", {"a": 1})
    raw = read_image_folders(tmp_path)
    np.testing.assert_array_equal(raw.train_x[0], rgba[..., :3].transpose(2, 0, 1))
    np.testing.assert_array_equal(raw.train_x[1], np.asarray(palette.convert("RGB")).transpose(2, 0, 1))


def test_what_cannot_be_one_data_set_is_one_line_naming_the_file_or_folder(tmp_path):
    def folder(name):
        d = tmp_path / name
        _write(d / "train", {"a": 2, "b": 1})
        _write(d / "test", {"a": 1}, seed=1)
        return d

    d = folder("sizes")
    Image.new("RGB", (7, 5)).save(d / "train" / "b" / "big.png")
    with pytest.raises(DataError, match=rf"^{d}/train/b/big.png: image size 7x5 differs from .*000.png's 6x5: "
                                        "pyro-bc does not resize; give images of one size$"):
        load_data(d)
    d = folder("corrupt")
    (d / "train" / "a" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(DataError, match=rf"^{d}/train/a/bad.png: not a readable image: "):
        load_data(d)
    d = folder("unknown class")
    _write(d / "test", {"c": 1})
    with pytest.raises(DataError, match=rf"^{d}/test/c: class 'c' has no training folder \(the classes: a, b\)$"):
        load_data(d)
    d = folder("no test")
    for path in (d / "test" / "a").iterdir():
        path.unlink()
    with pytest.raises(DataError, match=rf"^{d}/test: no images in its class folders"):
        load_data(d)
    d = folder("flat")
    Image.new("RGB", (6, 5)).save(d / "train" / "loose.png")  # a file beside the class folders is not a class: fine
    assert len(read_image_folders(d).train_y) == 3
    d = tmp_path / "no classes"
    (d / "train").mkdir(parents=True)
    (d / "test").mkdir()
    with pytest.raises(DataError, match=rf"^{d}/train: no class folders"):
        load_data(d)
    d = folder("sixteen bits")
    Image.fromarray(np.zeros((5, 6), np.uint16)).save(d / "train" / "a" / "deep.png")
    with pytest.raises(DataError, match=r"deep.png: a I;16 image \(more than 8 bits per pixel\)"):
        load_data(d)


def test_a_decompression_bomb_is_refused_before_it_is_decoded(tmp_path, monkeypatch):
    _write(tmp_path / "train", {"a": 1}, size=(40, 40))
    _write(tmp_path / "test", {"a": 1}, size=(40, 40))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 1600 pixels declared: over the limit, warned by Pillow
    with pytest.raises(DataError, match=r"000.png: not a readable image: Image size \(1600 pixels\) exceeds limit"):
        read_image_folders(tmp_path)


@pytest.mark.slow
def test_the_command_line_trains_and_compresses_lenet5_on_a_folder_of_png_files(tmp_path):
    """Two classes told apart by brightness, 28 x 28 greyscale: trained, compressed, and the file's test error as
    the images' own labels give it."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 60), ("test", 20)):
        for name, level in (("dark", 40), ("light", 200)):
            (tmp_path / "data" / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(rng.normal(level, 30, (28, 28)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels, "L").save(tmp_path / "data" / split / name / f"{i}.png")
    run = tmp_path / "run"
    assert main(["train", "--model", "lenet5", "--data", str(tmp_path / "data"), "--epochs", "3", "--val-size", "20",
                 "--lr", "0.01", "--batch-size", "25", "--out", str(run)]) == 0
    assert json.loads((run / "config.json").read_text())["data_format"] == "image-folder"
    assert main(["compress", str(run), "--thresholds", "-1", "-1", "-1", "-1", "--out", str(run / "MODEL.bcz")]) == 0
    summary = json.loads((run / "MODEL.json").read_text())
    ds = load_data(tmp_path / "data", val_size=20, seed=0)
    with torch.no_grad():
        wrong = (load(run / "MODEL.bcz")(ds.test.x).argmax(-1) != ds.test.y).float().mean().item()
    assert summary["error_compressed"] == pytest.approx(100 * wrong)
    assert ds.test.y.tolist() == [0] * 20 + [1] * 20 and summary["error_compressed"] < 50


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(0, 200), flips=st.lists(st.tuples(st.integers(0, 199), st.integers(1, 255)), max_size=6))
def test_fuzzed_image_files_are_read_or_refused_in_one_line(tmp_path, cut, flips):
    """A PNG truncated and with bytes flipped: its pixels are read, or one DataError names it; nothing else escapes."""
    folder = tmp_path / f"f{cut}-{len(flips)}-{abs(hash(tuple(flips))) % 10**6}"
    _write(folder / "train", {"a": 1})
    _write(folder / "test", {"a": 1}, seed=1)
    path = folder / "train" / "a" / "000.png"
    data = bytearray(path.read_bytes())
    for at, value in flips:
        if at < len(data):
            data[at] ^= value
    path.write_bytes(bytes(data[:len(data) - cut]))
    try:
        raw = read_image_folders(folder)
    except DataError as e:
        assert str(path) in str(e) and "\n" not in str(e)
    else:
        assert raw.train_x.shape[0] == 1 and raw.train_x.dtype == np.uint8  # a flipped header may change its mode
