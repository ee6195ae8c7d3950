"""python -m launch.predict CHECKPOINT IMAGE [IMAGE ...]: classify images with a trained net.

CHECKPOINT is a checkpoint file or a run folder (its checkpoint.pt), from the towers
or from the single-device reference. Each image goes through the program's own
evaluation: decoded as training decodes it (:func:`launch.images.load_image`: any
format and colour mode PIL reads, the same refusals), brought to the 256 base image,
the training set's mean image subtracted, then the centre 224 patch or, with
--ten-crop, the paper's ten patches with their softmaxes averaged
(:func:`launch.data.eval_views`). The net is the single-device reference rebuilt by
:func:`launch.checkpoint.reference_from`, in eval mode.

The mean image and the class names come from the checkpoint. An older checkpoint
without the mean image (or one saved from the reference without class names) needs
--data, the data it was trained on.

Output: per image, its path and its top-5 classes with their probabilities (all
classes when there are fewer), or with --json one JSON object per line. An image that
cannot be used gets one line on stderr and the others are still classified; the exit
code is then 1. A bad checkpoint or option: one line naming the fix, exit code 2.
"""

from launch.cli import hold_interrupts  # torch-free

if __name__ == "__main__":
    hold_interrupts()  # a Ctrl-C during the imports below ends the program in one line

import argparse
import json
import logging
import os
import sys
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterator, List, NamedTuple, Optional

import torch
import torch.nn.functional as F

from .checkpoint import CheckpointError, check_classes, load_checkpoint, reference_from, resolve_path
from .cli import (CLOSED_AT_START, OutputFailed, Parser, add_options, one_line, option, quick_exit, reader_gone,
                  refuse_empty, write_out)
from .data import DataStats, center_crop, eval_views, open_data
from .images import DECODE_ERRORS, ImageRejected, load_image
from .train import IMAGE_SHAPE

log = logging.getLogger("launch.predict")

TEN_PATCHES = 10  # four corners, the centre, and their reflections (section 4.1)
PATCHES_PER_FORWARD = 160  # through the net at once (--batch-size 300 --ten-crop, 3,000 at once, took 18 GB)


