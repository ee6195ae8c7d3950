"""The data pipeline of section 2 and 4.1: ImageNet-layout folders in, mean-subtracted
224x224 crops out.

Every image is first brought to the paper's canonical form, the *base image*: shorter
side rescaled to 256, central 256x256 patch, RGB, uint8 (:func:`load_image`). The
network sees raw pixel values 0-255 minus the per-pixel mean image of the training set
(no division by a standard deviation). Training adds random 224 crops, horizontal
reflections and the PCA colour shift; evaluation takes the centre crop, or the ten
patches (four corners, centre, and their reflections).

Exact resume: every random choice for a training sample (its place in the shuffled
order, crop, reflection, colour shift) is a pure function of (seed, epoch, position in
the epoch), so a run that starts at batch k sees exactly the batches a full run sees
from batch k on, whatever the number of DataLoader workers. The loaders are handed a
private ``torch.Generator``, so iterating them never touches the global RNG (dropout).

Corrupt images: checked lazily, when decoded (PIL's ``verify()`` misses truncated
JPEGs, and reading every file up front costs minutes on ImageNet). A file that fails
to decode is replaced by the next readable image of the same split (index + 1,
wrapping), which keeps batches full and deterministic. The replacement travels back
with the batch, so the count is right with worker processes too: the batch iterators
of this module add the skipped paths to ``dataset.corrupt`` in the calling process and
log each one once. ``open_data`` does not read the images, so that count grows as the
data is used.

The built-in dataset (``open_data(None)``, :func:`builtin_dataset`): ten procedurally
drawn texture classes (BUILTIN_CLASSES), 256x256 JPEGs generated from a fixed seed in
seconds. Each class has its own pair of hues, but neighbouring classes overlap in hue,
so colour narrows an image down to about two classes and the texture (orientation,
period, dots, rings, ...) must decide. It is meant to be learnt
by the full net from scratch in minutes on a CPU, as a check that the whole program
trains; it says nothing about ImageNet accuracy.

Caches (``default_cache_dir()``: ``$XDG_CACHE_HOME/alexnet-towers``, falling back to
``~/.cache/alexnet-towers``): the built-in dataset lives in ``<cache>/<BUILTIN_NAME>``;
the training-set statistics are stored next to the data as ``.alexnet-stats-<key>.pt``,
or in ``<cache>/stats`` when the data folder is read-only, keyed by the names and sizes
of the training files so that a changed dataset never gets stale statistics.
"""

import colorsys
import functools
import hashlib
import logging
import math
import os
import re
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from launch.checkpoint import save_checkpoint

log = logging.getLogger(__name__)

BASE_SIZE = 256  # section 2: shorter side rescaled to 256, central 256x256 patch
CROP_SIZE = 224  # section 4.1: the network's input
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
PCA_ALPHA_STD = 0.1  # section 4.1: alpha_i ~ N(0, 0.1^2)
STATS_SAMPLE = 2000  # training images read for the mean image and the RGB covariance
STATS_VERSION = 1  # part of the cache key: bump when the computation changes
TRANSPARENT_BACKGROUND = (128, 128, 128)  # mid-grey: close to the mean, so near 0 after subtraction

# The PCA of ImageNet's RGB pixels as published with fb.resnet.torch and used by most
# reproductions, on the 0-1 scale. Although called eigenvalues, these numbers are the
# standard deviations along the principal components (their squares would be the
# covariance's eigenvalues); see DataStats for the convention used throughout.
IMAGENET_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_EIGVEC = ((-0.5675, 0.7192, 0.4009),
                   (-0.5808, -0.0045, -0.8140),
                   (-0.5836, -0.6948, 0.4203))  # columns are the eigenvectors
_WORDNET_ID = re.compile(r"n\d{8}")

# Errors PIL raises for a file that is not a readable image (truncated, corrupt,
# unidentified, an absurd size); anything else is a bug and propagates.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, IndexError,
                  Image.DecompressionBombError)

# Domain tags keep the streams drawn from one (seed, epoch) independent.
_ORDER_STREAM, _AUGMENT_STREAM = 0, 1


