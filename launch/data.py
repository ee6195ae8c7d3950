"""The data pipeline of section 2 and 4.1: ImageNet-layout folders in, mean-subtracted
224x224 crops out. Decoding is in :mod:`launch.images`, the training-set statistics in
:mod:`launch.stats`, the built-in dataset in :mod:`launch.builtin`.

Training adds random 224 crops, horizontal reflections and the PCA colour shift to the
base image; evaluation takes the centre crop, or the ten patches (four corners,
centre, and their reflections).

Split between host and device: the loader decodes and crops, and hands out uint8
pixels (a quarter of the bytes of float32, which matters when one rank loads and
broadcasts to the other); the mean subtraction, the reflection and the colour shift run
on the rank's device (:func:`augment`, :func:`eval_views`).

Exact resume: every random choice for a training sample (its place in the shuffled
order, crop, reflection, colour shift) is a pure function of (seed, epoch, position in
the epoch), so a run that starts at batch k sees exactly the batches a full run sees
from batch k on, whatever the number of DataLoader workers. The loaders are handed a
private ``torch.Generator``, so iterating them never touches the global RNG (dropout).

Corrupt images: checked lazily, when decoded (PIL's ``verify()`` misses truncated
JPEGs, and reading every file up front costs minutes on ImageNet). A file that fails
to decode, or that :func:`launch.images.load_image` refuses (too large, too elongated),
is replaced in training by the next usable image of the same split (index + 1,
wrapping), which keeps batches full and deterministic; in evaluation it is left out, so
that every image counts once. What was skipped, and why, travels back with
the batch, so the count is right with worker processes too: the batch iterators of
this module add the skipped paths to ``dataset.corrupt`` in the calling process and
log each one once, with why. ``open_data`` reads no more of each split than its first
usable image (a split with none is refused at once; for training, of each class of
train/), so that count grows as the data is used.

Links: the scan follows symbolic links (class folders kept on another disk, files
linked in from elsewhere) but never loops, never lists one file twice in a split, and
never lists under one class a file that lies in another class's folder (see
:func:`scan_layout`).
"""

import fcntl
import functools
import hashlib
import itertools
import logging
import os
import stat
import sys
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Optional, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from towers.reference import INPUT_SIZE

from .builtin import BUILTIN_CLASSES, BUILTIN_NAME, builtin_dataset
from .cli import home_path, not_there, open_lock_file, prints_plainly, real_path
from .images import BASE_SIZE, DECODE_ERRORS, IMAGE_EXTENSIONS, DataError, is_image_name, load_image, skip_reason
from .meter import console_handler, log_warnings
from .ranks import die_with_parent
from .stats import DataStats, load_or_compute_stats, relative_path

log = logging.getLogger(__name__)

PCA_ALPHA_STD = 0.1  # section 4.1: alpha_i ~ N(0, 0.1^2)
# Domain tags keep the streams drawn from one (seed, epoch) independent.
_ORDER_STREAM, _AUGMENT_STREAM = 0, 1


# --------------------------------------------------------------------------- datasets

# What becomes of an image that cannot be used, as the log says it: in training, in evaluation.
STANDS_IN = "the next image stands in for it"
LEFT_OUT = "it is left out"


class ImageFolderSplit(Dataset):
    """One split (``train/`` or ``val/``) of an ImageNet-layout folder.

    ``dataset[i]`` is (3 x 256 x 256 uint8 base image, class index); a corrupt or
    refused file is replaced as described in the module docstring. ``samples`` is the
    sorted list of (path, class index); ``ignored_files`` counts the non-image files
    found; ``corrupt`` holds the paths skipped so far in this process, ``replaced`` those of
    them that a batch met, each with the next image in its place (not the statistics' sample).
    """

    def __init__(self, split: str, classes: list, samples: list, ignored_files: int = 0):
        self.split, self.classes, self.samples = split, classes, samples
        self.ignored_files = ignored_files
        self.corrupt: set = set()
        self.replaced: set = set()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        image, label, _ = self.load(index)
        return image, label

    def load(self, index: int, substitute: bool = True):
        """(3 x 256 x 256 uint8 image, label, skipped): the image at ``index`` or, if that
        file is unreadable or refused, at the next usable index (with ``substitute``; else
        None); ``skipped`` lists (index, reason) for the files passed over."""
        skipped = []
        for step in range(len(self.samples)):
            candidate = (index + step) % len(self.samples)
            path, label = self.samples[candidate]
            try:
                pixels = load_image(path)
            except DECODE_ERRORS as error:
                skipped.append((candidate, skip_reason(path, error)))
                if not substitute:
                    return None, label, skipped
                continue
            return torch.from_numpy(pixels).permute(2, 0, 1).contiguous(), label, skipped
        such = f", such as {skipped[0][1]}" if skipped else ""
        raise DataError(f"no usable image in {self.split}/: each of its {len(self.samples)} files failed to decode or "
                        f"was refused{such}: replace them")

    def record_skipped(self, skipped, then: str = STANDS_IN) -> None:
        """Adds skipped (index, reason) pairs (reported by ``load``, possibly in a worker)
        to ``corrupt``, logging each file once with its reason and what ``then`` happens."""
        for index, reason in skipped:
            path = self.samples[index][0]
            if then == STANDS_IN:
                self.replaced.add(path)
            if path not in self.corrupt:
                self.corrupt.add(path)
                log.warning("skipped image %s (%d in %s/ so far); %s", reason, len(self.corrupt), self.split, then)

    def check_usable(self, each_class: bool = False, labels: Optional[set] = None) -> None:
        """Raises DataError where no image of the split can be used or, with ``each_class``
        (training, where the next image stands in for one that cannot be used: another
        class's, for every image of a class of none), no image of one of its classes (of
        ``labels`` alone, if given). Found by decoding up to the first usable one (one decode,
        or one a class, as a rule): before a run, not at its first evaluation. The unusable
        files met on the way are logged where they are used."""
        if not each_class:
            if self.samples:
                self.load(0)
            return
        for label, members in itertools.groupby(range(len(self.samples)), key=lambda i: self.samples[i][1]):
            if labels is not None and label not in labels:
                continue
            members, skipped = list(members), []
            for index in members:
                image, _, passed_over = self.load(index, substitute=False)
                if image is not None:
                    break
                skipped += passed_over
            else:
                raise DataError(f"no usable image of class {_as_shown(self.classes[label])} in {self.split}/: each "
                                f"of its {len(members)} files failed to decode or was refused, such as "
                                f"{skipped[0][1]}: replace them, or remove the class from both train/ and val/")


