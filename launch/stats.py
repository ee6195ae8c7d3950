"""Training-set statistics (sections 2 and 4.1): the per-pixel mean image and the
PCA of the RGB pixel values, computed once from a sample of the training images and
cached.

The cache file is stored next to the data as ``.alexnet-stats-<key>.pt``, or in
``<cache>/stats`` (``launch.builtin.default_cache_dir()``), named after the data folder
too, when the data folder cannot be written; keyed by the names, sizes and modification
times of the training files so that a changed dataset (an image added, removed, renamed
or rewritten) never gets stale statistics.
"""

import contextlib
import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch

from .builtin import default_cache_dir
from .checkpoint import MEAN_SHAPE, damaged_record, save_checkpoint
from .images import BASE_SIZE, DECODE_ERRORS, DataError, load_image, skip_reason

if TYPE_CHECKING:
    from .data import ImageFolderSplit

log = logging.getLogger(__name__)

STATS_SAMPLE = 2000  # training images read for the mean image and the RGB covariance
STATS_VERSION = 2  # part of the cache key: bump when the computation or the decoding of an image changes
CACHED_SHAPES = {"mean": MEAN_SHAPE, "eigval": (3,), "eigvec": (3, 3)}  # each float32

# The PCA of ImageNet's RGB pixels as published with fb.resnet.torch and used by most
# reproductions: the eigenvalues of the covariance of pixels on the 0-1 scale (as a
# photograph's are: about 90 %, 8 % and 2 % of the variance; as standard deviations they
# would leave the third component 0.04 % of it). See DataStats for the scale used here.
IMAGENET_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_EIGVEC = ((-0.5675, 0.7192, 0.4009),
                   (-0.5808, -0.0045, -0.8140),
                   (-0.5836, -0.6948, 0.4203))  # columns are the eigenvectors
_WORDNET_ID = re.compile(r"n\d{8}")


@dataclass
class DataStats:
    """Training-set statistics on the 0-255 scale.

    Convention for the PCA: ``eigval[i]`` is the paper's lambda_i, the i-th eigenvalue of the
    RGB covariance, in decreasing order, of the pixels on the 0-1 scale, times 255 (the scale
    of the pixels it shifts): the scale of fb.resnet.torch's published ImageNet numbers
    (IMAGENET_EIGVAL), which most reproductions use. (On the 0-255 scale itself the first
    eigenvalue is some 14,000 for a photograph, 3,000 for the built-in set, and an alpha of 0.1
    would move a pixel 1,400 or 300 levels.) ``eigvec[:, i]`` is its principal component.
    The colour shift of section 4.1 is eigvec @ (alpha * eigval).
    """
    mean: torch.Tensor  # 3 x 256 x 256 float32, the per-pixel mean base image
    eigval: torch.Tensor  # 3, float32, the covariance's eigenvalues on the 0-1 scale times 255, decreasing
    eigvec: torch.Tensor  # 3 x 3 float32, columns are the principal components
    images: int = 0  # how many training images the statistics were computed from
    pca_source: str = "computed"  # or "imagenet": the published ImageNet PCA; "not used": a mean alone (of_mean)

    @classmethod
    def of_mean(cls, mean: torch.Tensor) -> "DataStats":
        """A checkpoint's mean image as statistics, for an evaluation: it subtracts the mean
        and shifts no colour, so no PCA (nor pass over the training images) is needed."""
        return cls(mean, torch.zeros(3), torch.eye(3), pca_source="not used")


def pca_from_covariance(covariance: np.ndarray):
    """(eigval, eigvec) in the DataStats convention from the covariance of 0-255 pixels: its
    eigenvalues on the 0-1 scale times 255 (divided by 255), decreasing, with the eigenvectors
    as columns, each signed so its largest entry is positive."""
    values, vectors = np.linalg.eigh(np.asarray(covariance, dtype=np.float64))
    order = np.argsort(values)[::-1]
    values, vectors = values[order], vectors[:, order]
    signs = np.sign(vectors[np.abs(vectors).argmax(axis=0), np.arange(3)])
    return np.clip(values, 0.0, None) / 255.0, vectors * signs


def _is_imagenet(classes) -> bool:
    return len(classes) == 1000 and all(_WORDNET_ID.fullmatch(c) for c in classes)


def compute_stats(train: "ImageFolderSplit", sample: int = STATS_SAMPLE, use_imagenet_pca: bool = False) -> DataStats:
    """Mean base image and RGB PCA from ``sample`` training images spread evenly over the
    (class-sorted) list, so that each class contributes in proportion to its images (one
    that holds less than a ``sample``-th of them may contribute none). Unreadable and refused files
    (see ``load_image``) are skipped."""
    picks = np.unique(np.linspace(0, len(train) - 1, min(sample, len(train))).round().astype(np.int64))
    # numpy, in float64: sums of uint8 values stay exact here (< 2^53), and torch's
    # strided uint8 -> float64 conversion of an HWC image is several times slower.
    pixel_sum = np.zeros((BASE_SIZE, BASE_SIZE, 3), dtype=np.float64)
    colour_outer = np.zeros((3, 3), dtype=np.float64)
    used = 0
    for index in picks.tolist():
        path = train.samples[index][0]
        try:
            pixels = load_image(path)
        except DECODE_ERRORS as error:
            train.record_skipped([(index, skip_reason(path, error))], "it is left out of the statistics, and training puts the next image in its place")
            continue
        pixel_sum += pixels
        flat = pixels.reshape(-1, 3).astype(np.float64)
        colour_outer += flat.T @ flat
        used += 1
    if used == 0:
        raise DataError(f"none of the {len(picks)} training images sampled for the statistics could be used "
                        f"(each was unreadable or refused; see the warnings above): replace or remove them")
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