class DataError(ValueError):
    """The data folder cannot be used as it is; the message names the fix."""


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "alexnet-towers"


# --------------------------------------------------------------------------- decoding

def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB. Transparency is composited on mid-grey; 16-bit
    greyscale (modes I;16* and I, as PNG and TIFF open) is scaled 65535 -> 255 rather
    than clipped, which is what PIL's own convert would do."""
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode.startswith("I;16") or image.mode == "I":
        grey = np.asarray(image, dtype=np.float64) * (255.0 / 65535.0)
        image = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), mode="L")
        return image.convert("RGB")
    if image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or image.has_transparency_data:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, TRANSPARENT_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def resize_center(image: Image.Image, size: int = BASE_SIZE) -> Image.Image:
    """Shorter side to ``size`` (up or down, bilinear with PIL's antialiasing), then the
    central ``size`` x ``size`` patch. Images smaller than the crop are enlarged here."""
    width, height = image.size
    scale = size / min(width, height)
    new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
    if new_size != image.size:
        image = image.resize(new_size, Image.BILINEAR)
    left, top = (new_size[0] - size) // 2, (new_size[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


def load_image(path: Union[str, Path], size: int = BASE_SIZE) -> np.ndarray:
    """The base image of one file: size x size x 3 uint8 RGB. Raises one of PIL's
    decode errors for a corrupt file (see ``DECODE_ERRORS``)."""
    with Image.open(path) as image:
        # JPEG only: let libjpeg decode at 1/2, 1/4 or 1/8 scale while both sides stay
        # >= size. Deterministic, and several times faster on large photographs.
        image.draft(image.mode, (size, size))
        image = resize_center(_to_rgb(image), size)
        return np.array(image, dtype=np.uint8)  # a writable copy: torch.from_numpy wants one


# --------------------------------------------------------------------------- datasets

class ImageFolderSplit(Dataset):
    """One split (``train/`` or ``val/``) of an ImageNet-layout folder.

    ``dataset[i]`` is (3 x 256 x 256 uint8 base image, class index); a corrupt file is
    replaced as described in the module docstring. ``samples`` is the sorted list of
    (path, class index); ``ignored_files`` counts the non-image files found;
    ``corrupt`` holds the paths found unreadable so far in this process.
    """

    def __init__(self, split: str, classes: list, samples: list, ignored_files: int = 0):
        self.split, self.classes, self.samples = split, classes, samples
        self.ignored_files = ignored_files
        self.corrupt: set = set()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        image, label, _ = self.load(index)
        return image, label

    def load(self, index: int):
        """(3 x 256 x 256 uint8 image, label, skipped indices): the image at ``index``
        or, if that file is unreadable, at the next readable index."""
        skipped = []
        for step in range(len(self.samples)):
            candidate = (index + step) % len(self.samples)
            path, label = self.samples[candidate]
            try:
                pixels = load_image(path)
            except DECODE_ERRORS:
                skipped.append(candidate)
                continue
            return torch.from_numpy(pixels).permute(2, 0, 1).contiguous(), label, skipped
        raise DataError(f"no readable image in {self.split}/: every file failed to decode")

    def record_skipped(self, skipped) -> None:
        """Adds skipped indices (reported by ``load``, possibly in a worker) to ``corrupt``."""
        for index in skipped:
            path = self.samples[index][0]
            if path not in self.corrupt:
                self.corrupt.add(path)
                log.warning("skipped unreadable image %s (%d in %s/ so far); the next image stands in for it",
                            path, len(self.corrupt), self.split)


