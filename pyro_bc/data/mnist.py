"""MNIST's folder layout: the four IDX files (each raw or gzipped), and the copy embedded in the package."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pyro_bc.data.datafile import RawData, check_labels
from pyro_bc.data.idx import read_idx
from pyro_bc.errors import DataError

__all__ = ["DEFAULT_DATA_DIR", "MNIST_FILES", "read_mnist"]

#: The MNIST copy embedded in the package (gzipped IDX files and their SHA256SUMS).
DEFAULT_DATA_DIR: Path = Path(__file__).resolve().parent / "mnist"

#: Base names of the four files :func:`read_mnist` looks for (each raw or with ``.gz``).
MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _find_file(data_dir: Path, base: str) -> Path:
    for name in (base, base + ".gz"):
        p = data_dir / name
        if p.is_file():
            return p
    raise DataError(f"{data_dir / base}: file not found (looked for {base} and {base}.gz in {data_dir})")


def _check_pair(images: np.ndarray, labels: np.ndarray, img_path: Path, lab_path: Path) -> None:
    if images.ndim != 3:
        raise DataError(f"{img_path}: expected 3-D images (N, H, W), got shape {images.shape}")
    if images.dtype != np.uint8:
        raise DataError(f"{img_path}: expected uint8 pixels (IDX type 0x08), got {images.dtype}")
    check_labels(labels, images.shape[0], str(lab_path), img_path.name)


def find_mnist_files(data_dir: Path) -> dict[str, Path]:
    """The paths of the four files in ``data_dir``, raw or gzipped; a missing one raises :class:`DataError`."""
    return {key: _find_file(data_dir, base) for key, base in MNIST_FILES.items()}


def read_mnist(data_dir: Path) -> RawData:
    """The four IDX files of ``data_dir``: images ``(N, 1, H, W)`` uint8 and their labels."""
    paths = find_mnist_files(data_dir)
    arrays = {key: read_idx(p) for key, p in paths.items()}
    for part in ("train", "test"):
        _check_pair(arrays[f"{part}_images"], arrays[f"{part}_labels"], paths[f"{part}_images"],
                    paths[f"{part}_labels"])
    return RawData(arrays["train_images"][:, None], arrays["train_labels"], arrays["test_images"][:, None],
                   arrays["test_labels"], train_name=str(paths["train_labels"]), test_name=str(paths["test_labels"]),
                   test_images_name=str(paths["test_images"]))
