"""Loading a data folder: its format detected, checksums verified, a seeded validation split, normalisation,
minibatches.

Four formats are read (:data:`FORMATS`; each reader in its own module, each error one line naming the file):
``mnist-idx`` (the four IDX files, :mod:`pyro_bc.data.mnist`), ``cifar10-python`` (CIFAR-10's pickled batches, read
without running code, :mod:`pyro_bc.data.cifar`), ``npz`` (``train.npz`` and ``test.npz``, :mod:`pyro_bc.data.npz`)
and ``image-folder`` (``train/<class>/<image>`` and ``test/<class>/<image>``, :mod:`pyro_bc.data.image_folder`).
No torchvision; the embedded MNIST (:data:`DEFAULT_DATA_DIR`) is the default.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pyro_bc.data.cifar import CIFAR_FILES, read_cifar10
from pyro_bc.data.datafile import CHUNK, RawData
from pyro_bc.data.idx import read_idx, write_idx
from pyro_bc.data.image_folder import IMAGE_FOLDERS, read_image_folders
from pyro_bc.data.mnist import DEFAULT_DATA_DIR, MNIST_FILES, read_mnist
from pyro_bc.data.npz import NPZ_FILES, read_npz_pair
from pyro_bc.defaults import VAL_SIZE
from pyro_bc.errors import ConfigError, DataError, first_line

__all__ = [
    "DEFAULT_DATA_DIR",
    "FORMATS",
    "MNIST",
    "MNIST_FILES",
    "Dataset",
    "Split",
    "detect_format",
    "iterate_minibatches",
    "load_data",
    "load_mnist",
    "read_idx",
    "require_shape",
    "write_idx",
]

#: The formats a data folder may hold, each with its reader and the file names that mark it.
_READERS: dict[str, tuple[Callable[[Path], RawData], tuple[str, ...]]] = {
    "mnist-idx": (read_mnist, tuple(n + ext for n in MNIST_FILES.values() for ext in ("", ".gz"))),
    "cifar10-python": (read_cifar10, CIFAR_FILES),
    "npz": (read_npz_pair, NPZ_FILES),
    "image-folder": (read_image_folders, IMAGE_FOLDERS),
}
FORMATS = tuple(_READERS)
#: MNIST's normalisation, the official code's: ``2 * (x / 255 - 0.5)``.
MNIST_NORMALISATION = {"kind": "2*(x/255-0.5)"}


@dataclass
class Split:
    """One part of a data set: images ``x`` (float32, ``(N, C, H, W)``) and labels ``y`` (int64, ``(N,)``)."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass
class Dataset:
    """The loaded data: ``train``, ``val`` (held out from the training files) and ``test`` splits.

    ``n_classes`` is the largest training label + 1 (or CIFAR's ``batches.meta`` count); ``image_shape`` is the
    shape of one example, ``(C, H, W)``; ``format`` one of :data:`FORMATS`; ``normalisation`` how pixels were
    scaled (``{"kind": "2*(x/255-0.5)"}``, or ``{"kind": "per-channel", "mean": [...], "std": [...]}``).
    """

    train: Split
    val: Split
    test: Split
    n_classes: int
    image_shape: tuple[int, int, int]
    format: str = "mnist-idx"
    normalisation: dict = field(default_factory=lambda: dict(MNIST_NORMALISATION))

    @property
    def validation(self) -> Split | None:
        """``val``, or None where it is empty (``val_size=0``: every training example is trained on)."""
        return self.val if len(self.val) else None


#: The name of :class:`Dataset` from when MNIST was the only format.
MNIST = Dataset


# ------------------------------------------------------------------------------------------------------ the folder
def _check_folder(data_dir: Path) -> None:
    if not data_dir.exists():
        raise DataError(f"{data_dir}: data folder not found")
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: not a folder")