@dataclass
class DataStats:
    """Training-set statistics on the 0-255 scale.

    Convention for the PCA: ``eigval[i]`` is the standard deviation of the pixels along
    the principal component ``eigvec[:, i]``, i.e. the square root of the i-th eigenvalue
    of the RGB covariance, in decreasing order. This puts computed statistics on the
    same footing as the widely used ImageNet numbers (IMAGENET_EIGVAL), which behave as
    standard deviations. The colour shift of section 4.1 is eigvec @ (alpha * eigval).
    """
    mean: torch.Tensor  # 3 x 256 x 256 float32, the per-pixel mean base image
    eigval: torch.Tensor  # 3, float32, std along each principal component, decreasing
    eigvec: torch.Tensor  # 3 x 3 float32, columns are the principal components
    images: int = 0  # how many training images the statistics were computed from
    pca_source: str = "computed"  # or "imagenet": the published ImageNet PCA


@dataclass
class DataBundle:
    root: Path
    classes: list
    train: ImageFolderSplit
    val: ImageFolderSplit
    stats: DataStats
    builtin: bool

    def describe(self) -> str:
        kind = "built-in dataset" if self.builtin else "data"
        return (f"{kind} {self.root}: {len(self.classes)} classes, {len(self.train)} train / "
                f"{len(self.val)} val images, stats from {self.stats.images} images (PCA: {self.stats.pca_source})")


# --------------------------------------------------------------------------- layout

def _class_folders(split_dir: Path) -> list:
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))


def _images_in(folder: Path):
    """(sorted [(path, size in bytes)], number of other files) under ``folder``, recursively."""
    images, ignored = [], 0
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if name.lower().endswith(IMAGE_EXTENSIONS):
                images.append((path, os.path.getsize(path)))
            else:
                ignored += 1
    return images, ignored


def scan_layout(root: Union[str, Path]):
    """Checks an ImageNet-layout folder and lists it. Returns (classes, {split: [(path,
    size)] per class}, {split: ignored file count}); raises DataError naming the fix."""
    root = Path(root).expanduser()
    layout_hint = "expected ROOT/train/CLASS/*.jpg and ROOT/val/CLASS/*.jpg with the same CLASS folders in both"
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise DataError(f"data folder {root} {what}: pass the path of a folder that holds train/ and val/ "
                        f"({layout_hint}), or no data folder to use the built-in dataset")
    missing = [s for s in ("train", "val") if not (root / s).is_dir()]
    if missing:
        raise DataError(f"{root} has no {' and no '.join(s + '/' for s in missing)} folder: {layout_hint}")
    classes = {s: _class_folders(root / s) for s in ("train", "val")}
    for split, names in classes.items():
        if not names:
            loose = sum(1 for e in os.scandir(root / split) if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))
            fix = (f"it holds {loose} images directly: sort them into {split}/CLASS/ folders"
                   + (" (for ILSVRC-2012 val, e.g. with the devkit's labels and a valprep script)" if split == "val" else "")
                   if loose else "put the images of each class in their own folder")
            raise DataError(f"no images found: {root / split} has no class folders; {fix} ({layout_hint})")
    if classes["train"] != classes["val"]:
        only_train = sorted(set(classes["train"]) - set(classes["val"]))
        only_val = sorted(set(classes["val"]) - set(classes["train"]))
        show = lambda names: ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
        parts = ([f"only in train/: {show(only_train)}"] if only_train else []) + \
                ([f"only in val/: {show(only_val)}"] if only_val else [])
        raise DataError(f"class folders differ between train/ and val/ of {root} ({'; '.join(parts)}): "
                        f"make both hold the same class folders (add the missing ones or remove the extra ones)")
    names = classes["train"]
    files, ignored = {}, {}
    for split in ("train", "val"):
        found = [_images_in(root / split / name) for name in names]
        files[split] = [images for images, _ in found]
        ignored[split] = sum(n for _, n in found)
    if not any(files["train"]) and not any(files["val"]):
        raise DataError(f"no images found under {root} (looked for {' '.join(IMAGE_EXTENSIONS)}, any case; "
                        f"ignored {ignored['train'] + ignored['val']} other files): add images to the class folders")
    for split in ("train", "val"):
        empty = [name for name, images in zip(names, files[split]) if not images]
        if empty:
            raise DataError(f"{len(empty)} class folder(s) in {root / split} hold no images ({', '.join(empty[:10])}"
                            f"{' ...' if len(empty) > 10 else ''}): add images to them or remove the class from "
                            f"both train/ and val/")
    return names, files, ignored