@dataclass
class PredictOptions:
    ten_crop: bool = option(False, "average the softmax over the paper's ten patches (four corners, centre and "
                                   "their reflections) instead of taking the centre patch", action="store_true")
    top: int = option(5, "classes shown per image (all of them when the net has fewer)")
    batch_size: int = option(16, f"images decoded and held at once, their patches through the net "
                                  f"{PATCHES_PER_FORWARD} at a time (memory grows with it)")
    device: str = option("auto", "'auto': the GPU when there is one, else the CPU", choices=("auto", "cpu", "cuda"))
    data: Optional[str] = option(None, "the ImageNet-layout folder the checkpoint was trained on; needed only for "
                                       "a checkpoint that holds no mean image or no class names (older ones)")
    json: bool = option(False, "one JSON object per line and image, for scripts: {\"image\", \"predictions\": "
                               "[{\"class\", \"probability\"}, ...]} or {\"image\", \"error\"}", action="store_true")

    def validate(self) -> None:
        """Raises ValueError naming the fix for an impossible value."""
        refuse_empty(data=self.data)
        for name in ("top", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")


class Prediction(NamedTuple):
    path: str
    probabilities: Optional[torch.Tensor]  # num_classes float32, on the CPU; None when the image failed
    error: Optional[str]  # why the image could not be used, naming it; None when it was classified


@dataclass
class Classifier:
    model: torch.nn.Module  # the single-device reference, in eval mode, on ``device``
    classes: list  # class names, in the order of the net's outputs
    stats: DataStats  # the training set's statistics; only the mean image is used
    device: torch.device

    @torch.no_grad()
    def probabilities(self, base_images: torch.Tensor, ten_crop: bool) -> torch.Tensor:
        """N x 3 x 256 x 256 uint8 base images -> N x num_classes softmax, as the
        program's evaluation computes it (launch.train.evaluate). At most PATCHES_PER_FORWARD
        patches through the net at once, and made at once (or one image's ten), whatever
        --batch-size and --ten-crop make: all of a batch's, made first, took 5 GB at 400."""
        views = TEN_PATCHES if ten_crop else 1
        probs = []
        for group in base_images.split(max(1, PATCHES_PER_FORWARD // views)):
            group = group.to(self.device)
            patches = eval_views(group if ten_crop else center_crop(group), self.stats, ten_crop)
            inputs = patches.reshape(-1, *IMAGE_SHAPE)
            logits = torch.cat([self.model(part) for part in inputs.split(PATCHES_PER_FORWARD)])
            probs.append(F.softmax(logits.float(), dim=1).view(len(group), views, -1).mean(dim=1).cpu())
        return torch.cat(probs)

    def classify(self, paths: List[str], batch_size: int, ten_crop: bool = False) -> Iterator[Prediction]:
        """A Prediction per path, in order; the usable images of every ``batch_size`` paths go
        through the net together."""
        for start in range(0, len(paths), batch_size):
            chunk = paths[start:start + batch_size]
            decoded = [decode(path) for path in chunk]
            usable = [image for image in decoded if isinstance(image, torch.Tensor)]
            probs = iter(self.probabilities(torch.stack(usable), ten_crop)) if usable else iter(())
            for path, image in zip(chunk, decoded):
                if not isinstance(image, torch.Tensor):
                    yield Prediction(path, None, image)
                    continue
                found = next(probs)
                if torch.isfinite(found).all():
                    yield Prediction(path, found, None)
                else:  # never a NaN printed as a probability (nor written into --json, where it is not JSON)
                    yield Prediction(path, None, f"{path}: the net's output for it is not a number (its weights "
                                                 f"overflow on this image): use a checkpoint of a run that did not diverge")


def decode(path: str):
    """The 3 x 256 x 256 uint8 base image of ``path``, as training decodes it, or the
    reason it cannot be used (a str naming the file). A warning PIL gives about an image it
    still reads (a damaged TIFF tag) is logged in a line naming the image (left to Python, it
    names PIL's source line, not the image)."""
    try:
        if Path(path).is_dir():
            return f"{path}: a folder, not an image"
        if Path(path).exists() and not Path(path).is_file():  # a FIFO would wait for a writer forever
            return f"{path}: not a regular file (a pipe, a device or a socket), not an image"
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always", UserWarning)  # PIL's about the image, not a deprecation
            pixels = load_image(path)
        for warning in said:
            log.warning("warning: %s: %s", one_line(path), one_line(str(warning.message)))
    except ImageRejected as error:  # its message names the file, the limit and the fix
        return str(error)
    except FileNotFoundError:
        return f"{path}: no such file"
    except PermissionError:
        return f"{path}: permission denied"
    except DECODE_ERRORS as error:
        return f"{path}: not a readable image ({type(error).__name__}: {error})"
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def choose_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is visible here: use --device cpu (or auto)")
    return torch.device(name)


def open_classifier(checkpoint, data: Optional[str] = None, device="cpu") -> Classifier:
    """The net of ``checkpoint`` (a file or a run folder) with its class names and the
    mean image of its training set, taken from the checkpoint or, where it lacks them,
    from ``data``. Raises CheckpointError or ValueError (DataError) naming the fix."""
    path = resolve_path(checkpoint)
    payload = load_checkpoint(path, mmap=False)  # read whole: the file may be written over while the images go
    classes, mean = payload.get("classes"), payload.get("data_mean")
    missing = [what for what, value in (("class names", classes), ("mean image of its training set", mean))
               if value is None]
    if missing and data is None:
        raise CheckpointError(f"{path} holds no {' and no '.join(missing)} (saved by an older version, or from the "
                              f"single-device model without them): give --data DIR, the data it was trained on")
    # eval_views subtracts the mean alone; the PCA is for training's colour shift, not saved.
    stats = None if mean is None else DataStats.of_mean(mean)
    if missing:
        # statistics computed only for a checkpoint without its mean, and only of the data it was trained
        # on (its mean would be wrong): checked before any image is decoded or statistics written
        bundle = open_data(data, stats=stats, builtin_alternative=False,
                           before_stats=lambda opened: check_classes(payload, path, opened.classes))
        classes = classes if classes is not None else bundle.classes
        stats = bundle.stats
    elif data is not None:
        log.info("%s holds its class names and mean image: --data is not needed and not read", path)
    classes = list(classes)  # distinct names, one per output (load_checkpoint checks a checkpoint's own)
    model = reference_from(payload).eval().to(device)  # whatever net the checkpoint records
    return Classifier(model, classes, stats, torch.device(device))


def top_classes(probabilities: torch.Tensor, classes: list, k: int) -> list:
    """[(class name, probability)] of the ``k`` most probable classes, most probable first."""
    best = probabilities.topk(min(k, len(classes)))
    return [(classes[i], p) for p, i in zip(best.values.tolist(), best.indices.tolist())]


def format_block(path: str, top: list) -> str:
    """The image's path, then one line per class: probability in percent, right-aligned, and
    the name; a path or name with a control character in it is quoted (``one_line``)."""
    return "\n".join([one_line(path)] + [f"{100 * p:7.1f}%  {one_line(name)}" for name, p in top])


def error_line(prediction: Prediction) -> str:
    """Why an image could not be used, on one line: its name quoted where it must be (as the
    shell reads it back), then the reason."""
    named = f"{prediction.path}: "
    if not prediction.error.startswith(named):
        return one_line(prediction.error)
    return f"{one_line(prediction.path)}: {one_line(prediction.error[len(named):])}"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m launch.predict",
                    description="Classify images with a trained checkpoint: each image's most probable classes, "
                                "computed as the program's evaluation computes them.")
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint file, or a run folder (its checkpoint.pt)")
    parser.add_argument("images", metavar="IMAGE", nargs="+", help="image files, any format and colour mode PIL reads")
    add_options(parser, PredictOptions)
    return parser


def _say(text: str) -> None:
    """Lines of the output, at once: an image's name in its own bytes, whatever the output's
    encoding, a name that is not UTF-8 included (which a strict UTF-8 output would refuse)."""
    write_out(os.fsencode(text) + b"\n")


def _parse(parser: argparse.ArgumentParser, argv: list) -> argparse.Namespace:
    """The command line, images among the options too, and after a "--" as they come (names
    like options): argparse's intermixed parsing loses what follows a "--", so that part is
    added to the positional arguments of the rest, in which a stand-in for each of the two
    required ones (a NUL, which no argument holds), put first, keeps argparse from asking for
    them (last, an option that lacks its value before "--" took one as its value)."""
    if "--" not in argv:
        return parser.parse_intermixed_args(argv)
    cut = argv.index("--")
    args = parser.parse_intermixed_args(["\0", "\0"] + argv[:cut])
    given = [a for a in [args.checkpoint, *args.images] if a != "\0"] + argv[cut + 1:]
    if len(given) < 2:
        parser.error("the following arguments are required: " + ("IMAGE" if given else "CHECKPOINT, IMAGE"))
    args.checkpoint, args.images = given[0], given[1:]
    return args


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    args = vars(_parse(build_parser(), sys.argv[1:] if argv is None else list(argv)))
    checkpoint, paths = args.pop("checkpoint"), args.pop("images")
    options = PredictOptions(**{f.name: args[f.name] for f in fields(PredictOptions)})
    try:  # Ctrl-C while the checkpoint or the data's statistics load, or while the images are classified
        try:
            if 1 in CLOSED_AT_START:  # given /dev/null, the predictions would be lost, exit 0
                raise ValueError("the standard output is closed (>&-), where the predictions are written: leave it "
                                 "open, or send it to a file (> predictions.txt)")
            options.validate()
            refuse_empty(CHECKPOINT=checkpoint)
            if "" in paths:  # not the current folder, which Path("") is
                raise ValueError(f"IMAGE number {paths.index('') + 1} is empty (an unset variable?): give an "
                                 f"image's path")
            classifier = open_classifier(checkpoint, options.data, choose_device(options.device))
        except (ValueError, CheckpointError) as exc:  # DataError is a ValueError
            log.error("error: %s", exc)
            return 2
        failed = shown = 0
        for prediction in classifier.classify(paths, options.batch_size, options.ten_crop):
            if prediction.error is not None:
                failed += 1
                log.error("error: %s", error_line(prediction))
                if options.json:
                    _say(json.dumps({"image": prediction.path, "error": prediction.error}))
                continue
            top = top_classes(prediction.probabilities, classifier.classes, options.top)
            if options.json:
                _say(json.dumps({"image": prediction.path,
                                 "predictions": [{"class": name, "probability": p} for name, p in top]}))
            else:
                _say(("\n" if shown else "") + format_block(prediction.path, top))
                shown += 1
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130
    except OutputFailed as exc:
        log.error("error: %s", exc)
        return 2
    except BrokenPipeError:
        return reader_gone()
    return 1 if failed else 0


if __name__ == "__main__":
    with quick_exit():
        sys.exit(main())
