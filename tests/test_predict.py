"""python -m launch.predict: predictions equal the reference's own softmax on the
evaluation's input; unusable images are named and skipped; bad checkpoints and
options stop the program with one line.

The fast tests call the module in this process on checkpoints saved from the
reference; the slow ones run the program as a user does (a real process, bounded)."""

import copy
import errno
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from launch import predict
from launch.builtin import BUILTIN_CLASSES
from launch.checkpoint import CheckpointError, FILENAME, checkpoint_payload, load_reference, save_reference
from launch.data import open_data
from launch.images import load_image
from launch.predict import format_block, open_classifier, top_classes
from towers import build_reference

from conftest import ROOT, RUN_TIMEOUT_S, undecodable_dds, warned_of_tiff

CLASSES = list(BUILTIN_CLASSES)  # the tiny data's classes, so that --data can stand in for what a checkpoint lacks
PREFERRED = 6  # the class the biased checkpoint is made to prefer
# The program computes in float32, the hand computation (_by_hand) in float64. Measured on
# these images: float32's probabilities lie up to 1e-5 from float64's (the logits reach 7
# and raw-pixel inputs are large). A patch cut one pixel off, an unreflected patch or a
# misplaced mean image moves a probability by 0.07 or more.
PROB_TOL = dict(rtol=0, atol=5e-5)


def _net(seed: int = 3):
    """A reference whose softmax differs clearly between images. With any of the inits,
    the logits of all images share one large common part (the FC7 features are all
    positive), so one class wins everywhere; FC8 is rescaled and its bias set so that
    the logits of a few calibration textures have mean 0 and a spread of about 2."""
    model = build_reference(len(CLASSES), seed=seed, init="scaled").eval()
    mean = _mean_image()
    patches = torch.stack([(torch.from_numpy(_texture(256, 256, seed=100 + i)).permute(2, 0, 1).float() - mean)
                           [:, 16:240, 16:240] for i in range(8)])
    with torch.no_grad():
        model.fc8.weight.mul_(2 / model(patches).std(dim=0).mean())
        model.fc8.bias.sub_(model(patches).mean(dim=0))
    return model


def _mean_image() -> torch.Tensor:
    """A mean image that varies over the 256 x 256, so that subtracting the wrong part of it shows."""
    generator = torch.Generator().manual_seed(5)
    return (100 + 60 * torch.rand(3, 256, 256, generator=generator)).contiguous()


