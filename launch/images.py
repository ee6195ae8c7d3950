"""Decoding: any image file to the paper's *base image* (section 2).

Every image is brought to one canonical form before anything else: RGB, uint8,
shorter side rescaled to 256, central 256x256 patch (:func:`load_image`). The
network then sees raw pixel values 0-255 minus the training set's per-pixel mean
image (no division by a standard deviation).
"""

import math
import os
import stat
import struct
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image

from .cli import without_line_breaks

BASE_SIZE = 256  # section 2: shorter side rescaled to 256, central 256x256 patch
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def is_image_name(name: str) -> bool:
    """Whether a data folder's scan reads the file ``name`` as an image: by its extension, any
    case; never a hidden file (macOS's ._x.jpg twins, a write cut short)."""
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)

TRANSPARENT_BACKGROUND = (128, 128, 128)  # mid-grey: close to the mean, so near 0 after subtraction
# Longer side over shorter side. The central square of a longer image shows less than a
# twentieth of it, blown up: a strip, a banner or a broken header rather than a picture
# of its class. Panoramas are usually well below it.
MAX_ASPECT_RATIO = 20
# The pixel limit is PIL's own, Image.MAX_IMAGE_PIXELS (about 89 million), read at each
# call so that setting it applies here too.

# Errors PIL raises for a file that is not a readable image (truncated, corrupt,
# unidentified, an absurd size; TypeError for a TIFF tag of the wrong type;
# NotImplementedError for a format it knows in a variant it cannot decode, such as a DDS
# pixel format), and ImageRejected (a ValueError); anything else is a bug and propagates.
DECODE_ERRORS = (OSError, ValueError, TypeError, SyntaxError, EOFError, struct.error, IndexError, NotImplementedError,
                  Image.DecompressionBombError)


class DataError(ValueError):
    """The data folder cannot be used as it is; the message names the fix, on one line
    however the names of the folders and files in it are written."""

    def __str__(self) -> str:
        return without_line_breaks(super().__str__())


class ImageRejected(ValueError):
    """A readable image refused for its size (above ``Image.MAX_IMAGE_PIXELS``) or
    shape (above ``MAX_ASPECT_RATIO``); the message names the file and the limit."""