# --------------------------------------------------------------------------- statistics

def pca_from_covariance(covariance: np.ndarray):
    """(eigval, eigvec) in the DataStats convention: sqrt of the covariance's eigenvalues,
    decreasing, with the eigenvectors as columns, each signed so its largest entry is positive."""
    values, vectors = np.linalg.eigh(np.asarray(covariance, dtype=np.float64))
    order = np.argsort(values)[::-1]
    values, vectors = values[order], vectors[:, order]
    signs = np.sign(vectors[np.abs(vectors).argmax(axis=0), np.arange(3)])
    return np.sqrt(np.clip(values, 0.0, None)), vectors * signs


def _is_imagenet(classes) -> bool:
    return len(classes) == 1000 and all(_WORDNET_ID.fullmatch(c) for c in classes)


def compute_stats(train: ImageFolderSplit, sample: int = STATS_SAMPLE, use_imagenet_pca: bool = False) -> DataStats:
    """Mean base image and RGB PCA from ``sample`` training images spread evenly over the
    (class-sorted) list, so that every class contributes. Unreadable files are skipped."""
    picks = np.unique(np.linspace(0, len(train) - 1, min(sample, len(train))).round().astype(np.int64))
    # numpy, in float64: sums of uint8 values stay exact here (< 2^53), and torch's
    # strided uint8 -> float64 conversion of an HWC image is several times slower.
    pixel_sum = np.zeros((BASE_SIZE, BASE_SIZE, 3), dtype=np.float64)
    colour_outer = np.zeros((3, 3), dtype=np.float64)
    used = 0
    for index in picks.tolist():
        try:
            pixels = load_image(train.samples[index][0])
        except DECODE_ERRORS:
            train.record_skipped([index])
            continue
        pixel_sum += pixels
        flat = pixels.reshape(-1, 3).astype(np.float64)
        colour_outer += flat.T @ flat
        used += 1
    if used == 0:
        raise DataError(f"none of the {len(picks)} training images sampled for the statistics could be read")
    count = used * BASE_SIZE * BASE_SIZE
    colour_mean = pixel_sum.sum(axis=(0, 1)) / count
    covariance = colour_outer / count - np.outer(colour_mean, colour_mean)
    if use_imagenet_pca:
        eigval, eigvec = np.array(IMAGENET_EIGVAL) * 255.0, np.array(IMAGENET_EIGVEC)
    else:
        eigval, eigvec = pca_from_covariance(covariance)
    mean = torch.from_numpy((pixel_sum / used).transpose(2, 0, 1).astype(np.float32))  # 3 x 256 x 256
    return DataStats(mean=mean.contiguous(), eigval=torch.tensor(eigval, dtype=torch.float32),
                     eigvec=torch.tensor(eigvec, dtype=torch.float32), images=used,
                     pca_source="imagenet" if use_imagenet_pca else "computed")


def _stats_key(root: Path, train_files: list, sample: int, imagenet: bool) -> str:
    digest = hashlib.sha256(f"stats v{STATS_VERSION} sample={sample} imagenet={imagenet}\n".encode())
    for path, size in train_files:
        digest.update(f"{os.path.relpath(path, root)}\t{size}\n".encode())
    return digest.hexdigest()[:20]