@dataclass
class DataBundle:
    root: Path
    classes: list
    train: ImageFolderSplit
    val: ImageFolderSplit
    stats: DataStats
    builtin: bool
    # {split: a digest of its images by name (relative to the split's folder), class and
    # size}: the same for the folder copied or moved elsewhere, another where one image is
    # renamed, or the pictures of two classes of the same file names are swapped
    digests: dict = field(default_factory=dict)

    def fingerprint(self, split: str) -> str:
        """A digest of the split's images by name and class alone, as checkpoints saved before
        ``digests`` recorded the validation set's (their "val_set")."""
        digest, folder = hashlib.sha256(), str(self.root / split)
        for path, label in getattr(self, split).samples:
            digest.update(os.fsencode(relative_path(path, folder)) + b"\0%d\0" % label)
        return digest.hexdigest()

    def describe(self) -> str:
        kind = "built-in dataset" if self.builtin else "data"
        return (f"{kind} {self.root}: {len(self.classes)} classes, {len(self.train)} train / "
                f"{len(self.val)} val images, stats from {self.stats.images} images (PCA: {self.stats.pca_source})")


# --------------------------------------------------------------------------- layout

# Names of files found beside the class folders of a split (labels, lists, archives): a link
# to nothing of such a name is no class folder. A class folder may have a dot in its name.
DATA_FILE_EXTENSIONS = IMAGE_EXTENSIONS + (".txt", ".csv", ".tsv", ".json", ".xml", ".md", ".mat", ".npy", ".pkl",
                                           ".pt", ".tar", ".gz", ".tgz", ".zip")


def _file_name(name: str) -> bool:
    return name.lower().endswith(DATA_FILE_EXTENSIONS)


# Folders that systems and tools make beside the pictures, not of them: a Synology NAS's
# thumbnails (@eaDir, in every folder it indexes) and recycle bin, macOS's zip leftovers,
# Windows' drive folders. Skipped as hidden folders are.
SYSTEM_FOLDERS = frozenset({"@eaDir", "#recycle", "#snapshot", "__MACOSX", "$RECYCLE.BIN", "System Volume Information"})


def not_data(name: str) -> bool:
    return name.startswith(".") or name in SYSTEM_FOLDERS


def _as_shown(name: str) -> str:
    """A folder name as is, or escaped where it is not in Unicode's composed form (NFD, as
    macOS and some copies write names: café in NFC and in NFD print alike, and differ), or
    holds a character that does not print, or a space at an end. (Letters of other scripts
    that look alike, such as a Cyrillic а, are not told apart.)"""
    return name if prints_plainly(name) and name == unicodedata.normalize("NFC", name) else ascii(name)


def _loose_images(split_dir: Path) -> int:
    """The images directly in a split's folder, beside its class folders: of no class."""
    return sum(1 for e in os.scandir(split_dir) if is_image_name(e.name) and not e.is_dir())


def _class_folders(split_dir: Path) -> list:
    """The class folders of a split, sorted: its folders and links to folders, never a hidden
    or system one. Raises DataError for a link to nothing, which may be a class whose disk is
    not there."""
    names = []
    with os.scandir(split_dir) as entries:  # closed by the error below too
        for entry in entries:
            if not_data(entry.name):
                continue
            if entry.is_dir():
                names.append(entry.name)
            elif entry.is_symlink() and not os.path.exists(entry.path) and not _file_name(entry.name):
                # (a file's link to nothing, labels.csv say, is as ignored as the file would be)
                raise DataError(f"{entry.path} is a link to {os.readlink(entry.path)}, which does not exist: a class "
                                f"folder whose disk is not mounted? Make it reachable, or remove the link")
    return sorted(names)