def detect_format(data_dir: str | os.PathLike) -> str:
    """The format of the data in ``data_dir``, from the names of the files it holds (one of :data:`FORMATS`)."""
    data_dir = Path(data_dir)
    _check_folder(data_dir)
    found = [fmt for fmt, (_, names) in _READERS.items() if any((data_dir / n).exists() for n in names)]
    if len(found) > 1:
        raise DataError(f"{data_dir}: holds files of several data formats ({', '.join(found)}); keep one per folder")
    if not found:
        raise DataError(f"{data_dir}: no data found: expected the four MNIST IDX files (train-images-idx3-ubyte, ...), "
                        f"CIFAR-10's python batches ({', '.join(CIFAR_FILES)}), {' and '.join(NPZ_FILES)}, or image files in "
                        "train/<class>/ and test/<class>/ folders")
    return found[0]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _verify_checksums(data_dir: Path) -> None:
    sums = data_dir / "SHA256SUMS"
    if not sums.is_file():
        return
    try:
        lines = sums.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{sums}: cannot read: {e}") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split(maxsplit=1)
        digest = parts[0].lower()
        name = parts[1].strip().lstrip("*") if len(parts) == 2 else ""
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest) or not name:
            raise DataError(f"{sums}: line {lineno} is not '<sha256>  <file name>'")
        if "/" in name or "\\" in name or name in (".", ".."):
            raise DataError(f"{sums}: line {lineno}: file name {name!r} must be a plain name in the same folder")
        target = data_dir / name
        if not target.is_file():
            continue  # only files that are present are checked; the needed ones are required elsewhere
        try:
            actual = _sha256(target)
        except OSError as e:
            raise DataError(f"{target}: cannot read: {e.strerror or e}") from None
        if actual != digest:
            raise DataError(f"{target}: checksum mismatch: sha256 {actual}, SHA256SUMS says {digest}")


# --------------------------------------------------------------------------------------------------- normalisation
def _mnist_scale(images: np.ndarray) -> np.ndarray:
    x = images.astype(np.float32)
    x /= 255.0
    x -= 0.5
    x *= 2.0
    return x


def channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per channel, the mean and (population) standard deviation of ``x / 255`` over uint8 images ``(N, C, H, W)``,
    exactly, from each channel's counts of the 256 values; a constant channel gets standard deviation 1."""
    values = np.arange(256) / 255.0
    counts = np.stack([np.bincount(images[:, c].ravel(), minlength=256) for c in range(images.shape[1])])
    n = counts.sum(axis=1)
    mean = counts @ values / n
    std = np.sqrt((counts * (values[None, :] - mean[:, None]) ** 2).sum(axis=1) / n)
    return mean, np.where(std > 0, std, 1.0)