def _save(path, model, **extra):
    """What save_reference writes, without its fsync (seconds per 230 MB file on a busy disk)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint_payload(model.state_dict(), num_classes=model.num_classes, **extra), path)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoints")
    mean = _mean_image()
    saved = {"full": folder / "full.pt", "old": folder / "old.pt", "bare": folder / "bare.pt"}
    model = _net()
    _save(saved["full"], model, classes=CLASSES, data_mean=mean)
    _save(saved["old"], model, classes=CLASSES)  # as saved before checkpoints kept the mean
    _save(saved["bare"], model)  # from the reference, without class names or mean
    return {**saved, "mean": mean}


def _texture(height: int, width: int, seed: int) -> np.ndarray:
    """height x width x 3 uint8: a smooth random colour pattern plus noise, photograph-like."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    channels = [np.sin(2 * np.pi * (rng.uniform(1, 6) * x + rng.uniform(1, 6) * y) + rng.uniform(0, 6))
                for _ in range(3)]
    pixels = 128 + 90 * np.stack(channels, axis=-1) + rng.normal(0, 12, (height, width, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Images of several sizes and formats: wider, taller, square, smaller than the crop."""
    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for seed, (height, width, suffix) in enumerate([(300, 420, "png"), (500, 260, "jpg"), (256, 256, "bmp"),
                                                    (150, 200, "webp")]):
        path = folder / f"photo{seed}.{suffix}"
        Image.fromarray(_texture(height, width, seed)).save(path)
        paths.append(str(path))
    return paths


def _by_hand(model, mean: torch.Tensor, path: str, ten_crop: bool) -> torch.Tensor:
    """Section 4.1's test computed directly, in float64: the base image minus the mean, the
    centre 224 patch (offset 16), or the four corners, the centre and their reflections with
    their softmaxes averaged. Returned as float32, the program's type."""
    model = copy.deepcopy(model).double()
    centred = torch.from_numpy(load_image(path)).permute(2, 0, 1).double() - mean.double()
    corners = [(16, 16)] if not ten_crop else [(0, 0), (0, 32), (32, 0), (32, 32), (16, 16)]
    patches = [centred[:, top:top + 224, left:left + 224] for top, left in corners]
    if ten_crop:
        patches += [patch.flip(-1) for patch in patches]
    with torch.no_grad():
        return F.softmax(model.eval()(torch.stack(patches)), dim=1).mean(dim=0).float()


def _predictions(classifier, paths, ten_crop=False, batch_size=3):
    return list(classifier.classify([str(p) for p in paths], batch_size, ten_crop))


def _predict(*args, check=None) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "launch.predict", *map(str, args)], cwd=ROOT,
                            capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    if check is not None:
        assert result.returncode == check, f"exit {result.returncode}\n{result.stderr[-3000:]}"
    return result


# ---------------------------------------------------------------- in this process

@pytest.mark.parametrize("ten_crop", [False, True], ids=["centre", "ten-patch"])
def test_predictions_are_the_reference_softmax_of_the_evaluation_patches(checkpoints, photos, ten_crop):
    classifier = open_classifier(checkpoints["full"])
    model = load_reference(checkpoints["full"])
    assert classifier.classes == CLASSES and not classifier.model.training
    photos = photos[:2] if ten_crop else photos  # a wide and a tall one: ten patches each take a while on a CPU
    predictions = _predictions(classifier, photos, ten_crop)  # batches of 3 and 1, or one of 2
    assert [p.path for p in predictions] == photos and all(p.error is None for p in predictions)
    for prediction in predictions:
        expected = _by_hand(model, checkpoints["mean"], prediction.path, ten_crop)
        torch.testing.assert_close(prediction.probabilities, expected, **PROB_TOL)
    # The images differ in what the net says of them: the comparison above is not of constants.
    probabilities = torch.stack([p.probabilities for p in predictions])
    assert (probabilities[0] - probabilities[1]).abs().max() > 0.1
    assert probabilities.max(dim=1).values.min() > 2 / len(CLASSES)


def test_the_net_takes_a_bounded_number_of_patches_at_once(checkpoints, photos, monkeypatch):
    """--batch-size 300 --ten-crop sent 3,000 patches through the net at once: 18 GB, then the
    out-of-memory killer, without a word. The same probabilities, in parts of at most
    PATCHES_PER_FORWARD."""
    classifier = open_classifier(checkpoints["full"])
    whole = [p.probabilities for p in classifier.classify(photos[:2], batch_size=2, ten_crop=True)]
    sizes, made, forward, views = [], [], classifier.model.forward, predict.eval_views

    def counted(inputs):
        sizes.append(len(inputs))
        return forward(inputs)

    def made_at_once(images, stats, ten_crop):  # all of a batch's patches were made before the first forward
        made.append(len(images) * (10 if ten_crop else 1))
        return views(images, stats, ten_crop)

    monkeypatch.setattr(predict, "PATCHES_PER_FORWARD", 7)
    monkeypatch.setattr(predict, "eval_views", made_at_once)
    monkeypatch.setattr(classifier.model, "forward", counted)
    parts = [p.probabilities for p in classifier.classify(photos[:2], batch_size=2, ten_crop=True)]
    assert sizes == [7, 3, 7, 3] and made == [10, 10]  # 20 patches, an image's ten made at once
    for a, b in zip(whole, parts):
        torch.testing.assert_close(a, b, **PROB_TOL)
    sizes.clear(), made.clear()
    centre = [p.probabilities for p in classifier.classify(photos[:3], batch_size=3)]
    assert sizes == [3] and made == [3]
    monkeypatch.setattr(predict, "PATCHES_PER_FORWARD", 2)
    sizes.clear(), made.clear()
    in_parts = [p.probabilities for p in classifier.classify(photos[:3], batch_size=3)]
    assert sizes == [2, 1] and made == [2, 1]
    torch.testing.assert_close(torch.stack(centre), torch.stack(in_parts), **PROB_TOL)


def test_ten_patches_differ_from_the_centre_patch(checkpoints, photos):
    classifier = open_classifier(checkpoints["full"])
    centre = _predictions(classifier, photos[:1])[0].probabilities
    ten = _predictions(classifier, photos[:1], ten_crop=True)[0].probabilities
    assert not torch.allclose(centre, ten, **PROB_TOL)
    torch.testing.assert_close(ten.sum(), torch.tensor(1.0))


@pytest.mark.slow
def test_every_colour_mode_classifies_and_grey_equals_its_rgb_copy(checkpoints, tmp_path):
    rgb = Image.fromarray(_texture(240, 320, seed=11))
    grey = rgb.convert("L")
    files = {"L": (grey, "png"), "P": (rgb.convert("P"), "png"), "RGBA": (rgb.convert("RGBA"), "png"),
             "CMYK": (rgb.convert("CMYK"), "jpg"), "I;16": (Image.fromarray(np.asarray(grey, np.uint16) * 257), "png"),
             "grey as RGB": (grey.convert("RGB"), "png")}
    paths = []
    for mode, (image, suffix) in files.items():
        path = tmp_path / f"{mode.replace(';', '').replace(' ', '_')}.{suffix}"
        image.save(path)
        with Image.open(path) as reopened:  # what the file holds is the mode meant
            # (a 16-bit grey PNG opens as I;16, or as I in older Pillow)
            assert reopened.mode in {"grey as RGB": ("RGB",), "I;16": ("I;16", "I")}.get(mode, (mode,))
        paths.append(path)
    classifier = open_classifier(checkpoints["full"])
    model = load_reference(checkpoints["full"])
    predictions = dict(zip(files, _predictions(classifier, paths, batch_size=len(paths))))
    for mode, prediction in predictions.items():
        assert prediction.error is None, mode
        torch.testing.assert_close(prediction.probabilities, _by_hand(model, checkpoints["mean"], prediction.path,
                                                                      False), **PROB_TOL)
    # 8-bit grey, 16-bit grey (x257) and grey stored as RGB are one picture to the net.
    for mode in ("L", "I;16"):
        torch.testing.assert_close(predictions[mode].probabilities, predictions["grey as RGB"].probabilities,
                                   **PROB_TOL)


def test_unusable_files_are_named_and_the_others_classified(checkpoints, photos, tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("not an image\n")
    strip = tmp_path / "strip.png"
    Image.new("RGB", (2100, 100)).save(strip)  # aspect ratio 21:1, refused as training refuses it
    folder = tmp_path / "folder.png"
    folder.mkdir()
    too_long = tmp_path / ("x" * 300 + ".jpg")  # the system refuses the name (ENAMETOOLONG) before any read
    pipe = tmp_path / "pipe.jpg"
    os.mkfifo(pipe)  # opened, it would wait for a writer
    odd = undecodable_dds(tmp_path / "odd.jpg")
    paths = [tmp_path / "missing.png", text, photos[0], folder, strip, too_long, pipe, odd, photos[1]]
    predictions = _predictions(open_classifier(checkpoints["full"]), paths, batch_size=4)
    assert [p.path for p in predictions] == [str(p) for p in paths]
    errors = {p.path: p.error for p in predictions if p.error is not None}
    assert set(errors) == {str(tmp_path / "missing.png"), str(text), str(folder), str(strip), str(too_long), str(pipe),
                           str(odd)}
    assert errors[str(odd)].startswith(f"{odd}: not a readable image (NotImplementedError: ")
    assert errors[str(pipe)].endswith(": not a regular file (a pipe, a device or a socket), not an image")
    assert "File name too long" in errors[str(too_long)]
    assert errors[str(tmp_path / "missing.png")].endswith(": no such file")
    assert errors[str(folder)].endswith(": a folder, not an image")
    assert "not a readable image (UnidentifiedImageError" in errors[str(text)]
    assert "aspect ratio 21.0:1" in errors[str(strip)]
    assert all(error.startswith(path) for path, error in errors.items())
    assert all(p.probabilities is not None for p in predictions if p.path in photos[:2])


def test_an_image_this_user_cannot_read_is_said_so(tmp_path, monkeypatch):
    """Not "no such file", which sends the user to look for it. (Simulated: the tests may run
    as root, who reads any file.)"""
    private = tmp_path / "private.jpg"
    Image.new("RGB", (8, 8)).save(private)

    def refused(path):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr(predict, "load_image", refused)
    assert predict.decode(str(private)) == f"{private}: permission denied"


def test_an_output_that_is_not_a_number_is_an_error_for_the_image_not_a_probability(checkpoints, photos):
    classifier = open_classifier(checkpoints["full"])
    with torch.no_grad():
        for weights in classifier.model.parameters():
            weights.mul_(1e38)  # finite, as a checkpoint's weights must be; their products are not
    [prediction] = _predictions(classifier, photos[:1], batch_size=1)
    assert prediction.probabilities is None and prediction.error == (
        f"{photos[0]}: the net's output for it is not a number (its weights overflow on this image): use a "
        f"checkpoint of a run that did not diverge")


@pytest.mark.slow
def test_a_checkpoint_without_mean_or_names_needs_the_data_it_was_trained_on(checkpoints, tiny_data, tmp_path,
                                                                            caplog):
    with pytest.raises(CheckpointError, match=r"no mean image of its training set .*give --data DIR"):
        open_classifier(checkpoints["old"])
    with pytest.raises(CheckpointError, match=r"no class names and no mean image .*give --data DIR"):
        open_classifier(checkpoints["bare"])
    data_mean = open_data(tiny_data).stats.mean
    for kind in ("old", "bare"):
        classifier = open_classifier(checkpoints[kind], data=str(tiny_data))
        assert classifier.classes == CLASSES
        torch.testing.assert_close(classifier.stats.mean, data_mean, rtol=0, atol=0)
    # and not other data, whose mean would be wrong: other classes, or another number of them
    renamed, fewer = tmp_path / "renamed", tmp_path / "fewer"
    for folder in (renamed, fewer):
        shutil.copytree(tiny_data, folder)
    for split in ("train", "val"):
        (renamed / split / "stripes_v").rename(renamed / split / "stripes_w")  # still the last
        shutil.rmtree(fewer / split / "dots")
    copied = {folder: sorted(p.name for p in folder.iterdir()) for folder in (renamed, fewer)}
    with pytest.raises(CheckpointError, match=r"was trained on other classes than the data's \(1 differ: stripes_v -> "
                                                r"stripes_w\): use the dataset"):
        open_classifier(checkpoints["old"], data=str(renamed))
    with pytest.raises(CheckpointError, match=r"was trained for 10 classes but the data has 9: use the dataset"):
        open_classifier(checkpoints["bare"], data=str(fewer))
    # refused before their statistics are computed: no 2,000 images decoded, no cache file written
    assert {folder: sorted(p.name for p in folder.iterdir()) for folder in (renamed, fewer)} == copied
    # With the mean saved in the checkpoint, --data is neither needed nor read.
    with caplog.at_level(logging.INFO, logger="launch.predict"):
        assert open_classifier(checkpoints["full"], data="/nonexistent").stats.mean.equal(checkpoints["mean"])
    assert f"{checkpoints['full']} holds its class names and mean image: --data is not needed and not read" \
        in caplog.messages
    # a --data that is not there is named, without the built-in dataset for advice (left out, no data is read)
    with pytest.raises(ValueError, match=r"^data folder /nonexistent does not exist: pass the path of a folder that "
                                         r"holds train/ and val/ \([^)]*\)$"):
        open_classifier(checkpoints["old"], data="/nonexistent")


def test_a_checkpoint_with_its_mean_and_without_names_reads_only_the_names_from_the_data(checkpoints, tiny_data,
                                                                                        tmp_path, monkeypatch):
    """No pass over the training images for statistics the checkpoint holds (nor their cache
    file written into the data folder)."""
    nameless = tmp_path / "nameless.pt"
    _save(nameless, load_reference(checkpoints["full"]), data_mean=checkpoints["mean"])

    def computed(*args, **kwargs):
        raise AssertionError("the training set's statistics were computed")
    monkeypatch.setattr("launch.data.load_or_compute_stats", computed)
    classifier = open_classifier(nameless, data=str(tiny_data))
    assert classifier.classes == CLASSES and classifier.stats.mean.equal(checkpoints["mean"])


def test_the_checkpoint_is_read_whole_so_that_it_may_be_written_over_while_the_images_go(checkpoints, photos,
                                                                                         tmp_path):
    """Mapped, a checkpoint cut short (a cp of another over it) ended the program with SIGBUS
    at the next batch, the mean image read from the mapping."""
    copied = tmp_path / "copied.pt"
    shutil.copyfile(checkpoints["full"], copied)
    classifier = open_classifier(copied)
    with open("/proc/self/maps") as maps:
        assert os.path.realpath(copied) not in maps.read()
    before = _predictions(classifier, photos[:2])
    copied.write_bytes(b"")
    after = _predictions(classifier, photos[:2])
    assert all(a.probabilities.equal(b.probabilities) for a, b in zip(after, before))


def test_an_image_name_that_is_not_utf8_is_printed_as_its_bytes_even_to_a_strict_output(checkpoints, photos,
                                                                                         tmp_path, monkeypatch):
    named = tmp_path / os.fsdecode(b"caf\xe9.png")  # Latin-1, as an old camera or archive names it
    shutil.copy(photos[0], named)
    output = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")  # PYTHONIOENCODING=utf-8:strict
    monkeypatch.setattr(sys, "stdout", output)
    for argv in ([], ["--json"]):
        assert predict.main([str(checkpoints["full"]), str(named), *argv]) == 0
    said = output.buffer.getvalue().splitlines()
    assert said[0] == os.fsencode(named)  # the text block: the name's own bytes first
    assert json.loads(said[-1])["image"] == str(named)  # JSON: escaped, so the output stays ASCII


def test_images_come_after_options_or_after_a_double_dash_and_errors_keep_to_one_line(checkpoints, photos, tmp_path,
                                                                                        monkeypatch, caplog, capsys):
    """Images among the options; after "--", names that look like options; a missing file whose
    name holds a newline: its error on one line."""
    dashed = tmp_path / "-x.png"
    shutil.copy(photos[0], dashed)
    output = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
    monkeypatch.setattr(sys, "stdout", output)
    monkeypatch.chdir(tmp_path)
    assert predict.main([str(checkpoints["full"]), "--json", "--top", "1", photos[0]]) == 0
    assert predict.main(["--json", "--", str(checkpoints["full"]), "-x.png"]) == 0
    assert predict.main(["--json", str(checkpoints["full"]), "--", "-x.png", "miss\ning.png"]) == 1
    assert predict.main([str(checkpoints["full"]), photos[1], "--json", "--", "-x.png"]) == 0  # one before the options
    said = [json.loads(line) for line in output.buffer.getvalue().splitlines()]
    assert [record["image"] for record in said] == [photos[0], "-x.png", "-x.png", "miss\ning.png", photos[1],
                                                    "-x.png"]
    assert said[1]["predictions"] == said[2]["predictions"] and "error" in said[3]
    classes = lambda record: [p["class"] for p in record["predictions"]]
    assert classes(said[5]) == classes(said[1])  # (in a batch of two: the same to float32 rounding)
    for argv, missing in ((["--", str(checkpoints["full"])], "IMAGE"), (["--json", "--"], "CHECKPOINT, IMAGE")):
        with pytest.raises(SystemExit) as refused:
            predict.main(argv)
        assert refused.value.code == 2 and capsys.readouterr().err.startswith(
            f"error: the following arguments are required: {missing}")
    for option in ("--top", "--device"):  # its value left out before "--": said so, not a stand-in taken for it
        with pytest.raises(SystemExit) as refused:
            predict.main([str(checkpoints["full"]), option, "--", photos[0]])
        assert refused.value.code == 2 and capsys.readouterr().err.startswith(
            f"error: argument {option}: expected one argument")
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == ["error: $'miss\\ning.png': no such file"]  # the name as the shell reads it back, then why


def test_missing_checkpoint_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        open_classifier(tmp_path / "nothing.pt")
    os.mkfifo(tmp_path / "pipe.pt")  # something there, which is no checkpoint: said so
    with pytest.raises(CheckpointError, match=rf"^{tmp_path / 'pipe.pt'} is not a file \(a folder, a named pipe, "
                                              rf"a device\): "):
        open_classifier(tmp_path / "pipe.pt")


def test_top_classes_are_ordered_and_all_of_them_when_fewer_than_asked():
    probabilities = torch.tensor([0.1, 0.6, 0.3])
    top = top_classes(probabilities, ["a", "b", "c"], 5)
    assert [name for name, _ in top] == ["b", "c", "a"]
    assert [p for _, p in top] == pytest.approx([0.6, 0.3, 0.1])
    assert top_classes(probabilities, ["a", "b", "c"], 1) == [("b", pytest.approx(0.6))]
    block = format_block("x.jpg", [("dots", 1.0), ("grid", 0.0604)])
    assert block.splitlines() == ["x.jpg", "  100.0%  dots", "    6.0%  grid"]
    # A name with a newline (or another control character) keeps to its line, quoted as the
    # shell reads it back; a name without one, even with quotes or odd bytes, is as it is.
    odd = "new\nline 'it''s' \\ \t\x1b\x85\u2028 é\udcff.jpg"
    block = format_block(odd, [("a\rb", 1.0)])
    assert len(block.splitlines()) == 2 and block.splitlines()[1] == "  100.0%  $'a\\rb'"
    read_back = subprocess.run(["bash", "-c", f"printf %s {block.splitlines()[0]}"], capture_output=True, check=True)
    assert read_back.stdout == os.fsencode(odd)
    assert format_block("it's é\udcff.jpg", []) == "it's é\udcff.jpg"


def test_the_text_output_is_a_block_per_image_of_its_five_most_probable_classes(checkpoints, photos, monkeypatch):
    """Without --top, five classes per image (of ten), most probable first, as the reference has
    them; the images' blocks one blank line apart, none before the first."""
    output = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
    monkeypatch.setattr(sys, "stdout", output)
    assert predict.main([str(checkpoints["full"]), *photos[:2], "--device", "cpu"]) == 0  # float32, as the reference
    said = output.buffer.getvalue().decode()
    assert said.endswith("\n") and not said.startswith("\n")
    blocks = [block.split("\n") for block in said[:-1].split("\n\n")]
    assert [block[0] for block in blocks] == photos[:2]
    model = load_reference(checkpoints["full"])
    for block in blocks:
        expected = _by_hand(model, checkpoints["mean"], block[0], ten_crop=False)
        best = expected.argsort(descending=True)[:5].tolist()
        assert [line.split("%  ")[1] for line in block[1:]] == [CLASSES[i] for i in best]
        # shown to 0.1 %: within half of that of the reference's probability
        shown = [float(line.split("%")[0]) for line in block[1:]]
        assert shown == pytest.approx([100 * expected[i].item() for i in best], abs=0.051)


def test_a_warning_about_an_image_it_still_reads_is_logged_naming_the_image(tmp_path, caplog):
    """In this process (the real one: the slow test above): the image classified, its warning one
    line naming it, each time it is read."""
    damaged = warned_of_tiff(tmp_path / "one.tif")
    with caplog.at_level(logging.WARNING, logger="launch.predict"):
        for _ in range(2):
            assert predict.decode(str(damaged)).shape == (3, 256, 256)
    said = [r.getMessage() for r in caplog.records if r.name == "launch.predict"]
    assert len(said) == 2 and all(re.fullmatch(f"warning: {re.escape(str(damaged))}: .*tag 278 .*", line)
                                  for line in said), said


def test_the_top_classes_of_ten_are_the_five_most_probable_most_probable_first():
    probabilities = torch.tensor([0.02, 0.2, 0.05, 0.15, 0.01, 0.25, 0.03, 0.12, 0.1, 0.07])
    top = top_classes(probabilities, [f"c{i}" for i in range(10)], 5)
    assert top == [(name, pytest.approx(p)) for name, p in
                   (("c5", 0.25), ("c1", 0.2), ("c3", 0.15), ("c7", 0.12), ("c8", 0.1))]


# ---------------------------------------------------------------- the program, as a user runs it

@pytest.mark.slow
def test_the_preferred_class_comes_first_from_a_run_folder(tmp_path, photos):
    run = tmp_path / "run"
    model = _net(seed=4)
    with torch.no_grad():
        model.fc8.bias[PREFERRED] = 40.0  # logits elsewhere stay within a few units: class 6 wins by far
    save_reference(run / FILENAME, model, classes=CLASSES, data_mean=_mean_image())
    result = _predict(run, photos[0], photos[1], check=0)
    blocks = [block.splitlines() for block in result.stdout.strip().split("\n\n")]
    assert [block[0] for block in blocks] == photos[:2]
    for block in blocks:
        assert len(block) == 1 + 5
        assert block[1] == f"  100.0%  {CLASSES[PREFERRED]}"
        names = [line.split("%  ")[1] for line in block[1:]]
        assert len(set(names)) == 5 and set(names) <= set(CLASSES)
    assert result.stderr == ""


@pytest.mark.slow
def test_json_output_equals_the_reference_and_bad_images_exit_1(checkpoints, photos, tmp_path):
    text = tmp_path / "text.jpg"
    text.write_text("hello\n")
    folder = tmp_path / "a folder"
    folder.mkdir()
    missing = tmp_path / "missing.jpg"
    good = photos[0]
    result = _predict(checkpoints["full"], missing, text, "--json", good, "--ten-crop", "--top", "10", folder,
                      "--batch-size", "2", check=1)  # images among the options, in their order
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["image"] for r in records] == [str(missing), str(text), good, str(folder)]
    assert [("error" in r) for r in records] == [True, True, False, True]
    expected = _by_hand(load_reference(checkpoints["full"]), checkpoints["mean"], good, ten_crop=True)
    got = {p["class"]: p["probability"] for p in records[2]["predictions"]}
    assert list(got) == [CLASSES[i] for i in expected.argsort(descending=True).tolist()]
    torch.testing.assert_close(torch.tensor([got[name] for name in CLASSES]), expected, **PROB_TOL)
    # One line on stderr per bad image, naming it; nothing else.
    lines = result.stderr.splitlines()
    assert len(lines) == 3 and all(line.startswith("error: ") for line in lines)
    for line, path in zip(lines, (missing, text, folder)):
        assert line.startswith(f"error: {path}: ")

    text_output = _predict(checkpoints["full"], missing, good, check=1)
    assert text_output.stdout.splitlines()[0] == good and len(text_output.stdout.splitlines()) == 6
    assert text_output.stderr.splitlines() == [f"error: {missing}: no such file"]


@pytest.mark.slow  # a process
def test_a_warning_about_an_image_it_still_reads_names_the_image_each_time(checkpoints, tmp_path):
    """PIL warns of a TIFF tag that holds more values than it should, and reads the image: the
    warning came as PIL's own two lines, naming its source line, not the image."""
    damaged = [warned_of_tiff(tmp_path / "one.tif"), warned_of_tiff(tmp_path / "two.tif")]
    result = _predict(checkpoints["full"], *damaged, "--json", check=0)
    assert [json.loads(line)["image"] for line in result.stdout.splitlines()] == [str(p) for p in damaged]
    lines = result.stderr.splitlines()
    assert len(lines) == 2 and all(re.fullmatch(f"warning: {re.escape(str(path))}: .*tag 278 .*", line)
                                   for line, path in zip(lines, damaged)), lines


def _refusal(case, checkpoints, photos, tmp_path):
    """(arguments, part of the one error line) of each way to call launch.predict wrongly."""
    not_checkpoint = tmp_path / "weights.pt"
    not_checkpoint.write_bytes(b"\x00" * 100)
    return {
        "missing checkpoint": ([tmp_path / "nothing", photos[0]], "no checkpoint at"),
        "no mean": ([checkpoints["old"], photos[0]], "give --data DIR"),
        "not a checkpoint": ([not_checkpoint, photos[0]], "truncated or not a checkpoint"),
        "bad option": ([checkpoints["full"], photos[0], "--batch-size", "0"], "--batch-size must be at least 1"),
        "no class shown": ([checkpoints["full"], photos[0], "--top", "0"], "--top must be at least 1"),
        "no image": ([checkpoints["full"]], "required: IMAGE"),
        # an unset "$VARIABLE": not the current folder's checkpoint.pt, nor the current folder as the data
        "empty checkpoint": (["", photos[0]], "error: CHECKPOINT is empty: give a path (. for the current folder)"),
        "empty data": ([checkpoints["full"], photos[0], "--data", ""], "error: --data is empty: give a value"),
        "empty image": ([checkpoints["full"], photos[0], ""], "error: IMAGE number 2 is empty (an unset variable?)"),
    }[case]


@pytest.mark.parametrize("case", ["missing checkpoint", "no mean", "not a checkpoint", "bad option", "no class shown",
                                  "no image", "empty checkpoint", "empty data", "empty image"])
def test_bad_checkpoints_and_options_are_refused_with_the_fix(checkpoints, photos, tmp_path, case, caplog, capsys):
    """In this process (the program's log goes to caplog); the real process: the test below."""
    args, expected = _refusal(case, checkpoints, photos, tmp_path)
    try:
        code = predict.main([str(a) for a in args])
    except SystemExit as exc:  # argparse's refusals
        code = exc.code
    said = capsys.readouterr()
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] + said.err.splitlines()
    assert code == 2 and said.out == ""
    assert len(errors) == 1 and errors[0].startswith("error: ") and expected in errors[0], errors