@dataclass
class Skipped:
    """What the scan of one split left out, and why."""
    other_files: int = 0  # files that are not images (by their extension), and hidden ones (macOS's ._x.jpg twins)
    loose_images: int = 0  # images directly in train/ or val/, beside the class folders: of no class
    hidden_folders: int = 0  # in class folders, not walked: thumbnail caches (.thumbs, @eaDir), a tool's own
    looping_links: list = field(default_factory=list)  # folder links back into their own class's walk
    other_class: list = field(default_factory=list)  # images reached through a link into another class's folder
    duplicates: list = field(default_factory=list)  # images listed already, under another path (same real file)
    broken_links: list = field(default_factory=list)  # image names that link to nothing, or in a loop
    not_files: list = field(default_factory=list)  # image names of something else: a pipe, a device, a socket

    def describe(self) -> str:
        """One line on the links skipped, each kind with its first path; "" if none."""
        kinds = [(self.looping_links, "folder links that loop (to a folder already walked in their class, or one "
                                      "holding their class folder)"),
                 (self.other_class, "images reached through a link into another class's folder"),
                 (self.duplicates, "images listed already under another path (the same file through a link)"),
                 (self.broken_links, "links that lead to no image (to nothing, or round in a loop)"),
                 (self.not_files, "image names of what is not a file (a pipe, a device), which a read would wait "
                                  "on or never end")]
        return "; ".join(f"{what}: {len(paths)}, e.g. {paths[0]}" for paths, what in kinds if paths)

    def report(self, split: str) -> None:
        """Logs what was left out of ``split``, each kind on a line of its own."""
        if self.other_files:
            log.info("%s/: ignored %d hidden files or files that are not images (%s)", split, self.other_files,
                     " ".join(IMAGE_EXTENSIONS))
        if self.loose_images:
            log.warning("%s/: ignored %d images directly in it, beside the class folders: they belong to no class "
                        "(move each into its class's folder)", split, self.loose_images)
        if self.hidden_folders:
            log.info("%s/: ignored %d hidden or system folders in class folders (thumbnail caches and the like)", split,
                     self.hidden_folders)
        if self.describe():
            log.warning("%s/: skipped %s", split, self.describe())


def too_deep(folder: Path) -> DataError:
    return DataError(f"{folder} holds folders nested too deep for this Python to walk (about "
                     f"{sys.getrecursionlimit()} levels): move the images fewer folders down")


def class_owners(split_dir: Path, names: list) -> dict:
    """{real path of a class folder of the split: its class}, as images_in takes them; of two
    class folders that are one folder, the first owns it."""
    owners = {}
    for name in names:
        owners.setdefault(os.path.realpath(split_dir / name), name)
    return owners


def _owner(real_dir: str, owners: dict):
    """The class whose (real) folder holds the real path ``real_dir``, or None."""
    while real_dir not in owners:
        parent = os.path.dirname(real_dir)
        if parent == real_dir:
            return None
        real_dir = parent
    return owners[real_dir]


def images_in(folder: Path, name: str, owners: dict, seen: set, skipped: Skipped, files: set) -> list:
    """Sorted [(path, (size in bytes, modification time in ns))] of the images under
    ``folder``, the folder of class ``name``, recursively, following links (a link's size
    and time are its target's). ``owners`` maps the real path of each class
    folder of the split to its class; ``seen`` holds the real paths listed so far in the
    split. What is left out is counted in ``skipped``; ``files`` receives the (device,
    inode) of each image listed, which a hard link shares."""
    top = os.path.realpath(folder)
    real_dirs = {str(folder): top}  # walked path -> real path, filled as the walk goes down
    visited = {top}
    images = []
    for dirpath, dirnames, filenames in os.walk(folder, onerror=_raise, followlinks=True):
        real_dir = real_dirs.pop(dirpath)
        kept = []
        for sub in sorted(dirnames):
            if not_data(sub):
                skipped.hidden_folders += 1
                continue
            path = os.path.join(dirpath, sub)
            if os.path.islink(path):
                real = os.path.realpath(path)
                # A link to a folder walked already, or to one holding this class folder
                # (a link to "." or ".."), would list the same files again, or forever.
                if real in visited or os.path.commonpath([real, top]) == real:
                    skipped.looping_links.append(path)
                    continue
            else:
                real = os.path.join(real_dir, sub)
            visited.add(real)
            real_dirs[path] = real
            kept.append(sub)
        dirnames[:] = kept
        dir_owner = _owner(real_dir, owners)
        for file_name in sorted(filenames):
            path = os.path.join(dirpath, file_name)
            if not is_image_name(file_name):
                skipped.other_files += 1
                continue
            # Another class's image if found in another class's folder (through a folder
            # link), or if it is a link into another class's folder.
            status = os.lstat(path)
            link = stat.S_ISLNK(status.st_mode)
            if link:
                try:
                    status = os.stat(path)  # what it links to: its kind, size and time
                except OSError:
                    skipped.broken_links.append(path)
                    continue
            real, owner = os.path.join(real_dir, file_name), dir_owner
            if link and owner in (None, name):
                real = os.path.realpath(path)
                owner = _owner(os.path.dirname(real), owners)
            if owner not in (None, name):
                skipped.other_class.append(path)
            elif real in seen:
                skipped.duplicates.append(path)
            elif not stat.S_ISREG(status.st_mode):
                skipped.not_files.append(path)
            else:
                seen.add(real)
                files.add((status.st_dev, status.st_ino))
                images.append((path, (status.st_size, status.st_mtime_ns)))
    return images


def _identity(path: str) -> tuple:
    status = os.stat(path)
    return status.st_dev, status.st_ino