def _channel_scale(mean: np.ndarray, std: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    shift, scale = (np.asarray(v, np.float32).reshape(1, -1, 1, 1) for v in (mean, std))

    def scaled(images: np.ndarray) -> np.ndarray:
        x = images.astype(np.float32)
        x /= 255.0
        x -= shift
        x /= scale
        return x

    return scaled


# ------------------------------------------------------------------------------------------------------- the split
def _split(images: np.ndarray, labels: np.ndarray, idx: np.ndarray, scale) -> Split:
    return Split(torch.from_numpy(scale(images[idx])), torch.from_numpy(labels[idx].astype(np.int64)))


def _assemble(raw: RawData, fmt: str, val_size: int, seed: int, subset: int | None) -> Dataset:
    tr_x, tr_y, te_x, te_y = raw.train_x, raw.train_y, raw.test_x, raw.test_y
    if te_x.shape[1:] != tr_x.shape[1:]:
        raise DataError(f"{raw.test_images_name or raw.test_name}: image size {te_x.shape[1:]} differs from the "
                        f"training images' {tr_x.shape[1:]}")
    n_train = tr_y.shape[0]
    if n_train == 0:
        raise DataError(f"{raw.train_name}: no training examples")
    n_classes = raw.n_classes or int(tr_y.max()) + 1
    for name, labels, what in ((raw.train_name, tr_y, "training"), (raw.test_name, te_y, "test")):
        if labels.size and int(labels.max()) >= n_classes:
            raise DataError(f"{name}: label out of range: {what} label {int(labels.max())} but "
                            f"{'the classes' if raw.n_classes else 'training labels'} are 0..{n_classes - 1}")
    if isinstance(val_size, bool) or not isinstance(val_size, (int, np.integer)) or not 0 <= val_size < n_train:
        raise ConfigError(
            f"val_size must be an integer in 0..{n_train - 1} (training examples: {n_train}), got {val_size}"
            + (f" (the default; a tenth of the examples would be {n_train // 10})"
               if val_size == VAL_SIZE else "")
        )
    n_fit = n_train - int(val_size)
    if subset is not None and (
        isinstance(subset, bool) or not isinstance(subset, (int, np.integer)) or not 1 <= subset <= n_fit
    ):
        raise ConfigError(f"subset must be an integer in 1..{n_fit} (training examples after validation), got {subset}")

    perm = np.random.default_rng(seed).permutation(n_train)
    train_idx, val_idx = perm[:n_fit], perm[n_fit:]
    if fmt == "mnist-idx":
        scale, normalisation = _mnist_scale, dict(MNIST_NORMALISATION)
    else:  # statistics of the examples trained on (all of them, whatever the subset), never of val or test
        mean, std = channel_stats(tr_x[train_idx])
        scale = _channel_scale(mean, std)
        normalisation = {"kind": "per-channel", "mean": mean.tolist(), "std": std.tolist()}
    if subset is not None:
        train_idx = train_idx[: int(subset)]
    c, h, w = (int(d) for d in tr_x.shape[1:])
    return Dataset(train=_split(tr_x, tr_y, train_idx, scale), val=_split(tr_x, tr_y, val_idx, scale),
                   test=_split(te_x, te_y, np.arange(len(te_y)), scale), n_classes=n_classes, image_shape=(c, h, w),
                   format=fmt, normalisation=normalisation)


def _load(data_dir: str | os.PathLike | None, fmt: str | None, val_size: int, seed: int, subset: int | None,
          verify: bool) -> Dataset:
    data_dir = DEFAULT_DATA_DIR if data_dir is None else Path(data_dir)
    _check_folder(data_dir)
    fmt = fmt or detect_format(data_dir)
    if verify:
        _verify_checksums(data_dir)
    return _assemble(_READERS[fmt][0](data_dir), fmt, val_size, seed, subset)


def load_data(
    data_dir: str | os.PathLike | None = None,
    val_size: int = VAL_SIZE,
    seed: int = 0,
    subset: int | None = None,
    verify: bool = True,
) -> Dataset:
    """Load the data set in ``data_dir`` (default: the embedded MNIST), its format detected by
    :func:`detect_format`.

    If the folder holds a ``SHA256SUMS`` file (the embedded copy does) and ``verify`` is true, every listed file
    present in the folder is checked against it first.

    Normalisation: MNIST as in the official code of Louizos et al., ``2 * (x / 255 - 0.5)``, i.e. pixels in
    ``[-1, 1]``; the other formats per channel, ``(x / 255 - mean_c) / std_c``, with the mean and standard deviation
    of channel ``c`` over the training examples left after the validation split (all of them, whatever
    ``subset``). Images come as float32 ``(N, C, H, W)``, labels as int64.

    Validation split: the training examples are permuted with ``numpy.random.default_rng(seed).permutation``; the
    *last* ``val_size`` examples of that permutation form ``val`` and the others, in permutation order, ``train``.
    ``subset=N`` then keeps the first ``N`` of those training examples (``val`` is unaffected). The test set is
    returned as is and is never used for any choice.
    """
    return _load(data_dir, None, val_size, seed, subset, verify)


def load_mnist(
    data_dir: str | os.PathLike | None = None,
    val_size: int = VAL_SIZE,
    seed: int = 0,
    subset: int | None = None,
    verify: bool = True,
) -> Dataset:
    """:func:`load_data` for a folder of the four MNIST IDX files (``train-images-idx3-ubyte``,
    ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each raw or gzipped)."""
    return _load(data_dir, "mnist-idx", val_size, seed, subset, verify)


def require_shape(dataset: Dataset, data_dir: str | os.PathLike | None, input_shape: tuple[int, ...], whose: str,
                  fix: str) -> None:
    """Refuse, in one line naming both shapes and ``fix`` (the flag that mends it), a data set whose examples are
    not the ``input_shape`` that ``whose`` (a network, a file) takes."""
    shape = tuple(dataset.image_shape)
    if shape != tuple(input_shape):
        source = f"data folder {data_dir}" if data_dir is not None else "the embedded MNIST"
        raise ConfigError(f"{source} holds examples of shape {'x'.join(map(str, shape))}, but {whose} takes "
                          f"{'x'.join(map(str, input_shape))}: {fix}")


def iterate_minibatches(
    split: Split, batch_size: int, generator: torch.Generator, shuffle: bool = True, drop_last: bool = False
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x, y)`` minibatches of ``split``.

    With ``shuffle`` the order is ``torch.randperm(len(split), generator=generator)``, so a training loop can save
    and restore ``generator.get_state()`` to resume exactly; without it the order is the stored one. The last,
    smaller batch is yielded unless ``drop_last``.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size}")
    n = len(split)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        yield split.x[idx], split.y[idx]


