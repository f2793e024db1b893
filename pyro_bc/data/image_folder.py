"""Images as files, one folder per class: ``train/<class>/<image>`` and ``test/<class>/<image>``, the layout of
torchvision's ``ImageFolder``.

The classes are the training folder's subfolders in sorted order (class ``i`` is the ``i``-th name, as
``ImageFolder`` numbers them); the test folder's subfolders must be among them (a class may have no test images).
Every file whose extension Pillow reads (``.png``, ``.jpg``, ``.bmp``, ...) is an image, other files are skipped
(``.DS_Store``, a ``README``); hidden files and folders are skipped. All images must have one size: pyro-bc does
not resize (a network's input shape is fixed, and resizing is a choice of the data's owner). They are read as one
channel where every training image is greyscale, else as RGB (an alpha channel dropped, a palette expanded).

Sizes are bounded before anything is allocated: each image's declared size (read from its header) against
:data:`~pyro_bc.data.datafile.MAX_FILE_BYTES` for the whole array and Pillow's own decompression-bomb limit per
image; every problem is a one-line :class:`~pyro_bc.errors.DataError` naming the file or folder.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from pyro_bc.data.datafile import MAX_FILE_BYTES, RawData
from pyro_bc.errors import DataError, first_line

__all__ = ["IMAGE_FOLDERS", "read_image_folders"]

#: The two folders that mark the format.
IMAGE_FOLDERS = ("train", "test")
#: Labels are stored as uint8 in 0..255 (as the other formats'), so at most this many classes.
MAX_CLASSES = 256
#: Pillow's modes of one greyscale channel of at most 8 bits (with or without alpha).
_GREY = {"1", "L", "LA"}
#: Pillow's modes of more than 8 bits per pixel, which an 8-bit image would clip.
_WIDE = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _image_files(folder: Path) -> list[Path]:
    extensions = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    return sorted(p for p in folder.iterdir() if _visible(p) and p.is_file() and p.suffix.lower() in extensions)


def _class_folders(folder: Path) -> list[str]:
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder (an image folder holds train/<class>/ and test/<class>/ folders)")
    names = sorted(p.name for p in folder.iterdir() if _visible(p) and p.is_dir())
    if not names:
        raise DataError(f"{folder}: no class folders (expected {folder}/<class>/<image>, one folder per class)")
    return names


def _listing(folder: Path, classes: list[str]) -> list[tuple[Path, int]]:
    """``(image file, class index)`` of every image under ``folder``'s class folders, which must be in ``classes``."""
    index = {name: i for i, name in enumerate(classes)}
    files = []
    for name in _class_folders(folder):
        if name not in index:
            raise DataError(f"{folder / name}: class {name!r} has no training folder (the classes: "
                            f"{', '.join(classes[:8])}{', ...' if len(classes) > 8 else ''})")
        files += [(path, index[name]) for path in _image_files(folder / name)]
    if not files:
        raise DataError(f"{folder}: no images in its class folders (files ending in .png, .jpg, .bmp, ...)")
    return files


def _header(path: Path) -> tuple[tuple[int, int], str]:
    """The image's (width, height) and mode, from its header alone."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # a bomb is refused, not warned about
            with Image.open(path) as image:
                size, mode = image.size, image.mode
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: not a readable image: {first_line(e)}") from None
    if mode in _WIDE:
        raise DataError(f"{path}: a {mode} image (more than 8 bits per pixel): pyro-bc reads 8-bit images; convert it")
    return size, mode


def _read(path: Path, mode: str, size: tuple[int, int]) -> np.ndarray:
    try:
        with Image.open(path) as image:
            if image.size != size:  # checked again: the header was read before
                raise DataError(f"{path}: image size {image.size[0]}x{image.size[1]} differs from the others' "
                                f"{size[0]}x{size[1]}")
            pixels = image.convert(mode) if image.mode != mode else image
            return np.asarray(pixels, dtype=np.uint8)
    except DataError:
        raise
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{path}: not a readable image: {first_line(e)}") from None


def _images(files: list[tuple[Path, int]], size: tuple[int, int], mode: str, what: str) -> tuple[np.ndarray,
                                                                                                  np.ndarray]:
    channels = 1 if mode == "L" else 3
    nbytes = len(files) * channels * size[0] * size[1]
    if nbytes > MAX_FILE_BYTES:
        raise DataError(f"{what}: {len(files)} images of {size[0]}x{size[1]} would take {nbytes} bytes, more than the "
                        f"{MAX_FILE_BYTES} read at once")
    x = np.empty((len(files), channels, size[1], size[0]), np.uint8)
    for i, (path, _) in enumerate(tqdm(files, desc=f"reading {what}", leave=False, disable=None)):
        pixels = _read(path, mode, size)
        x[i] = pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)
    return x, np.array([label for _, label in files], np.uint8)


def read_image_folders(data_dir: Path) -> RawData:
    """The images of ``data_dir/train`` and ``data_dir/test``, as uint8 ``(N, C, H, W)`` with their class indices."""
    train_dir, test_dir = (data_dir / name for name in IMAGE_FOLDERS)
    classes = _class_folders(train_dir)
    if len(classes) > MAX_CLASSES:
        raise DataError(f"{train_dir}: {len(classes)} class folders, more than the {MAX_CLASSES} a data folder holds")
    train, test = _listing(train_dir, classes), _listing(test_dir, classes)
    headers = {path: _header(path) for path, _ in train + test}
    size = headers[train[0][0]][0]
    for path, (other, _) in headers.items():
        if other != size:
            raise DataError(f"{path}: image size {other[0]}x{other[1]} differs from {train[0][0]}'s "
                            f"{size[0]}x{size[1]}: pyro-bc does not resize; give images of one size")
    mode = "L" if all(headers[path][1] in _GREY for path, _ in train) else "RGB"
    (train_x, train_y), (test_x, test_y) = (_images(files, size, mode, str(folder))
                                            for files, folder in ((train, train_dir), (test, test_dir)))
    return RawData(train_x, train_y, test_x, test_y, train_name=str(train_dir), test_name=str(test_dir),
                   n_classes=len(classes))