def load_or_compute_stats(root: Path, train: ImageFolderSplit, train_files: list, cache_dir: Optional[Path] = None,
                          sample: int = STATS_SAMPLE) -> DataStats:
    """The DataStats of a training set, from its cache file if one matches the current
    files (names and sizes), else computed and cached next to the data, or in
    ``cache_dir/stats`` where the data folder cannot be written."""
    imagenet = _is_imagenet(train.classes)
    key = _stats_key(root, train_files, sample, imagenet)
    name = f".alexnet-stats-{key}.pt"
    fallback = Path(cache_dir or default_cache_dir()) / "stats" / name
    for candidate in (root / name, fallback):
        if candidate.is_file():
            try:
                saved = torch.load(candidate, weights_only=True)
                stats = DataStats(saved["mean"], saved["eigval"], saved["eigvec"], int(saved["images"]),
                                  str(saved["pca_source"]))
                if saved["key"] != key or stats.mean.shape != (3, BASE_SIZE, BASE_SIZE):
                    raise ValueError("written for other data")
            except Exception as exc:  # an unreadable or foreign cache is recomputed, never trusted
                log.warning("ignoring unusable statistics cache %s (%s)", candidate, exc)
                continue
            log.info("training-set statistics from %s", candidate)
            return stats
    log.info("computing training-set statistics from up to %d images of %s", sample, root / "train")
    stats = compute_stats(train, sample, use_imagenet_pca=imagenet)
    payload = {"key": key, "mean": stats.mean, "eigval": stats.eigval, "eigvec": stats.eigvec,
               "images": stats.images, "pca_source": stats.pca_source}
    try:
        save_checkpoint(root / name, payload)
    except OSError:
        save_checkpoint(fallback, payload)
    return stats


def open_data(data_dir: Optional[Union[str, Path]], *, cache_dir: Optional[Path] = None) -> DataBundle:
    """Opens an ImageNet-layout folder (``data_dir``) or, for None, the built-in dataset
    (made in ``cache_dir`` if given, else ``default_cache_dir()``, on first use).
    Raises DataError with the fix when the folder cannot be used."""
    builtin = data_dir is None
    root = builtin_dataset(None if cache_dir is None else Path(cache_dir) / BUILTIN_NAME) if builtin else Path(data_dir).expanduser()
    classes, files, ignored = scan_layout(root)
    splits = {}
    for split in ("train", "val"):
        samples = [(path, label) for label, images in enumerate(files[split]) for path, _ in images]
        splits[split] = ImageFolderSplit(split, classes, samples, ignored[split])
        if ignored[split]:
            log.info("%s/: ignored %d files that are not images (%s)", split, ignored[split], " ".join(IMAGE_EXTENSIONS))
    train_files = [f for images in files["train"] for f in images]
    stats = load_or_compute_stats(root, splits["train"], train_files, cache_dir)
    return DataBundle(root, classes, splits["train"], splits["val"], stats, builtin)


# --------------------------------------------------------------------------- batches

def _collate(items):
    images, labels, skipped = zip(*items)
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64), [i for s in skipped for i in s]


class _TrainPositions(Dataset):
    """Item k is the training sample at position ``first + k`` of epoch ``epoch``: a pure
    function of (seed, epoch, position)."""

    def __init__(self, images: ImageFolderSplit, stats: DataStats, seed: int, epoch: int, order: np.ndarray, first: int, count: int):
        self.images, self.stats, self.seed, self.epoch = images, stats, seed, epoch
        self.order, self.first, self.count = order, first, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, k: int):
        position = self.first + k
        image, label, skipped = self.images.load(int(self.order[position]))
        rng = np.random.default_rng([_AUGMENT_STREAM, self.seed, self.epoch, position])
        top, left = rng.integers(0, BASE_SIZE - CROP_SIZE + 1, size=2)
        flip = rng.random() < 0.5
        alpha = rng.normal(0.0, PCA_ALPHA_STD, size=3)
        return augment(image, self.stats, int(top), int(left), bool(flip), alpha), label, skipped


def augment(image: torch.Tensor, stats: DataStats, top: int, left: int, flip: bool, alpha) -> torch.Tensor:
    """Section 4.1 for one 3 x 256 x 256 uint8 base image: the 224 crop at (top, left)
    minus the mean image cropped at the same place, reflected if ``flip``, plus the
    colour shift eigvec @ (alpha * eigval) added to every pixel. Returns 3 x 224 x 224 float32."""
    window = (slice(None), slice(top, top + CROP_SIZE), slice(left, left + CROP_SIZE))
    x = image[window].float() - stats.mean[window]
    if flip:
        x = x.flip(2)
    shift = stats.eigvec @ (torch.as_tensor(alpha, dtype=torch.float32) * stats.eigval)
    return (x + shift.view(3, 1, 1)).contiguous()


