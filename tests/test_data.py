"""The data pipeline on real files: layout errors, symbolic links, colour modes, the
resize, corrupt and refused files, the built-in dataset, cached statistics,
deterministic batches, ten-crop, and the prepare tool as a real subprocess.
Everything is made in tmp_path."""

import errno
import gc
import hashlib
import inspect
import itertools
import json
import logging
import multiprocessing
import os
import resource
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
import types
import unicodedata
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from launch import builtin, cli, data, images, prepare, stats, two_gpu
from launch.config import parse_config
from launch.images import DataError

from conftest import as_foreground_job, damaged_tiff, short_temporary, undecodable_dds

REPO = Path(__file__).resolve().parents[1]


def _save(path: Path, image: Image.Image, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def _rgb(seed: int, size=(80, 60)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _simple_tree(root: Path, classes=("a", "b"), train=3, val=2) -> Path:
    for split, count in (("train", train), ("val", val)):
        for c, name in enumerate(classes):
            for i in range(count):
                _save(root / split / name / f"{i}.jpg", _rgb(100 * c + 10 * (split == "val") + i))
    return root


def _data_folders_read_only(monkeypatch, *folders: Path) -> None:
    """Statistics cannot be saved beside the data of ``folders`` (as where they cannot be written):
    only in the cache folder."""
    real_save = stats.save_checkpoint

    def read_only(path, payload):
        if path.parent in folders:
            raise PermissionError(f"read-only: {path}")
        real_save(path, payload)
    monkeypatch.setattr(stats, "save_checkpoint", read_only)


def _mixed_tree(root: Path) -> dict:
    """Two classes with every kind of file the loader must cope with; returns the odd ones."""
    train = root / "train"
    _save(train / "a" / "rgb.jpg", _rgb(1, (300, 200)))
    _save(train / "a" / "grey.png", Image.new("L", (64, 80), 77))
    _save(train / "a" / "palette.png", _rgb(2).convert("P"))
    _save(train / "a" / "cmyk.jpg", Image.new("CMYK", (90, 70), (10, 20, 30, 40)))
    _save(train / "a" / "clear.png", Image.new("RGBA", (70, 70), (255, 0, 0, 0)))
    _save(train / "a" / "deep.png", Image.fromarray(np.full((40, 60), 65535, dtype=np.uint16)))
    _save(train / "a" / "tiny.png", _rgb(3, (50, 30)))
    _save(train / "a" / "UPPER.JPG", _rgb(4))
    _save(train / "b" / "rgb.bmp", _rgb(5))
    _save(train / "b" / "rgb.gif", _rgb(6))
    _save(train / "b" / "rgb.tif", _rgb(7))
    whole = _save(train / "b" / "whole.jpg", _rgb(8, (300, 300))).read_bytes()
    truncated = train / "b" / "truncated.jpg"
    truncated.write_bytes(whole[: len(whole) // 2])
    fake = train / "b" / "fake.jpg"
    fake.write_text("this is not an image")
    (train / "b" / "notes.txt").write_text("ignored")
    (train / "a" / "._rgb.jpg").write_bytes(b"\0\5\26\7 macOS's resource fork of rgb.jpg")  # hidden: ignored
    _save(train / "b" / ".thumbs" / "whole.jpg", _rgb(8, (30, 30)))  # a hidden folder: a viewer's, not data
    for folder in (train / "b", train, root / "val"):  # a Synology NAS's thumbnails, in every folder it indexes
        _save(folder / "@eaDir" / "whole.jpg" / "SYNOPHOTO_THUMB_M.jpg", _rgb(8, (30, 30)))
    _save(train / "b" / "z_last.jpg", _rgb(9))
    for name in ("a", "b"):
        _save(root / "val" / name / "v.jpg", _rgb(20 + len(name)))
    return {"truncated": str(truncated), "fake": str(fake)}


# --------------------------------------------------------------------------- layout errors

def _no_train(root):
    _simple_tree(root)
    os.rename(root / "train", root / "training")


def _differing_classes(root):
    _simple_tree(root, classes=("a", "b", "only_train", "café"))
    os.rename(root / "val" / "only_train", root / "val" / "only_val")
    os.rename(root / "val" / "café", root / "val" / unicodedata.normalize("NFD", "café"))  # prints alike


def _empty_class(root):
    _simple_tree(root)
    (root / "train" / "empty").mkdir()
    _save(root / "val" / "empty" / "v.jpg", _rgb(0))


def _empty_class_of_a_two_line_name(root):
    """A name that would print as a line of its own, read as another error's."""
    _simple_tree(root)
    (root / "train" / "x\nerror: other").mkdir()
    _save(root / "val" / "x\nerror: other" / "v.jpg", _rgb(0))


def _no_images(root):
    for split in ("train", "val"):
        (root / split / "a").mkdir(parents=True)
        (root / split / "a" / "readme.txt").write_text("not an image")


def _flat_val(root):
    _simple_tree(root)
    for path in (root / "val").rglob("*.jpg"):
        os.rename(path, root / "val" / f"{path.parent.name}_{path.name}")
    for folder in ("a", "b"):
        (root / "val" / folder).rmdir()


@pytest.mark.parametrize("make, expected", [
    (None, ["does not exist", "train/ and val/", "built-in"]),
    (_no_train, ["no train/", "ROOT/train/CLASS"]),
    (_differing_classes, ["only in train/: café, only_train", "only in val/: 'cafe\\u0301', only_val",
                          "same class folders"]),
    (_empty_class, ["hold no images (empty)", "add images"]),
    (_empty_class_of_a_two_line_name, ["hold no images ('x\\nerror: other')"]),
    (_no_images, ["no images found", "ignored 2 other files", "add images"]),
    (_flat_val, ["no class folders", "4 images directly", "sort them into val/CLASS/"]),
], ids=["missing", "no-train", "differing-classes", "empty-class", "empty-class-of-a-two-line-name", "no-images",
        "flat-val"])
def test_layout_errors_name_the_fix(tmp_path, make, expected):
    root = tmp_path / "data"
    if make is not None:
        make(root)
    with pytest.raises(DataError) as info:
        data.open_data(root, cache_dir=tmp_path / "cache")
    assert "\n" not in str(info.value)  # one line
    for fragment in expected:
        assert fragment in str(info.value), str(info.value)


def test_a_data_error_is_one_line_whatever_its_folders_are_named(tmp_path):
    """A class folder named with a newline, whose images cannot be used: its name and its
    images' paths in the error broke it into lines, the next read as another error."""
    root = _simple_tree(tmp_path / "data", classes=("a", "x\nerror: other"))
    for image in (root / "train" / "x\nerror: other").iterdir():
        image.write_bytes(b"HEIC, not a JPEG")
    with pytest.raises(DataError) as refused:
        data.open_data(root, cache_dir=tmp_path / "cache", classify=True)
    said = str(refused.value)
    assert "\n" not in said and said.startswith("no usable image of class 'x\\nerror: other' in train/: ")
    assert f"such as {tmp_path}/data/train/x\\nerror: other/0.jpg: unreadable (" in said


def test_a_name_holding_a_line_separator_is_kept_on_one_line():
    """U+2028 and U+2029 end a line in editors and many terminals as a newline does: a name
    holding one is escaped in messages, and quoted as the shell reads it back where a name
    is printed alone; a name of other characters, accented ones too, is left as it is."""
    for separator, escaped in (("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        assert cli.without_line_breaks(f"a{separator}b.jpg") == f"a{escaped}b.jpg"
        assert cli.one_line(f"a{separator}b.jpg") == f"$'a{escaped}b.jpg'"
    assert cli.without_line_breaks("café.jpg") == cli.one_line("café.jpg") == "café.jpg"


def test_an_evaluation_opens_a_folder_without_train(tmp_path):
    """Given the statistics (a checkpoint's mean image), an evaluation reads val/ alone: a
    train/ that is not there, or that could not be trained on, does not matter."""
    root = _simple_tree(tmp_path / "data")
    stats = data.open_data(root, cache_dir=tmp_path / "cache").stats
    whole = data.open_data(root, cache_dir=tmp_path / "cache")
    for damage in (lambda: os.rename(root / "train" / "b", root / "train" / "c"),  # other classes
                   lambda: [image.unlink() for image in (root / "train" / "c").iterdir()],  # an empty class
                   lambda: shutil.rmtree(root / "train"),
                   lambda: (root / "train").write_bytes(b"")):  # a file, not the folder
        damage()
        alone = data.open_data(root, stats=stats, need_train=False)
        assert alone.classes == whole.classes and alone.val.samples == whole.val.samples and not alone.train.samples
        assert alone.stats is stats and alone.digests["val"] == whole.digests["val"]
        with pytest.raises(DataError):  # a training run is refused it
            data.open_data(root, stats=stats)
    with pytest.raises(ValueError, match="give them as stats"):  # no training set to compute them from
        data.open_data(root, need_train=False)
    (root / "train").unlink()
    with pytest.raises(DataError, match="has no train/ folder"):
        data.open_data(root, stats=stats)


@pytest.mark.parametrize("unreadable", ["train", "train/b"], ids=["split", "class"])
def test_a_folder_that_cannot_be_read_is_named(tmp_path, monkeypatch, unreadable):
    # Simulated (the tests may run as root, who reads any folder): the error os.scandir gives
    # for a folder without read permission, which os.walk would otherwise pass over in silence.
    root = _simple_tree(tmp_path / "data")
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(path) == root / unreadable:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(DataError) as info:
        data.open_data(root, cache_dir=tmp_path / "cache")
    assert str(info.value) == (f"cannot read {root / unreadable} (Permission denied): make the data folder readable "
                               f"(every folder in it), or pass another data folder")


# --------------------------------------------------------------------------- links

def _relative(files: dict, root: Path) -> dict:
    return {split: [[os.path.relpath(path, root) for path, _ in images] for images in per_class]
            for split, per_class in files.items()}


# scan_layout in a child process, so that a scan that never ends fails the test on its
# timeout instead of hanging the run.
_SCAN = """
import dataclasses, json, sys
from launch import data
classes, files, skipped = data.scan_layout(sys.argv[1])
print(json.dumps({"files": {split: [[path for path, _ in images] for images in per_class]
                            for split, per_class in files.items()},
                  "skipped": {split: dataclasses.asdict(s) for split, s in skipped.items()}}))
"""


def test_links_back_into_the_class_folder_are_skipped(tmp_path):
    root = _simple_tree(tmp_path / "data", train=1, val=1)
    _save(root / "train" / "a" / "sub" / "deep.jpg", _rgb(7))
    os.symlink(".", root / "train" / "a" / "self")
    os.symlink("..", root / "train" / "a" / "sub" / "up")  # the class folder again
    # Two loops: walked, they branch at every level until the paths grow too long.
    done = subprocess.run([sys.executable, "-c", _SCAN, str(root)], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    train = root / "train"
    assert found["files"]["train"] == [[str(train / "a" / "0.jpg"), str(train / "a" / "sub" / "deep.jpg")],
                                       [str(train / "b" / "0.jpg")]]
    assert found["skipped"]["train"]["looping_links"] == [str(train / "a" / "self"), str(train / "a" / "sub" / "up")]
    assert found["skipped"]["train"]["duplicates"] == [] and found["skipped"]["train"]["other_class"] == []


def test_link_to_the_split_folder_does_not_relabel_other_classes(tmp_path, caplog):
    root = _simple_tree(tmp_path / "data", train=2, val=1)
    os.symlink("..", root / "train" / "a" / "up")  # train/a/up/b/ holds class b's images
    caplog.set_level(logging.INFO, logger="launch.data")
    bundle = data.open_data(root, cache_dir=tmp_path / "cache")
    assert [(os.path.relpath(path, root), label) for path, label in bundle.train.samples] == [
        ("train/a/0.jpg", 0), ("train/a/1.jpg", 0), ("train/b/0.jpg", 1), ("train/b/1.jpg", 1)]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"train/: skipped folder links that loop (to a folder already walked in their class, or one "
                        f"holding their class folder): 1, e.g. {root / 'train' / 'a' / 'up'}"]


def test_class_folder_linked_from_another_disk_works(tmp_path, caplog):
    root = _simple_tree(tmp_path / "data", train=1, val=1)
    elsewhere = tmp_path / "other_disk"
    for split in ("train", "val"):
        _save(elsewhere / split / "c" / "0.jpg", _rgb(50 + len(split)))
        os.symlink(elsewhere / split / "c", root / split / "c")
    caplog.set_level(logging.INFO, logger="launch.data")
    bundle = data.open_data(root, cache_dir=tmp_path / "cache")
    assert bundle.classes == ["a", "b", "c"]
    assert [(os.path.relpath(path, root), label) for path, label in bundle.train.samples] == [
        ("train/a/0.jpg", 0), ("train/b/0.jpg", 1), ("train/c/0.jpg", 2)]
    assert bundle.stats.images == 3 and not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("name", ["c", "St. Bernard", "n02085620.v2"])
def test_a_class_folder_linked_to_nothing_is_refused_not_left_out(tmp_path, name):
    root = _simple_tree(tmp_path / "data", train=1, val=1)
    for split in ("train", "val"):
        os.symlink(tmp_path / "unmounted" / split / name, root / split / name)
    with pytest.raises(DataError, match=f"^{root / 'train' / name} is a link to {tmp_path / 'unmounted'}/train/{name}, "
                                        f"which does not exist: a class folder whose disk is not mounted\\? Make it "
                                        f"reachable, or remove the link$"):
        data.scan_layout(root)


def test_of_two_class_folders_that_are_one_folder_the_first_owns_its_images(tmp_path):
    """b a link to a: the images are a's (the first class by name), and b is a class of none."""
    root = _simple_tree(tmp_path / "data", classes=("a", "c"))
    for split in ("train", "val"):
        (root / split / "b").symlink_to(root / split / "a")
    assert data.class_owners(root / "train", ["a", "b", "c"]) == {str((root / "train" / name).resolve()): name
                                                                 for name in ("a", "c")}
    with pytest.raises(DataError, match=r"^1 class folder\(s\) in \S+/train hold no images \(b\)"):
        data.scan_layout(root)


def test_a_class_folder_named_as_an_image_is_a_class_not_a_loose_image(tmp_path):
    """Only files directly in train/ are images of no class: a class folder whose name ends in
    .jpg is a class like any other."""
    root = _simple_tree(tmp_path / "data", classes=("a", "b.jpg"))
    _save(root / "train" / "loose.jpg", _rgb(9))
    classes, files, skipped = data.scan_layout(root)
    assert classes == ["a", "b.jpg"] and [len(images) for images in files["train"]] == [3, 3]
    assert skipped["train"].loose_images == 1 and skipped["val"].loose_images == 0


def test_a_validation_image_that_is_a_training_image_is_refused(tmp_path):
    root = _simple_tree(tmp_path / "data", train=2, val=1)
    data.scan_layout(root)  # two linked trees of their own are fine
    os.symlink(root / "train" / "b" / "1.jpg", root / "val" / "b" / "seen.jpg")
    with pytest.raises(DataError, match=f"^1 validation image\\(s\\) of {root} are training images too \\(the same file, "
                                        f"through a link\\), such as {root}/val/b/seen.jpg: the validation error"):
        data.scan_layout(root)
    os.remove(root / "val" / "b" / "seen.jpg")
    os.link(root / "train" / "b" / "1.jpg", root / "val" / "b" / "seen.jpg")  # a hard link
    with pytest.raises(DataError, match="^1 validation image"):
        data.scan_layout(root)
    os.remove(root / "val" / "b" / "seen.jpg")
    os.symlink("/nowhere/labels.csv", root / "train" / "labels.csv")  # a file's link to nothing: ignored, as the file
    data.scan_layout(root)
    shutil.rmtree(root / "val" / "a")
    os.symlink("../train/a", root / "val" / "a")  # a whole class
    with pytest.raises(DataError, match="^2 validation image"):
        data.scan_layout(root)


def test_links_count_once_and_only_for_their_own_class(tmp_path):
    root = _simple_tree(tmp_path / "data", train=2, val=1)
    elsewhere = tmp_path / "other_disk"
    _save(elsewhere / "extra" / "e.jpg", _rgb(53))
    _save(elsewhere / "loose.jpg", _rgb(54))
    train = root / "train"
    os.symlink(elsewhere / "extra", train / "a" / "extra")  # a sub-folder elsewhere
    os.symlink(elsewhere / "loose.jpg", train / "b" / "linked.jpg")  # an image elsewhere
    os.symlink("../b", train / "a" / "b_too")  # another class's folder
    os.symlink("../b/0.jpg", train / "a" / "stolen.jpg")  # another class's image
    os.symlink("0.jpg", train / "a" / "again.jpg")  # the same image under a second name
    os.symlink("gone.jpg", train / "a" / "dangling.jpg")  # a link to nothing
    os.symlink("y.jpg", train / "a" / "x.jpg")  # and two that link to each other
    os.symlink("x.jpg", train / "a" / "y.jpg")
    os.mkfifo(train / "b" / "pipe.jpg")  # a read would wait for a writer forever
    os.symlink("pipe.jpg", train / "b" / "to_pipe.jpg")
    classes, files, skipped = data.scan_layout(root)
    assert _relative(files, root) == {
        "train": [["train/a/0.jpg", "train/a/1.jpg", "train/a/extra/e.jpg"],
                  ["train/b/0.jpg", "train/b/1.jpg", "train/b/linked.jpg"]],
        "val": [["val/a/0.jpg"], ["val/b/0.jpg"]]}
    # b_too/linked.jpg too: found in class b's folder, although it links to a file outside every class.
    b_too = [str(train / "a" / "b_too" / name) for name in ("0.jpg", "1.jpg", "linked.jpg", "pipe.jpg", "to_pipe.jpg")]
    assert skipped["train"] == data.Skipped(other_class=[str(train / "a" / "stolen.jpg"), *b_too],
                                            duplicates=[str(train / "a" / "again.jpg")],
                                            broken_links=[str(train / "a" / name) for name in
                                                          ("dangling.jpg", "x.jpg", "y.jpg")],
                                            not_files=[str(train / "b" / name) for name in ("pipe.jpg", "to_pipe.jpg")])
    assert skipped["val"] == data.Skipped()
    assert "image names of what is not a file (a pipe, a device), which a read would wait on or never end: 2, " \
           f"e.g. {train / 'b' / 'pipe.jpg'}" in skipped["train"].describe()
    assert f"links that lead to no image (to nothing, or round in a loop): 3, e.g. {train / 'a' / 'dangling.jpg'}" \
        in skipped["train"].describe()


def test_a_split_s_digest_follows_its_images_names_classes_and_sizes_not_its_place(tmp_path):
    """What a resume compares: the same for the folder copied elsewhere; another where an image
    is renamed, moved into a subfolder of its class, rewritten at another size, or where the
    pictures of two classes of the same file names are swapped (their sizes then swapped)."""
    root = _simple_tree(tmp_path / "data")
    _save(root / "train" / "a" / "0.jpg", _rgb(1, (90, 70)))  # of another size than class b's 0.jpg
    digests = lambda folder: data.open_data(folder, cache_dir=tmp_path / "cache").digests
    original = digests(root)
    assert original["train"] != original["val"]
    shutil.copytree(root, tmp_path / "copy")
    assert digests(tmp_path / "copy") == original

    def changed(change) -> dict:
        shutil.rmtree(tmp_path / "changed", ignore_errors=True)
        shutil.copytree(root, tmp_path / "changed")
        change(tmp_path / "changed" / "train")
        return digests(tmp_path / "changed")

    def swap(train):
        os.rename(train / "a" / "0.jpg", train / "0.jpg")
        os.rename(train / "b" / "0.jpg", train / "a" / "0.jpg")
        os.rename(train / "0.jpg", train / "b" / "0.jpg")

    def into_a_subfolder(train):
        (train / "a" / "more").mkdir()
        os.rename(train / "a" / "2.jpg", train / "a" / "more" / "2.jpg")

    for change in (lambda train: os.rename(train / "a" / "2.jpg", train / "a" / "9.jpg"), into_a_subfolder,
                   lambda train: _save(train / "b" / "1.jpg", _rgb(2, (60, 60))), swap):
        got = changed(change)
        assert got["train"] != original["train"] and got["val"] == original["val"]


# --------------------------------------------------------------------------- decoding

def test_every_mode_becomes_256_rgb(tmp_path):
    odd = _mixed_tree(tmp_path)
    classes, files, skipped = data.scan_layout(tmp_path)
    paths = {Path(p).name: p for images in files["train"] for p, _ in images}
    assert odd["fake"] in paths.values() and "notes.txt" not in paths  # .jpg by name is kept until decoded
    assert "._rgb.jpg" not in paths  # a hidden file, whatever its name says
    assert classes == ["a", "b"]  # not @eaDir
    assert skipped == {"train": data.Skipped(other_files=2, hidden_folders=2), "val": data.Skipped()}
    assert not [p for p in paths.values() if ".thumbs" in p or "@eaDir" in p]
    for name, path in paths.items():
        if path in odd.values():
            continue
        pixels = images.load_image(path)
        assert pixels.shape == (256, 256, 3) and pixels.dtype == np.uint8, name
        assert pixels.flags.writeable, name  # torch.from_numpy warns of a read-only array
    # Uniform images keep their value through the resize, so the conversions can be checked exactly.
    assert (images.load_image(paths["grey.png"]) == 77).all()
    assert (images.load_image(paths["clear.png"]) == images.TRANSPARENT_BACKGROUND).all()  # alpha 0: background only
    assert (images.load_image(paths["deep.png"]) == 255).all()  # 16-bit white scaled, not clipped
    cmyk = images.load_image(paths["cmyk.jpg"]).reshape(-1, 3).mean(0)
    assert np.allclose(cmyk, Image.new("CMYK", (1, 1), (10, 20, 30, 40)).convert("RGB").getpixel((0, 0)), atol=3)


def test_a_transparent_colour_of_a_palette_or_an_rgb_image_shows_the_background(tmp_path):
    """Transparency without an alpha channel: a GIF's transparent palette entry, a PNG's colour key
    (tRNS), of RGB or of 16-bit grey. Converted as they are, the hidden pixels showed the colour
    stored under them."""
    palette = Image.new("P", (300, 260), 1)
    palette.putpalette([200, 10, 10, 10, 200, 10] + [0] * 762)
    palette.paste(0, (0, 0, 150, 260))  # the left half in entry 0, which is transparent
    keyed = Image.new("RGB", (300, 260), (10, 200, 10))
    keyed.paste((200, 10, 10), (0, 0, 150, 260))  # the left half in the keyed colour
    grey = np.full((260, 300), 200 * 257, dtype=np.uint16)
    grey[:, :150] = 7 * 257  # the left half in the keyed grey
    try:
        deep = _save(tmp_path / "deep.png", Image.fromarray(grey), transparency=7 * 257)  # 16-bit grey, keyed
    except OSError:  # older Pillow writes it with its colour key only from mode I
        deep = _save(tmp_path / "deep.png", Image.fromarray(grey).convert("I"), transparency=7 * 257)
    for path, shown in ((_save(tmp_path / "palette.gif", palette, transparency=0), (10, 200, 10)),
                        (_save(tmp_path / "keyed.png", keyed, transparency=(200, 10, 10)), (10, 200, 10)),
                        (deep, (200,) * 3)):
        pixels = images.load_image(path)  # 300 x 260 -> 295 x 256, the central 256 columns from 19 on
        assert (pixels[:, :100] == images.TRANSPARENT_BACKGROUND).all(), path.name
        assert (pixels[:, -100:] == shown).all(), path.name


def test_a_half_transparent_pixel_is_mixed_with_the_background(tmp_path):
    """Alpha between 0 and 255 (an anti-aliased edge, a soft shadow): the colour shows in
    proportion to its alpha over the mid-grey background, as it would on a grey page."""
    for path, colour, alpha in ((_save(tmp_path / "half.png", Image.new("RGBA", (256, 256), (200, 10, 10, 128))),
                                 (200, 10, 10), 128),
                                (_save(tmp_path / "grey.png", Image.new("LA", (256, 256), (0, 64))), (0, 0, 0), 64)):
        background = images.TRANSPARENT_BACKGROUND
        expected = [c * alpha / 255 + grey * (255 - alpha) / 255 for c, grey in zip(colour, background)]
        assert np.abs(images.load_image(path) - np.array(expected)).max() <= 1, path.name  # rounding: one level


def test_integer_greyscale_of_other_depths_is_refused_or_scaled_not_made_black(tmp_path):
    """A TIFF of 32-bit integers (mode I, as a 16-bit PGM also opens) has no range of its own:
    scaled as 16-bit, its 0-255 values became a black image that trained and was classified.
    16-bit PGM (PIL scales its maximum to 65535) is read as before."""
    grey = np.arange(256, dtype=np.int32).repeat(256).reshape(256, 256)
    Image.fromarray(grey).save(tmp_path / "int32.tif")
    with Image.open(tmp_path / "int32.tif") as image:
        assert image.mode == "I"
    with pytest.raises(images.ImageRejected, match=r"int32.tif: 32-bit integer greyscale, whose range of values the "
                                                   r"file does not say: convert it to 8 or 16 bits, or leave it out$"):
        images.load_image(tmp_path / "int32.tif")
    (tmp_path / "deep.pgm").write_bytes(b"P5\n2 1\n4095\n\x0f\xff\x08\x00")  # white, and about half
    with Image.open(tmp_path / "deep.pgm") as image:
        assert image.mode == "I"
    pixels = images.load_image(tmp_path / "deep.pgm")
    assert pixels[0, 0, 0] == 255 and pixels[0, -1, 0] == 128
    # a 12-bit TIFF (a scientific camera's) opens as 16-bit with its 12-bit values: white was 16 of 255
    def twelve_bit_tiff(values) -> Path:
        bits = "".join(f"{value:012b}" for value in values) + "0000"
        packed = bytes(int(bits[i:i + 8], 2) for i in range(0, len(bits), 8))
        tags = [(256, 3, 1, 2), (257, 3, 1, 1), (258, 3, 1, 12), (259, 3, 1, 1), (262, 3, 1, 1), (273, 4, 1, 8),
                (277, 3, 1, 1), (278, 3, 1, 1), (279, 4, 1, len(packed))]  # 2 x 1, uncompressed, grey
        directory = (struct.pack("<H", len(tags)) + b"".join(struct.pack("<HHII", *t) for t in tags)
                     + struct.pack("<I", 0))
        (tmp_path / "deep.tif").write_bytes(b"II*\x00" + struct.pack("<I", 8 + len(packed)) + packed + directory)
        with Image.open(tmp_path / "deep.tif") as image:
            assert image.mode == "I;16" and np.asarray(image).tolist() == [list(values)]
        return tmp_path / "deep.tif"
    pixels = images.load_image(twelve_bit_tiff((4095, 2048)))
    assert pixels[0, 0, 0] == 255 and pixels[0, -1, 0] == 128
    # scaled by 255 / 4095 (white is 2^12 - 1, not 2^12): 265 is 16.502, so 17 (265 / 4096 * 255 would give 16)
    assert (images.load_image(twelve_bit_tiff((265, 265))) == 17).all()


def test_float_images_keep_their_brightness(tmp_path):
    """Mode F (TIFF's 32-bit float greyscale): 0-1 scaled to 0-255, not clipped to black;
    values beyond 1 read on the 0-255 scale; NaN as 0."""
    def loaded(values) -> np.ndarray:
        path = tmp_path / "float.tif"
        Image.fromarray(np.array(values, dtype=np.float32).repeat(128, 0).repeat(128, 1), mode="F").save(path)
        with Image.open(path) as image:
            assert image.mode == "F"
        return images.load_image(path)[::128, ::128, 0]  # 256 x 256: a base image, not resized
    assert (loaded([[0.5, 1.0], [0.0, 0.25]]) == [[128, 255], [0, 64]]).all()
    assert (loaded([[0.5, 200.0], [300.0, -3.0]]) == [[0, 200], [255, 0]]).all()
    assert (loaded([[np.nan, 1.0], [0.2, 0.2]]) == [[0, 255], [51, 51]]).all()


def test_a_tiff_with_a_damaged_tag_is_unreadable(tmp_path):
    """A TIFF whose strip offsets are of the wrong type (RATIONAL, not LONG) makes PIL
    raise TypeError: the file is unreadable like any damaged image, not a crash of the
    program reading it."""
    path = damaged_tiff(tmp_path / "damaged.tif", 273, 2, bytes([5]))  # the type of the strip offsets: 4 (LONG) to 5
    with pytest.raises(images.DECODE_ERRORS):
        images.load_image(path)


def test_a_format_pil_knows_in_a_variant_it_cannot_decode_is_unreadable(tmp_path):
    """A DDS of a pixel format PIL does not decode (whatever the file's name: PIL goes by its
    bytes) makes it raise NotImplementedError: an unreadable image, not a crash."""
    path = undecodable_dds(tmp_path / "odd.jpg")
    with pytest.raises(NotImplementedError):
        Image.open(path).load()
    with pytest.raises(images.DECODE_ERRORS):
        images.load_image(path)


def test_resize_center_takes_the_central_patch():
    # 512 x 256: the shorter side is already 256, so the result is columns 128..383 exactly.
    pixels = np.random.default_rng(0).integers(0, 256, (256, 512, 3), dtype=np.uint8)
    out = np.asarray(images.resize_center(Image.fromarray(pixels)))
    assert np.array_equal(out, pixels[:, 128:384])
    assert images.resize_center(Image.new("RGB", (50, 30))).size == (256, 256)


def test_a_base_image_is_channels_then_rows_then_columns_as_the_picture_shows(tmp_path):
    """The dataset's 3 x 256 x 256 image is the picture upright: its rows top to bottom, its
    columns left to right, its channels red, green, blue (a square picture transposed would
    keep the shape, and the crops and mean would be cut from a picture on its side)."""
    pixels = np.zeros((256, 256, 3), dtype=np.uint8)
    pixels[:, :128, 0] = 200  # the left half red
    pixels[:128, :, 1] = 150  # the top half green
    pixels[:, :, 2] = np.arange(256, dtype=np.uint8)[None, :]  # blue growing to the right
    root = tmp_path / "data"
    for split in ("train", "val"):
        for name in ("a", "b"):
            _save(root / split / name / "0.png", Image.fromarray(pixels))
    bundle = data.open_data(root, cache_dir=tmp_path / "cache")
    image = bundle.train[0][0]
    assert image.shape == (3, 256, 256) and image.dtype == torch.uint8
    assert (image[0, :, :128] == 200).all() and (image[0, :, 128:] == 0).all()
    assert (image[1, :128] == 150).all() and (image[1, 128:] == 0).all()
    assert torch.equal(image[2], torch.arange(256, dtype=torch.uint8).expand(256, 256))
    (crop, _), = list(data.Loader(bundle).eval(batch_size=1, limit=1))  # the centre crop: rows and columns 16..239
    assert torch.equal(crop[0], image[:, 16:240, 16:240])


def test_corrupt_files_are_replaced_and_counted(tmp_path):
    odd = _mixed_tree(tmp_path)
    bundle = data.open_data(tmp_path, cache_dir=tmp_path / "cache")
    train = bundle.train
    assert train.ignored_files == 2
    index = {path: i for i, (path, _) in enumerate(train.samples)}
    for name in ("fake", "truncated"):  # each stands in the next file of its class: rgb.bmp, whole.jpg
        image, label, skipped = train.load(index[odd[name]])
        assert [i for i, _ in skipped] == [index[odd[name]]] and image.shape == (3, 256, 256)
        assert skipped[0][1].startswith(f"{odd[name]}: unreadable (")
        assert torch.equal(image, train[index[odd[name]] + 1][0]) and label == train.samples[index[odd[name]] + 1][1]
    assert train.corrupt == {odd["fake"], odd["truncated"]}  # the statistics read every training image
    # ... and left the two out of them: the mean and the colours are the usable images' alone.
    usable = np.stack([images.load_image(path) for path, _ in train.samples if path not in train.corrupt])
    assert bundle.stats.images == len(usable) == len(train) - 2
    assert np.allclose(bundle.stats.mean.numpy(), usable.mean(axis=0).transpose(2, 0, 1), atol=1e-3)
    pixels = usable.reshape(-1, 3).astype(np.float64)
    variances = np.sort(np.linalg.eigvalsh(np.cov(pixels.T, bias=True)))[::-1]
    assert np.allclose(bundle.stats.eigval.double().numpy() * 255, variances, rtol=1e-4)
    # The batch iterators count too, also when worker processes decode.
    train.corrupt = set()
    batches = list(data.train_batches(bundle, batch_size=len(train), seed=0, epoch=0, workers=2))
    assert len(batches) == 1 and batches[0][0].shape == (len(train), 3, 224, 224)
    assert train.corrupt == {odd["fake"], odd["truncated"]}


def test_the_image_standing_in_is_looked_for_past_the_end_of_the_split_from_its_start(tmp_path):
    """The next usable image wraps: where every image from the one asked for to the last is
    unusable, the first one stands in, even where it is the only one left to try."""
    root = _simple_tree(tmp_path / "data", classes=("a",), train=3, val=1)
    samples = [(str(root / "train" / "a" / f"{i}.jpg"), 0) for i in range(3)]
    for path, _ in samples[1:]:
        Path(path).write_bytes(b"not a jpeg")
    split = data.ImageFolderSplit("train", ["a"], samples)
    for index in (1, 2):
        image, label, skipped = split.load(index)
        assert [i for i, _ in skipped] == list(range(index, 3)) and label == 0
        assert torch.equal(image, torch.from_numpy(images.load_image(samples[0][0])).permute(2, 0, 1))
    Path(samples[0][0]).write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="no usable image in train/: each of its 3 files failed to decode"):
        split.load(1)


def test_a_class_of_no_usable_training_image_is_refused_naming_it(tmp_path):
    """Every training image of class b unreadable (pictures of another format under .jpg, say):
    each would have the next usable image, class c's, stand in for it, and the net would learn
    b as c. Refused before a run, naming the class; val/ may lack a class's images (fewer are
    evaluated, and the evaluation says how many)."""
    root = _simple_tree(tmp_path / "data", classes=("a", "b", "c"))
    for image in (root / "train" / "b").iterdir():
        image.write_bytes(b"HEIC, not a JPEG")
    assert len(data.open_data(root, cache_dir=tmp_path / "cache").train) == 9  # a tool that trains nothing: as it is
    with pytest.raises(DataError) as refused:
        data.open_data(root, cache_dir=tmp_path / "cache", classify=True)
    assert str(refused.value).startswith(f"no usable image of class b in train/: each of its 3 files failed to decode "
                                         f"or was refused, such as {root / 'train' / 'b' / '0.jpg'}: unreadable (")
    assert str(refused.value).endswith(": replace them, or remove the class from both train/ and val/")
    (root / "train" / "b" / "1.jpg").write_bytes((root / "train" / "a" / "1.jpg").read_bytes())  # one usable: enough
    for image in (root / "val" / "b").iterdir():
        image.write_bytes(b"HEIC, not a JPEG")
    assert len(data.open_data(root, cache_dir=tmp_path / "cache", classify=True).train) == 9


def test_the_check_of_classes_of_no_usable_image_looks_at_the_classes_asked_for_alone(tmp_path):
    """What a run checks where an epoch skipped images of some classes: those classes, and
    only those, are refused where none of their training images can be used any longer."""
    root = _simple_tree(tmp_path / "data", classes=("a", "b", "c"))
    bundle = data.open_data(root, cache_dir=tmp_path / "cache", classify=True)
    for image in (root / "train" / "b").iterdir():
        image.write_bytes(b"not a jpeg")  # class b's folder emptied of usable images while the run trains
    bundle.train.check_usable(each_class=True, labels={0, 2})
    bundle.train.check_usable(each_class=True, labels=set())
    for labels in ({1}, {0, 1}, None):
        with pytest.raises(DataError, match="^no usable image of class b in train/: each of its 3 files"):
            bundle.train.check_usable(each_class=True, labels=labels)


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_split_of_no_usable_image_is_refused_when_opened(tmp_path, split):
    """Every image of val/ (or of train/, for a tool that trains nothing) unreadable: refused at
    once, not at the first evaluation; one usable image, even the last, is enough."""
    root = _simple_tree(tmp_path / "data")
    paths = sorted((root / split).rglob("*.jpg"))
    for path in paths:
        path.write_bytes(b"not a jpeg")
    # (for train/, the statistics are not reached: the check comes before them)
    with pytest.raises(DataError, match=f"^no usable image in {split}/: each of its {len(paths)} files failed to "
                                        f"decode or was refused, such as {paths[0]}: unreadable"):
        data.open_data(root, cache_dir=tmp_path / "cache")
    _save(paths[-1], _rgb(1))
    assert len(getattr(data.open_data(root, cache_dir=tmp_path / "cache"), split)) == len(paths)


def test_an_image_replaced_by_a_named_pipe_after_the_scan_is_passed_over_not_waited_on(tmp_path):
    """The scan refuses what is not a file; one replaced by a named pipe while a run trains
    would be opened, and waited on for good (a device: read without end)."""
    root = _simple_tree(tmp_path / "data")
    bundle = data.open_data(root, cache_dir=tmp_path / "cache")
    path, _ = bundle.train.samples[0]
    os.unlink(path)
    os.mkfifo(path)
    class Waited(Exception):
        pass

    def waited(*_):
        raise Waited("opened the pipe and waited on it")

    previous = signal.signal(signal.SIGALRM, waited)
    signal.alarm(20)  # a wait for good fails the test
    try:
        image, label, skipped = bundle.train.load(0)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert [i for i, _ in skipped] == [0] and "not a regular file (a named pipe" in skipped[0][1]
    assert torch.equal(image, bundle.train[1][0])  # the next image stands in for it


def _resize_then_crop(image: Image.Image, size: int = 256) -> Image.Image:
    """resize_center as it was: the whole image resized, then the central patch cut out."""
    width, height = image.size
    scale = size / min(width, height)
    new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
    if new_size != image.size:
        image = image.resize(new_size, Image.BILINEAR)
    left, top = (new_size[0] - size) // 2, (new_size[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


# (99, 76): enlarged, with the patch's edges inside source pixels, of which the filter reads one more on each side
@pytest.mark.parametrize("size", [(300, 200), (640, 480), (50, 30), (99, 76), (256, 256), (375, 500), (1000, 257)])
def test_resize_center_equals_resizing_then_cropping(size):
    # Noise: every pixel differs from its neighbours, the hardest case for rounding.
    pixels = np.random.default_rng(size[0]).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    difference = np.abs(np.asarray(images.resize_center(image), dtype=np.int16)
                        - np.asarray(_resize_then_crop(image), dtype=np.int16))
    # Tolerance: the same filter at the same scale and centre, but PIL takes the box in
    # float32, so some filter weights differ in their last bits and a sum that lands on
    # .5 rounds the other way: 1 grey level at most, on well under 1% of the values.
    assert difference.max() <= 1 and (difference > 0).mean() < 0.01
    if size == (256, 256):  # a base image already: kept exactly
        assert difference.max() == 0


# resize_center in a child with 1 GiB of address space to spare: resizing the whole
# 1 x 20000 image first (256 x 5,120,000 pixels) took about 6 GB.
_THIN_RESIZE = """
import resource
from PIL import Image
from launch import images
spare = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize() + 2 ** 30
resource.setrlimit(resource.RLIMIT_AS, (spare, spare))
print(images.resize_center(Image.new("RGB", (1, 20000), (9, 9, 9))).size)
"""


def test_thin_image_is_refused_and_resizing_it_costs_the_output_only(tmp_path):
    path = _save(tmp_path / "thin.png", Image.new("RGB", (1, 20000), (9, 9, 9)))
    assert path.stat().st_size < 1000  # a tiny file
    with pytest.raises(images.ImageRejected, match=r"aspect ratio 20000\.0:1 \(1 x 20000 pixels\) above 20:1") as info:
        images.load_image(path)
    assert str(info.value).startswith(f"{path}: ")
    at_the_limit = _save(tmp_path / "strip.png", Image.new("RGB", (400, 20), (9, 9, 9)))  # 20:1 exactly: taken
    assert (images.load_image(at_the_limit) == 9).all()
    with pytest.raises(images.ImageRejected, match=r"aspect ratio 20\.1:1 \(402 x 20 pixels\) above 20:1"):
        images.load_image(_save(tmp_path / "beyond.png", Image.new("RGB", (402, 20), (9, 9, 9))))
    with pytest.raises(images.ImageRejected, match=r"aspect ratio 20\.005:1 \(200 x 4001 pixels\) above 20:1"):
        images.load_image(_save(tmp_path / "just.png", Image.new("RGB", (200, 4001), (9, 9, 9))))  # not 20.0:1
    done = subprocess.run([sys.executable, "-c", _THIN_RESIZE], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "(256, 256)", done.stderr


@pytest.mark.parametrize("size", [(150, 100), (300, 200)], ids=["above-the-limit", "above-twice-the-limit"])
def test_image_above_the_pixel_limit_is_refused_as_too_large(tmp_path, monkeypatch, size):
    path = _save(tmp_path / "big.png", _rgb(0, size))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # read at each call
    with warnings.catch_warnings(record=True) as warned, pytest.raises(images.ImageRejected) as info:
        warnings.simplefilter("always")
        images.load_image(path)
    assert not warned  # refused, and said once: not also by PIL's DecompressionBombWarning
    message = str(info.value)
    assert message.startswith(f"{path}: too large: ") and "10000" in message, message
    if size == (150, 100):  # PIL opens it (only above twice the limit it refuses), so its size is known
        assert "150 x 100 pixels" in message


def test_an_image_of_as_many_pixels_as_the_limit_is_taken_and_no_limit_takes_any(tmp_path, monkeypatch):
    """The limit is PIL's Image.MAX_IMAGE_PIXELS: an image of exactly that many pixels is taken,
    and None, PIL's way to turn the check off, takes an image of any size."""
    path = _save(tmp_path / "big.png", Image.new("RGB", (150, 100), (9, 9, 9)))
    for limit in (150 * 100, None):
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
        assert (images.load_image(path) == 9).all(), limit


def test_a_large_jpeg_is_decoded_at_the_smallest_scale_that_keeps_256_pixels(tmp_path):
    """libjpeg decodes a large JPEG at 1/2, 1/4 or 1/8 scale while both sides stay at least
    256: a 1024 x 1024 checkerboard of 4 x 4 squares comes out at 1/4 as a checkerboard of
    single pixels, not at 1/8 as a flat grey enlarged."""
    rows, columns = np.indices((1024, 1024))
    squares = ((rows // 4 + columns // 4) % 2 * 255).astype(np.uint8)
    path = _save(tmp_path / "squares.jpg", Image.fromarray(squares).convert("RGB"), quality=95)
    pixels = images.load_image(path)[..., 0]
    white = np.indices((256, 256)).sum(axis=0) % 2 == 1
    assert (pixels[white] > 128 + 20).all() and (pixels[~white] < 128 - 20).all()


def test_skipped_images_are_logged_with_their_reason(tmp_path, monkeypatch, caplog):
    root = _simple_tree(tmp_path / "data", train=2, val=1)
    big = _save(root / "train" / "a" / "big.png", _rgb(1, (300, 250)))
    thin = _save(root / "train" / "a" / "thin.png", Image.new("RGB", (1, 30)))
    fake = root / "train" / "b" / "fake.jpg"
    fake.write_text("this is not an image")
    # PIL checks crops against twice the limit too: above half of 256 x 256, only big.png
    # is refused. DataLoader workers are forked, so they see the limit as well.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 70_000)
    reasons = {str(big): "too large: 300 x 250 pixels, above the limit of 70000 pixels",
               str(thin): "aspect ratio 30.0:1", str(fake): "unreadable (UnidentifiedImageError: cannot identify "}
    caplog.set_level(logging.WARNING, logger="launch.data")

    def check_log(bundle, when):
        lines = {path: r.getMessage() for r in caplog.records for path in reasons
                 if r.getMessage().startswith(f"skipped image {path}: ")}
        assert set(lines) == set(reasons), (when, [r.getMessage() for r in caplog.records])
        for path, reason in reasons.items():
            assert lines[path].startswith(f"skipped image {path}: {reason}"), (when, lines[path])
        assert bundle.train.corrupt == set(reasons), when

    bundle = data.open_data(root, cache_dir=tmp_path / "cache")  # the statistics read every training image
    assert bundle.stats.images == 4
    check_log(bundle, "statistics")
    assert all(r.getMessage().endswith("; it is left out of the statistics, and training puts the next image in its "
                                       "place") for r in caplog.records if r.getMessage().startswith("skipped image"))
    assert bundle.train.replaced == set()  # none stood in for another: that is for the images of a batch
    caplog.clear()
    bundle.train.corrupt = set()
    assert len(list(data.train_batches(bundle, batch_size=len(bundle.train), seed=0, epoch=0, workers=2))) == 1
    check_log(bundle, "batches decoded in worker processes")


def test_an_unusable_image_is_logged_once_however_often_met_and_stands_in_only_in_training(tmp_path, caplog):
    """Each epoch and each evaluation meets the same unusable files again: each is logged the
    first time alone. ``replaced`` lists the training images a batch met, for which the next one
    stood in; a validation image is left out, never replaced."""
    root = _simple_tree(tmp_path / "data", train=3, val=2)
    bad_train, bad_val = root / "train" / "a" / "1.jpg", root / "val" / "b" / "0.jpg"
    bad_train.write_bytes(b"not a jpeg")
    bad_val.write_bytes(b"not a jpeg")
    caplog.set_level(logging.WARNING, logger="launch.data")
    bundle = data.open_data(root, cache_dir=tmp_path / "cache")  # the statistics meet the training image
    assert bundle.train.replaced == set()
    with data.Loader(bundle) as loader:
        for epoch in range(3):
            assert len(list(loader.train(batch_size=6, seed=0, epoch=epoch))) == 1
            assert sum(len(labels) for _, labels in loader.eval(batch_size=2)) == 3
    for path in (bad_train, bad_val):
        said = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"skipped image {path}: ")]
        assert len(said) == 1, said
    assert bundle.train.corrupt == bundle.train.replaced == {str(bad_train)}
    assert bundle.val.corrupt == {str(bad_val)} and bundle.val.replaced == set()


# --------------------------------------------------------------------------- built-in dataset

def _files(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_built_in_set_that_cannot_be_put_in_place_is_said_and_leaves_nothing(tmp_path, monkeypatch):
    """The rename of the generated set into place failing for another reason than another process
    finishing first (a cache folder that turned read-only): said, with the fix, and the staging
    folder removed; not a path to a folder that is not there."""
    def refused(source, target):
        raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(builtin.os, "rename", refused)
    with pytest.raises(DataError, match=r"^cannot make the built-in dataset in .* \(Permission denied\): set "):
        builtin.builtin_dataset(tmp_path / "set", train_per_class=1, val_per_class=1)
    assert list(tmp_path.iterdir()) == []


def test_the_built_in_images_are_pinned():
    """The generator's pixels, pinned: a cached set is used as it is under its name
    (BUILTIN_NAME), so a change to what it draws must come with a new name, and a new digest
    here. (No transcendental function of numpy's, whose results may differ from CPU to CPU;
    another version of numpy's generators or of Pillow's resize may change the pixels, which
    is then a new set, to be named anew.)"""
    digest = hashlib.sha256()
    for class_id, name in enumerate(builtin.BUILTIN_CLASSES):
        rng = np.random.default_rng([builtin.BUILTIN_SEED, 0, class_id, 0])  # each class's first training image
        digest.update(builtin.draw_builtin(name, rng).tobytes())
    assert (builtin.BUILTIN_NAME, digest.hexdigest()) == (
        "textures10-v2", "e0a3e552ec2161221c691de55c015ebd1b44e75b4943c0f680b634af1e0c5ffd")
    with pytest.raises(ValueError, match="^unknown built-in class 'spirals'$"):
        builtin.draw_builtin("spirals", np.random.default_rng(0))


def test_a_built_in_set_put_in_place_by_another_process_first_is_used(tmp_path, monkeypatch):
    """Two runs making the set at once: the second's rename fails onto the first's folder,
    which is the set: used, and the second's staging folder removed."""
    root = tmp_path / "set"

    def another_first(source, target):
        Path(target).mkdir()
        raise OSError(errno.ENOTEMPTY, os.strerror(errno.ENOTEMPTY))
    monkeypatch.setattr(builtin.os, "rename", another_first)
    assert builtin.builtin_dataset(root, train_per_class=1, val_per_class=1) == root
    assert list(tmp_path.iterdir()) == [root]


def test_builtin_dataset_is_deterministic_and_atomic(tmp_path, monkeypatch):
    shared = os.umask(0o002)  # the folders' modes follow the umask, whatever the suite's
    try:
        first = builtin.builtin_dataset(tmp_path / "one", train_per_class=2, val_per_class=1)
        second = builtin.builtin_dataset(tmp_path / "two", train_per_class=2, val_per_class=1)
    finally:
        os.umask(shared)
    files = _files(first)
    assert files == _files(second)
    assert len([f for f in files if f.endswith(".jpg")]) == 30
    # every image drawn anew: a validation image no copy of a training one, nor two of a class alike
    pictures = [path.read_bytes() for path in sorted(first.rglob("*.jpg"))]
    assert len(set(pictures)) == len(pictures) == 30
    bundle = data.open_data(first, cache_dir=tmp_path / "cache")
    # readable by the other users of a shared cache, not private as the staging folder it was made in: as the
    # folders in it are, by the umask
    assert stat.S_IMODE(first.stat().st_mode) == stat.S_IMODE((first / "train").stat().st_mode) == 0o775
    private = os.umask(0o077)
    try:
        kept = builtin.builtin_dataset(tmp_path / "private", train_per_class=1, val_per_class=1)
    finally:
        os.umask(private)
    assert stat.S_IMODE(kept.stat().st_mode) == stat.S_IMODE((kept / "train").stat().st_mode) == 0o700
    assert bundle.classes == sorted(builtin.BUILTIN_CLASSES)
    assert builtin.builtin_dataset(first) == first  # made once, then reused

    # A pre-existing staging folder of a killed run does not count as the dataset; one left by a
    # process that has ended here is removed (50 MB each), one of a process that runs is not.
    target, host = tmp_path / "three", socket.gethostname()
    (tmp_path / ".three.partial-killed" / "train" / "circle").mkdir(parents=True)  # an earlier version's name
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    (tmp_path / f".three.partial-{host}-{ended.pid}-x1y2z3" / "train").mkdir(parents=True)
    (tmp_path / f".three.partial-{host}-1-a1b2c3" / "train").mkdir(parents=True)  # init's: it runs
    real_draw, calls = builtin.draw_builtin, []

    def failing_draw(*args, **kwargs):
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt  # an interruption halfway through
        return real_draw(*args, **kwargs)

    monkeypatch.setattr(builtin, "draw_builtin", failing_draw)
    with pytest.raises(KeyboardInterrupt):
        builtin.builtin_dataset(target, train_per_class=2, val_per_class=1)
    assert not target.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".three")) == sorted([
        f".three.partial-{host}-1-a1b2c3", ".three.partial-killed"])
    monkeypatch.setattr(builtin, "draw_builtin", real_draw)
    assert _files(builtin.builtin_dataset(target, train_per_class=2, val_per_class=1)) == files
    # Damaged since (a part of it deleted by hand): the fix is to delete it whole.
    damaged = builtin.builtin_dataset(tmp_path / "cache" / builtin.BUILTIN_NAME, train_per_class=2, val_per_class=1)
    shutil.rmtree(damaged / "val")
    with pytest.raises(DataError, match=f"^the built-in dataset's folder is damaged \\({damaged} has no val/ folder: "
                                        f".*\\): delete {damaged}, and the next run makes it again$"):
        data.open_data(None, cache_dir=tmp_path / "cache")
    shutil.rmtree(damaged)
    damaged = builtin.builtin_dataset(damaged, train_per_class=2, val_per_class=1)
    for split in ("train", "val"):  # a class gone whole: it trained on nine without a word
        shutil.rmtree(damaged / split / "rings")
    with pytest.raises(DataError, match="damaged \\(its classes are blotches, checkerboard, dots, gradient, grid, "
                                        "solid, stripes_d, stripes_h, stripes_v, not the ten generated\\)"):
        data.open_data(None, cache_dir=tmp_path / "cache")
    shutil.rmtree(damaged)
    damaged = builtin.builtin_dataset(damaged, train_per_class=2, val_per_class=1)
    next((damaged / "train" / "dots").iterdir()).unlink()
    with pytest.raises(DataError, match="damaged \\(the classes of its train/ hold 2, 2, 1, 2, 2, 2, 2, 2, 2, 2 "
                                        "images, where each holds as many as the others\\)"):
        data.open_data(None, cache_dir=tmp_path / "cache")

    # A cache folder that cannot be made, or a disk error halfway: one line naming the fix, nothing left.
    (tmp_path / "a-file").write_text("")
    with pytest.raises(DataError, match=f"cannot make the built-in dataset in {tmp_path / 'a-file'} \\(File "
                                        f"exists\\): set XDG_CACHE_HOME to a folder"):
        builtin.builtin_dataset(tmp_path / "a-file" / "four", train_per_class=2, val_per_class=1)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(builtin, "draw_builtin", full_disk)
    with pytest.raises(DataError, match="\\(No space left on device\\): set XDG_CACHE_HOME to a folder with 70 MB"):
        builtin.builtin_dataset(tmp_path / "five", train_per_class=2, val_per_class=1)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".five", "five"))]
    # A file (or a link to nothing) where the dataset's folder goes: named, before any image is drawn
    (tmp_path / "six").write_text("")
    (tmp_path / "seven").symlink_to(tmp_path / "nothing")
    for name in ("six", "seven"):
        with pytest.raises(DataError, match=f"^{tmp_path / name}, where the built-in dataset goes, is not a folder: "
                                            f"remove it, and the next run makes the dataset there$"):
            builtin.builtin_dataset(tmp_path / name, train_per_class=2, val_per_class=1)


# --------------------------------------------------------------------------- statistics

def test_the_cache_folder_is_never_the_root_or_the_current_folder(tmp_path, monkeypatch):
    """An empty HOME (an unset variable in a script) made the built-in dataset in /.cache; a
    relative XDG_CACHE_HOME in the current folder, which the XDG specification rules out."""
    import pwd
    try:
        home = pwd.getpwuid(os.getuid()).pw_dir
    except KeyError:
        pytest.skip("this user has no entry in the password database")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert builtin.default_cache_dir() == tmp_path / "xdg" / "alexnet-towers"
    for relative in ("", "cache"):
        monkeypatch.setenv("XDG_CACHE_HOME", relative)
        assert builtin.default_cache_dir() == tmp_path / "home" / ".cache" / "alexnet-towers"
    for unusable in ("", "home"):  # from the password database instead
        monkeypatch.setenv("HOME", unusable)
        assert builtin.default_cache_dir() == Path(home) / ".cache" / "alexnet-towers"

    def no_such_user(uid):
        raise KeyError(uid)

    monkeypatch.setattr(pwd, "getpwuid", lambda uid: types.SimpleNamespace(pw_dir="home"))  # not a folder's path
    with pytest.raises(DataError, match="^no folder to keep the built-in dataset"):
        builtin.default_cache_dir()
    monkeypatch.setattr(pwd, "getpwuid", no_such_user)  # a container's user, not in /etc/passwd
    with pytest.raises(DataError, match="^no folder to keep the built-in dataset and other cached files in: HOME is "
                                        "not set to a folder, and this user has no home folder here; set "
                                        "XDG_CACHE_HOME to a folder you can write, or give a data folder of "
                                        "your own$"):
        data.open_data(None)
    # Where a data folder is given, its statistics are cached beside it alone.
    root = tmp_path / "data"
    for split, count in (("train", 2), ("val", 1)):
        for label in ("a", "b"):
            (root / split / label).mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (256, 256), (40 * i, 90, 200)).save(root / split / label / f"{i}.jpg")
    assert data.open_data(root).stats.images == 4 and list(root.glob(".alexnet-stats-*.pt"))


def test_a_cache_folder_that_cannot_be_looked_in_is_passed_over_or_said(tmp_path):
    """Path.is_file and is_dir raise, not answer False, for a path in a folder this user cannot
    enter (PermissionError: another user's home, named by an inherited XDG_CACHE_HOME), or one
    with a name too long for the system (which root meets too): the statistics' cached copy
    there, looked for, and the built-in dataset, were a traceback."""
    unusable = tmp_path / ("x" * 300)
    root = _simple_tree(tmp_path / "data")
    assert data.open_data(root, cache_dir=unusable).stats.images == 6  # computed
    assert len(list(root.glob(".alexnet-stats-*.pt"))) == 1  # and kept beside the data
    with pytest.raises(DataError, match=r"^cannot make the built-in dataset in .*x \(File name too long\): set "
                                        r"XDG_CACHE_HOME to a folder"):
        builtin.builtin_dataset(unusable / "set", train_per_class=1, val_per_class=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_stats_are_cached_keyed_and_fall_back_to_cache_dir(tmp_path, monkeypatch, caplog):
    root = _simple_tree(tmp_path / "data")
    cache = tmp_path / "cache"
    first = data.open_data(root, cache_dir=cache).stats
    assert first.mean.shape == (3, 256, 256) and first.mean.dtype == torch.float32 and first.images == 6
    assert len(list(root.glob(".alexnet-stats-*.pt"))) == 1

    def no_compute(*args, **kwargs):
        raise AssertionError("statistics recomputed although cached")

    with monkeypatch.context() as m:
        m.setattr(stats, "compute_stats", no_compute)
        again = data.open_data(root, cache_dir=cache).stats
    assert torch.equal(again.mean, first.mean) and torch.equal(again.eigvec, first.eigvec)
    assert (again.images, again.pca_source) == (6, "computed")  # as computed, the count of images too

    # A changed training set gets new statistics; a read-only data folder caches in cache_dir.
    _save(root / "train" / "a" / "new.jpg", _rgb(99))
    _data_folders_read_only(monkeypatch, root)
    caplog.clear()
    changed = data.open_data(root, cache_dir=cache).stats
    assert changed.images == 7 and not torch.equal(changed.mean, first.mean)
    [cached] = (cache / "stats").glob(".alexnet-stats-*.pt")
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    beside = root / f".alexnet-stats-{cached.name.rsplit('-', 1)[1]}"  # the cache folder's named after root too
    assert warned == [f"could not cache the training-set statistics in {root} (read-only: {beside})",
                      f"the training-set statistics are cached in {cached} instead"], warned
    monkeypatch.setattr(stats, "compute_stats", no_compute)
    assert torch.equal(data.open_data(root, cache_dir=cache).stats.mean, changed.mean)


def test_read_only_folders_of_the_same_names_sizes_and_times_get_each_its_own_statistics(tmp_path, monkeypatch):
    """Images of one size in an uncompressed format, their times set alike: two such folders
    that cannot be written, cached in the one cache folder, are not taken for each other; there,
    a folder's statistics of its images as they were are removed when it changes, not another's."""
    folders = [tmp_path / "these", tmp_path / "inverted"]
    for split, i in itertools.product(("train", "val"), range(3)):
        image = np.random.default_rng(i).integers(0, 256, (48, 64, 3), dtype=np.uint8)
        for folder, pixels in zip(folders, (image, 255 - image)):
            path = _save(folder / split / "ab"[i % 2] / f"{i}.bmp", Image.fromarray(pixels))
            os.utime(path, ns=(10**18, 10**18))
    real_save, real_compute = stats.save_checkpoint, stats.compute_stats

    def no_compute(*args, **kwargs):
        raise AssertionError("statistics recomputed although cached")

    _data_folders_read_only(monkeypatch, *folders)
    cache = tmp_path / "cache"
    opened = [data.open_data(folder, cache_dir=cache) for folder in folders]
    for bundle in opened:
        assert torch.equal(bundle.stats.mean, real_compute(bundle.train).mean)
    assert (opened[0].stats.mean - opened[1].stats.mean).abs().mean() > 10  # one the other's negative
    assert len(list((cache / "stats").iterdir())) == 2
    monkeypatch.setattr(stats, "compute_stats", no_compute)
    for folder, bundle in zip(folders, opened):
        assert torch.equal(data.open_data(folder, cache_dir=cache).stats.mean, bundle.stats.mean)
    kept = {p.name: p.read_bytes() for p in (cache / "stats").iterdir()}
    monkeypatch.setattr(stats, "compute_stats", real_compute)
    _save(folders[0] / "train" / "a" / "new.bmp", Image.fromarray(np.zeros((48, 64, 3), dtype=np.uint8)))
    changed = data.open_data(folders[0], cache_dir=cache).stats
    assert not torch.equal(changed.mean, opened[0].stats.mean)
    now = {p.name: p.read_bytes() for p in (cache / "stats").iterdir()}
    assert len(now) == 2 and len(set(now) & set(kept)) == 1  # the other folder's kept, this one's replaced
    assert [now[name] == kept[name] for name in set(now) & set(kept)] == [True]
    # Writable again, and changed: cached beside it, and its own in the cache folder removed, with
    # those named before they were named after their folder (read for no folder any more).
    (cache / "stats" / f".alexnet-stats-{'0' * 20}.pt").write_bytes(b"")
    monkeypatch.setattr(stats, "save_checkpoint", real_save)
    _save(folders[0] / "train" / "b" / "new.bmp", Image.fromarray(np.zeros((48, 64, 3), dtype=np.uint8)))
    data.open_data(folders[0], cache_dir=cache)
    assert len(list(folders[0].glob(".alexnet-stats-*.pt"))) == 1
    assert sorted(p.name for p in (cache / "stats").iterdir()) == sorted(set(now) & set(kept))


def test_the_statistics_cache_follows_the_sample_size_and_a_file_rewritten_at_another_size(tmp_path):
    """A file rewritten at another size with its modification time kept (cp -p, rsync -t of
    another version), or statistics asked of another sample size: computed anew, not read
    from the cache of the files as they were."""
    root = _simple_tree(tmp_path / "data")
    first = data.open_data(root, cache_dir=tmp_path / "cache").stats
    image = root / "train" / "a" / "0.jpg"
    before = image.stat()
    _save(image, _rgb(99, (90, 70)))
    os.utime(image, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert image.stat().st_size != before.st_size
    bundle = data.open_data(root, cache_dir=tmp_path / "cache")
    assert torch.equal(bundle.stats.mean, stats.compute_stats(bundle.train).mean)
    assert not torch.equal(bundle.stats.mean, first.mean)
    _, files, _ = data.scan_layout(root)
    train_files = [f for images in files["train"] for f in images]
    assert stats.load_or_compute_stats(root, bundle.train, train_files, tmp_path / "cache", sample=2).images == 2


def test_statistics_cached_beside_the_data_stay_valid_when_the_folder_moves(tmp_path, monkeypatch):
    """The cache's key holds the training files' names relative to the data folder: moved or
    renamed (another disk, another mount point), the folder keeps its statistics."""
    root = _simple_tree(tmp_path / "data")
    first = data.open_data(root, cache_dir=tmp_path / "cache").stats
    moved = root.rename(tmp_path / "moved")

    def no_compute(*args, **kwargs):
        raise AssertionError("statistics recomputed although cached")

    monkeypatch.setattr(stats, "compute_stats", no_compute)
    assert torch.equal(data.open_data(moved, cache_dir=tmp_path / "cache").stats.mean, first.mean)


def test_statistics_that_cannot_be_cached_anywhere_are_used_and_said_to_be_so(tmp_path, monkeypatch, caplog):
    """Neither the data folder nor the cache folder writable (full, read-only): the statistics
    are used all the same, and the log says that the next run computes them again."""
    root = _simple_tree(tmp_path / "data")

    def full_disk(path, payload):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(stats, "save_checkpoint", full_disk)
    caplog.set_level(logging.WARNING, logger="launch.stats")
    assert data.open_data(root, cache_dir=tmp_path / "cache").stats.images == 6
    assert [r.getMessage() for r in caplog.records if r.name == "launch.stats"] == [
        f"could not cache the training-set statistics in {root} (No space left on device)",
        f"could not cache the training-set statistics in {tmp_path / 'cache' / 'stats'} (No space left on device)",
        "the statistics are not cached: they will be computed again next time"]


def test_the_statistics_sample_is_spread_evenly_over_the_classes(tmp_path):
    """``sample`` images from the whole class-sorted list, its first and last among them: each
    class contributes, not only the first class's images."""
    colours = {"a": (30, 0, 0), "b": (0, 60, 0), "c": (0, 0, 90)}
    for name, colour in colours.items():
        for i in range(3):
            _save(tmp_path / "train" / name / f"{i}.png", Image.new("RGB", (256, 256), colour))
            _save(tmp_path / "val" / name / f"{i}.png", Image.new("RGB", (256, 256), colour))
    train = data.open_data(tmp_path, cache_dir=tmp_path / "cache").train
    for sample, picked in ((3, "abc"), (2, "ac")):  # indices 0, 4, 8; 0, 8
        computed = stats.compute_stats(train, sample=sample)
        expected = np.mean([colours[name] for name in picked], axis=0)
        assert computed.images == sample
        expected_mean = torch.tensor(expected, dtype=torch.float32)[:, None, None].expand(3, 256, 256)
        assert torch.equal(computed.mean, expected_mean)


def test_statistics_of_a_sample_of_no_usable_image_are_refused(tmp_path):
    """Every training image sampled unreadable (damaged since the folder was opened): refused in
    one line naming the fix, rather than statistics divided by no image (not a number), which
    would train a net of NaN."""
    train = data.open_data(_simple_tree(tmp_path / "data"), cache_dir=tmp_path / "cache").train
    for index in (0, len(train) - 1):  # the sample of two: the first image and the last
        Path(train.samples[index][0]).write_bytes(b"HEIC, not a JPEG")
    with pytest.raises(DataError, match=r"^none of the 2 training images sampled for the statistics could be used "
                                        r"\(each was unreadable or refused; see the warnings above\): replace or "
                                        r"remove them$"):
        stats.compute_stats(train, sample=2)


def test_a_training_set_of_imagenet_s_classes_gets_the_published_pca(tmp_path):
    """Classes that are ImageNet's 1000 WordNet ids: the colour shift uses the published ImageNet
    PCA (on the 0-255 scale, the eigenvectors as columns), the mean image the set's own."""
    classes = [f"n{i:08d}" for i in range(1000)]
    paths = [_save(tmp_path / "train" / classes[label] / "0.png", Image.new("RGB", (256, 256), (10, 20, label // 9)))
             for label in (0, 999)]
    train = data.ImageFolderSplit("train", classes, [(str(path), label) for path, label in zip(paths, (0, 999))])
    files = [(str(path), (path.stat().st_size, path.stat().st_mtime_ns)) for path in paths]
    computed = stats.load_or_compute_stats(tmp_path, train, files, tmp_path / "cache")
    assert computed.pca_source == "imagenet" and computed.images == 2
    assert torch.allclose(computed.eigval, torch.tensor(stats.IMAGENET_EIGVAL) * 255)
    assert torch.equal(computed.eigvec, torch.tensor(stats.IMAGENET_EIGVEC))
    assert torch.equal(computed.mean[:, 0, 0], torch.tensor([10.0, 20.0, 111 / 2]))


def test_a_damaged_statistics_cache_is_computed_again(tmp_path, caplog):
    """Bytes of the cached mean image overwritten (a bad disk, a copy cut short and mended by
    hand): torch.load reads them as numbers, so the checksums saved with them are checked; a
    cache whose numbers are not finite is not used either."""
    root = _simple_tree(tmp_path / "data")
    first = data.open_data(root, cache_dir=tmp_path / "cache").stats
    [cache] = root.glob(".alexnet-stats-*.pt")
    with zipfile.ZipFile(cache) as archive:  # the largest record, the mean image, stored as it is
        record = max(archive.infolist(), key=lambda r: r.file_size)
    raw = bytearray(cache.read_bytes())
    start = record.header_offset + 30 + int.from_bytes(raw[record.header_offset + 26:record.header_offset + 28],
                                                       "little") + int.from_bytes(
        raw[record.header_offset + 28:record.header_offset + 30], "little")
    raw[start + 1000:start + 5000] = b"\x7f" * 4000  # as float32: 3.4e38
    cache.write_bytes(bytes(raw))
    caplog.clear()
    again = data.open_data(root, cache_dir=tmp_path / "cache").stats
    assert torch.equal(again.mean, first.mean)
    assert f"ignoring unusable statistics cache {cache} (its record {record.filename} does not match its " \
           f"checksum: damaged)" in caplog.text

    saved = torch.load(cache, weights_only=True)  # written anew, whole
    saved["eigval"] = torch.full_like(saved["eigval"], float("nan"))
    torch.save(saved, cache)
    caplog.clear()
    assert torch.equal(data.open_data(root, cache_dir=tmp_path / "cache").stats.eigval, first.eigval)
    assert "(it holds numbers that are not finite)" in caplog.text
    # of other shapes or types, each of which failed in a rank, every run again; a negative deviation;
    # another data set's statistics under this one's name (copied by hand)
    for name, odd, said in (("key", "0" * 20, "written for other data"),
                            ("eigval", torch.ones(4), "its eigval not of the shape and type"),
                            ("eigvec", torch.ones(2, 2), "its eigvec not of the shape and type"),
                            ("mean", first.mean.double(), "its mean not of the shape and type"),
                            ("mean", first.mean.to(torch.uint8), "its mean not of the shape and type"),
                            ("eigval", -first.eigval, "it holds eigenvalues below 0")):
        torch.save(dict(torch.load(cache, weights_only=True), **{name: odd}), cache)
        caplog.clear()
        again = data.open_data(root, cache_dir=tmp_path / "cache").stats
        assert all(torch.equal(getattr(again, k), getattr(first, k)) for k in ("mean", "eigval", "eigvec")), name
        assert f"ignoring unusable statistics cache {cache} ({said}" in caplog.text, caplog.text


def test_stats_follow_an_image_rewritten_in_place_at_the_same_size(tmp_path):
    root = _simple_tree(tmp_path / "data")
    image = _save(tmp_path / "elsewhere" / "same.bmp", _rgb(1))  # uncompressed: every 80x60 BMP has one size
    linked = root / "train" / "a" / "linked.bmp"
    os.symlink(image, linked)  # a link's size and time are its target's
    first = data.open_data(root, cache_dir=tmp_path / "cache").stats
    before = image.stat()
    _save(image, Image.new("RGB", (80, 60), (255, 255, 255)))
    later = before.st_mtime_ns + 10**9  # a later time, even where the file system's clock is coarse
    os.utime(image, ns=(later, later))
    assert image.stat().st_size == before.st_size
    _, files, _ = data.scan_layout(root)
    assert dict(files["train"][0])[str(linked)] == (before.st_size, later)
    bundle = data.open_data(root, cache_dir=tmp_path / "cache")
    assert not torch.equal(bundle.stats.mean, first.mean)
    assert torch.equal(bundle.stats.mean, stats.compute_stats(bundle.train).mean)
    key = stats._stats_key(root, [f for images in files["train"] for f in images], stats.STATS_SAMPLE, False)
    assert [p.name for p in root.glob(".alexnet-stats-*.pt")] == [f".alexnet-stats-{key}.pt"]  # the old one gone


def test_a_file_s_name_relative_to_the_data_folder_is_the_one_relpath_gives():
    """The names the statistics' key and the checks of the data hold, relative to the data folder:
    cut from the path where it lies in the folder, as os.path.relpath has it for any other."""
    for path, folder in (("/data/train/a/0.jpg", "/data"), ("/train/a/0.jpg", "/"), ("/data/../x/0.jpg", "/data/..")):
        assert stats.relative_path(path, folder) == os.path.relpath(path, folder), (path, folder)


def test_a_file_name_that_is_not_utf8_is_read(tmp_path):
    root = _simple_tree(tmp_path / "data")
    latin1 = root / "train" / "a" / os.fsdecode(b"lat\xe9.jpg")  # a name written on a Latin-1 system
    latin1.write_bytes((root / "train" / "a" / "0.jpg").read_bytes())
    bundle = data.open_data(root, cache_dir=tmp_path / "cache")
    assert str(latin1) in [path for path, _ in bundle.train.samples] and bundle.stats.images == 7


def test_pca_convention_against_numpy(tmp_path):
    # Known covariance C = Q diag(lambda) Q^T of 0-255 pixels: eigval must be lambda on the 0-1
    # scale (lambda / 255^2), times 255, decreasing.
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))
    variances = np.array([400.0, 90.0, 4.0])
    eigval, eigvec = stats.pca_from_covariance(q @ np.diag(variances) @ q.T)
    assert np.allclose(eigval, variances / 255)
    assert np.allclose(np.abs(eigvec.T @ q), np.eye(3), atol=1e-9)  # the same axes, up to sign
    assert np.allclose(eigvec @ np.diag(eigval * 255) @ eigvec.T, q @ np.diag(variances) @ q.T)
    for seed in range(5):  # numpy's signs are arbitrary: each axis is signed so that its largest entry is positive
        pixels = np.random.default_rng(seed).normal(size=(100, 3)) @ q
        _, signed = stats.pca_from_covariance(np.cov(pixels.T))
        assert (signed[np.abs(signed).argmax(axis=0), np.arange(3)] > 0).all(), seed
    # Greyscale pixels (R = G = B) have a covariance of rank one, whose two other eigenvalues come out
    # of the decomposition a rounding error either side of 0: 0, not below.
    eigval, _ = stats.pca_from_covariance(q @ np.diag([400.0, 1e-9, -1e-9]) @ q.T)
    assert (eigval >= 0).all() and np.allclose(eigval, [400 / 255, 0, 0], atol=1e-9)

    # End to end on lossless 256x256 images: against numpy's covariance of the same pixels.
    rng = np.random.default_rng(1)
    arrays = [np.clip(rng.multivariate_normal([120, 130, 110], q @ np.diag(variances) @ q.T, (256, 256)), 0, 255)
              .round().astype(np.uint8) for _ in range(3)]
    for i, pixels in enumerate(arrays):  # in two classes, which the statistics do not tell apart
        _save(tmp_path / "train" / "xy"[i % 2] / f"{i}.png", Image.fromarray(pixels))
    for name in "xy":
        _save(tmp_path / "val" / name / "0.png", Image.fromarray(arrays[0]))
    computed = data.open_data(tmp_path, cache_dir=tmp_path / "cache").stats
    all_pixels = np.concatenate([p.reshape(-1, 3) for p in arrays]).astype(np.float64)
    numpy_variances = np.sort(np.linalg.eigvalsh(np.cov(all_pixels.T, bias=True)))[::-1]
    assert np.allclose(computed.eigval.double().numpy() * 255, numpy_variances, rtol=1e-4)
    assert np.allclose(computed.mean.numpy(), np.mean(arrays, axis=0).transpose(2, 0, 1), atol=1e-3)

    # ImageNet: the published numbers, scaled to 0-255, in the same convention.
    imagenet = stats.compute_stats(data.open_data(tmp_path, cache_dir=tmp_path / "cache").train, use_imagenet_pca=True)
    assert torch.allclose(imagenet.eigval, torch.tensor(stats.IMAGENET_EIGVAL) * 255)
    assert stats._is_imagenet([f"n{i:08d}" for i in range(1000)]) and not stats._is_imagenet(["a"] * 1000)
    assert not stats._is_imagenet([f"n{i:08d}_tench" for i in range(1000)])  # the ids themselves, whole


def test_a_photographs_colour_pca_is_on_the_scale_of_the_published_imagenet_numbers(tmp_path):
    """fb.resnet.torch's published ImageNet PCA (0.2175, 0.0188, 0.0045) holds the eigenvalues of
    the covariance of 0-1 pixels: a photograph's computed ones are within 4 times of each.
    Taken for standard deviations (as they once were here), the computed ones were 2 to 10 times
    the published second and third, and the colour shift along them as much stronger."""
    import matplotlib
    photo = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if not photo.is_file():
        pytest.skip(f"no {photo} in this matplotlib")
    for split in ("train", "val"):
        for name in "ab":
            (tmp_path / split / name).mkdir(parents=True)
            shutil.copy(photo, tmp_path / split / name / "photo.jpg")
    computed = data.open_data(tmp_path, cache_dir=tmp_path / "cache").stats.eigval.double().numpy()
    ratios = computed / (np.array(stats.IMAGENET_EIGVAL) * 255)
    assert ((1 / 4 < ratios) & (ratios < 4)).all(), ratios


def test_statistics_cached_by_an_earlier_version_of_their_computation_are_computed_anew(tmp_path, monkeypatch):
    """STATS_VERSION is part of the cache's key: bumped when the computation or the decoding
    changes, the files' statistics as it was are not read, and their cache is replaced."""
    root = _simple_tree(tmp_path / "data")
    first = data.open_data(root, cache_dir=tmp_path / "cache").stats
    [old] = root.glob(".alexnet-stats-*.pt")
    real_compute, computed = stats.compute_stats, []

    def counted(*args, **kwargs):
        computed.append(1)
        return real_compute(*args, **kwargs)

    monkeypatch.setattr(stats, "compute_stats", counted)
    monkeypatch.setattr(stats, "STATS_VERSION", stats.STATS_VERSION + 1)
    again = data.open_data(root, cache_dir=tmp_path / "cache").stats
    assert computed == [1] and torch.equal(again.mean, first.mean)
    [new] = root.glob(".alexnet-stats-*.pt")
    assert new != old


def test_a_cache_with_one_eigenvalue_below_0_or_one_number_not_finite_is_computed_again(tmp_path, caplog):
    """Each number checked, not only a cache whose numbers are all wrong."""
    root = _simple_tree(tmp_path / "data")
    first = data.open_data(root, cache_dir=tmp_path / "cache").stats
    [cache] = root.glob(".alexnet-stats-*.pt")
    saved = torch.load(cache, weights_only=True)
    one_below, one_nan = saved["eigval"].clone(), saved["mean"].clone()
    one_below[2] = -1.0
    one_nan[1, 100, 100] = float("nan")
    for name, odd, said in (("eigval", one_below, "it holds eigenvalues below 0"),
                            ("mean", one_nan, "it holds numbers that are not finite")):
        torch.save(dict(saved, **{name: odd}), cache)
        caplog.clear()
        again = data.open_data(root, cache_dir=tmp_path / "cache").stats
        assert all(torch.equal(getattr(again, k), getattr(first, k)) for k in ("mean", "eigval", "eigvec")), name
        assert f"ignoring unusable statistics cache {cache} ({said})" in caplog.text, caplog.text


def test_a_damaged_copy_beside_the_data_does_not_hide_the_cache_folder_s(tmp_path, monkeypatch, caplog):
    """A data folder that cannot be written, holding a damaged statistics file under the current
    key (copied in with the data): passed over for the cache folder's, not computed every run."""
    root = _simple_tree(tmp_path / "data")
    _data_folders_read_only(monkeypatch, root)
    first = data.open_data(root, cache_dir=tmp_path / "cache").stats
    [cached] = (tmp_path / "cache" / "stats").glob(".alexnet-stats-*.pt")
    beside = root / f".alexnet-stats-{cached.name.rsplit('-', 1)[1]}"
    beside.write_bytes(b"PK\x03\x04 cut short")

    def no_compute(*args, **kwargs):
        raise AssertionError("statistics recomputed although cached")

    monkeypatch.setattr(stats, "compute_stats", no_compute)
    caplog.set_level(logging.INFO, logger="launch.stats")
    caplog.clear()
    assert torch.equal(data.open_data(root, cache_dir=tmp_path / "cache").stats.mean, first.mean)
    assert f"ignoring unusable statistics cache {beside} (" in caplog.text
    assert f"training-set statistics from {cached}" in caplog.text


def test_the_built_in_images_are_stored_at_the_quality_pinned_with_their_name(tmp_path):
    """The JPEG quality is part of what a cached set under BUILTIN_NAME holds, as the pixels are
    (test_the_built_in_images_are_pinned): its quantisation tables, pinned with the name."""
    root = builtin.builtin_dataset(tmp_path / "set", train_per_class=1, val_per_class=1)
    quality_90 = _save(tmp_path / "quality-90.jpg", Image.new("RGB", (16, 16)), quality=90)
    with Image.open(quality_90) as pinned, Image.open(next(root.rglob("*.jpg"))) as drawn:
        assert (builtin.BUILTIN_NAME, drawn.quantization) == ("textures10-v2", pinned.quantization)
    # beside the images, what made them, and that the folder is safe to delete (a cache's)
    assert sorted(p.name for p in root.iterdir()) == ["ABOUT.txt", "train", "val"]
    assert "Safe to delete." in (root / "ABOUT.txt").read_text()


def test_a_built_in_set_put_in_place_by_another_process_while_it_looks_is_used(tmp_path, monkeypatch):
    """Another run's rename landing between the first look (no folder) and the look for a file
    in the way: its folder is the set, used, not taken for a file where the set goes."""
    root = tmp_path / "set"
    real_lexists = builtin.os.path.lexists

    def another_finishes(path):
        if Path(path) == root:
            root.mkdir(exist_ok=True)
        return real_lexists(path)

    monkeypatch.setattr(builtin.os.path, "lexists", another_finishes)
    assert builtin.builtin_dataset(root, train_per_class=1, val_per_class=1) == root
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"] and not list(root.iterdir())


def test_the_built_in_set_holds_250_training_and_20_validation_images_per_class(tmp_path, monkeypatch):
    """Its size is part of what its name pins (a cached set is used as it is): 2,500 training
    images, on which test_recipe's schedule is set, and 200 for validation."""
    made = []

    def recorded(target, train_per_class, val_per_class):
        made.append((train_per_class, val_per_class))
        (target / "train").mkdir()

    monkeypatch.setattr(builtin, "_generate_builtin", recorded)
    builtin.builtin_dataset(tmp_path / "set")
    assert (builtin.BUILTIN_NAME, made) == ("textures10-v2", [(250, 20)])


# --------------------------------------------------------------------------- batches

def test_train_batches_are_a_pure_function_of_seed_epoch_position(small_bundle):
    rng_state = torch.get_rng_state()
    full = list(data.train_batches(small_bundle, batch_size=6, seed=3, epoch=0))
    assert data.batches_per_epoch(small_bundle, 6) == len(full) == 3  # 20 images: drop_last
    assert full[0][0].shape == (6, 3, 224, 224) and full[0][0].dtype == torch.uint8
    assert full[0][1].dtype == torch.int64
    with_workers = list(data.train_batches(small_bundle, batch_size=6, seed=3, epoch=0, workers=2))
    resumed = list(data.train_batches(small_bundle, batch_size=6, seed=3, epoch=0, start_batch=2))
    for (batch, labels), (other_batch, other_labels) in zip(full, with_workers):
        assert torch.equal(batch, other_batch) and torch.equal(labels, other_labels)
    assert len(resumed) == 1 and torch.equal(resumed[0][0], full[2][0]) and torch.equal(resumed[0][1], full[2][1])
    assert torch.equal(torch.get_rng_state(), rng_state), "iterating must not touch the global RNG (dropout)"
    epoch1 = list(data.train_batches(small_bundle, batch_size=6, seed=3, epoch=1))
    assert not torch.equal(torch.cat([b[1] for b in full]), torch.cat([b[1] for b in epoch1]))


def test_the_loader_refuses_what_has_no_batches_at_the_call_and_a_resume_at_the_epoch_end_has_none(small_bundle):
    """Bad arguments are refused when the batches are asked for, naming the value, not at the
    first batch (nor with a ZeroDivisionError or NumPy's error in a worker); a run resumed
    at the end of an epoch (start_batch = the epoch's batches) gets an empty epoch."""
    loader = data.Loader(small_bundle)
    assert list(loader.train(6, seed=3, epoch=0, start_batch=3)) == []  # 20 images: 3 batches of 6
    refusals = [(lambda: loader.train(6, seed=3, epoch=0, start_batch=4), "start_batch 4 is outside the epoch's 3"),
                (lambda: loader.train(6, seed=3, epoch=0, start_batch=-1), "start_batch -1 is outside"),
                (lambda: loader.train(6, seed=3, epoch=-1), "seed and epoch must be non-negative, got seed=3, "
                                                            "epoch=-1"),
                (lambda: loader.train(6, seed=-2, epoch=0), "seed and epoch must be non-negative, got seed=-2"),
                (lambda: loader.train(21, seed=3, epoch=0), "batch size 21 is larger than the training set (20"),
                (lambda: loader.train(0, seed=3, epoch=0), "batch size must be at least 1, got 0"),
                (lambda: data.batches_per_epoch(small_bundle, 0), "batch size must be at least 1, got 0"),
                (lambda: loader.eval(0), "batch size must be at least 1, got 0"),
                (lambda: loader.eval(4, limit=0), "limit must be at least 1, got 0")]
    for call, message in refusals:
        with pytest.raises(ValueError) as refused:
            call()
        assert str(refused.value).startswith(message), (message, str(refused.value))


def test_the_workers_of_train_batches_end_with_its_epoch_or_its_error(tmp_path):
    """train_batches' loader is its own: its worker processes end as the epoch's last batch is
    taken, and as an error ends the batches, before the error reaches the caller (whose
    traceback, held while it is reported, would otherwise keep the loader and its workers)."""
    root = _simple_tree(tmp_path / "data", train=3, val=1)
    bundle = data.open_data(root, cache_dir=tmp_path / "cache")
    before = set(multiprocessing.active_children())
    gc.disable()  # no collection of the loader meanwhile
    try:
        assert len(list(data.train_batches(bundle, 6, seed=0, epoch=0, workers=2))) == 1
        assert not set(multiprocessing.active_children()) - before
        for path, _ in bundle.train.samples:
            Path(path).write_bytes(b"not a jpeg")  # the training images gone bad while a run trains
        with pytest.raises(DataError, match="no usable image in train/") as stopped:  # in a worker
            list(data.train_batches(bundle, 6, seed=0, epoch=1, workers=2))
        assert stopped.traceback and not set(multiprocessing.active_children()) - before
    finally:
        gc.enable()


def _equal(batches, others) -> bool:
    return len(batches) == len(others) and all(torch.equal(a, c) and torch.equal(b, d)
                                               for (a, b), (c, d) in zip(batches, others))


def test_one_loader_serves_every_epoch_and_evaluation_from_the_same_workers(small_bundle):
    """launch.data.Loader, as a rank holds it for the whole run: its worker processes start
    once; an iteration left midway (--max-steps, or a save and an evaluation) leaves nothing
    in the batches asked for next, and closing it ends the workers."""
    expected = {epoch: list(data.train_batches(small_bundle, 6, seed=3, epoch=epoch)) for epoch in (0, 1)}
    centre, ten = list(data.Loader(small_bundle).eval(4)), list(data.Loader(small_bundle).eval(2, ten_crop=True))
    before = set(multiprocessing.active_children())
    with data.Loader(small_bundle, workers=2) as loader:
        left = loader.train(6, seed=3, epoch=0)
        assert _equal([next(left)], expected[0][:1])  # and the workers have the next batches in hand
        workers = set(multiprocessing.active_children()) - before
        assert len(workers) == 2
        assert _equal(list(loader.eval(4)), centre)
        with pytest.raises(StopIteration):
            next(left)  # asking for other batches ended that iteration
        assert _equal(list(loader.train(6, seed=3, epoch=1)), expected[1])
        assert _equal(list(loader.train(6, seed=3, epoch=0, start_batch=1)), expected[0][1:])
        assert _equal(list(loader.eval(2, ten_crop=True)), ten)
        assert set(multiprocessing.active_children()) - before == workers  # the same processes throughout
    assert not set(multiprocessing.active_children()) & workers


def test_the_shares_of_a_batch_are_its_images_in_order_and_of_the_validation_set_every_nth(small_bundle):
    """What each data-parallel replica loads: share (i, n) of every training batch is its i-th
    n-th, the same images, crops and labels that a single loader puts there; of the validation
    set every n-th image from the i-th, so that the shares together evaluate each image once."""
    loader = data.Loader(small_bundle)
    whole = list(loader.train(8, seed=5, epoch=1, start_batch=1))  # 20 images: batch 1 alone
    for shares in (2, 4):
        parts = [list(loader.train(8, seed=5, epoch=1, start_batch=1, share=(i, shares))) for i in range(shares)]
        assert all(len(part) == 1 and len(part[0][1]) == 8 // shares for part in parts)
        assert torch.equal(torch.cat([part[0][0] for part in parts]), whole[0][0])
        assert torch.equal(torch.cat([part[0][1] for part in parts]), whole[0][1])
    assert data.share_of_batch(12, (2, 3)) == (8, 4)
    labels = torch.cat([labels for _, labels in loader.eval(4)])  # 10 images, one of each class
    for shares in (2, 3):
        assert data.eval_share(10, None, (shares - 1, shares)) == list(range(shares - 1, 10, shares))
        parts = [torch.cat([b for _, b in loader.eval(4, share=(i, shares))]) for i in range(shares)]
        assert sorted(torch.cat(parts).tolist()) == sorted(labels.tolist())
        assert all(torch.equal(part, labels[i::shares]) for i, part in enumerate(parts))


def test_a_batch_that_finds_no_room_in_shared_memory_names_the_fix_and_other_errors_pass_as_they_are(small_bundle,
                                                                                                       monkeypatch):
    """The error a worker raises where /dev/shm is full becomes one that says what to do (fewer
    workers, or a larger /dev/shm); any other error of a batch reaches the caller unchanged."""
    def collate(error):
        def failing(items):
            raise RuntimeError(error)
        return failing

    full = "unable to allocate shared memory(shm) for file </torch_1_2_3>: Success (28)"
    monkeypatch.setattr(data, "shared_memory_free", lambda folder=data.SHARED_MEMORY: 12 * 10**6)
    monkeypatch.setattr(data, "_collate", collate(full))
    with pytest.raises(RuntimeError) as refused:
        next(data.Loader(small_bundle).train(6, seed=0, epoch=0))
    assert str(refused.value).startswith("the batches of 0 DataLoader workers found no room in /dev/shm (12 MB free; ")
    assert str(refused.value).endswith("give fewer workers (--workers), or /dev/shm more room (docker run --shm-size)")
    assert str(refused.value.__cause__) == full
    monkeypatch.setattr(data, "_collate", collate("stack expects each tensor to be equal size"))
    with pytest.raises(RuntimeError, match="^stack expects each tensor to be equal size$"):
        next(data.Loader(small_bundle).eval(4))


def test_the_room_in_shared_memory_is_what_this_user_may_fill(tmp_path, monkeypatch):
    """The blocks free to an unprivileged process (a file system keeps some for root), in
    bytes of the file system's fragments; None where there is no such folder."""
    fields = dict(zip(("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree", "f_favail",
                       "f_flag", "f_namemax"), (8192, 2048, 1000, 700, 600, 100, 50, 40, 0, 255)))
    monkeypatch.setattr(os, "statvfs", lambda folder: types.SimpleNamespace(**fields))
    assert data.shared_memory_free(str(tmp_path)) == 600 * 2048
    monkeypatch.undo()
    assert data.shared_memory_free(str(tmp_path / "missing")) is None


def test_augmentation_changes_with_epoch_and_follows_the_paper(small_bundle):
    data_stats = small_bundle.stats
    choices = [data.train_augmentation(seed=0, epoch=epoch, first=0, count=20) for epoch in (0, 1)]
    assert not torch.equal(choices[0].alpha, choices[1].alpha) and not torch.equal(choices[0].top, choices[1].top)
    assert choices[0].flip.any() and not choices[0].flip.all()  # about half reflected

    image = small_bundle.train[0][0]
    crop = image[None, :, 5:229, 7:231]  # as the loader cuts it at (5, 7)
    at = lambda flip, alpha: data.Augmentation(torch.tensor([5]), torch.tensor([7]), torch.tensor([flip]),
                                                torch.tensor([alpha], dtype=torch.float32))
    plain = data.augment(crop, at(False, [0.0, 0.0, 0.0]), data_stats)[0]
    assert torch.equal(plain, image[:, 5:229, 7:231].float() - data_stats.mean[:, 5:229, 7:231])
    assert torch.equal(data.augment(crop, at(True, [0.0, 0.0, 0.0]), data_stats)[0], plain.flip(2))
    alpha = [0.1, -0.2, 0.05]
    shifted = data.augment(crop, at(False, alpha), data_stats)[0] - plain
    expected = sum(alpha[i] * data_stats.eigval[i].item() * data_stats.eigvec[:, i] for i in range(3))
    assert torch.allclose(shifted, expected.float().view(3, 1, 1).expand_as(shifted), atol=1e-4)


def test_each_position_has_its_choices_whatever_the_range_drawn():
    """The choices are drawn a block of positions at a time: a range across a block's end, or
    one position alone, gets what the positions get in a larger range."""
    first = data.DRAW_BLOCK - 100
    whole = data.train_augmentation(seed=2, epoch=1, first=first, count=300)
    for start, count in [(data.DRAW_BLOCK - 5, 10), (data.DRAW_BLOCK + 7, 1), (first, 1), (first + 299, 1)]:
        data._draw_block.cache_clear()
        part = data.train_augmentation(seed=2, epoch=1, first=start, count=count)
        for got, expected in zip(part, whole):
            assert torch.equal(got, expected[start - first:start - first + count])
    # Over many positions: section 4.1's distributions, each block drawn anew.
    many = data.train_augmentation(seed=0, epoch=0, first=0, count=20 * data.DRAW_BLOCK)
    assert set(many.top.tolist()) == set(many.left.tolist()) == set(range(256 - 224 + 1))
    assert abs(many.flip.double().mean() - 0.5) < 0.01  # 20,480 coin flips: 0.0035 standard deviation
    assert abs(many.alpha.double().std() - 0.1) < 0.002 and abs(many.alpha.double().mean()) < 0.002
    assert not torch.equal(many.alpha[:data.DRAW_BLOCK], many.alpha[data.DRAW_BLOCK:2 * data.DRAW_BLOCK])


@pytest.mark.parametrize("first", [0, 5, data.DRAW_BLOCK])
def test_no_positions_have_no_choices_of_the_choices_types(first):
    """An empty range (a share of no images) gets empty choices of the types a batch's are, at a
    block's start too, where it lies in no block."""
    none, one = (data.train_augmentation(seed=1, epoch=0, first=first, count=count) for count in (0, 1))
    assert all(len(choice) == 0 for choice in none)
    assert [c.dtype for c in none] == [c.dtype for c in one] == [torch.int64, torch.int64, torch.bool, torch.float32]
    assert none.alpha.shape == (0, 3)


@pytest.mark.parametrize("block", [None, 7], ids=["one block", "blocks of 7"])
def test_the_batched_augmentation_is_the_per_image_one(small_bundle, monkeypatch, request, block):
    """What the loader used to hand out (float32, augmented image by image on the CPU)
    against uint8 crops augmented as a batch, as each rank does on its device; with blocks
    of 7 positions, the loader's crops are cut where train_augmentation says across blocks."""
    if block is not None:
        monkeypatch.setattr(data, "DRAW_BLOCK", block)
    data._draw_block.cache_clear()
    request.addfinalizer(data._draw_block.cache_clear)  # no block of 7 left for the other tests
    data_stats = small_bundle.stats
    (crops, labels), = list(data.train_batches(small_bundle, batch_size=20, seed=4, epoch=2))
    assert crops.dtype == torch.uint8 and crops.shape == (20, 3, 224, 224)
    choices = data.train_augmentation(seed=4, epoch=2, first=0, count=20)
    batched = data.augment(crops, choices, data_stats)
    order = data.epoch_order(len(small_bundle.train), seed=4, epoch=2)
    for k in range(20):
        image = small_bundle.train[int(order[k])][0]
        top, left = int(choices.top[k]), int(choices.left[k])
        window = (slice(None), slice(top, top + 224), slice(left, left + 224))
        x = image[window].float() - data_stats.mean[window]
        if choices.flip[k]:
            x = x.flip(2)
        x = x + (data_stats.eigvec @ (choices.alpha[k] * data_stats.eigval)).view(3, 1, 1)
        # The colour shift is a 3 x 3 product, summed in another order as a batch: at most
        # an ulp or two of values of a few hundred (1e-5 absolute is about 300 ulps at 256).
        torch.testing.assert_close(batched[k], x, rtol=0, atol=1e-5)


def test_evaluation_batches_and_ten_crop(small_bundle):
    centre = [(data.eval_views(images, small_bundle.stats, ten_crop=False), labels)
              for images, labels in data.Loader(small_bundle).eval(batch_size=4)]
    assert [len(labels) for _, labels in centre] == [4, 4, 2]  # in order, last partial batch kept
    labels = torch.cat([l for _, l in centre])
    assert torch.equal(labels, torch.tensor([label for _, label in small_bundle.val.samples]))
    ten = [(data.eval_views(images, small_bundle.stats, ten_crop=True), labels)
           for images, labels in data.Loader(small_bundle).eval(batch_size=4, ten_crop=True)]
    views = torch.cat([images for images, _ in ten])
    assert views.shape == (10, 10, 3, 224, 224)
    assert torch.equal(views[:, 4], torch.cat([images for images, _ in centre]))
    assert torch.equal(views[:, 5:], views[:, :5].flip(-1))
    image = small_bundle.val[0][0].float() - small_bundle.stats.mean
    assert torch.equal(views[0, 0], image[:, :224, :224]) and torch.equal(views[0, 3], image[:, 32:, 32:])
    assert torch.equal(views[0, 1], image[:, :224, 32:]) and torch.equal(views[0, 2], image[:, 32:, :224])
    limited = torch.cat([l for _, l in data.Loader(small_bundle).eval(batch_size=4, limit=5)])
    assert len(limited) == 5 and len(set(limited.tolist())) == 5  # spread over the classes
    assert data.eval_indices(11, 4) == [0, 3, 7, 10]  # evenly spread: 0, 3.3, 6.7 and 10, each to the nearest


# --------------------------------------------------------------------------- prepare tool

def _prepare(*args):
    return subprocess.run([sys.executable, "-m", "launch.prepare", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow  # the tool as a subprocess, with its worker pool
def test_prepare_tool_end_to_end(tmp_path):
    src, dst = tmp_path / "raw", tmp_path / "prepared"
    odd = _mixed_tree(src)
    done = _prepare(src, dst, "--workers", "2")
    assert done.returncode == 0, done.stderr
    assert "unreadable" in done.stderr and odd["truncated"] in done.stderr and odd["fake"] in done.stderr
    assert "17/17 done: 15 converted, 2 skipped" in done.stderr  # the skipped files are not counted as converted
    listed = (dst / "unreadable.txt").read_text()
    assert odd["truncated"] in listed and odd["fake"] in listed
    written = sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*.jpg"))
    assert len(written) == 17 - 2 and "train/a/cmyk.jpg" in written
    assert {"train/b/rgb.bmp.jpg", "train/b/rgb.gif.jpg"} <= set(written)  # same stem: full names kept
    for path in dst.rglob("*.jpg"):
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.size == (256, 256) and image.mode == "RGB", path
    assert len(list(dst.glob(".alexnet-stats-*.pt"))) == 1  # statistics computed and cached
    bundle = data.open_data(dst, cache_dir=tmp_path / "cache")
    assert len(bundle.train) == 13 and bundle.stats.images == 13

    bad = _prepare(tmp_path / "nowhere", tmp_path / "out")
    assert bad.returncode != 0 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr
    assert "built-in" not in bad.stderr  # SRC cannot be left out, as training's --data can
    helped = _prepare("--help")
    assert helped.returncode == 0 and "--workers" in helped.stdout and "256" in helped.stdout


def test_prepare_on_a_full_disk_is_one_line_and_leaves_no_part_of_an_image(tmp_path, monkeypatch, capfd):
    """The disk fills while two workers write: one fails, the other is still writing when the
    pool is ended. One line naming DST and the fix, exit 2, and no partial file in DST."""
    src, dst, first = _simple_tree(tmp_path / "raw", train=10), tmp_path / "prepared", tmp_path / "first-write"

    real_write_bytes = Path.write_bytes

    def full_disk(path, data):  # in the workers, forked with it
        real_write_bytes(path, data[:3])  # a part of the JPEG
        try:
            os.close(os.open(first, os.O_CREAT | os.O_EXCL))
        except FileExistsError:  # every write but the first: the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) from None
        time.sleep(120)  # the first: still writing when the other has failed

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    # 24 images: two chunks of the pool's 16, one per worker
    assert prepare.main([str(src), str(dst), "--workers", "2"]) == 2
    err = capfd.readouterr().err
    assert "Traceback" not in err and err.splitlines()[-1:] == [
        f"error: cannot write to DST {dst} (No space left on device): free space on its disk, or give a DST that can "
        f"be written; run again, and the images already written are kept"]
    # no image (the record, empty, says this version's DST), and the tree refused to training as unfinished
    assert first.exists() and sorted(p.name for p in dst.rglob("*") if p.is_file()) == sorted(
        [data.PREPARE_LOCK_NAME, data.UNFINISHED_NAME, prepare.RECORD_NAME])

    # the list of unreadable files, written once the images are: the images stay, no part of the list
    monkeypatch.undo()
    (src / "train" / "a" / "fake.jpg").write_text("not an image")
    real = Path.write_bytes

    def full_disk_for_the_list(path, data):
        if "unreadable" not in path.name:  # an image
            return real(path, data)
        real(path, data[:10])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_bytes", full_disk_for_the_list)
    assert prepare.main([str(src), str(dst), "--workers", "1"]) == 2
    assert capfd.readouterr().err.splitlines()[-1].startswith(f"error: cannot write to DST {dst} (No space left")
    assert sorted(p.name for p in dst.rglob("*") if p.is_file() and p.name != data.PREPARE_LOCK_NAME) == sorted(
        [*(p.name for p in src.rglob("[0-9].jpg")), data.UNFINISHED_NAME, prepare.RECORD_NAME])


@pytest.mark.slow  # the tool as a subprocess
def test_prepare_on_a_disk_that_takes_a_part_of_an_image_keeps_none_of_it(tmp_path):
    """A disk that fills takes the first bytes of a file and refuses the rest: the write fails
    then, and the image cut short is not kept in DST (where the next run would count it as done)."""
    src, dst = _simple_tree(tmp_path / "raw", train=2, val=1), tmp_path / "prepared"

    def small_disk():  # 16 kB a file, less than a converted image of noise: a write past it is cut short
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails (EFBIG) rather than the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, resource.RLIM_INFINITY))

    refused = subprocess.run([sys.executable, "-m", "launch.prepare", src, dst, "--workers", "1"], cwd=REPO,
                             capture_output=True, text=True, timeout=120, preexec_fn=small_disk,
                             env={**os.environ, "HOME": str(tmp_path)})
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.splitlines()[-1].startswith(f"error: cannot write to DST {dst} (File too large): raise the "
                                                      f"limit on the size of a file (ulimit -f)"), refused.stderr
    # neither an image cut short nor a hidden part of one; the lock of the run that writes to DST
    assert sorted(p.name for p in dst.rglob("*") if p.is_file()) == sorted(
        [data.PREPARE_LOCK_NAME, data.UNFINISHED_NAME, prepare.RECORD_NAME])
    assert _prepare(src, dst, "--workers", "1").returncode == 0  # and, given room, the run goes on
    assert not (dst / data.UNFINISHED_NAME).exists()
    for path in dst.rglob("*.jpg"):
        with Image.open(path) as image:
            image.load()  # whole


def test_prepare_refuses_two_images_with_one_target_and_a_quality_out_of_range(tmp_path, capsys):
    src = _simple_tree(tmp_path / "raw")
    for name in ("0.png", "0.png.jpg"):  # beside 0.jpg: written as 0.jpg, 0.png.jpg, and 0.png.jpg again
        _save(src / "train" / "a" / name, _rgb(50), format="PNG" if name == "0.png" else "JPEG")
    assert prepare.main([str(src), str(tmp_path / "prepared")]) == 2
    error = capsys.readouterr().err.strip()
    assert error == (f"error: {src / 'train/a/0.png'} and {src / 'train/a/0.png.jpg'} would both be written to "
                     f"{tmp_path / 'prepared/train/a/0.png.jpg'}: rename one of them in SRC")
    assert not (tmp_path / "prepared").exists()  # refused before writing anything
    # A file whose base image takes the name of a folder beside it: 1.jpeg is written as 1.jpg
    (src / "train" / "a" / "0.png").unlink()
    (src / "train" / "a" / "1.jpg").unlink()
    _save(src / "train" / "a" / "1.jpg" / "inner.jpg", _rgb(51))  # a folder named like an image
    _save(src / "train" / "a" / "1.jpeg", _rgb(52))
    assert prepare.main([str(src), str(tmp_path / "prepared")]) == 2
    error = capsys.readouterr().err.strip()
    assert error == (f"error: {src / 'train/a/1.jpeg'} would be written to {tmp_path / 'prepared/train/a/1.jpg'}, "
                     f"which {src / 'train/a/1.jpg/inner.jpg'} needs as a folder: rename one of them in SRC")
    assert not (tmp_path / "prepared").exists()
    for quality in ("0", "-5", "101"):
        with pytest.raises(SystemExit) as refused:
            prepare.main([str(src), str(tmp_path / "q"), "--quality", quality])
        assert refused.value.code == 2
        assert f"--quality must be 1 to 100 (JPEG's scale; default 95), got {quality}" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_prepare_writes_images_of_the_longest_names_and_refuses_one_whose_base_image_name_would_be_too_long(
        tmp_path, capsys):
    src, dst = _simple_tree(tmp_path / "raw", train=1, val=1), tmp_path / "prepared"
    longest = "x" * 251 + ".jpg"  # 255 bytes: its partial file's name must be shorter than ".NAME.partial-PID"
    _save(src / "train" / "a" / longest, _rgb(60))
    png = _save(src / "train" / "b" / ("y" * 248 + ".png"), _rgb(61), format="PNG")  # -> 256 bytes with .jpg
    assert prepare.main([str(src), str(dst), "--workers", "1"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {png}: its base image's name in DST, {png.name}.jpg, would be longer than a file name can be (255 "
        f"bytes): give it a shorter name in SRC")
    assert not dst.exists()
    png.unlink()
    wide = _save(src / "train" / "b" / ("é" * 124 + ".png"), _rgb(62), format="PNG")  # 132 characters, 256 bytes
    assert prepare.main([str(src), str(dst), "--workers", "1"]) == 2
    assert f"{wide.name}.jpg, would be longer than a file name can be (255 bytes)" in capsys.readouterr().err
    wide.unlink()
    assert prepare.main([str(src), str(dst), "--workers", "1"]) == 0
    with Image.open(dst / "train" / "a" / longest) as image:
        assert image.size == (256, 256)
    assert sorted(p.name for p in (dst / "train" / "a").iterdir()) == ["0.jpg", longest]  # no partial file left
    # a killed worker's partial file of it, its name shortened to fit (cli.write_whole): removed by the next run
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    suffix = f".partial-{int(ended.stdout)}"
    left = dst / "train" / "a" / f".{longest[:255 - 1 - len(suffix)]}{suffix}"
    left.write_bytes(b"\xff\xd8")
    assert prepare.main([str(src), str(dst), "--workers", "1"]) == 0 and not left.exists()


def test_a_partial_image_whose_name_was_cut_within_a_character_is_removed(tmp_path):
    """cli.write_whole cuts a long name by bytes, perhaps within a character: compared as text,
    its partial file was not found to be the image's."""
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    suffix = f".partial-{int(ended.stdout)}"
    kept = 255 - 1 - len(suffix)  # bytes of the name in its partial file's: within an é after an odd number of c's
    target = tmp_path / "train" / "a" / ("c" * (1 + kept % 2) + "é" * 120 + ".jpg")
    target.parent.mkdir(parents=True)
    cut = os.fsdecode(b"." + os.fsencode(target.name)[:255 - 1 - len(suffix)] + suffix.encode())
    assert len(os.fsencode(cut)) == 255
    (target.parent / cut).write_bytes(b"\xff\xd8")
    other = target.parent / f".other.jpg{suffix}"  # of no image planned
    other.write_bytes(b"\xff\xd8")
    prepare._remove_abandoned_partials({target: None})
    assert [p.name for p in target.parent.iterdir()] == [other.name]


def test_prepare_refuses_more_workers_than_its_cores_run_and_starts_no_more_than_its_work_needs(tmp_path, capsys,
                                                                                                 monkeypatch):
    src, dst = _simple_tree(tmp_path / "raw"), tmp_path / "prepared"
    monkeypatch.setattr(prepare, "usable_cores", lambda: 2)
    for workers in ("0", "9", "100000"):
        with pytest.raises(SystemExit) as refused:
            prepare.main([str(src), str(dst), "--workers", workers])
        assert refused.value.code == 2
        assert (f"--workers must be 1 to 8 (4 processes for each of the 2 cores it may use: more only thrash the "
                f"machine), got {workers}") in capsys.readouterr().err
    assert not dst.exists()
    started, real = [], prepare._pool
    monkeypatch.setattr(prepare, "_pool", lambda workers: started.append(workers) or real(workers))
    assert prepare.main([str(src), str(dst), "--workers", "8"]) == 0  # 10 images, a worker's work at a time
    assert started == [1] and len(list(dst.rglob("*.jpg"))) == 10


def _channel(path: Path) -> int:
    """The colour channel that a one-colour image is: 0 red, 1 green, 2 blue."""
    with Image.open(path) as image:
        return int(np.asarray(image.convert("RGB")).mean(axis=(0, 1)).argmax())


def test_prepare_names_each_image_by_its_own_name_and_refuses_images_that_src_no_longer_has(tmp_path, capsys):
    """A restarted run finds the files of the last one by their names alone: an image added to
    SRC beside one of the same stem gets a file of its own, never the one written for the
    other. An image in DST that no image of SRC becomes would be trained on: refused, named."""
    src, dst = _simple_tree(tmp_path / "raw", train=1, val=1), tmp_path / "prepared"
    _save(src / "train" / "a" / "x.png", Image.new("RGB", (300, 300), "red"))
    _save(src / "train" / "a" / "y.JPEG", Image.new("RGB", (300, 300), "blue"))
    assert prepare.main([str(src), str(dst), "--workers", "1"]) == 0
    written = lambda: sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*.jpg"))
    firsts = ["train/a/0.jpg", "train/b/0.jpg", "val/a/0.jpg", "val/b/0.jpg"]
    assert written() == sorted([*firsts, "train/a/x.png.jpg", "train/a/y.jpg"])

    _save(src / "train" / "a" / "x.jpg", Image.new("RGB", (300, 300), "lime"))  # the same stem as x.png
    assert prepare.main([str(src), str(dst), "--workers", "1"]) == 0
    assert written() == sorted([*firsts, "train/a/x.jpg", "train/a/x.png.jpg", "train/a/y.jpg"])
    train_a = dst / "train" / "a"
    assert [_channel(train_a / name) for name in ("x.png.jpg", "x.jpg", "y.jpg")] == [0, 1, 2]

    (src / "train" / "a" / "x.png").unlink()
    capsys.readouterr()
    assert prepare.main([str(src), str(dst), "--workers", "1"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: DST {dst} holds 1 image(s) that no image of SRC becomes, such as {train_a / 'x.png.jpg'} (SRC has "
        f"changed since they were written, or DST holds other images): the training program would read them as "
        f"data. Remove them, or give a new DST, and run again")
    (train_a / "x.png.jpg").unlink()
    (train_a / ".x.png.jpg.partial-123").write_bytes(b"\xff\xd8")  # hidden, a write cut short: not data
    _save(train_a / ".thumbs" / "x.jpg", _rgb(1))  # in a hidden folder: not data either
    for folder in (train_a, dst / "train"):  # nor in the thumbnails of a NAS that indexes DST
        _save(folder / "@eaDir" / "x.jpg" / "SYNOPHOTO_THUMB_M.jpg", _rgb(1))
    assert prepare.main([str(src), str(dst), "--workers", "1"]) == 0
    assert len(data.open_data(dst, cache_dir=tmp_path / "cache").train) == 4  # 0.jpg of a and b, x.jpg, y.jpg


def test_folders_nested_deeper_than_python_walks_are_refused_in_one_line(tmp_path, capsys):
    """os.walk recurses before Python 3.12: a class folder nested about a recursion limit deep
    (1,000 folders) gave a traceback, in the training program and in launch.prepare alike. The
    limit is lowered here to what a test's folders reach; from Python 3.12 they are walked."""
    src, dst = _simple_tree(tmp_path / "raw", train=1, val=1), tmp_path / "prepared"
    assert prepare.main([str(src), str(dst), "--workers", "1"]) == 0
    for root in (tmp_path / "deep", dst):
        _simple_tree(root, train=1, val=1)
        deep = root / "train" / "a" / Path(*["d"] * 200)
        deep.mkdir(parents=True)
        _save(deep / "x.jpg", _rgb(1))
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(len(inspect.stack()) + 100)  # deep enough for the program, not for a walk of 200
    try:
        try:
            data.open_data(tmp_path / "deep", cache_dir=tmp_path / "cache")
            walked = True
        except DataError as exc:
            walked = False
            assert str(exc) == (f"{tmp_path / 'deep' / 'train'} holds folders nested too deep for this Python to "
                                f"walk (about {sys.getrecursionlimit()} levels): move the images fewer folders down")
        code = prepare.main([str(src), str(dst), "--workers", "1"])
    finally:
        sys.setrecursionlimit(limit)
    assert walked == (sys.version_info >= (3, 12))
    if walked:  # DST's deep image is not one that SRC makes
        assert code == 2 and "holds 1 image(s) that no image of SRC becomes" in capsys.readouterr().err
    else:
        assert code == 2 and capsys.readouterr().err.splitlines()[-1] == (
            f"error: {dst} holds folders nested too deep for this Python to walk (about "
            f"{len(inspect.stack()) + 100} levels): move the images fewer folders down")


def test_prepare_says_how_many_files_it_leaves_out_as_not_images(tmp_path, caplog):
    """A file whose name is not an image's (a JPEG named .jfif, a name without extension) is
    not converted, as the training program would not read it: said, with the names it reads;
    and so is an image outside the class folders, as the training program says too."""
    src = _simple_tree(tmp_path / "raw", train=1, val=1)
    jpeg = (src / "train" / "a" / "0.jpg").read_bytes()
    for name in ("photo.jfif", "noext", ".hidden.jpg"):
        (src / "train" / "a" / name).write_bytes(jpeg)
    (src / "val" / "loose.jpg").write_bytes(jpeg)  # beside the class folders: of no class
    caplog.set_level(logging.INFO)
    assert prepare.main([str(src), str(tmp_path / "prepared"), "--workers", "1"]) == 0
    said = [r.getMessage() for r in caplog.records]
    assert "train/: ignored 3 hidden files or files that are not images (.jpg .jpeg .png .bmp .gif .webp .tif " \
           ".tiff)" in said
    assert "val/: ignored 1 images directly in it, beside the class folders: they belong to no class (move each " \
           "into its class's folder)" in said
    assert not any(line.startswith(("val/: ignored 1 hidden", "train/: ignored 1 images")) for line in said)


def test_prepare_finds_the_images_that_a_link_in_dst_adds_and_removes_the_partial_images_of_a_killed_run(
        tmp_path, capsys, monkeypatch):
    """An image that a folder link in DST's class folder adds is one that no image of SRC
    becomes, which the training program would read: refused, as one in a real folder is, and
    counted once however many links reach it. A link to another class's folder of DST adds
    none (the training program skips what it reaches), nor does a link to a planned image
    beside it; a link from val/ to a training image
    adds one to val/ (refused before any image is converted). The hidden partial image of a
    worker that was killed is removed from DST's own folders, where it can be; one of a
    process that lives is not, nor a file of that name reached through a link that DST's
    images are not written through."""
    src, dst = _simple_tree(tmp_path / "raw", train=1, val=1), tmp_path / "prepared"
    assert prepare.main([str(src), str(dst), "--workers", "1"]) == 0
    train_a = dst / "train" / "a"
    (train_a / "to-b").symlink_to(dst / "train" / "b")
    (train_a / "loop").symlink_to(train_a)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (dst / "train" / "b" / "notes").symlink_to(elsewhere)
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, alive = train_a / f".0.jpg.partial-{int(ended.stdout)}", train_a / f".0.jpg.partial-{os.getppid()}"
    not_ours = elsewhere / f".0.jpg.partial-{int(ended.stdout)}"
    no_image_s = train_a / f".notes.partial-{int(ended.stdout)}"  # a partial file of no image planned: not ours
    for partial in (dead, alive, not_ours, no_image_s):
        partial.write_bytes(b"\xff\xd8")
    with monkeypatch.context() as m:  # a DST this run cannot write: read as it is
        m.setattr(os, "unlink", lambda path, *args, **kwargs: (_ for _ in ()).throw(PermissionError(13, "denied")))
        assert prepare.main([str(src), str(dst), "--workers", "1"]) == 0
    assert dead.exists()
    assert prepare.main([str(src), str(dst), "--workers", "1"]) == 0
    assert not dead.exists() and alive.exists() and not_ours.exists() and no_image_s.exists()
    # a link in a class folder to an image planned there, met first by the walk, is that image: none added
    (train_a / "0-alias.jpg").symlink_to(train_a / "0.jpg")
    assert prepare.main([str(src), str(dst), "--workers", "1"]) == 0
    (train_a / "0-alias.jpg").unlink()
    # a DST folder that cannot be read: named, with that fix, not the fix of one that cannot be written
    unreadable, real_scandir = dst / "train" / "b", os.scandir
    with monkeypatch.context() as m:
        m.setattr(os, "scandir", lambda path=".": (_ for _ in ()).throw(PermissionError(
            errno.EACCES, os.strerror(errno.EACCES), str(path))) if Path(path) == unreadable else real_scandir(path))
        capsys.readouterr()
        assert prepare.main([str(src), str(dst), "--workers", "1"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: cannot read {unreadable} (Permission denied): make the data folder readable (every folder in it), "
        f"or pass another data folder")

    other = _simple_tree(tmp_path / "other", train=1, val=1)
    (train_a / "more").symlink_to(other / "train" / "b")
    (dst / "train" / "b" / "to-a").symlink_to(train_a)  # reaches a's stray image too: the training program skips it
    capsys.readouterr()
    assert prepare.main([str(src), str(dst), "--workers", "1"]) == 2
    assert capsys.readouterr().err.strip().startswith(
        f"error: DST {dst} holds 1 image(s) that no image of SRC becomes, such as {train_a / 'more' / '0.jpg'} (")
    (train_a / "more").unlink()
    (dst / "val" / "a" / "leak.jpg").symlink_to(train_a / "0.jpg")
    assert prepare.main([str(src), str(dst), "--workers", "1"]) == 2
    assert capsys.readouterr().err.strip().startswith(
        f"error: DST {dst} holds 1 image(s) that no image of SRC becomes, such as {dst / 'val' / 'a' / 'leak.jpg'} (")


def _age(path: Path, seconds: int = 10) -> None:
    """``path``'s modification time moved ``seconds`` back: its source rewritten after it was made."""
    status = os.lstat(path)
    os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns - seconds * 10**9), follow_symlinks=False)


def test_prepare_makes_again_what_is_older_than_its_image_and_refuses_an_image_of_src_in_dst(tmp_path, caplog,
                                                                                            capsys):
    """Run again, prepare converts an image of SRC rewritten under its name since (newer than
    its file in DST) and an image in DST that is a link, not only those missing; removes the
    file made of an image that can no longer be read; and refuses a link in SRC into DST's
    train/ or val/, whose images each run would add again to the training set."""
    caplog.set_level(logging.INFO, logger=prepare.log.name)
    src, dst = _simple_tree(tmp_path / "raw", train=2, val=1), tmp_path / "prepared"
    red = _save(src / "train" / "a" / "0.jpg", Image.new("RGB", (300, 300), "red"))
    assert prepare.main([str(src), str(dst), "--workers", "1"]) == 0
    made, linked = dst / "train" / "a" / "0.jpg", dst / "train" / "b" / "0.jpg"
    assert _channel(made) == 0
    before = {p: p.read_bytes() for p in dst.rglob("*.jpg")}

    caplog.clear()
    assert prepare.main([str(src), str(dst), "--workers", "1"]) == 0  # nothing has changed: nothing is made
    assert "6 images in" in caplog.text and "0 to convert, 6 already in" in caplog.text

    _save(red, Image.new("RGB", (300, 300), "blue"))  # the same name, another picture
    _age(made)
    linked.unlink()
    linked.symlink_to(src / "train" / "b" / "0.jpg")  # as new as its source, but not a base image
    caplog.clear()
    assert prepare.main([str(src), str(dst), "--workers", "1"]) == 0
    assert "2 to convert, 4 already in" in caplog.text and "unreadable" not in caplog.text
    assert _channel(made) == 2 and not linked.is_symlink() and linked.read_bytes() == before[linked]
    assert {p: p.read_bytes() for p in dst.rglob("*.jpg") if p != made} == {p: b for p, b in before.items() if p != made}

    gone = src / "train" / "b" / "1.jpg"
    gone.write_bytes(b"no longer an image")
    _age(dst / "train" / "b" / "1.jpg")
    assert prepare.main([str(src), str(dst), "--workers", "1"]) == 0
    assert not (dst / "train" / "b" / "1.jpg").exists() and str(gone) in (dst / "unreadable.txt").read_text()
    (dst / "train" / "b" / "1.jpg").mkdir()  # a folder in its place is not removed, nor is it a reason to stop
    assert prepare.main([str(src), str(dst), "--workers", "1"]) == 0
    (dst / "train" / "b" / "1.jpg").rmdir()
    gone.unlink()

    files = {p: p.read_bytes() for p in dst.rglob("*") if p.is_file()}
    (src / "train" / "a" / "more").symlink_to(dst / "train" / "b", target_is_directory=True)
    capsys.readouterr()
    assert prepare.main([str(src), str(dst), "--workers", "1"]) == 2
    assert capsys.readouterr().err == (f"error: {src / 'train' / 'a' / 'more' / '0.jpg'} is {linked}, an image that "
                                       f"this program writes in DST: remove the link to it from SRC, or give another "
                                       f"DST\n")
    assert {p: p.read_bytes() for p in dst.rglob("*") if p.is_file()} == files  # nothing written
    (src / "train" / "a" / "more").unlink()
    shutil.move(src, dst / "raw")  # SRC in DST, beside what it writes there: its images are not DST's
    assert prepare.main([str(dst / "raw"), str(dst), "--workers", "1"]) == 0


def test_prepare_lists_the_unreadable_files_of_its_last_run_by_their_own_bytes(tmp_path, monkeypatch):
    """A name that is not UTF-8 is listed as its bytes are, one holding a line break, a carriage
    return, a tab or a backslash on one line, escaped; a run that finds none unreadable leaves
    no list of an earlier run's; a class with no readable image is refused (exit 2)."""
    # The name is logged too: kept out of the test's report, which pytest-xdist's workers send as UTF-8.
    logged = []
    kept = logging.Handler()
    kept.emit = lambda record: logged.append(record.getMessage())
    monkeypatch.setattr(prepare.log, "handlers", [kept])
    monkeypatch.setattr(prepare.log, "propagate", False)
    src, dst = _simple_tree(tmp_path / "raw", train=1, val=1), tmp_path / "prepared"
    odd = os.path.join(os.fsencode(src / "train" / "a"), b"bad\xfe.png")
    with open(odd, "wb") as f:
        f.write(b"not an image")
    try:
        assert prepare.main([str(src), str(dst), "--workers", "1"]) == 0
    finally:  # not left in a kept folder, whose name pytest-xdist's workers could not report
        os.unlink(odd)
    listed = (dst / "unreadable.txt").read_bytes()
    assert listed.startswith(odd + b"\t") and listed.count(b"\n") == 1
    broken = src / "train" / "a" / "two\nlines\tand \\\r.jpg"
    broken.write_bytes(b"not an image either")
    assert prepare.main([str(src), str(dst), "--workers", "1"]) == 0
    broken.unlink()
    lines = (dst / "unreadable.txt").read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{src}/train/a/two\\nlines\\tand \\\\\\r.jpg\t{src}/train/a/two\\n")
    [skipped] = [m for m in logged if m.startswith(f"skipped {src}/train/a/two")]  # on one line in the log too
    assert skipped.startswith(f"skipped {src}/train/a/two\\nlines\\tand ") and not set("\n\t\r") & set(skipped)
    assert prepare.main([str(src), str(dst), "--workers", "1"]) == 0
    assert not (dst / "unreadable.txt").exists()

    (src / "val" / "b" / "0.jpg").write_bytes(b"not a jpeg either")  # class b's only val image
    shutil.rmtree(dst)
    assert prepare.main([str(src), str(dst), "--workers", "1"]) == 2


def test_prepare_run_again_on_a_finished_dst_it_cannot_write_to_ends_well(tmp_path, monkeypatch):
    """A finished DST on a read-only disk (another user's): nothing to write, so nothing fails,
    with or without a list of unreadable files (which is the same as the last run's)."""
    src, dst = _simple_tree(tmp_path / "raw", train=1, val=1), tmp_path / "prepared"
    assert prepare.main([str(src), str(dst), "--workers", "1"]) == 0
    (src / "train" / "a" / "bad.jpg").write_bytes(b"not an image")
    assert prepare.main([str(src), str(dst), "--workers", "1"]) == 0
    listed = (dst / "unreadable.txt").read_bytes()

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    monkeypatch.setattr(prepare, "write_whole", read_only)
    monkeypatch.setattr(Path, "unlink", read_only)
    monkeypatch.setattr(Path, "touch", read_only)
    assert prepare.main([str(src), str(dst), "--workers", "1"]) == 0
    assert (dst / "unreadable.txt").read_bytes() == listed
    monkeypatch.undo()
    (src / "train" / "a" / "bad.jpg").unlink()
    assert prepare.main([str(src), str(dst), "--workers", "1"]) == 0 and not (dst / "unreadable.txt").exists()
    monkeypatch.setattr(Path, "unlink", read_only)
    monkeypatch.setattr(Path, "touch", read_only)
    assert prepare.main([str(src), str(dst), "--workers", "1"]) == 0


def test_prepare_makes_again_an_image_whose_source_was_replaced_by_an_older_one(tmp_path, caplog):
    """What an image was made from is recorded, not guessed from dates: a source replaced by
    another with an older date (tar, cp -p, rsync -t) is made again, one dated in the future
    once, one whose time lost its fraction of a second not; an image whose record line was cut
    short is made again; a DST of an earlier version (no record) is taken as it took itself."""
    caplog.set_level(logging.INFO, logger=prepare.log.name)
    src, dst = _simple_tree(tmp_path / "raw", train=2, val=1), tmp_path / "prepared"
    red = _save(src / "train" / "a" / "0.jpg", Image.new("RGB", (300, 300), "red"))
    made = dst / "train" / "a" / "0.jpg"
    assert prepare.main([str(src), str(dst), "--workers", "1"]) == 0 and _channel(made) == 0

    _save(red, Image.new("RGB", (300, 300), "blue"))  # another picture, from a copy made a day before
    _age(red, 24 * 3600)
    caplog.clear()
    assert prepare.main([str(src), str(dst), "--workers", "1"]) == 0
    assert "1 to convert, 5 already in" in caplog.text and _channel(made) == 2

    future = time.time_ns() + 24 * 3600 * 10**9  # a clock set wrong: made once, not on every run
    os.utime(red, ns=(future, future))
    assert prepare.main([str(src), str(dst), "--workers", "1"]) == 0
    caplog.clear()
    assert prepare.main([str(src), str(dst), "--workers", "1"]) == 0
    assert "0 to convert, 6 already in" in caplog.text

    # The same tree copied by a tool that keeps whole seconds (tar's ustar format, FAT): not changed.
    whole = red.stat().st_mtime_ns // 10**9 * 10**9
    os.utime(red, ns=(whole, whole))
    caplog.clear()
    assert prepare.main([str(src), str(dst), "--workers", "1"]) == 0
    assert "0 to convert, 6 already in" in caplog.text

    records = sorted(dst.glob(f"{prepare.RECORD_NAME}*"))
    assert records == [dst / prepare.RECORD_NAME]  # the workers' parts merged into one file
    # The program killed as it wrote the line of an image written whole: the image is made again.
    lines = [l for l in records[0].read_text().splitlines() if not l.startswith('["train/a/1.jpg"')]
    records[0].write_text("".join(l + "\n" for l in lines) + '["train/a/1.jpg", "1.jpg", 12')
    assert (dst / "train" / "a" / "1.jpg").is_file()
    caplog.clear()
    assert prepare.main([str(src), str(dst), "--workers", "1"]) == 0
    assert "1 to convert, 5 already in" in caplog.text
    assert prepare.read_record(dst)[0]["train/a/1.jpg"][0] == "1.jpg"

    # A DST written by an earlier version, which kept no record: its images are taken as that
    # version took them, by date (not all made again: hours for ImageNet), and recorded.
    records[0].unlink()
    an_hour_ago = time.time_ns() - 3600 * 10**9
    os.utime(red, ns=(an_hour_ago, an_hour_ago))  # its date no longer in the future
    _age(dst / "train" / "a" / "1.jpg", 24 * 3600)  # older than its source: made again
    caplog.clear()
    assert prepare.main([str(src), str(dst), "--workers", "1"]) == 0
    assert "1 to convert, 5 already in" in caplog.text and "holds no record of what its images were made from (an " \
        "earlier version wrote them): the 5 no older than their images in SRC are kept" in caplog.text
    caplog.clear()
    assert prepare.main([str(src), str(dst), "--workers", "1"]) == 0
    assert "0 to convert, 6 already in" in caplog.text and "no record" not in caplog.text
    records[0].unlink()  # and one that it finished: recorded too, though nothing is converted
    caplog.clear()
    assert prepare.main([str(src), str(dst), "--workers", "1"]) == 0
    assert "0 to convert, 6 already in" in caplog.text and "holds no record" in caplog.text
    assert len(prepare.read_record(dst)[0]) == 6
    caplog.clear()
    assert prepare.main([str(src), str(dst), "--workers", "1"]) == 0
    assert "0 to convert, 6 already in" in caplog.text and "no record" not in caplog.text


def test_prepare_reads_only_what_a_record_can_be(tmp_path, capsys, caplog):
    """The record's files as they could be found: a FIFO in a part's name (read, it was waited on
    for good), a folder in the record's, a line nested too deep (a RecursionError traceback), a
    rewrite killed (its partial file, 100 MB for ImageNet, was left for good); and a first run
    killed before its first line, whose DST was then taken for an earlier version's."""
    caplog.set_level(logging.INFO, logger=prepare.log.name)
    src, dst = _simple_tree(tmp_path / "raw", train=2, val=1), tmp_path / "prepared"
    assert prepare.main([str(src), str(dst), "--workers", "1"]) == 0
    capsys.readouterr()
    for odd, make in ((dst / f"{prepare.RECORD_NAME}-123", os.mkfifo), (dst / prepare.RECORD_NAME, os.mkdir)):
        kept = odd.with_name("kept")
        if odd.exists():
            odd.rename(kept)
        make(odd)
        assert prepare.main([str(src), str(dst), "--workers", "1"]) == 2
        assert capsys.readouterr().err == (f"error: {odd} is not a file, where DST keeps its record of what its images "
                                           f"were made from: remove it, and run again\n")
        odd.rmdir() if odd.is_dir() else odd.unlink()
        if kept.exists():
            kept.rename(odd)
    with open(dst / prepare.RECORD_NAME, "a") as record:
        record.write("[" * 100_000 + "\n")
    abandoned = dst / f".{prepare.RECORD_NAME}.partial-{2**22 + 1}"  # of a process that is not there
    abandoned.write_text("a rewrite killed")
    caplog.clear()
    assert prepare.main([str(src), str(dst), "--workers", "1"]) == 0
    assert "0 to convert, 6 already in" in caplog.text and not abandoned.exists()
    # two lines edited by hand, the last word on their images: a time made text, a field left out; made again
    first, second = (json.loads(line) for line in (dst / prepare.RECORD_NAME).read_text().splitlines()[:2])
    with open(dst / prepare.RECORD_NAME, "a") as record:
        record.write(f"{json.dumps([*first[:3], str(first[3]), *first[4:]])}\n{json.dumps(second[:-1])}\n")
    caplog.clear()
    assert prepare.main([str(src), str(dst), "--workers", "1"]) == 0
    assert "2 to convert, 4 already in" in caplog.text

    # killed after its first image, before its first line: the empty record says this version's DST
    fresh = tmp_path / "fresh"
    real = prepare._convert_jobs

    def killed_after_one(jobs, workers):
        real(jobs[:1], workers)
        for part in fresh.glob(f"{prepare.RECORD_NAME}-*"):
            part.unlink()  # its line never written
        raise KeyboardInterrupt

    prepare._convert_jobs = killed_after_one
    try:
        assert prepare.main([str(src), str(fresh), "--workers", "1", "--quality", "95"]) == 130
    finally:
        prepare._convert_jobs = real
    caplog.clear()
    assert prepare.main([str(src), str(fresh), "--workers", "1", "--quality", "50"]) == 0
    assert "6 to convert, 0 already in" in caplog.text and "no record" not in caplog.text


def test_prepare_s_workers_take_ctrl_c_and_sigterm_again_once_they_can(monkeypatch):
    """Held while the pool forks (a Ctrl-C then was ignored in a fork's callback, and the run went
    on to exit 0): each worker takes them again once it has its handlers, and so does the program."""
    before, real, forking = signal.pthread_sigmask(signal.SIG_BLOCK, []), multiprocessing.Pool, []

    def pool(*args, **kwargs):
        forking.append(signal.pthread_sigmask(signal.SIG_BLOCK, []))
        return real(*args, **kwargs)

    monkeypatch.setattr(prepare.multiprocessing, "Pool", pool)
    with prepare._pool(2) as (pool, processes):
        assert forking and {signal.SIGINT, signal.SIGTERM} <= forking[0], forking
        held = [pool.apply(signal.pthread_sigmask, (signal.SIG_BLOCK, [])) for _ in range(4)]
        assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before
    assert len(processes) == 2 and not any({signal.SIGINT, signal.SIGTERM} & mask for mask in held), held


def test_prepare_run_again_at_another_quality_makes_every_image_again(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=prepare.log.name)
    src, dst = _simple_tree(tmp_path / "raw", train=2, val=1), tmp_path / "prepared"
    assert prepare.main([str(src), str(dst), "--workers", "1"]) == 0
    before = {p: p.read_bytes() for p in dst.rglob("*.jpg")}
    caplog.clear()
    assert prepare.main([str(src), str(dst), "--workers", "1", "--quality", "30"]) == 0
    assert "6 to convert, 0 already in" in caplog.text
    assert "6 images in DST were made at another --quality: converted again at 30" in caplog.text
    assert all(len(p.read_bytes()) < len(b) for p, b in before.items())
    caplog.clear()
    assert prepare.main([str(src), str(dst), "--workers", "1", "--quality", "30"]) == 0
    assert "0 to convert, 6 already in" in caplog.text


def test_prepare_refuses_an_empty_src_or_dst(tmp_path, monkeypatch, capsys):
    """An empty argument ($DST unset) would be the current folder: one line, exit 2, nothing written."""
    src = _simple_tree(tmp_path / "raw", train=1, val=1)
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    for args in ([str(src), ""], ["", str(tmp_path / "prepared")]):
        with pytest.raises(SystemExit) as refused:
            prepare.main([*args, "--workers", "1"])
        name = "DST" if args[0] else "SRC"
        assert refused.value.code == 2 and capsys.readouterr().err == (
            f"error: {name} is empty: give a path (. for the current folder) (see python -m launch.prepare "
            f"--help)\n")
    assert not list(here.iterdir()) and not (tmp_path / "prepared").exists()


def test_prepare_refuses_a_dst_whose_train_or_val_is_in_src(tmp_path, capsys):
    """A train/ or val/ of DST that is a link into SRC: the images would be written into SRC.
    DST in SRC itself, or SRC, is refused as an option, before SRC is read."""
    src = _simple_tree(tmp_path / "raw", train=1, val=1)
    files = sorted(src.rglob("*"))
    for inside in (src / "prepared", src):
        with pytest.raises(SystemExit) as ended:
            prepare.main([str(src), str(inside), "--workers", "1"])
        assert ended.value.code == 2
        assert capsys.readouterr().err == (f"error: DST {inside} must lie outside SRC {src} (see python -m "
                                           f"launch.prepare --help)\n")
    assert sorted(src.rglob("*")) == files
    for split, into in (("train", src / "train"), ("val", src / "val" / "a")):
        dst = tmp_path / f"linked-{split}"
        dst.mkdir()
        (dst / split).symlink_to(into, target_is_directory=True)
        assert prepare.main([str(src), str(dst), "--workers", "1"]) == 2
        assert capsys.readouterr().err == (f"error: DST's {split}/ {dst / split} is {into}, in SRC {src}: the images "
                                           f"would be written into SRC. Remove that link, or give another DST\n")
        assert sorted(src.rglob("*")) == files and sorted(p.name for p in dst.iterdir()) == [split]
    # A class folder of DST that is a link to SRC's: its images were written over SRC's own.
    originals = {p: p.read_bytes() for p in files if p.is_file()}
    dst = tmp_path / "linked-class"
    (dst / "train").mkdir(parents=True)
    (dst / "train" / "a").symlink_to(src / "train" / "a", target_is_directory=True)
    assert prepare.main([str(src), str(dst), "--workers", "1"]) == 2
    assert capsys.readouterr().err == (f"error: {dst / 'train' / 'a'} in DST is {src / 'train' / 'a'}, where SRC's "
                                       f"images are: they would be written over. Remove that link, or give another "
                                       f"DST\n")
    assert {p: p.read_bytes() for p in originals} == originals and sorted(src.rglob("*")) == files
    # SRC's class folders links to where the images are (as ImageNet is often laid out), and a
    # class folder of DST a link to the same place: outside SRC's own tree, written over all the same.
    store, linked_src = _simple_tree(tmp_path / "store", train=1, val=1), tmp_path / "linked-src"
    for split in ("train", "val"):
        for name in ("a", "b"):
            (linked_src / split).mkdir(parents=True, exist_ok=True)
            (linked_src / split / name).symlink_to(store / split / name, target_is_directory=True)
    originals = {p: p.read_bytes() for p in store.rglob("*.jpg")}
    dst = tmp_path / "linked-to-the-store"
    (dst / "train").mkdir(parents=True)
    (dst / "train" / "a").symlink_to(store / "train" / "a", target_is_directory=True)
    assert prepare.main([str(linked_src), str(dst), "--workers", "1"]) == 2
    assert capsys.readouterr().err.startswith(f"error: {dst / 'train' / 'a'} in DST is {store / 'train' / 'a'}, "
                                              f"where SRC's images are")
    (dst / "train" / "a").unlink()
    (dst / "train").rmdir()
    (dst / "train").symlink_to(store / "train", target_is_directory=True)  # a folder holding them
    assert prepare.main([str(linked_src), str(dst), "--workers", "1"]) == 2
    assert "an image that this program writes in DST" in capsys.readouterr().err  # the check of SRC's images
    assert {p: p.read_bytes() for p in originals} == originals


def test_prepare_lists_the_unreadable_files_in_one_order_whatever_order_the_workers_end_in(tmp_path, monkeypatch):
    """unreadable.txt is sorted: run again, the list is the same, byte for byte, so that a
    finished DST on a disk that cannot be written to is left as it is (exit 0)."""
    src, dst = _simple_tree(tmp_path / "raw", train=1, val=1), tmp_path / "prepared"
    for i in range(5):
        (src / "train" / "a" / f"bad{i}.jpg").write_bytes(b"not an image")
    assert prepare.main([str(src), str(dst), "--workers", "1"]) == 0
    listed = (dst / "unreadable.txt").read_bytes()
    assert [line.split(b"\t")[0] for line in listed.splitlines()] == [
        os.fsencode(src / "train" / "a" / f"bad{i}.jpg") for i in range(5)]

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    real = prepare._results  # the pool's results come back in any order: here, the other way round
    monkeypatch.setattr(prepare, "_results", lambda *args: reversed(list(real(*args))))
    monkeypatch.setattr(prepare, "write_whole", read_only)
    monkeypatch.setattr(Path, "unlink", read_only)
    monkeypatch.setattr(Path, "touch", read_only)
    assert prepare.main([str(src), str(dst), "--workers", "1"]) == 0
    assert (dst / "unreadable.txt").read_bytes() == listed


def test_prepare_names_the_fix_of_a_write_that_fails(tiny_data, tmp_path, capfd):
    for code, fix in ((errno.ENOSPC, "free space on its disk"), (errno.EACCES, "make it writable"),
                      (errno.EROFS, "make it writable"), (errno.ENOTDIR, "make it a folder")):
        assert prepare._cannot_write(tmp_path, OSError(code, os.strerror(code))) == (
            f"error: cannot write to DST {tmp_path} ({os.strerror(code)}): {fix}, or give a DST that can be written; "
            f"run again, and the images already written are kept")
    assert prepare._cannot_write(tmp_path, OSError(errno.ENOENT, os.strerror(errno.ENOENT))) == (
        f"error: cannot write to DST {tmp_path} (No such file or directory): give a DST that can be written; run "
        f"again, and the images already written are kept")  # no fix named where none is known
    afile = tmp_path / "a-file"  # a file where a folder above DST goes
    afile.write_text("")
    assert prepare._cannot_write(afile / "dst", NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR),
                                                                   str(afile / "dst"))) == (
        f"error: cannot write {afile} on the way to DST {afile / 'dst'} (Not a directory): make it a folder, or give a "
        f"DST that can be written; run again, and the images already written are kept")
    afile.unlink()
    partial = tmp_path / "train" / "a" / ".0.jpg.partial-7"  # an image's write refused: its folder is named
    assert prepare._cannot_write(tmp_path, PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(partial))) == (
        f"error: cannot write {partial.parent} in DST {tmp_path} (Permission denied): make it writable, or give a DST "
        f"that can be written; run again, and the images already written are kept")
    afile = tmp_path / "a-file"
    afile.write_text("")
    assert prepare.main([str(tiny_data), str(afile), "--workers", "1"]) == 2
    last = capfd.readouterr().err.splitlines()[-1]
    assert last.startswith(f"error: cannot write to DST {afile} (") and ": make it a folder, or give a DST" in last
    for long, name in ((tmp_path / ("d" * 256), "d" * 24), (tmp_path / ("é" * 128) / "dst", "é" * 24)):
        assert prepare.main([str(tiny_data), str(long), "--workers", "1"]) == 2  # 256 bytes: one more than a name's
        assert capfd.readouterr().err.splitlines()[-1] == (
            f"error: cannot write DST {long}: a name in it, {name}..., is longer than a file name can be (255 "
            f"bytes): give a DST of shorter names")
    in_the_way = tmp_path / "prepared" / "train" / sorted(builtin.BUILTIN_CLASSES)[0]  # where a class folder goes
    in_the_way.parent.mkdir(parents=True)
    in_the_way.write_text("")
    assert prepare.main([str(tiny_data), str(tmp_path / "prepared"), "--workers", "1"]) == 2
    assert capfd.readouterr().err.splitlines()[-1] == (
        f"error: cannot write {in_the_way} in DST {tmp_path / 'prepared'} (Not a directory): make it a folder, or "
        f"give a DST that can be written; run again, and the images already written are kept")


# launch.prepare where one worker's write never ends, and outlives SIGTERM (as one on a disk
# that does not answer, or one seen waiting for work), and the other's fills the disk, which
# ends the pool.
_STUCK_WORKER = """
import errno, multiprocessing, os, signal, sys, time
from PIL import Image
from launch import prepare
prepare.WORKER_GRACE_S = 1

def stuck_or_full(image, path, *args, **kwargs):
    try:
        os.close(os.open(sys.argv[-1], os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) from None
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(3600)

Image.Image.save = stuck_or_full
bystander = multiprocessing.Process(target=time.sleep, args=(60,))  # the caller's own: never the backstop's
bystander.start()
code = prepare.main(sys.argv[1:-1])
print("bystander", "alive" if bystander.is_alive() else "killed")
bystander.terminate()
sys.exit(code)
"""


def test_prepare_ends_even_where_a_worker_outlives_being_told_to_end(tmp_path):
    src, dst = _simple_tree(tmp_path / "raw", train=10), tmp_path / "prepared"  # 24 images: a chunk per worker
    proc, out, err = _run_script(_STUCK_WORKER, src, dst, "--workers", "2", tmp_path / "first-write")
    assert proc.returncode == 2 and "Traceback" not in err, err
    assert out.split() == ["bystander", "alive"]
    assert err.splitlines()[-1].startswith(f"error: cannot write to DST {dst} (No space left on device)")
    assert "did not end 1 s after being told to: killed" in err
    _no_process_left(proc.pid)


# launch.prepare run as its own __main__ does, every worker's write never ending and outliving SIGTERM.
_STUCK_WORKERS = """
import signal, sys, time
from PIL import Image
from launch import prepare
from launch.cli import quick_exit
prepare.WORKER_GRACE_S = 2

def stuck(image, path, *args, **kwargs):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(3600)

Image.Image.save = stuck
with quick_exit():
    sys.exit(prepare.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_prepare_interrupted_twice_while_its_pool_ends_still_ends_with_its_workers(tmp_path):
    """The second Ctrl-C interrupts the pool's end; the exit's own end of the pool then waits on
    the workers, which the backstop still kills."""
    src, dst = _simple_tree(tmp_path / "raw", train=10), tmp_path / "prepared"
    proc = subprocess.Popen([sys.executable, "-c", _STUCK_WORKERS, str(src), str(dst), "--workers", "2"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=as_foreground_job)  # Ctrl-C reaches it even where the suite runs in the background
    try:
        deadline = time.monotonic() + 60
        while len(_session(proc.pid)) < 3:  # the program and its two workers
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        time.sleep(1)  # the workers have begun their first write
        proc.send_signal(signal.SIGINT)
        time.sleep(1)  # the pool's end is waiting on the workers
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert "interrupted: the images written so far are kept" in err
    _no_process_left(proc.pid)


# launch.prepare where the system kills one worker (SIGKILL, as where memory runs out) as it converts
# its first image; the other goes on.
_KILLED_WORKER = """
import multiprocessing, os, signal, sys
from PIL import Image
from launch import prepare
from launch.cli import quick_exit
multiprocessing.set_start_method("fork")  # the workers patched as this process is (3.14 starts them otherwise)
real_save = Image.Image.save

def killed_once(image, *args, **kwargs):
    try:
        os.close(os.open(sys.argv[-1], os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return real_save(image, *args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)

Image.Image.save = killed_once
with quick_exit():
    sys.exit(prepare.main(sys.argv[1:-1]))
"""


@pytest.mark.slow
def test_prepare_whose_worker_is_killed_says_so_and_goes_on_when_run_again(tmp_path):
    """The Pool would wait for good for the images of a killed worker: one line, exit 1, no process
    left, every image written whole; the same command then converts the rest."""
    src, dst = _simple_tree(tmp_path / "raw", train=20), tmp_path / "prepared"  # 44 images: 3 chunks of 16
    proc, _, err = _run_script(_KILLED_WORKER, src, dst, "--workers", "2", tmp_path / "killed")
    assert proc.returncode == 1 and "Traceback" not in err, err
    last = err.splitlines()[-1]
    assert last.startswith("error: a worker (process ") and last.endswith(
        " ended before the images were converted (killed by SIGKILL: by the system where memory runs out, or by hand), "
        "and what it was converting is lost: run the same command again to convert the rest (with fewer --workers "
        "where memory is short); the images written so far are kept, each one whole"), err
    _no_process_left(proc.pid)
    written = [p for p in dst.rglob("*.jpg") if not p.name.startswith(".")]
    assert 0 < len(written) < 44  # the killed worker's chunk is not
    for path in written:
        with Image.open(path) as image:
            image.load()
    again = _prepare(src, dst, "--workers", "2")
    assert again.returncode == 0, again.stderr
    assert f"44 images in {src}: {44 - len(written)} to convert, {len(written)} already in {dst}" in again.stderr


# launch.prepare whose work, 12 images, goes to two workers, 11 to one and 1 to the other, which then
# waits for work. Each image takes 0.3 s; a worker writes its process id, per image, in the file given last.
_ONE_WORKER_BUSY = """
import multiprocessing, os, sys, time
from PIL import Image
from launch import prepare
from launch.cli import quick_exit
multiprocessing.set_start_method("fork")  # the workers patched as this process is (3.14 starts them otherwise)
prepare.WORKER_GRACE_S = 1
prepare.CHUNK = 11
real_save = Image.Image.save

def slow(image, *args, **kwargs):
    with open(sys.argv[-1], "a") as f:
        f.write(f"{os.getpid()}\\n")
    time.sleep(0.3)
    return real_save(image, *args, **kwargs)

Image.Image.save = slow
with quick_exit():
    sys.exit(prepare.main(sys.argv[1:-1]))
"""


# launch.prepare, then the training program's loader, their workers started by multiprocessing's fork
# server (the default from Python 3.14): the workers' parent is the server, not the program.
_FORK_SERVER = """
import multiprocessing, sys
from launch import data, prepare
if __name__ == "__main__":
    multiprocessing.set_start_method("forkserver")
    assert prepare.main([*sys.argv[1:], "--workers", "2"]) == 0
    with data.Loader(data.open_data(sys.argv[2]), workers=2) as loader:
        print(sum(len(labels) for _, labels in loader.train(4, seed=0, epoch=0)))
"""


# The loader's workers started by the fork server, then the program killed (SIGKILL): they, the
# server and the resource tracker end with it.
_FORK_SERVER_KILLED = """
import multiprocessing, sys, time
from launch import data
if __name__ == "__main__":
    multiprocessing.set_start_method("forkserver")
    with data.Loader(data.open_data(sys.argv[1]), workers=2) as loader:
        next(iter(loader.train(4, seed=0, epoch=0)))
        print("ready", flush=True)
        time.sleep(120)
"""


@pytest.mark.slow
def test_workers_that_a_fork_server_starts_work_and_end_with_their_program(tmp_path):
    src, dst = _simple_tree(tmp_path / "raw", train=4, val=1), tmp_path / "prepared"
    proc, out, err = _run_script(_FORK_SERVER, src, dst)
    assert proc.returncode == 0 and out.split() == ["8"], err[-3000:]

    proc = subprocess.Popen([sys.executable, "-c", _FORK_SERVER_KILLED, str(dst)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=dict(os.environ, TMPDIR=str(short_temporary())))  # what a killed program leaves
    try:
        assert proc.stdout.readline() == "ready\n", proc.communicate()
        assert len(_session(proc.pid)) >= 4  # the program, the server, two workers
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
        _no_process_left(proc.pid)
    finally:
        for pid in _session(proc.pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_prepare_killed_takes_its_workers_with_it(tmp_path):
    """The program killed (SIGKILL) while its two workers convert: they end with it, each in
    the image it is at, without a word, and leave the lock on DST to the next run."""
    src, dst, busy = _simple_tree(tmp_path / "raw", train=10, val=1), tmp_path / "prepared", tmp_path / "busy"
    script = _ONE_WORKER_BUSY.replace("prepare.CHUNK = 11", "prepare.CHUNK = 11; prepare.WORKER_GRACE_S = 10")
    proc = subprocess.Popen([sys.executable, "-c", script, str(src), str(dst), "--workers", "2", str(busy)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not busy.exists() or len(set(busy.read_text().split())) < 2:  # each worker at its first image
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=60)  # stderr ends when the last worker has
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    _no_process_left(proc.pid)
    assert len(busy.read_text().split()) <= 4 and "Traceback" not in err, (busy.read_text(), err)  # of 24 images
    assert not [p for p in dst.rglob("*") if ".partial-" in p.name]
    assert _prepare(src, dst, "--workers", "2").returncode == 0


@pytest.mark.slow
def test_prepare_whose_idle_worker_is_killed_still_ends(tmp_path):
    """A worker that waits for work holds the lock on the Pool's queue of work: killed, it leaves
    the others, and the Pool's own end, waiting for that lock for good. The program tells the
    worker's end in one line (exit 1) within seconds, and leaves no process; run again, it
    converts the rest."""
    src, dst, busy = _simple_tree(tmp_path / "raw", train=5, val=1), tmp_path / "prepared", tmp_path / "busy"
    proc = subprocess.Popen([sys.executable, "-c", _ONE_WORKER_BUSY, str(src), str(dst), "--workers", "2", str(busy)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not busy.exists() or len(busy.read_text().split()) < 6:  # the one image, and 5 of the 11
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        time.sleep(0.5)  # the one image written by then (0.3 s), its worker waiting for work
        pids = busy.read_text().split()
        idle = [int(pid) for pid in set(pids) if pids.count(pid) == 1]
        assert len(set(pids)) == 2 and len(idle) == 1, pids
        os.kill(idle[0], signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 1 and "Traceback" not in err, err
    assert "the worker pool did not end 2 s after being told to" in err
    assert err.splitlines()[-1].startswith(f"error: a worker (process {idle[0]}) ended before the images were converted")
    _no_process_left(proc.pid)
    again = _prepare(src, dst, "--workers", "2")
    assert again.returncode == 0 and len(list(dst.rglob("[0-9].jpg"))) == 12, again.stderr


@pytest.mark.slow
def test_prepare_refuses_a_dst_that_another_prepare_is_writing_to(tmp_path, capsys, caplog):
    """Else two SRCs would be mixed in one DST, each run having found it without the other's
    images. A training run is refused it too, and refuses a prepare while it reads it: the images
    it trains on would be rewritten under it, and the run could not be resumed."""
    src, dst, busy = _simple_tree(tmp_path / "raw", train=5, val=1), tmp_path / "prepared", tmp_path / "busy"
    other = _simple_tree(tmp_path / "other", classes=("c", "d"))
    proc = subprocess.Popen([sys.executable, "-c", _ONE_WORKER_BUSY, str(src), str(dst), "--workers", "2", str(busy)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not busy.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        assert prepare.main([str(other), str(dst), "--workers", "1"]) == 2
        assert proc.poll() is None  # refused while the other was writing
        assert capsys.readouterr().err.splitlines()[-1] == (
            f"error: DST {dst} is being written by another launch.prepare (process {proc.pid} on "
            f"{socket.gethostname()}): wait for it to end, or give another DST")
        assert two_gpu.main(["--data", str(dst), "--out", str(tmp_path / "runs")]) == 2
        assert caplog.messages[-1] == (f"error: {dst} is being written by a python -m launch.prepare (process "
                                       f"{proc.pid} on {socket.gethostname()}): wait for it to end, then start again")
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err
    config = parse_config(["--data", str(dst), "--out", str(tmp_path / "runs"), "--batch-size", "2"])
    *_, locks = two_gpu.prepare_run(config, None)  # as a training run holds them, to its end
    with locks:
        assert prepare.main([str(src), str(dst), "--workers", "1"]) == 2
        assert capsys.readouterr().err.splitlines()[-1] == (
            f"error: DST {dst} is being read by a training run (python -m launch.two_gpu): wait for it to end, or "
            f"give another DST")
    assert prepare.main([str(src), str(dst), "--workers", "1"]) == 0  # once the run has ended
    for odd in (tmp_path / "folder", tmp_path / "pipe"):  # the lock's name taken by what no prepare makes: no lock
        odd.mkdir()
        (odd / data.PREPARE_LOCK_NAME).mkdir() if odd.name == "folder" else os.mkfifo(odd / data.PREPARE_LOCK_NAME)
        assert data.hold_for_reading(odd) is None  # a folder of that name: IsADirectoryError, the descriptor left open
    assert sorted(p.name for p in (dst / "train").iterdir()) == ["a", "b"]  # SRC's classes alone
    assert prepare.main([str(other), str(dst), "--workers", "1"]) == 2  # then refused for what DST holds
    assert "holds 12 image(s) that no image of SRC becomes" in capsys.readouterr().err


def test_prepare_goes_on_without_a_lock_where_dst_cannot_hold_one(tmp_path, monkeypatch, caplog):
    """A DST that this run cannot write to, another user's that holds every image already, is
    read as before; a file system without locks is told, and used."""
    src, dst = _simple_tree(tmp_path / "raw"), tmp_path / "prepared"
    assert prepare.main([str(src), str(dst), "--workers", "1"]) == 0
    for code in (errno.EACCES, errno.EROFS, errno.ENOLCK):
        def refused(path, read_only=False):
            raise OSError(code, os.strerror(code))
        monkeypatch.setattr(prepare, "lock_exclusively", refused)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="launch.prepare"):
            assert prepare.main([str(src), str(dst), "--workers", "1"]) == 0, code
        assert f"10 images in {src}: 0 to convert, 10 already in {dst}" in caplog.text
        assert ("is on a file system without locks" in caplog.text) == (code == errno.ENOLCK)


def test_a_lock_on_a_file_that_may_only_be_read_holds(tmp_path, monkeypatch):
    path, real = tmp_path / "lock", os.open
    path.write_text("process 1 on elsewhere\n")

    def read_only(file, flags, *args, **kwargs):  # as for another user's file
        if flags & (os.O_RDWR | os.O_WRONLY):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
        return real(file, flags, *args, **kwargs)

    monkeypatch.setattr(cli.os, "open", read_only)
    with pytest.raises(PermissionError):
        cli.lock_exclusively(path)
    with pytest.raises(PermissionError):  # one that is not there: it cannot be made, nor read instead
        cli.lock_exclusively(tmp_path / "missing", read_only=True)
    with cli.lock_exclusively(path, read_only=True):
        monkeypatch.undo()
        with pytest.raises(BlockingIOError) as held:  # another open file of it, as another process has
            cli.lock_exclusively(path)
        assert str(held.value) == "process 1 on elsewhere"
    cli.lock_exclusively(path).close()  # released


def test_a_training_run_reads_a_prepared_folder_where_it_cannot_be_locked(tmp_path, monkeypatch):
    """A file system without locks (some network ones: ENOLCK) holds no lock for the run, which
    goes on reading the folder; one that a launch.prepare holds is refused."""
    root = _simple_tree(tmp_path / "data")
    (root / data.PREPARE_LOCK_NAME).write_text("python -m launch.prepare (pid 1)\n")
    real, lock_file, tried = data.fcntl.flock, str(root / data.PREPARE_LOCK_NAME), []

    def no_locks(fd, operation):
        tried.append(fd)
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(data.fcntl, "flock", no_locks)
    assert data.hold_for_reading(root) is None and tried  # tried, and gone on without
    monkeypatch.setattr(data.fcntl, "flock", real)
    with open(lock_file) as writing:
        real(writing, data.fcntl.LOCK_EX | data.fcntl.LOCK_NB)
        with pytest.raises(DataError, match="is being written by a python -m launch.prepare"):
            data.hold_for_reading(root)
    with data.hold_for_reading(root) as held:
        assert held is not None


_SLOW_TO_CONVERT = 60  # copies of one large image: seconds of work for one worker


@pytest.mark.slow
@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_prepare_interrupted_says_so_in_one_line_and_goes_on_when_run_again(tmp_path, signal_name):
    """Ctrl-C (to the terminal's whole process group: the program and its workers) or SIGTERM
    (to the program alone): one line and exit 130, no part of an image in DST, no process
    left; the same command then converts the rest."""
    src, dst = _simple_tree(tmp_path / "raw", train=1, val=1), tmp_path / "prepared"
    big = _save(tmp_path / "big.jpg", _rgb(7, (2400, 1800)), quality=95)
    for i in range(_SLOW_TO_CONVERT):
        shutil.copy(big, src / "train" / "a" / f"big{i}.jpg")
    command = [sys.executable, "-m", "launch.prepare", str(src), str(dst), "--workers", "2"]
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=as_foreground_job)
    try:
        deadline = time.monotonic() + 120
        while not list(dst.glob("train/a/big*.jpg")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        if signal_name == "SIGINT":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            os.kill(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    assert err.splitlines()[-1] == ("interrupted: the images written so far are kept, each one whole; run the same "
                                    "command again to go on") and "Traceback" not in err, err
    written = list(dst.glob("train/a/big*.jpg"))
    assert 0 < len(written) < _SLOW_TO_CONVERT, "interrupted before the end"
    assert not [p for p in dst.rglob(".*")
                if p.is_file() and p.name not in (data.PREPARE_LOCK_NAME, data.UNFINISHED_NAME)
                and not p.name.startswith(prepare.RECORD_NAME)], "a part of an image is left"  # the record, its parts
    _no_process_left(proc.pid)
    # The tree lacks images (val/ entirely): training on it is refused, naming the fix.
    with pytest.raises(DataError, match=f"^{dst} is the DST of a python -m launch.prepare that has not finished"):
        data.open_data(dst, cache_dir=tmp_path / "cache")
    kept = len(list(dst.rglob("*.jpg")))
    again = _prepare(src, dst, "--workers", "2")
    assert again.returncode == 0 and f"{kept} already in" in again.stderr, again.stderr
    assert len(list(dst.glob("train/a/big*.jpg"))) == _SLOW_TO_CONVERT
    assert not (dst / data.UNFINISHED_NAME).exists() and len(data.open_data(dst).val) == 2


def _run_script(script: str, *args):
    """(process, stdout, stderr) of ``python -c script args`` in a session of its own, killed
    whole where it has not ended in 60 s."""
    proc = subprocess.Popen([sys.executable, "-c", script, *map(str, args)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc, out, err


def _no_process_left(sid: int) -> None:
    deadline = time.monotonic() + 10
    while _session(sid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _session(sid), "a worker outlived the program"


def _session(sid: int) -> list:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split() if entry.name.isdigit() else None
        except OSError:
            continue
        if fields and fields[0] != "Z" and int(fields[3]) == sid:
            found.append(int(entry.name))
    return found


def test_evaluation_counts_each_usable_image_once(tmp_path, caplog):
    root = _simple_tree(tmp_path / "data", train=3, val=3)
    (root / "val" / "a" / "1.jpg").write_bytes(b"not a jpeg")  # the middle one of class a
    bundle = data.open_data(root, cache_dir=tmp_path / "cache")
    for ten_crop in (False, True):
        for batch_size, lengths in ((2, [1, 2, 2]), (1, [1, 0, 1, 1, 1, 1])):  # the first batch lost one; all of it
            batches = list(data.Loader(bundle).eval(batch_size=batch_size, ten_crop=ten_crop))
            # Left out, not replaced by its neighbour (which would count twice): 5 of 6, in order.
            assert torch.cat([labels for _, labels in batches]).tolist() == [0, 0, 1, 1, 1]
            assert [len(labels) for _, labels in batches] == lengths
            size = 256 if ten_crop else 224  # uint8 base images or centre crops: the views are cut on the device
            # an empty batch too: the other tower receives it into a buffer of that shape and type
            assert all(images.shape == (len(labels), 3, size, size) and images.dtype == torch.uint8
                       for images, labels in batches), [(images.shape, images.dtype) for images, _ in batches]
    assert "1.jpg: unreadable" in caplog.text and "it is left out" in caplog.text  # logged once, with what it means
