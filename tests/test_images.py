"""launch.images: how a file's pixels become the base image, checked against values derived
here from the file's own pixels (PIL opening it, integer arithmetic)."""

import numpy as np
from PIL import Image, ImageOps

from launch import images


def test_sixteen_bit_grey_is_rounded_to_the_nearest_of_255_levels_of_65535(tmp_path):
    """Every 16-bit grey value, 0 to 65535 (a 256 x 256 image holds each once, so nothing is
    resized), is the 8-bit level nearest to value * 255 / 65535: 65535 is white, and a value is
    never a level below its nearest one (the integers below round halves up; v * 255 / 65535 is
    v / 257, never a half)."""
    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as image:
        assert image.mode.startswith("I") and np.array_equal(np.asarray(image), values)  # 16 bits, as written
    wide = values.astype(np.int64)
    expected = (2 * wide * 255 + 65535) // (2 * 65535)
    assert expected[0, 0] == 0 and expected[-1, -1] == 255
    pixels = images.load_image(path)
    assert (pixels == expected[:, :, None]).all()


def test_the_exif_orientation_tag_is_not_applied(tmp_path):
    """As the README says (and torchvision's loaders do): a photo stored sideways, with an EXIF
    tag that asks a viewer to turn it, is the base image as its pixels are stored, not turned."""
    pixels = np.zeros((256, 256, 3), dtype=np.uint8)
    pixels[:128] = (200, 20, 20)  # the top half red
    pixels[128:] = (20, 20, 200)  # the bottom half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: turn 90 degrees clockwise to view
    path = tmp_path / "sideways.jpg"
    Image.fromarray(pixels).save(path, quality=95, exif=exif)
    with Image.open(path) as image:
        assert image.getexif().get(0x0112) == 6
        stored = np.asarray(image.convert("RGB"), dtype=np.int16)
        turned = np.asarray(ImageOps.exif_transpose(image).convert("RGB"), dtype=np.int16)
    assert np.abs(turned - stored).max() > 100  # turned, the red half would lie elsewhere
    assert np.array_equal(images.load_image(path), stored)


def test_a_large_jpeg_is_the_image_libjpeg_decodes_at_a_quarter_scale(tmp_path):
    """A 1024 x 1024 JPEG is decoded by libjpeg at 1/4 scale, 256 x 256 (the smallest that
    keeps 256 pixels a side), which is then the base image as it is: not decoded whole and
    resized by PIL's bilinear filter, whose pixels differ."""
    noise = np.random.default_rng(3).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    photo = Image.fromarray(noise).resize((1024, 1024), Image.BICUBIC)  # detail at every scale
    path = tmp_path / "large.jpg"
    photo.save(path, quality=95)
    with Image.open(path) as image:
        image.draft("RGB", (256, 256))
        assert image.size == (256, 256)
        quarter = np.asarray(image.convert("RGB"))
    with Image.open(path) as image:
        whole = np.asarray(image.convert("RGB").resize((256, 256), Image.BILINEAR))
    assert not np.array_equal(quarter, whole)
    assert np.array_equal(images.load_image(path), quarter)


def test_float_grey_in_0_to_1_is_scaled_so_that_each_level_over_255_is_that_level(tmp_path):
    """A 32-bit float TIFF of values 0-1 is scaled 1 -> 255: the value k / 255 is 8-bit level k,
    for every k from 0 to 255 (one 256-pixel column each, so nothing is resized)."""
    levels = np.arange(256)
    path = tmp_path / "float.tif"
    Image.fromarray(np.tile((levels / 255).astype(np.float32), (256, 1)), mode="F").save(path)
    with Image.open(path) as image:
        assert image.mode == "F"
    pixels = images.load_image(path)
    assert (pixels == levels[None, :, None]).all()