def relative_path(path: str, folder: str) -> str:
    """``os.path.relpath(path, folder)`` for a ``path`` that a walk of ``folder`` joined, by
    a slice: a million images' names in about a second, ten times as fast as relpath."""
    return path[len(folder) + 1:] if path.startswith(folder + os.sep) else os.path.relpath(path, folder)


def _stats_key(root: Path, train_files: list, sample: int, imagenet: bool) -> str:
    digest = hashlib.sha256(f"stats v{STATS_VERSION} sample={sample} imagenet={imagenet}\n".encode())
    folder = str(root)
    for path, (size, mtime_ns) in train_files:
        # surrogateescape: a file name that is not UTF-8 hashes as its bytes (a UTF-8 one as before)
        digest.update(f"{relative_path(path, folder)}\t{size}\t{mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:20]


def _remove_stale(places: list, target: Path, of_folder: str) -> None:
    """Removes the statistics that are never read again, beside ``target`` just written: those of
    the training images as they were, beside the data or of its folder in the cache folder, and
    the cache folder's named before they were named after their data folder."""
    beside, *cache = (place.parent for place in places)
    stale = list(beside.glob(".alexnet-stats-*.pt"))
    for folder in cache:
        stale += [p for p in folder.glob(".alexnet-stats-*.pt") if p.name.startswith(of_folder)
                  or re.fullmatch(r"\.alexnet-stats-[0-9a-f]{20}\.pt", p.name)]
    for path in stale:
        if path != target:
            with contextlib.suppress(OSError):  # a folder that cannot be written keeps them
                path.unlink()


def load_or_compute_stats(root: Path, train: "ImageFolderSplit", train_files: list, cache_dir: Optional[Path] = None,
                          sample: int = STATS_SAMPLE) -> DataStats:
    """The DataStats of a training set, from its cache file if one matches the current
    files (names, sizes and modification times), else computed and cached next to the data, or in
    ``cache_dir/stats`` where the data folder cannot be written."""
    imagenet = _is_imagenet(train.classes)
    key = _stats_key(root, train_files, sample, imagenet)
    name = f".alexnet-stats-{key}.pt"
    places = [root / name]  # and the cache folder's, where there is one
    # The cache folder's is named after the data folder too: folders whose training files have the
    # same names, sizes and times (images of one size in an uncompressed format, times set alike)
    # get each their own statistics there, where beside the data each has its own file anyway.
    of_folder = f".alexnet-stats-{hashlib.sha256(os.fsencode(os.path.realpath(root))).hexdigest()[:12]}-"
    with contextlib.suppress(ValueError):
        places.append(Path(cache_dir or default_cache_dir()) / "stats" / f"{of_folder}{key}.pt")
    for candidate in places:
        if os.path.isfile(candidate):  # False, not PermissionError, in a folder this user cannot enter
            try:
                damaged = damaged_record(candidate)  # torch.load would load damaged bytes as numbers
                if damaged is not None:
                    raise ValueError(f"its record {damaged} does not match its checksum: damaged")
                saved = torch.load(candidate, weights_only=True)
                stats = DataStats(saved["mean"], saved["eigval"], saved["eigvec"], int(saved["images"]),
                                  str(saved["pca_source"]))
                if saved["key"] != key:
                    raise ValueError("written for other data")
                odd = [name for name, shape in CACHED_SHAPES.items() if not (isinstance(saved[name], torch.Tensor)
                       and saved[name].dtype == torch.float32 and tuple(saved[name].shape) == shape)]
                if odd:  # each failed in a rank, every run again
                    raise ValueError(f"its {' and '.join(odd)} not of the shape and type this program writes")
                if not all(torch.isfinite(t).all() for t in (stats.mean, stats.eigval, stats.eigvec)):
                    raise ValueError("it holds numbers that are not finite")
                if (stats.eigval < 0).any():
                    raise ValueError("it holds eigenvalues below 0")
            except Exception as exc:  # an unreadable or foreign cache is recomputed, never trusted
                log.warning("ignoring unusable statistics cache %s (%s)", candidate, exc)
                continue
            log.info("training-set statistics from %s", candidate)
            return stats
    log.info("computing training-set statistics from up to %d images of %s", sample, root / "train")
    stats = compute_stats(train, sample, use_imagenet_pca=imagenet)
    payload = {"key": key, "mean": stats.mean, "eigval": stats.eigval, "eigvec": stats.eigvec,
               "images": stats.images, "pca_source": stats.pca_source}
    for target in places:  # the data folder may be read-only or full
        try:
            save_checkpoint(target, payload)
            _remove_stale(places, target, of_folder)
            if target.parent != root:  # where a later run, or the user clearing space, will look for them
                log.warning("the training-set statistics are cached in %s instead", target)
            break
        except OSError as exc:
            log.warning("could not cache the training-set statistics in %s (%s)", target.parent, exc.strerror or exc)
    else:
        log.warning("the statistics are not cached: they will be computed again next time")
    return stats