def test_ctrl_c_while_the_checkpoint_loads_is_one_line(checkpoints, photos, monkeypatch, caplog, capsys):
    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(predict, "open_classifier", interrupted)
    assert predict.main([str(checkpoints["full"]), str(photos[0])]) == 130
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == ["interrupted"]
    assert capsys.readouterr().out == ""


@pytest.mark.slow  # a real process
def test_a_reader_that_goes_away_ends_it_quietly(checkpoints, photos):
    """``python -m launch.predict ... | head -1``: the pipe closes under the program."""
    command = [sys.executable, "-m", "launch.predict", str(checkpoints["full"]), *photos, "--batch-size", "1"]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # before the first line: its print meets a closed pipe
    _, err = proc.communicate(timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 141 and err == "", err[-3000:]


@pytest.mark.slow  # a real process
@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full, a device that is always full")
def test_an_output_that_cannot_be_written_is_one_line_and_exit_2(checkpoints, photos):
    """``python -m launch.predict ... --json > predictions.jsonl`` on a full disk: not exit 1,
    which says that an image could not be used."""
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-m", "launch.predict", str(checkpoints["full"]), photos[0], "--json"],
                                cwd=ROOT, stdout=full, stderr=subprocess.PIPE, text=True, timeout=RUN_TIMEOUT_S)
    assert result.returncode == 2 and result.stderr.splitlines() == [
        "error: cannot write to the standard output (No space left on device): free space on the disk it goes to, or "
        "send it elsewhere"], result.stderr[-3000:]