def epoch_order(num_images: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled order of epoch ``epoch``, seeded by (seed, epoch) alone."""
    return np.random.default_rng([_ORDER_STREAM, seed, epoch]).permutation(num_images)


def batches_per_epoch(bundle: DataBundle, batch_size: int) -> int:
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    return len(bundle.train) // batch_size  # drop_last: a partial batch would change the step's statistics


def _loader(dataset: Dataset, batch_size: int, workers: int) -> DataLoader:
    # A private generator: DataLoader draws its workers' base seed from it, which would
    # otherwise advance the global RNG (and so change dropout) on every new iterator.
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=_collate,
                      generator=torch.Generator().manual_seed(0), persistent_workers=False)


def train_batches(bundle: DataBundle, batch_size: int, seed: int, epoch: int, start_batch: int = 0,
                  workers: int = 0) -> Iterator:
    """Batches (N x 3 x 224 x 224 float32 images, N int64 labels) of epoch ``epoch``,
    shuffled by a permutation seeded by (seed, epoch), only full batches, starting at
    batch ``start_batch`` without decoding the skipped ones."""
    total = batches_per_epoch(bundle, batch_size)
    if total == 0:
        raise ValueError(f"batch size {batch_size} is larger than the training set ({len(bundle.train)} images): "
                         f"use a smaller batch")
    if not 0 <= start_batch <= total:
        raise ValueError(f"start_batch {start_batch} is outside the epoch's {total} batches")
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be non-negative, got seed={seed}, epoch={epoch}")
    order = epoch_order(len(bundle.train), seed, epoch)
    positions = _TrainPositions(bundle.train, bundle.stats, seed, epoch, order, start_batch * batch_size,
                                (total - start_batch) * batch_size)
    return _batches(positions, bundle.train, batch_size, workers)  # not a generator itself: errors come at the call


def _batches(dataset: Dataset, split: ImageFolderSplit, batch_size: int, workers: int) -> Iterator:
    for images, labels, skipped in _loader(dataset, batch_size, workers):
        split.record_skipped(skipped)  # here, in the calling process, whichever process decoded
        yield images, labels


def _ten_crop_corners():
    edge = BASE_SIZE - CROP_SIZE
    return ((0, 0), (0, edge), (edge, 0), (edge, edge), (edge // 2, edge // 2))  # (top, left): TL TR BL BR centre


class _EvalImages(Dataset):
    def __init__(self, images: ImageFolderSplit, mean: torch.Tensor, indices: list, ten_crop: bool):
        self.images, self.mean, self.indices, self.ten_crop = images, mean, indices, ten_crop

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        image, label, skipped = self.images.load(self.indices[k])
        centred = image.float() - self.mean  # 3 x 256 x 256
        if not self.ten_crop:
            return center_crop(centred), label, skipped
        views = [centred[:, t:t + CROP_SIZE, l:l + CROP_SIZE] for t, l in _ten_crop_corners()]
        views += [v.flip(2) for v in views]
        return torch.stack(views), label, skipped  # 10 x 3 x 224 x 224


def center_crop(x: torch.Tensor) -> torch.Tensor:
    offset = (BASE_SIZE - CROP_SIZE) // 2
    return x[..., offset:offset + CROP_SIZE, offset:offset + CROP_SIZE].contiguous()


def eval_indices(num_images: int, limit: Optional[int]) -> list:
    """All validation indices in order, or ``limit`` of them spread evenly over the
    (class-sorted) set, so that a quick evaluation still covers every class."""
    if limit is None or limit >= num_images:
        return list(range(num_images))
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    return np.unique(np.linspace(0, num_images - 1, limit).round().astype(np.int64)).tolist()


def eval_batches(bundle: DataBundle, batch_size: int, ten_crop: bool = False, workers: int = 0,
                 limit: Optional[int] = None) -> Iterator:
    """The validation set in order, last partial batch kept: (N x 3 x 224 x 224 centre
    crops, or N x 10 x 3 x 224 x 224 for the ten-patch test, and N int64 labels). Views
    0-4 are the top-left, top-right, bottom-left, bottom-right and centre patches, 5-9
    their horizontal reflections."""
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    dataset = _EvalImages(bundle.val, bundle.stats.mean, eval_indices(len(bundle.val), limit), ten_crop)
    return _batches(dataset, bundle.val, batch_size, workers)


# --------------------------------------------------------------------------- built-in dataset

BUILTIN_NAME = "textures10-v2"  # change the version whenever the generator's output changes
BUILTIN_SEED = 20120101
BUILTIN_TRAIN_PER_CLASS = 250
BUILTIN_VAL_PER_CLASS = 20
BUILTIN_CLASSES = ("blotches", "checkerboard", "dots", "gradient", "grid", "rings", "solid", "stripes_d", "stripes_h",
                   "stripes_v")
_BUILTIN_SIZE = BASE_SIZE
_BUILTIN_QUALITY = 90
_BUILTIN_HUE_ORDER = ("stripes_h", "dots", "stripes_v", "rings", "stripes_d", "checkerboard", "gradient", "grid",
                      "solid", "blotches")  # blotches draws its own colours
_BUILTIN_HUE_SPREAD = 0.05  # of the colour wheel: hue centres are 0.05 apart, so neighbours overlap
# Moderate contrast and little noise: high-contrast edges and pixel noise in every 11x11
# patch give conv1 (which sees raw 0-255 values) huge gradients that stall early training.
_BUILTIN_BRIGHT, _BUILTIN_DARK = (0.55, 0.8), (0.3, 0.5)  # HSV value of the two colours
_BUILTIN_NOISE_STD = (0.0, 8.0)  # Gaussian pixel noise, per image, on the 0-255 scale


def _class_colours(class_name: str, rng: np.random.Generator):
    """(background, foreground) RGB on the 0-255 scale. Each class has its own hue
    centre in the first half of the colour wheel (_BUILTIN_HUE_ORDER, 1/20 apart, similar
    textures kept apart); the foreground hue lies within +-_BUILTIN_HUE_SPREAD of it, so
    hue alone narrows an image down to about two classes, and the background near the
    opposite hue; which of the two is the bright one is random."""
    hue = _BUILTIN_HUE_ORDER.index(class_name) / (2 * len(BUILTIN_CLASSES))
    bright, dark = rng.uniform(*_BUILTIN_BRIGHT), rng.uniform(*_BUILTIN_DARK)
    if rng.random() < 0.5:
        bright, dark = dark, bright
    foreground = colorsys.hsv_to_rgb((hue + rng.uniform(-_BUILTIN_HUE_SPREAD, _BUILTIN_HUE_SPREAD)) % 1.0,
                                     rng.uniform(0.5, 1.0), bright)
    background = colorsys.hsv_to_rgb((hue + 0.5 + rng.uniform(-_BUILTIN_HUE_SPREAD, _BUILTIN_HUE_SPREAD)) % 1.0,
                                     rng.uniform(0.3, 1.0), dark)
    return np.array(background, dtype=np.float32) * 255, np.array(foreground, dtype=np.float32) * 255


@functools.lru_cache(maxsize=2)
def _pixel_centres(size: int):
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + np.float32(0.5)
    return y, x


def draw_builtin(class_name: str, rng: np.random.Generator, size: int = _BUILTIN_SIZE) -> np.ndarray:
    """One size x size x 3 uint8 image of a class of the built-in dataset: a texture in
    two colours (a hint at the class, see _class_colours) with random scale, phase and
    rotation, plus pixel noise. A few milliseconds per image."""
    background, foreground = _class_colours(class_name, rng)
    y, x = _pixel_centres(size)
    spread = math.radians(15)  # how far oriented classes turn away from their axis
    axis = {"stripes_h": 0.0, "stripes_v": math.pi / 2, "stripes_d": math.pi / 4 * rng.choice([1, 3])}
    angle = axis.get(class_name, rng.uniform(0, 2 * math.pi)) + rng.uniform(-spread, spread)
    cos, sin = np.float32(math.cos(angle)), np.float32(math.sin(angle))
    # Rotated coordinates: stripes run along u, so their edges are perpendicular to v.
    u, v = x * cos + y * sin, y * cos - x * sin
    period = np.float32(rng.uniform(14, 40))
    phase_u, phase_v = (rng.uniform(0, 1, 2) * period).astype(np.float32)
    if class_name.startswith("stripes"):
        blend = (v + phase_v) % period < period / 2
    elif class_name == "checkerboard":
        blend = (np.floor((u + phase_u) / period) + np.floor((v + phase_v) / period)) % 2 == 0
    elif class_name == "grid":
        width = period * np.float32(rng.uniform(0.12, 0.25))
        blend = ((u + phase_u) % period < width) | ((v + phase_v) % period < width)
    elif class_name == "dots":
        du, dv = (u + phase_u) % period - period / 2, (v + phase_v) % period - period / 2
        blend = du * du + dv * dv < (period * np.float32(rng.uniform(0.2, 0.35))) ** 2
    elif class_name == "rings":  # concentric circles around a random point of the image
        cy, cx = (rng.uniform(0.2, 0.8, 2) * size).astype(np.float32)
        blend = (np.sqrt((x - cx) ** 2 + (y - cy) ** 2) + phase_u) % period < period / 2
    elif class_name == "gradient":
        blend = (u - u.min()) / (u.max() - u.min())
    elif class_name == "blotches":  # smooth random colour field from a coarse random grid
        grid = int(rng.integers(4, 13))
        coarse = rng.uniform(0, 255, (grid, grid, 3)).astype(np.uint8)
        image = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BILINEAR), dtype=np.float32)
    elif class_name == "solid":
        image = np.broadcast_to(background, (size, size, 3))
    else:
        raise ValueError(f"unknown built-in class {class_name!r}")
    if class_name not in ("blotches", "solid"):
        image = background + blend.astype(np.float32)[..., None] * (foreground - background)
    image = image + rng.standard_normal((size, size, 3), dtype=np.float32) * np.float32(rng.uniform(*_BUILTIN_NOISE_STD))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _generate_builtin(target: Path, train_per_class: int, val_per_class: int) -> None:
    for split_id, (split, per_class) in enumerate((("train", train_per_class), ("val", val_per_class))):
        for class_id, name in enumerate(BUILTIN_CLASSES):
            folder = target / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                # One stream per image: the file does not depend on the order of generation.
                rng = np.random.default_rng([BUILTIN_SEED, split_id, class_id, i])
                Image.fromarray(draw_builtin(name, rng)).save(folder / f"{name}_{i:05d}.jpg", quality=_BUILTIN_QUALITY)
    (target / "ABOUT.txt").write_text(
        f"{BUILTIN_NAME}: generated by launch/data.py (draw_builtin, seed {BUILTIN_SEED}); "
        f"{train_per_class} train and {val_per_class} val images per class. Safe to delete.\n")


def builtin_dataset(root: Optional[Path] = None, *, train_per_class: int = BUILTIN_TRAIN_PER_CLASS,
                    val_per_class: int = BUILTIN_VAL_PER_CLASS) -> Path:
    """The built-in dataset's folder, generated on first use: ten procedurally drawn
    classes (BUILTIN_CLASSES), 256x256 JPEGs in the ImageNet layout, identical on every
    machine. Made in a temporary sibling folder and renamed into place, so an
    interrupted generation never leaves a folder that looks complete."""
    root = Path(root) if root is not None else default_cache_dir() / BUILTIN_NAME
    if root.is_dir():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-", dir=root.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the dataset is not
    log.info("generating the built-in dataset in %s", root)
    try:
        _generate_builtin(staging, train_per_class, val_per_class)
        try:
            os.rename(staging, root)
        except OSError:
            if not root.is_dir():  # not another process finishing first: a real error
                raise
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return root