def scan_layout(root: Union[str, Path], builtin_alternative: bool = True, need_train: bool = True):
    """Checks an ImageNet-layout folder and lists it. Returns (classes, {split: [(path,
    (size, mtime_ns))] per class}, {split: Skipped}); raises DataError naming the fix, and
    where ``builtin_alternative`` (a program whose data option may be left out), the built-in dataset.
    Without ``need_train`` (an evaluation), val/ alone is listed, and train/ is neither read
    nor needed: the training split is empty.

    Links are followed, but a folder link back into its own class's walk (to a folder
    walked already, or to one holding the class folder) is skipped, and so is an image
    that is listed already in the split (same real path) or whose real path lies in
    another class's real folder (the innermost one, where class folders nest)."""
    try:
        return _scan_layout(home_path(root), builtin_alternative, need_train)
    except OSError as exc:  # a folder or file on the way that cannot be read
        raise cannot_read(exc, root) from None


def cannot_read(exc: OSError, root) -> DataError:
    """The error of a scan of the data folder ``root`` that met ``exc``."""
    return DataError(f"cannot read {exc.filename or root} ({exc.strerror or exc}): make the data folder readable "
                     f"(every folder in it), or pass another data folder")


def _raise(exc: OSError):
    raise exc


# In the DST of a python -m launch.prepare until it has written every image: a tree that it was
# stopped in, or is still writing, lacks some (the last classes of val/, say) and is refused.
UNFINISHED_NAME = ".prepare-unfinished"
# In the DST of a python -m launch.prepare: locked by it (exclusively) while it writes there, and
# by a training run reading the folder (shared): each refuses the other.
PREPARE_LOCK_NAME = ".prepare.lock"