_MATERIALISE_BATCH = 1024  # examples per batch while a Dataset or DataLoader is read into tensors


def as_split(data, what: str = "data") -> Split:
    """``data`` as one :class:`Split` held in memory: an ``(x, y)`` pair of tensors as it is, a
    ``torch.utils.data.Dataset`` or ``DataLoader`` read once, in the dataset's order (a map-style dataset through
    a DataLoader with the loader's ``collate_fn`` and no shuffling, so that its sampler does not reorder it; an
    iterable one as the loader yields it); numpy arrays are taken as tensors, and so is a list of labels. Each item or batch must be an ``(x, y)``
    pair; integer labels become int64, floating-point inputs torch's default dtype (float32), the layers' dtype."""
    from torch.utils.data import DataLoader, IterableDataset
    from torch.utils.data import Dataset as TorchDataset

    if isinstance(data, Split):
        x, y = data.x, data.y
    elif isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], (torch.Tensor, np.ndarray)) \
            and isinstance(data[1], (torch.Tensor, np.ndarray, list, tuple)):  # labels may be a list of numbers
        try:
            x, y = (torch.as_tensor(t) for t in data)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ConfigError(f"{what}: its labels do not make a tensor ({first_line(e)}): give class indices") from None
    elif isinstance(data, (DataLoader, TorchDataset, list, tuple)):  # a list of (x, y) pairs is a map-style dataset
        dataset = data.dataset if isinstance(data, DataLoader) else data
        if isinstance(data, DataLoader) and isinstance(dataset, IterableDataset):
            batches = data
        else:
            collate = data.collate_fn if isinstance(data, DataLoader) else None
            batches = DataLoader(dataset, batch_size=_MATERIALISE_BATCH, shuffle=False, collate_fn=collate)
        xs, ys = [], []
        try:
            for batch in batches:
                if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                    raise ConfigError(f"{what}: each item or batch must be an (x, y) pair, got {type(batch).__name__}"
                                      + (f" with keys {', '.join(map(str, batch))}" if isinstance(batch, dict) else ""))
                xs.append(torch.as_tensor(batch[0]))
                ys.append(torch.as_tensor(batch[1]))
        except (TypeError, ValueError, RuntimeError) as e:  # collating, or a tensor of what is not numbers
            raise ConfigError(f"{what}: its items do not batch into tensors ({first_line(e)}): give (x, y) pairs of "
                              "equal-shaped tensors (images through ToTensor) and class indices") from None
        if not xs:
            raise ConfigError(f"{what}: no examples")
        x, y = torch.cat(xs), torch.cat(ys)
    else:
        raise ConfigError(f"{what} must be an (x, y) pair of tensors or arrays, a torch Dataset, a DataLoader or a "
                          f"list of (x, y) pairs, got {type(data).__name__}")
    if len(x) != len(y):
        raise ConfigError(f"{what}: {len(x)} inputs but {len(y)} labels")
    if not y.is_floating_point():
        y = y.long()
    if x.is_floating_point():
        x = x.to(torch.get_default_dtype())
        finite = torch.isfinite(x.reshape(len(x), -1)).all(1)
        if not finite.all():
            raise ConfigError(f"{what}: {int((~finite).sum())} examples hold NaN or infinite inputs, the first is "
                              f"example {int((~finite).nonzero()[0])}")
    return Split(x, y)