@pytest.mark.slow  # a real process
def test_a_closed_output_is_one_line_and_exit_2(checkpoints, photos):
    """``python -m launch.predict ... >&-``: the predictions went to /dev/null, put there for the
    program's sake, and it exited 0."""
    result = subprocess.run(["sh", "-c", 'exec "$@" >&-', "sh", sys.executable, "-m", "launch.predict",
                             str(checkpoints["full"]), photos[0]], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, timeout=RUN_TIMEOUT_S)
    assert result.returncode == 2 and result.stderr.splitlines() == [
        "error: the standard output is closed (>&-), where the predictions are written: leave it open, or send it "
        "to a file (> predictions.txt)"], result.stderr[-3000:]


@pytest.mark.slow
def test_a_refusal_is_one_line_and_exit_2_from_the_real_process(checkpoints, photos, tmp_path):
    args, expected = _refusal("not a checkpoint", checkpoints, photos, tmp_path)
    result = _predict(*args, check=2)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where no GPU is visible")
def test_device_cuda_without_a_gpu_is_refused(checkpoints, photos):
    result = _predict(checkpoints["full"], photos[0], "--device", "cuda", check=2)
    assert result.stderr.splitlines() == ["error: --device cuda: no CUDA GPU is visible here: use --device cpu (or auto)"]


@pytest.mark.slow
def test_a_checkpoint_written_by_the_towers_classifies(trained_run, tiny_data):
    val_images = sorted((tiny_data / "val").glob("*/*"))
    result = _predict(trained_run[0], *val_images, "--top", "3", "--ten-crop", check=0)
    blocks = [block.splitlines() for block in result.stdout.strip().split("\n\n")]
    assert [block[0] for block in blocks] == [str(p) for p in val_images]
    assert all(len(block) == 4 and {line.split("%  ")[1] for line in block[1:]} <= set(CLASSES) for block in blocks)