def hold_for_reading(root: Path):
    """A shared lock on the data folder ``root`` where a python -m launch.prepare made it (it
    holds PREPARE_LOCK_NAME), held while the returned file stays open: a launch.prepare into
    ``root`` is refused meanwhile. None where there is nothing to lock (a folder made otherwise,
    a file system without locks). Raises DataError where a launch.prepare writes there now."""
    try:  # read-only (the data may be another user's); a folder or a pipe of that name is no launch.prepare's
        fd = open_lock_file(root / PREPARE_LOCK_NAME, os.O_RDONLY)
    except OSError:
        return None
    lock = os.fdopen(fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = lock.read(200).strip() or "another process"
        lock.close()
        raise DataError(f"{root} is being written by a python -m launch.prepare ({holder}): wait for it to end, then "
                        f"start again") from None
    except OSError:
        lock.close()
        return None
    return lock


def _scan_layout(root: Path, builtin_alternative: bool, need_train: bool):
    layout_hint = "expected ROOT/train/CLASS/*.jpg and ROOT/val/CLASS/*.jpg with the same CLASS folders in both"
    if not root.is_dir():
        what = not_there(root) or "is not a folder"
        builtin = ", or no data folder to use the built-in dataset" if builtin_alternative else ""
        raise DataError(f"data folder {root} {what}: pass the path of a folder that holds train/ and val/ "
                        f"({layout_hint}){builtin}")
    if os.path.lexists(root / UNFINISHED_NAME):
        raise DataError(f"{root} is the DST of a python -m launch.prepare that has not finished (stopped, or still "
                        f"running), and lacks some of its images: run that command again to its end (it goes on "
                        f"where it stopped)")
    splits = ("train", "val") if need_train else ("val",)
    missing = [s for s in splits if not (root / s).is_dir()]
    if missing:
        raise DataError(f"{root} has no {' and no '.join(s + '/' for s in missing)} folder: {layout_hint}")
    classes = {s: _class_folders(root / s) for s in splits}
    for split, names in classes.items():
        if not names:
            loose = _loose_images(root / split)
            fix = (f"it holds {loose} images directly: sort them into {split}/CLASS/ folders"
                   + (" (for ILSVRC-2012 val, e.g. with the devkit's labels and a valprep script)" if split == "val" else "")
                   if loose else "put the images of each class in their own folder")
            raise DataError(f"no images found: {root / split} has no class folders; {fix} ({layout_hint})")
    if classes.get("train", classes["val"]) != classes["val"]:
        only_train = sorted(set(classes["train"]) - set(classes["val"]))
        only_val = sorted(set(classes["val"]) - set(classes["train"]))
        show = lambda names: ", ".join(map(_as_shown, names[:10])) + (f" and {len(names) - 10} more"
                                                                     if len(names) > 10 else "")
        parts = ([f"only in train/: {show(only_train)}"] if only_train else []) + \
                ([f"only in val/: {show(only_val)}"] if only_val else [])
        raise DataError(f"class folders differ between train/ and val/ of {root} ({'; '.join(parts)}): "
                        f"make both hold the same class folders (add the missing ones or remove the extra ones)")
    names = classes["val"]
    files = {"train": [[] for _ in names]}
    skipped, identities = {"train": Skipped()}, {"train": set()}
    for split in splits:
        owners = class_owners(root / split, names)
        seen, skipped[split], identities[split] = set(), Skipped(), set()
        skipped[split].loose_images = _loose_images(root / split)
        try:
            files[split] = [images_in(root / split / name, name, owners, seen, skipped[split], identities[split])
                            for name in names]
        except RecursionError:  # os.walk recurses, before Python 3.12
            raise too_deep(root / split) from None
    both = identities["train"] & identities["val"]
    if both:
        example = next(path for images in files["val"] for path, _ in images if _identity(path) in both)
        raise DataError(f"{len(both)} validation image(s) of {root} are training images too (the same file, through a "
                        f"link), such as {example}: the validation error would not measure how the net does on "
                        f"images it has not learnt from. Give val/ images of its own")
    if not any(files["train"]) and not any(files["val"]):
        others = skipped["train"].other_files + skipped["val"].other_files
        raise DataError(f"no images found under {root} (looked for {' '.join(IMAGE_EXTENSIONS)}, any case; "
                        f"ignored {others} other files): add images to the class folders")
    for split in splits:
        empty = [name for name, images in zip(names, files[split]) if not images]
        if empty:
            raise DataError(f"{len(empty)} class folder(s) in {root / split} hold no images "
                            f"({', '.join(map(_as_shown, empty[:10]))}{' ...' if len(empty) > 10 else ''}): add "
                            f"images to them or remove the class from both train/ and val/")
    return names, files, skipped


def open_data(data_dir: Optional[Union[str, Path]], *, cache_dir: Optional[Path] = None,
              stats: Optional[DataStats] = None, classify: bool = False, need_train: bool = True,
              before_stats: Optional[Callable[[DataBundle], None]] = None,
              builtin_alternative: bool = True) -> DataBundle:
    """Opens an ImageNet-layout folder (``data_dir``) or, for None, the built-in dataset
    (made in ``cache_dir`` if given, else ``default_cache_dir()``, on first use). With
    ``classify`` (a net is to be trained to tell its classes apart), a folder of one class is
    refused, and so is a class none of whose training images can be used (the next image, of
    another class, would stand in for each).
    ``stats`` given (by a rank that received them, or from a checkpoint to evaluate) are
    used instead of the cache's. Without ``need_train`` (an evaluation, given ``stats``),
    train/ is not read, and the training split is empty. ``before_stats(bundle)``, the bundle
    without its statistics, is called before they are computed or cached (a resume's check that
    the data is the run's, which writes nothing, nor decodes 2,000 images, where it refuses).
    Without ``builtin_alternative`` (a program where no data folder means another thing than
    the built-in dataset), a folder that cannot be used is not said to be one to leave out.
    Raises DataError with the fix when the folder cannot be used."""
    builtin = data_dir is None
    root = (builtin_dataset(None if cache_dir is None else Path(cache_dir) / BUILTIN_NAME) if builtin
            else home_path(data_dir))
    if not need_train and stats is None:
        raise ValueError("open_data: a folder without train/ has no statistics of its own; give them as stats")
    try:
        classes, files, skipped = scan_layout(root, builtin_alternative, need_train)
        if builtin:  # as generated: its ten classes, as many images in each as in the others of its split
            if tuple(classes) != BUILTIN_CLASSES:
                raise DataError(f"its classes are {', '.join(map(_as_shown, classes))}, not the ten generated")
            for split, images in files.items():
                if len({len(of_class) for of_class in images}) > 1:
                    raise DataError(f"the classes of its {split}/ hold {', '.join(str(len(i)) for i in images)} "
                                    f"images, where each holds as many as the others")
    except DataError as exc:
        if not builtin:
            raise
        raise DataError(f"the built-in dataset's folder is damaged ({exc}): delete {root}, and the next run makes it "
                        f"again") from None
    if classify and len(classes) < 2:  # before its statistics are computed: the net would refuse it
        raise DataError(f"{root} has one class, {_as_shown(classes[0])}: a classifier tells classes apart, so add "
                        f"the folders of the others (two at least) to train/ and val/")
    splits = {}
    for split in ("train", "val"):
        samples = [(path, label) for label, images in enumerate(files[split]) for path, _ in images]
        splits[split] = ImageFolderSplit(split, classes, samples, skipped[split].other_files)
        skipped[split].report(split)
    for split in splits.values():
        split.check_usable(each_class=classify and split.split == "train")
    digests = {}
    for split in ("train", "val"):
        digest, folder = hashlib.sha256(), str(root / split)
        for label, images in enumerate(files[split]):
            for path, (size, _) in images:
                digest.update(os.fsencode(relative_path(path, folder)) + b"\0%d\0%d\0" % (label, size))
        digests[split] = digest.hexdigest()
    bundle = DataBundle(root, classes, splits["train"], splits["val"], stats, builtin, digests)
    if before_stats is not None:
        before_stats(bundle)
    if stats is None:
        train_files = [f for images in files["train"] for f in images]
        bundle.stats = load_or_compute_stats(root, splits["train"], train_files, cache_dir)
    return bundle


# --------------------------------------------------------------------------- batches

def _collate(items):
    """(images, labels, skipped) of a batch; an item whose image is None (an evaluation
    image that could not be used) is left out, so a batch may be short, even empty."""
    kept = [(image, label) for image, label, _ in items if image is not None]
    images = torch.stack([image for image, _ in kept]) if kept else torch.empty(0)
    labels = torch.tensor([label for _, label in kept], dtype=torch.int64)
    if kept and get_worker_info() is not None:
        # Into shared memory here, where the batch goes to the rank: where /dev/shm has no room
        # this raises, and the rank gets the error. Left to the worker's queue, the failure comes
        # in the queue's own thread, which drops the batch, and the rank waits for it for good.
        images, labels = images.share_memory_(), labels.share_memory_()
    return images, labels, [i for _, _, skipped in items for i in skipped]


# The choices are drawn for a block of positions at a time, one generator per (seed, epoch,
# block): drawn position by position they took 40 us each, 5 ms per batch of 128 on the
# training loop's thread, where a GPU's step waits for them.
DRAW_BLOCK = 1024


@functools.lru_cache(maxsize=4)  # a batch lies in one or two blocks; each process keeps its own
def _draw_block(seed: int, epoch: int, block: int) -> tuple:
    """Read-only (corners DRAW_BLOCK x 2 int64 (top, left), flips DRAW_BLOCK bool, alphas
    DRAW_BLOCK x 3 float64) of positions block * DRAW_BLOCK onwards of epoch ``epoch``."""
    rng = np.random.default_rng([_AUGMENT_STREAM, seed, epoch, block])
    draws = (rng.integers(0, BASE_SIZE - INPUT_SIZE + 1, size=(DRAW_BLOCK, 2)), rng.random(DRAW_BLOCK) < 0.5,
             rng.normal(0.0, PCA_ALPHA_STD, size=(DRAW_BLOCK, 3)))
    for array in draws:
        array.flags.writeable = False
    return draws


class Augmentation(NamedTuple):
    """Section 4.1's random choices for a batch of N training samples."""
    top: torch.Tensor  # N int64: row of the 224 crop in the 256 base image
    left: torch.Tensor  # N int64: its column
    flip: torch.Tensor  # N bool: horizontal reflection
    alpha: torch.Tensor  # N x 3 float32: the PCA colour shift's coefficients, ~ N(0, 0.1^2)

    def to(self, device) -> "Augmentation":
        return Augmentation(*(t.to(device) for t in self))


def train_augmentation(seed: int, epoch: int, first: int, count: int) -> Augmentation:
    """The choices for positions first .. first + count - 1 of epoch ``epoch``. Known to
    every rank without communication: each one is a function of (seed, epoch, position)."""
    first_block, end_block = first // DRAW_BLOCK, -(-(first + count) // DRAW_BLOCK)
    blocks = [_draw_block(seed, epoch, block) for block in range(first_block, max(end_block, first_block + 1))]
    start = first - first_block * DRAW_BLOCK
    corners, flips, alphas = (np.concatenate(parts)[start:start + count] for parts in zip(*blocks))
    return Augmentation(torch.from_numpy(corners[:, 0].copy()), torch.from_numpy(corners[:, 1].copy()),
                        torch.from_numpy(flips.copy()), torch.from_numpy(alphas.astype(np.float32)))


def augment(crops: torch.Tensor, choices: Augmentation, stats: DataStats) -> torch.Tensor:
    """Section 4.1 on the device of ``crops`` (N x 3 x 224 x 224 uint8, cut at ``choices``'
    places): minus the mean image cut at the same places, reflected where ``flip``, plus
    the colour shift eigvec @ (alpha * eigval) added to every pixel. N x 3 x 224 x 224 float32."""
    device = crops.device
    choices = choices.to(device)
    offsets = torch.arange(INPUT_SIZE, device=device)
    rows, cols = choices.top[:, None] + offsets, choices.left[:, None] + offsets  # N x 224 each
    mean = stats.mean.to(device)[:, rows[:, :, None], cols[:, None, :]].transpose(0, 1)  # N x 3 x 224 x 224
    x = crops.float() - mean
    x = torch.where(choices.flip[:, None, None, None], x.flip(3), x)
    shift = (choices.alpha * stats.eigval.to(device)) @ stats.eigvec.to(device).T  # N x 3
    return x + shift[:, :, None, None]


@functools.lru_cache(maxsize=2)  # the epoch being loaded (and the one before, as a new one starts)
def epoch_order(num_images: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled order of epoch ``epoch``, seeded by (seed, epoch) alone; read-only, as
    every caller of the same epoch shares it."""
    order = np.random.default_rng([_ORDER_STREAM, seed, epoch]).permutation(num_images)
    order.flags.writeable = False
    return order


def batches_per_epoch(bundle: DataBundle, batch_size: int) -> int:
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    return len(bundle.train) // batch_size  # drop_last: a partial batch would change the step's statistics


def check_outside_the_images(flag: str, given: str, root: Path) -> None:
    """Raises ValueError naming the fix where the folder ``given`` (with ``flag``) lies in the
    data's train/ or val/ (``root``'s): a run folder there would be read as a class of its own
    by every later scan of that data, a resume's included."""
    try:
        folder = real_path(given)
    except OSError:  # a name too long: its making names the fault
        return
    for split in ("train", "val"):
        images = real_path(root / split)
        if folder == images or images in folder.parents:
            raise ValueError(f"{flag} {given} lies in the data's {split}/ ({images}), where a folder would be "
                             f"taken for a class of images: give {flag} outside {images}")


def check_batch_size(bundle: DataBundle, batch_size: int) -> None:
    """Raises ValueError naming the fix where not one batch of ``batch_size`` fits the training images."""
    if batches_per_epoch(bundle, batch_size) == 0:
        raise ValueError(f"--batch-size {batch_size} is larger than the {len(bundle.train)} training images: "
                         f"choose a smaller one")


def _end_with(parent_pid: int, worker_id: int) -> None:
    """A worker ends with the process that started it. DataLoader's own check is not enough:
    a worker whose parent was killed while the worker was still starting watches its new
    parent instead, and waits for batches forever. (It ends by torch's own handler of SIGTERM,
    at once, whatever it is doing; its multiprocessing folder in TMPDIR, with the socket it
    hands its batches over through, then stays there. A handler of Python's that removed it
    would run only once the worker came back from C, which one stuck there never does.)
    A library's warning (PIL's about an image it decodes) is a line of the console, as the
    rank's are (:func:`launch.meter.log_warnings`): a spawned worker has neither."""
    die_with_parent(parent_pid)
    logging.basicConfig(level=logging.WARNING, handlers=[console_handler()])
    log_warnings()


def share_of_batch(batch_size: int, share: tuple) -> tuple:
    """(first position within a batch, size) of share ``share = (index, shares)`` of every batch."""
    index, shares = share
    assert batch_size % shares == 0 and 0 <= index < shares, (batch_size, share)
    size = batch_size // shares
    return index * size, size


SHARED_MEMORY = "/dev/shm"  # where a DataLoader worker's batches wait for the rank (torch's shared memory)
WORKER_PREFETCH = 2  # DataLoader's prefetch_factor: the batches each worker keeps ready


def worker_bytes(batch_size: int) -> int:
    """The most one DataLoader worker holds in SHARED_MEMORY: its WORKER_PREFETCH batches of
    ``batch_size`` images, each at most a 256 x 256 base image (the ten-patch test's) and a label."""
    return WORKER_PREFETCH * batch_size * (3 * BASE_SIZE * BASE_SIZE + 8)


def shared_memory_free(folder: str = SHARED_MEMORY) -> Optional[int]:
    """Bytes free in ``folder``; None where there is no such folder."""
    try:
        status = os.statvfs(folder)
    except OSError:
        return None
    return status.f_bavail * status.f_frsize


class Loader:
    """A rank's batches, for training and evaluation, from one DataLoader whose ``workers``
    worker processes start with the first batch and live until :meth:`close` (or the end of
    a ``with`` block): a new epoch or evaluation starts at once. A loader that started them
    afresh each time waited 3 s for its first batch and 1 s for its workers to end (2
    workers spawned on a 2-core CPU; each imports torch), twice an epoch. With ``workers``
    0 the images are loaded in the calling process. Only the keys of the items travel to
    the workers ((seed, epoch, position) or a validation index); each batch asked for ends
    the iteration of the one before it."""

    def __init__(self, bundle: DataBundle, workers: int = 0, pin_memory: bool = False):
        self.bundle, self._requests, self._current = bundle, _Requests(), None
        # A private generator: DataLoader draws its workers' base seed from it, which would
        # otherwise advance the global RNG (and so change dropout) on every new iterator.
        # Pinned memory lets the copy to a GPU run while the GPU computes.
        self._loader = DataLoader(_Items(bundle.train, bundle.val), batch_sampler=self._requests,
                                  num_workers=workers, collate_fn=_collate, persistent_workers=workers > 0,
                                  prefetch_factor=WORKER_PREFETCH if workers else None,
                                  generator=torch.Generator().manual_seed(0), pin_memory=pin_memory,
                                  worker_init_fn=functools.partial(_end_with, os.getpid()))

    def train(self, batch_size: int, seed: int, epoch: int, start_batch: int = 0,
              share: tuple = (0, 1)) -> Iterator:
        """Batches (N x 3 x 224 x 224 uint8 crops, N int64 labels) of epoch ``epoch``,
        shuffled by a permutation seeded by (seed, epoch), only full batches, starting at
        batch ``start_batch`` without decoding the skipped ones. The rest of the
        augmentation is :func:`augment` with :func:`train_augmentation`, on the device.
        With ``share = (i, n)`` only the i-th n-th of each batch is loaded (N = batch_size / n):
        the n shares of a batch are its images in order, whatever n is."""
        total = batches_per_epoch(self.bundle, batch_size)
        if total == 0:
            raise ValueError(f"batch size {batch_size} is larger than the training set ({len(self.bundle.train)} "
                             f"images): use a smaller batch")
        if not 0 <= start_batch <= total:
            raise ValueError(f"start_batch {start_batch} is outside the epoch's {total} batches")
        if seed < 0 or epoch < 0:
            raise ValueError(f"seed and epoch must be non-negative, got seed={seed}, epoch={epoch}")
        first, size = share_of_batch(batch_size, share)
        keys = ([("train", seed, epoch, batch * batch_size + first + k) for k in range(size)]
                for batch in range(start_batch, total))
        # the errors above come at the call, not at the first batch
        return self._batches(keys, total - start_batch, self.bundle.train, STANDS_IN, INPUT_SIZE)

    def eval(self, batch_size: int, ten_crop: bool = False, limit: Optional[int] = None,
             share: tuple = (0, 1)) -> Iterator:
        """The validation set in order, last partial batch kept: (N x 3 x 224 x 224 uint8 centre
        crops, or N x 3 x 256 x 256 uint8 base images for the ten-patch test, and N int64
        labels); :func:`eval_views` makes the network's input of them. Unusable images are
        left out (logged), so N may fall short of ``batch_size`` in any batch. With ``share``
        only that share of the images (see :func:`eval_share`)."""
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        indices = eval_share(len(self.bundle.val), limit, share)
        keys = ([("val", index, ten_crop) for index in indices[start:start + batch_size]]
                for start in range(0, len(indices), batch_size))
        return self._batches(keys, -(-len(indices) // batch_size), self.bundle.val, LEFT_OUT,
                             BASE_SIZE if ten_crop else INPUT_SIZE)

    def _batches(self, keys: Iterator, count: int, split: ImageFolderSplit, then: str, side: int) -> Iterator:
        if self._current is not None:
            self._current.close()  # its iteration is over: the DataLoader serves one at a time
        self._requests.keys, self._requests.count = keys, count
        self._current = self._iterate(split, then, side)
        return self._current

    def _iterate(self, split: ImageFolderSplit, then: str, side: int) -> Iterator:
        try:
            for images, labels, skipped in self._loader:
                split.record_skipped(skipped, then)  # here, in the calling process, whichever process decoded
                if not len(labels):  # every image of the batch left out: empty, but of the batches' shape and type
                    images = torch.empty((0, 3, side, side), dtype=torch.uint8)
                yield images, labels
        except RuntimeError as exc:  # raised in a worker by _collate
            if "unable to allocate shared memory" not in str(exc):
                raise
            free = shared_memory_free()
            raise RuntimeError(f"the batches of {self._loader.num_workers} DataLoader workers found no room in "
                               f"{SHARED_MEMORY} ({'?' if free is None else free // 10**6} MB free; each worker holds "
                               f"up to {WORKER_PREFETCH} batches there): give fewer workers (--workers), or "
                               f"{SHARED_MEMORY} more room (docker run --shm-size)") from exc

    def close(self) -> None:
        """Ends the worker processes (waiting for them); the loader is not used after."""
        if self._current is not None:
            self._current.close()
        iterator = getattr(self._loader, "_iterator", None)  # persistent workers: DataLoader keeps their iterator
        if iterator is not None:
            iterator._shutdown_workers()  # what DataLoader does when the iterator is collected, done now
            self._loader._iterator = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Requests:
    """The DataLoader's batch sampler: the keys of the batches asked for last. DataLoader
    reads it in the calling process as an iteration starts; the workers see only keys."""

    def __init__(self):
        self.keys, self.count = iter(()), 0

    def __iter__(self):
        return self.keys

    def __len__(self) -> int:
        return self.count


class _Items(Dataset):
    """Items by key: ("train", seed, epoch, position) is the uint8 224 crop of the training
    sample at that position of the epoch's order, at the place ``train_augmentation``
    draws for it; ("val", index, ten_crop) the validation image's 224 centre crop, or its
    whole 256 base image for the ten-patch test (the views are cut on the device by
    :func:`eval_views`). An unusable validation image is left out, not replaced by its
    neighbour (which would then be counted twice)."""

    def __init__(self, train: ImageFolderSplit, val: ImageFolderSplit):
        self.train, self.val = train, val

    def __getitem__(self, key: tuple):
        if key[0] == "val":
            _, index, ten_crop = key
            image, label, skipped = self.val.load(index, substitute=False)
            if image is None or ten_crop:
                return image, label, skipped
            return center_crop(image), label, skipped
        _, seed, epoch, position = key
        image, label, skipped = self.train.load(int(epoch_order(len(self.train), seed, epoch)[position]))
        block, offset = divmod(position, DRAW_BLOCK)
        top, left = _draw_block(seed, epoch, block)[0][offset].tolist()
        return image[:, top:top + INPUT_SIZE, left:left + INPUT_SIZE].contiguous(), label, skipped


def train_batches(bundle: DataBundle, batch_size: int, seed: int, epoch: int, start_batch: int = 0,
                  workers: int = 0) -> Iterator:
    """:meth:`Loader.train` from a loader of its own, whose workers end with the epoch."""
    loader = Loader(bundle, workers)
    return _closing(loader.train(batch_size, seed, epoch, start_batch), loader)


def _closing(batches: Iterator, loader: Loader) -> Iterator:
    with loader:
        yield from batches


def _ten_crop_corners():
    edge = BASE_SIZE - INPUT_SIZE
    return ((0, 0), (0, edge), (edge, 0), (edge, edge), (edge // 2, edge // 2))  # (top, left): TL TR BL BR centre


def eval_views(images: torch.Tensor, stats: DataStats, ten_crop: bool) -> torch.Tensor:
    """The network's input from ``Loader.eval``'s uint8 images, on their device: the centre
    crops minus the mean's centre (N x 3 x 224 x 224 float32), or for the ten-patch test
    N x 10 x 3 x 224 x 224, views 0-4 the top-left, top-right, bottom-left, bottom-right
    and centre patches, 5-9 their horizontal reflections."""
    mean = stats.mean.to(images.device)
    if not ten_crop:
        return images.float() - center_crop(mean)
    centred = images.float() - mean  # N x 3 x 256 x 256
    views = [centred[..., t:t + INPUT_SIZE, l:l + INPUT_SIZE] for t, l in _ten_crop_corners()]
    return torch.stack(views + [v.flip(-1) for v in views], dim=1)


def center_crop(x: torch.Tensor) -> torch.Tensor:
    offset = (BASE_SIZE - INPUT_SIZE) // 2
    return x[..., offset:offset + INPUT_SIZE, offset:offset + INPUT_SIZE].contiguous()


def eval_indices(num_images: int, limit: Optional[int]) -> list:
    """All validation indices in order, or ``limit`` of them spread evenly over the
    (class-sorted) set, so that a quick evaluation still covers every class."""
    if limit is None or limit >= num_images:
        return list(range(num_images))
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    return np.unique(np.linspace(0, num_images - 1, limit).round().astype(np.int64)).tolist()


def eval_share(num_images: int, limit: Optional[int], share: tuple = (0, 1)) -> list:
    """The validation indices that share ``share = (i, n)`` evaluates: every n-th, from the i-th."""
    index, shares = share
    return eval_indices(num_images, limit)[index::shares]
