"""The data pipeline on real files: layout errors, colour modes, corrupt files, the
built-in dataset, cached statistics, deterministic batches, ten-crop, and the
prepare tool as a real subprocess. Everything is made in tmp_path."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from launch import data
from launch.data import DataError

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
    _save(train / "b" / "z_last.jpg", _rgb(9))
    for name in ("a", "b"):
        _save(root / "val" / name / "v.jpg", _rgb(20 + len(name)))
    return {"truncated": str(truncated), "fake": str(fake)}


# --------------------------------------------------------------------------- layout errors

def _no_train(root):
    _simple_tree(root)
    os.rename(root / "train", root / "training")


def _differing_classes(root):
    _simple_tree(root, classes=("a", "b", "only_train"))
    os.rename(root / "val" / "only_train", root / "val" / "only_val")


def _empty_class(root):
    _simple_tree(root)
    (root / "train" / "empty").mkdir()
    _save(root / "val" / "empty" / "v.jpg", _rgb(0))


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
    (_differing_classes, ["only in train/: only_train", "only in val/: only_val", "same class folders"]),
    (_empty_class, ["hold no images (empty)", "add images"]),
    (_no_images, ["no images found", "ignored 2 other files", "add images"]),
    (_flat_val, ["no class folders", "4 images directly", "sort them into val/CLASS/"]),
], ids=["missing", "no-train", "differing-classes", "empty-class", "no-images", "flat-val"])
def test_layout_errors_name_the_fix(tmp_path, make, expected):
    root = tmp_path / "data"
    if make is not None:
        make(root)
    with pytest.raises(DataError) as info:
        data.open_data(root, cache_dir=tmp_path / "cache")
    for fragment in expected:
        assert fragment in str(info.value), str(info.value)


# --------------------------------------------------------------------------- decoding

def test_every_mode_becomes_256_rgb(tmp_path):
    odd = _mixed_tree(tmp_path)
    classes, files, ignored = data.scan_layout(tmp_path)
    paths = {Path(p).name: p for images in files["train"] for p, _ in images}
    assert odd["fake"] in paths.values() and "notes.txt" not in paths  # .jpg by name is kept until decoded
    assert ignored == {"train": 1, "val": 0}
    for name, path in paths.items():
        if path in odd.values():
            continue
        pixels = data.load_image(path)
        assert pixels.shape == (256, 256, 3) and pixels.dtype == np.uint8, name
    # Uniform images keep their value through the resize, so the conversions can be checked exactly.
    assert (data.load_image(paths["grey.png"]) == 77).all()
    assert (data.load_image(paths["clear.png"]) == data.TRANSPARENT_BACKGROUND).all()  # alpha 0: background only
    assert (data.load_image(paths["deep.png"]) == 255).all()  # 16-bit white scaled, not clipped
    cmyk = data.load_image(paths["cmyk.jpg"]).reshape(-1, 3).mean(0)
    assert np.allclose(cmyk, Image.new("CMYK", (1, 1), (10, 20, 30, 40)).convert("RGB").getpixel((0, 0)), atol=3)


def test_resize_center_takes_the_central_patch():
    # 512 x 256: the shorter side is already 256, so the result is columns 128..383 exactly.
    pixels = np.random.default_rng(0).integers(0, 256, (256, 512, 3), dtype=np.uint8)
    out = np.asarray(data.resize_center(Image.fromarray(pixels)))
    assert np.array_equal(out, pixels[:, 128:384])
    assert data.resize_center(Image.new("RGB", (50, 30))).size == (256, 256)


def test_corrupt_files_are_replaced_and_counted(tmp_path):
    odd = _mixed_tree(tmp_path)
    bundle = data.open_data(tmp_path, cache_dir=tmp_path / "cache")
    train = bundle.train
    assert train.ignored_files == 1
    index = {path: i for i, (path, _) in enumerate(train.samples)}
    for name in ("fake", "truncated"):  # each stands in the next file of its class: rgb.bmp, whole.jpg
        image, label, skipped = train.load(index[odd[name]])
        assert skipped == [index[odd[name]]] and image.shape == (3, 256, 256)
        assert torch.equal(image, train[index[odd[name]] + 1][0]) and label == train.samples[index[odd[name]] + 1][1]
    assert train.corrupt == {odd["fake"], odd["truncated"]}  # the statistics read every training image
    # The batch iterators count too, also when worker processes decode.
    train.corrupt = set()
    batches = list(data.train_batches(bundle, batch_size=len(train), seed=0, epoch=0, workers=2))
    assert len(batches) == 1 and batches[0][0].shape == (len(train), 3, 224, 224)
    assert train.corrupt == {odd["fake"], odd["truncated"]}


# --------------------------------------------------------------------------- built-in dataset

def _files(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_builtin_dataset_is_deterministic_and_atomic(tmp_path, monkeypatch):
    first = data.builtin_dataset(tmp_path / "one", train_per_class=2, val_per_class=1)
    second = data.builtin_dataset(tmp_path / "two", train_per_class=2, val_per_class=1)
    files = _files(first)
    assert files == _files(second)
    assert len([f for f in files if f.endswith(".jpg")]) == 30
    bundle = data.open_data(first, cache_dir=tmp_path / "cache")
    assert bundle.classes == sorted(data.BUILTIN_CLASSES)
    assert data.builtin_dataset(first) == first  # made once, then reused

    # A pre-existing staging folder of a killed run does not count as the dataset.
    target = tmp_path / "three"
    (tmp_path / ".three.partial-killed" / "train" / "circle").mkdir(parents=True)
    real_draw, calls = data.draw_builtin, []

    def failing_draw(*args, **kwargs):
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt  # an interruption halfway through
        return real_draw(*args, **kwargs)

    monkeypatch.setattr(data, "draw_builtin", failing_draw)
    with pytest.raises(KeyboardInterrupt):
        data.builtin_dataset(target, train_per_class=2, val_per_class=1)
    assert not target.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".three")) == [".three.partial-killed"]
    monkeypatch.setattr(data, "draw_builtin", real_draw)
    assert _files(data.builtin_dataset(target, train_per_class=2, val_per_class=1)) == files


# --------------------------------------------------------------------------- statistics

def test_stats_are_cached_keyed_and_fall_back_to_cache_dir(tmp_path, monkeypatch):
    root = _simple_tree(tmp_path / "data")
    cache = tmp_path / "cache"
    stats = data.open_data(root, cache_dir=cache).stats
    assert stats.mean.shape == (3, 256, 256) and stats.mean.dtype == torch.float32 and stats.images == 6
    assert len(list(root.glob(".alexnet-stats-*.pt"))) == 1

    def no_compute(*args, **kwargs):
        raise AssertionError("statistics recomputed although cached")

    with monkeypatch.context() as m:
        m.setattr(data, "compute_stats", no_compute)
        again = data.open_data(root, cache_dir=cache).stats
    assert torch.equal(again.mean, stats.mean) and torch.equal(again.eigvec, stats.eigvec)

    # A changed training set gets new statistics; a read-only data folder caches in cache_dir.
    _save(root / "train" / "a" / "new.jpg", _rgb(99))
    real_save = data.save_checkpoint

    def read_only(path, payload):
        if path.parent == root:
            raise PermissionError(f"read-only: {path}")
        real_save(path, payload)

    monkeypatch.setattr(data, "save_checkpoint", read_only)
    changed = data.open_data(root, cache_dir=cache).stats
    assert changed.images == 7 and not torch.equal(changed.mean, stats.mean)
    assert len(list((cache / "stats").glob(".alexnet-stats-*.pt"))) == 1
    monkeypatch.setattr(data, "compute_stats", no_compute)
    assert torch.equal(data.open_data(root, cache_dir=cache).stats.mean, changed.mean)


def test_pca_convention_against_numpy(tmp_path):
    # Known covariance C = Q diag(lambda) Q^T: eigval must be sqrt(lambda), decreasing.
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))
    variances = np.array([400.0, 90.0, 4.0])
    eigval, eigvec = data.pca_from_covariance(q @ np.diag(variances) @ q.T)
    assert np.allclose(eigval, np.sqrt(variances))
    assert np.allclose(np.abs(eigvec.T @ q), np.eye(3), atol=1e-9)  # the same axes, up to sign
    assert np.allclose(eigvec @ np.diag(eigval ** 2) @ eigvec.T, q @ np.diag(variances) @ q.T)

    # End to end on lossless 256x256 images: against numpy's covariance of the same pixels.
    rng = np.random.default_rng(1)
    images = [np.clip(rng.multivariate_normal([120, 130, 110], q @ np.diag(variances) @ q.T, (256, 256)), 0, 255)
              .round().astype(np.uint8) for _ in range(3)]
    for i, pixels in enumerate(images):
        _save(tmp_path / "train" / "x" / f"{i}.png", Image.fromarray(pixels))
    _save(tmp_path / "val" / "x" / "0.png", Image.fromarray(images[0]))
    stats = data.open_data(tmp_path, cache_dir=tmp_path / "cache").stats
    all_pixels = np.concatenate([p.reshape(-1, 3) for p in images]).astype(np.float64)
    numpy_variances = np.sort(np.linalg.eigvalsh(np.cov(all_pixels.T, bias=True)))[::-1]
    assert np.allclose(stats.eigval.double().numpy() ** 2, numpy_variances, rtol=1e-4)
    assert np.allclose(stats.mean.numpy(), np.mean(images, axis=0).transpose(2, 0, 1), atol=1e-3)

    # ImageNet: the published numbers, scaled to 0-255, in the same convention.
    imagenet = data.compute_stats(data.open_data(tmp_path, cache_dir=tmp_path / "cache").train, use_imagenet_pca=True)
    assert torch.allclose(imagenet.eigval, torch.tensor(data.IMAGENET_EIGVAL) * 255)
    assert data._is_imagenet([f"n{i:08d}" for i in range(1000)]) and not data._is_imagenet(["a"] * 1000)


# --------------------------------------------------------------------------- batches

@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("builtin") / "shapes"
    data.builtin_dataset(root, train_per_class=2, val_per_class=1)
    return data.open_data(root, cache_dir=root.parent / "cache")


def test_train_batches_are_a_pure_function_of_seed_epoch_position(small_bundle):
    rng_state = torch.get_rng_state()
    full = list(data.train_batches(small_bundle, batch_size=6, seed=3, epoch=0))
    assert data.batches_per_epoch(small_bundle, 6) == len(full) == 3  # 20 images: drop_last
    assert full[0][0].shape == (6, 3, 224, 224) and full[0][0].dtype == torch.float32
    assert full[0][1].dtype == torch.int64
    with_workers = list(data.train_batches(small_bundle, batch_size=6, seed=3, epoch=0, workers=2))
    resumed = list(data.train_batches(small_bundle, batch_size=6, seed=3, epoch=0, start_batch=2))
    for (images, labels), (other_images, other_labels) in zip(full, with_workers):
        assert torch.equal(images, other_images) and torch.equal(labels, other_labels)
    assert len(resumed) == 1 and torch.equal(resumed[0][0], full[2][0]) and torch.equal(resumed[0][1], full[2][1])
    assert torch.equal(torch.get_rng_state(), rng_state), "iterating must not touch the global RNG (dropout)"
    epoch1 = list(data.train_batches(small_bundle, batch_size=6, seed=3, epoch=1))
    assert not torch.equal(torch.cat([b[1] for b in full]), torch.cat([b[1] for b in epoch1]))


def test_augmentation_changes_with_epoch_and_follows_the_paper(small_bundle):
    stats = small_bundle.stats
    views = []
    for epoch in (0, 1):
        order = data.epoch_order(len(small_bundle.train), seed=0, epoch=epoch)
        position = int(np.flatnonzero(order == 0)[0])  # wherever image 0 landed
        item = data._TrainPositions(small_bundle.train, stats, 0, epoch, order, 0, len(order))[position]
        views.append(item[0])
    assert not torch.equal(views[0], views[1])

    image = small_bundle.train[0][0]
    plain = data.augment(image, stats, 5, 7, False, np.zeros(3))
    assert torch.equal(plain, image[:, 5:229, 7:231].float() - stats.mean[:, 5:229, 7:231])
    assert torch.equal(data.augment(image, stats, 5, 7, True, np.zeros(3)), plain.flip(2))
    alpha = np.array([0.1, -0.2, 0.05])
    shifted = data.augment(image, stats, 5, 7, False, alpha) - plain
    expected = sum(alpha[i] * stats.eigval[i].item() * stats.eigvec[:, i] for i in range(3))
    assert torch.allclose(shifted, expected.float().view(3, 1, 1).expand_as(shifted), atol=1e-4)


def test_eval_batches_and_ten_crop(small_bundle):
    centre = list(data.eval_batches(small_bundle, batch_size=4))
    assert [len(labels) for _, labels in centre] == [4, 4, 2]  # in order, last partial batch kept
    labels = torch.cat([l for _, l in centre])
    assert torch.equal(labels, torch.tensor([label for _, label in small_bundle.val.samples]))
    ten = list(data.eval_batches(small_bundle, batch_size=4, ten_crop=True))
    views = torch.cat([images for images, _ in ten])
    assert views.shape == (10, 10, 3, 224, 224)
    assert torch.equal(views[:, 4], torch.cat([images for images, _ in centre]))
    assert torch.equal(views[:, 5:], views[:, :5].flip(-1))
    image = small_bundle.val[0][0].float() - small_bundle.stats.mean
    assert torch.equal(views[0, 0], image[:, :224, :224]) and torch.equal(views[0, 3], image[:, 32:, 32:])
    limited = torch.cat([l for _, l in data.eval_batches(small_bundle, batch_size=4, limit=5)])
    assert len(limited) == 5 and len(set(limited.tolist())) == 5  # spread over the classes


# --------------------------------------------------------------------------- prepare tool

def _prepare(*args):
    return subprocess.run([sys.executable, "-m", "launch.prepare", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_prepare_tool_end_to_end(tmp_path):
    src, dst = tmp_path / "raw", tmp_path / "prepared"
    odd = _mixed_tree(src)
    done = _prepare(src, dst, "--workers", "2")
    assert done.returncode == 0, done.stderr
    assert "unreadable" in done.stderr and odd["truncated"] in done.stderr and odd["fake"] in done.stderr
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
    helped = _prepare("--help")
    assert helped.returncode == 0 and "--workers" in helped.stdout and "256" in helped.stdout
