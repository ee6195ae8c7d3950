"""The built-in dataset: ten procedurally drawn texture classes (BUILTIN_CLASSES),
256x256 JPEGs in the ImageNet layout, generated from a fixed seed in seconds and
identical on every machine.

Each class has its own pair of hues, but neighbouring classes overlap in hue, so
colour narrows an image down to about two classes and the texture (orientation,
period, dots, rings, ...) must decide. It is meant to be learnt by the full net from
scratch in minutes on a CPU, as a check that the whole program trains; it says
nothing about ImageNet accuracy.

It lives in ``<cache>/<BUILTIN_NAME>``, the cache being ``$XDG_CACHE_HOME/alexnet-towers``
or ``~/.cache/alexnet-towers`` (:func:`default_cache_dir`).
"""

import colorsys
import functools
import logging
import math
import os
import pwd
import shutil
import socket
import stat
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from .cli import remove_abandoned
from .images import BASE_SIZE, DataError

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/alexnet-towers`` where that is an absolute path (the XDG specification
    ignores a relative one), else ``~/.cache/alexnet-towers``: the home folder of HOME where that
    is absolute (an empty one would be the root folder), else of the password database.
    Raises DataError where neither has one."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    if os.path.isabs(base):
        return Path(base) / "alexnet-towers"
    home = os.environ.get("HOME", "")
    if not os.path.isabs(home):
        try:
            home = pwd.getpwuid(os.getuid()).pw_dir
        except KeyError:  # a container's user that /etc/passwd does not list
            home = ""
    if not os.path.isabs(home):
        raise DataError("no folder to keep the built-in dataset and other cached files in: HOME is not set to a "
                        "folder, and this user has no home folder here; set XDG_CACHE_HOME to a folder you can "
                        "write, or give a data folder of your own")
    return Path(home) / ".cache" / "alexnet-towers"


def default_root() -> Path:
    """Where the built-in dataset lives when no folder is given: ``<cache>/<BUILTIN_NAME>``."""
    return default_cache_dir() / BUILTIN_NAME


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
    if class_name not in BUILTIN_CLASSES:
        raise ValueError(f"unknown built-in class {class_name!r}")
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
    else:  # solid
        image = np.broadcast_to(background, (size, size, 3))
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
        f"{BUILTIN_NAME}: generated by launch/builtin.py (draw_builtin, seed {BUILTIN_SEED}); "
        f"{train_per_class} train and {val_per_class} val images per class. Safe to delete.\n")


def builtin_dataset(root: Optional[Path] = None, *, train_per_class: int = BUILTIN_TRAIN_PER_CLASS,
                    val_per_class: int = BUILTIN_VAL_PER_CLASS) -> Path:
    """The built-in dataset's folder, generated on first use: ten procedurally drawn
    classes (BUILTIN_CLASSES), 256x256 JPEGs in the ImageNet layout, identical on every
    machine. Made in a temporary sibling folder and renamed into place, so an
    interrupted generation never leaves a folder that looks complete."""
    root = Path(root) if root is not None else default_root()
    try:
        if root.is_dir():
            return root
    except OSError as exc:  # PermissionError: in a folder this user cannot enter, such as another's home
        raise DataError(_cannot_make(root, exc)) from None
    if os.path.lexists(root):  # a file, or a link to nothing, that the finished folder would be renamed onto
        if root.is_dir():  # or another run's folder, made since it was first asked
            return root
        raise DataError(f"{root}, where the built-in dataset goes, is not a folder: remove it, and the next run makes "
                        f"the dataset there")
    partial = f".{root.name}.partial-"  # then HOST-PID-, and mkdtemp's letters
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        remove_abandoned(root.parent, partial, suffixed=True)  # generations killed (50 MB each)
        staging = Path(tempfile.mkdtemp(prefix=f"{partial}{socket.gethostname()}-{os.getpid()}-", dir=root.parent))
    except OSError as exc:  # a read-only or full cache folder
        raise DataError(_cannot_make(root, exc)) from None
    log.info("generating the built-in dataset in %s", root)
    try:
        _generate_builtin(staging, train_per_class, val_per_class)
        # mkdtemp makes it private; the dataset is as any folder made here is: as its subfolders, by the umask
        staging.chmod(stat.S_IMODE((staging / "train").stat().st_mode))
        try:
            os.rename(staging, root)
        except OSError:
            if not root.is_dir():  # not another process finishing first: a real error
                raise
            shutil.rmtree(staging, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise DataError(_cannot_make(root, exc)) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return root


def _cannot_make(root: Path, exc: OSError) -> str:
    return (f"cannot make the built-in dataset in {root.parent} ({exc.strerror or exc}): set XDG_CACHE_HOME to a "
            f"folder with 70 MB free that you can write, or give a data folder of your own")