def skip_reason(path: Union[str, Path], error: Exception) -> str:
    """How the logs name a file that ``load_image`` failed on: a refused image as what
    it is (too large, aspect ratio), anything else as unreadable."""
    if isinstance(error, ImageRejected):
        return str(error)
    return f"{path}: unreadable ({type(error).__name__}: {error})"


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB. Transparency is composited on mid-grey (a 16-bit PNG's
    transparent grey too); 16-bit greyscale (modes I;16* and I, as PNG, TIFF and PGM open)
    is scaled 65535 -> 255 (a TIFF's 2^bits - 1, where it holds fewer bits) rather than
    clipped, which is what PIL's own convert would do. Floating-point greyscale (mode F, as
    TIFF opens) is scaled 1 -> 255 when every value lies in 0-1, the usual range of float
    images, and taken as 0-255 otherwise (PIL would clip 0-1 to black)."""
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        grey = np.nan_to_num(np.asarray(image, dtype=np.float64))
        key = image.info.get("transparency")  # a PNG's transparent grey (tRNS), as stored
        keyed = grey == key if type(key) is int else None
        if image.mode != "F":  # a TIFF of 10, 12 or 14 bits opens as 16, its values as stored: 2^bits - 1 is white
            bits = tuple(image.tag_v2.get(258, ())) if image.format == "TIFF" else ()
            grey *= 255.0 / (2.0 ** bits[0] - 1 if bits and 8 < bits[0] < 16 else 65535.0)
        elif grey.size and 0 <= grey.min() and grey.max() <= 1:
            grey *= 255.0
        if keyed is not None:
            grey[keyed] = TRANSPARENT_BACKGROUND[0]
        image = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), mode="L")
        return image.convert("RGB")
    if image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or image.has_transparency_data:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, TRANSPARENT_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _source_span(length: int, new_length: int, size: int):
    """One axis of ``resize_center``: the source pixels [first, last) that bilinear
    resampling of ``length`` to ``new_length`` reads for the central ``size`` output
    pixels, and where those output pixels start and end in that span (floats)."""
    step = length / new_length  # source pixels per output pixel
    start = (new_length - size) // 2 * step
    end = min(start + size * step, length)  # min: float rounding must not leave the image
    reach = max(step, 1.0)  # PIL's bilinear filter: one output pixel, at least one source pixel, each side
    first, last = max(0, math.floor(start - reach)), min(length, math.ceil(end + reach))
    return first, last, start - first, end - first


def resize_center(image: Image.Image, size: int = BASE_SIZE) -> Image.Image:
    """Shorter side to ``size`` (up or down, bilinear with PIL's antialiasing), then the
    central ``size`` x ``size`` patch. Images smaller than the crop are enlarged here.

    Only the source pixels under the central patch are resampled, at the scale and
    centre of resizing the whole image, so the work is about size x size whatever the
    shape (resizing first made a 1 x 20000 image 256 x 5,120,000). The two passes are
    made one axis at a time, horizontal first as PIL orders them for a whole image of
    ordinary shape: given a box, PIL may order them the other way, and the rounding of
    the intermediate image then moves many pixels by one grey level."""
    width, height = image.size
    if width == height == size:  # a base image already (the built-in set, launch.prepare's output): as it is
        return image
    scale = size / min(width, height)
    new_width, new_height = max(size, round(width * scale)), max(size, round(height * scale))
    x_first, x_last, left, right = _source_span(width, new_width, size)
    y_first, y_last, top, bottom = _source_span(height, new_height, size)
    rows = y_last - y_first
    image = image.crop((x_first, y_first, x_last, y_last))
    image = image.resize((size, rows), Image.BILINEAR, box=(left, 0, right, rows))
    return image.resize((size, size), Image.BILINEAR, box=(0, top, size, bottom))


def _check_limits(path: Union[str, Path], width: int, height: int) -> None:
    """Raises ImageRejected, before any pixel is decoded, for an image above the limits."""
    if Image.MAX_IMAGE_PIXELS is not None and width * height > Image.MAX_IMAGE_PIXELS:
        raise ImageRejected(f"{path}: too large: {width} x {height} pixels, above the limit of "
                            f"{Image.MAX_IMAGE_PIXELS} pixels (PIL.Image.MAX_IMAGE_PIXELS): shrink it or leave it out")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        ratio, places = max(width, height) / min(width, height), 1
        while round(ratio, places) <= MAX_ASPECT_RATIO and places < 6:  # 4001 x 200: 20.005, not 20.0, above 20
            places += 1
        raise ImageRejected(f"{path}: aspect ratio {ratio:.{places}f}:1 ({width} x {height} pixels) above "
                            f"{MAX_ASPECT_RATIO}:1 (MAX_ASPECT_RATIO): crop it or leave it out")


def _open(path: Union[str, Path]) -> Image.Image:
    # A file replaced since the folder was listed (which refuses these) by a named pipe would
    # be waited on for good, a device read without end
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise OSError("not a regular file (a named pipe, a device, a folder): replace it with the image, or remove it")
    # PIL checks the size itself on opening: it warns above MAX_IMAGE_PIXELS (the caller
    # refuses those, naming the size) and raises above twice that.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            return Image.open(path)
        except Image.DecompressionBombError as error:
            raise ImageRejected(f"{path}: too large: above twice the limit of {Image.MAX_IMAGE_PIXELS} pixels "
                                f"(PIL.Image.MAX_IMAGE_PIXELS; PIL: {error}): shrink it or leave it out") from None


def load_image(path: Union[str, Path], size: int = BASE_SIZE) -> np.ndarray:
    """The base image of one file: size x size x 3 uint8 RGB. Raises ImageRejected for an
    image above the size or aspect-ratio limits, one of PIL's decode errors for a corrupt
    file (see ``DECODE_ERRORS``)."""
    with _open(path) as image:
        _check_limits(path, *image.size)
        if image.mode == "I" and image.format == "TIFF" and 32 in tuple(image.tag_v2.get(258, ())):  # BitsPerSample
            # (a 16-bit PGM opens as mode I too, scaled to 0-65535 by PIL): any scale to 8 bits would be a guess,
            # and this one (65535 -> 255) made the 0-255 values of such a file black
            raise ImageRejected(f"{path}: 32-bit integer greyscale, whose range of values the file does not say: "
                                f"convert it to 8 or 16 bits, or leave it out")
        # JPEG only: let libjpeg decode at 1/2, 1/4 or 1/8 scale while both sides stay
        # >= size. Deterministic, and several times faster on large photographs.
        image.draft(image.mode, (size, size))
        image = resize_center(_to_rgb(image), size)
        return np.array(image, dtype=np.uint8)  # a writable copy: torch.from_numpy wants one
