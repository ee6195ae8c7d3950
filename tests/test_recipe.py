"""--recipe: which values fill the recipe options, sized how to the training set; the
warning when the paper's recipe meets a small set; a resumed run keeps its recipe."""

import dataclasses
import json
import logging
import math
import os

import pytest

from launch import builtin
from launch.checkpoint import CheckpointError, load_checkpoint
from launch.config import (PAPER_RECIPE, PAPER_RECIPE_MIN_IMAGES, RUN_CONTROL, SMALL_MIN_EPOCHS, SMALL_MIN_STEPS,
                           TrainConfig, build_parser, check_schedule_options, describe_recipe, given_options,
                           parse_config, recipe_warnings, resolve, update_config_json)
from launch.two_gpu import ARCHITECTURE_OPTIONS, evaluated_config, main, resumed_config
from launch.train import architecture

from conftest import TINY, launch

RECIPE_FIELDS = tuple(PAPER_RECIPE)


def _resolved(train_images: int, **options) -> TrainConfig:
    """As the program resolves a command line: before the data is opened, then with its size."""
    return resolve(resolve(TrainConfig(**options)), train_images=train_images)


def _recipe(config: TrainConfig) -> dict:
    return {name: getattr(config, name) for name in RECIPE_FIELDS}


# ---------------------------------------------------------------- resolution

def test_the_builtin_dataset_trains_with_the_small_recipe_at_its_size():
    train_images = builtin.BUILTIN_TRAIN_PER_CLASS * len(builtin.BUILTIN_CLASSES)  # 2,500: 78 steps of 32
    config = _resolved(train_images)
    assert config.recipe == "small"
    assert _recipe(config) == dict(epochs=3, batch_size=32, lr=0.0025, schedule="fixed", lr_milestones=(2,),
                                   warmup_steps=20, init="scaled")


@pytest.mark.parametrize("train_images", [330, 10_000, 1_281_167])
def test_data_gets_the_papers_recipe_whatever_its_size(train_images):
    config = _resolved(train_images, data="photos")
    assert config.recipe == "paper" and _recipe(config) == PAPER_RECIPE


# train images -> (epochs, milestone) at batch 32, by the documented rule: the fewest epochs
# that make 200 steps of train_images // 32, at least 3, the rate divided by 10 for the last third
@pytest.mark.parametrize("train_images, epochs, milestone", [
    (100, 67, 45),     # 3 steps an epoch
    (330, 20, 14),     # 10 steps
    (360, 19, 13),     # 11 steps
    (6_400, 3, 2),     # 200 steps: three epochs, 600 steps
    (50_000, 3, 2),    # 1,562 steps: the length grows with the data
])
def test_small_recipe_is_sized_to_the_training_set(train_images, epochs, milestone):
    config = _resolved(train_images, data="photos", recipe="small")
    assert _recipe(config) == dict(epochs=epochs, batch_size=32, lr=0.0025, schedule="fixed",
                                   lr_milestones=(milestone,), warmup_steps=20, init="scaled")


@pytest.mark.parametrize("batch_size", [8, 32, 64])
@pytest.mark.parametrize("train_images", [64, 200, 333, 1_000, 2_500, 7_000, 20_000])
def test_small_recipe_takes_the_fewest_epochs_that_make_enough_steps(train_images, batch_size):
    config = _resolved(train_images, data="photos", recipe="small", batch_size=batch_size)
    steps_per_epoch = train_images // batch_size
    assert config.epochs >= SMALL_MIN_EPOCHS and config.epochs * steps_per_epoch >= SMALL_MIN_STEPS
    if config.epochs > SMALL_MIN_EPOCHS:  # one epoch fewer would be too short
        assert (config.epochs - 1) * steps_per_epoch < SMALL_MIN_STEPS
    # the rate is divided by 10 once, for the last third of the epochs (at least the last one)
    (milestone,) = config.lr_milestones
    assert 1 <= config.epochs - milestone <= math.ceil(config.epochs / 3)


def test_options_given_win_over_the_recipe():
    config = _resolved(330, data="photos", recipe="small", epochs=6, lr=0.01, init="paper", warmup_steps=0)
    # the milestone follows the epochs given; the rest comes from the recipe
    assert _recipe(config) == dict(epochs=6, batch_size=32, lr=0.01, schedule="fixed", lr_milestones=(4,),
                                   warmup_steps=0, init="paper")
    assert _resolved(330, data="photos", recipe="small", batch_size=16).epochs == 10  # 20 steps an epoch
    assert _resolved(330, data="photos", recipe="small", lr_milestones=(3, 5)).lr_milestones == (3, 5)
    assert _resolved(330, data="photos", recipe="small", schedule="plateau").schedule == "plateau"
    assert _recipe(_resolved(330, recipe="paper")) == PAPER_RECIPE  # the built-in data with the paper's recipe
    given = _resolved(330, data="photos", epochs=5, batch_size=4)
    assert (given.recipe, given.epochs, given.batch_size, given.lr) == ("paper", 5, 4, 0.01)


def test_before_the_data_is_opened_only_the_small_recipes_length_is_left_open():
    config = resolve(TrainConfig(recipe="small"))
    assert config.epochs is None and config.lr_milestones is None
    assert (config.batch_size, config.lr, config.init) == (32, 0.0025, "scaled")
    assert _recipe(resolve(TrainConfig(data="photos"))) == PAPER_RECIPE


def test_the_recipe_line_says_what_was_chosen_and_why():
    line = describe_recipe(_resolved(360, data="photos", recipe="small", lr=0.01), 360)
    assert line.startswith("recipe: small (--recipe small; 19 epochs of 11 steps for 360 training images")
    assert "--epochs 19 --batch-size 32 --lr 0.01 --schedule fixed --lr-milestones 13" in line
    assert line.endswith("given as options: --lr 0.01")
    line = describe_recipe(_resolved(2_500), 2_500)
    assert "recipe: small (the default for the built-in dataset; 3 epochs of 78 steps" in line
    assert "given" not in line
    line = describe_recipe(_resolved(1_281_167, data="imagenet"), 1_281_167)
    assert line.startswith("recipe: paper (the default with --data; section 5")
    assert "--epochs 90 --batch-size 128 --lr 0.01 --schedule plateau" in line
    assert "--lr-milestones" not in line  # the plateau schedule has none
    # one or two epochs: the small recipe's milestone lies at their end, and the line said the rate was divided
    for epochs in (1, 2, 3):
        line = describe_recipe(_resolved(2_500, epochs=epochs), 2_500)
        said = f"; {epochs} epoch{'s leave' if epochs > 1 else ' leaves'} no last third: the rate is not divided): "
        assert (said in line) == (epochs < 3), line
    assert "leave no last third" not in describe_recipe(_resolved(2_500, epochs=2, lr_milestones=(1,)), 2_500)


def test_the_papers_recipe_warns_below_its_threshold_only():
    below, at = PAPER_RECIPE_MIN_IMAGES - 1, PAPER_RECIPE_MIN_IMAGES
    (warning,) = recipe_warnings(_resolved(below, data="photos"), below)
    assert f"has {below}" in warning and "--recipe small" in warning
    assert recipe_warnings(_resolved(at, data="photos"), at) == []
    assert recipe_warnings(_resolved(330, data="photos", recipe="small"), 330) == []


def test_a_resume_writes_its_recipe_and_how_it_goes_on_into_config_json(tmp_path):
    """What the run goes on with follows (the layout, precision, logging, an --lr given anew); how
    one start was run (--max-steps, --workers, where it wrote) stays as the first start wrote it."""
    first = TrainConfig(out="runs", run_name="a", max_steps=3, workers=2, log_every=1, lr=0.01)
    (tmp_path / "config.json").write_text(json.dumps(dataclasses.asdict(first)))
    update_config_json(tmp_path, TrainConfig(out="elsewhere", max_steps=9, workers=0, layout="single",
                                             precision="bf16", log_every=3, replicas=2, lr=0.001))
    written = json.loads((tmp_path / "config.json").read_text())
    assert {k: written[k] for k in ("layout", "precision", "log_every", "replicas", "lr")} == {
        "layout": "single", "precision": "bf16", "log_every": 3, "replicas": 2, "lr": 0.001}
    assert {k: written[k] for k in ("out", "run_name", "max_steps", "workers")} == {
        "out": "runs", "run_name": "a", "max_steps": 3, "workers": 2}


def test_a_damaged_config_json_is_written_anew_and_one_that_cannot_be_written_is_warned_of(tmp_path, caplog):
    """A config.json damaged (JSON that is no object, or text cut short) is written anew with
    the resumed run's options; one that cannot be written (a folder in its place) is warned of,
    and the resume goes on: the checkpoint holds the options all the same."""
    for damaged in ("[1, 2]\n", '{"lr": 0.0'):  # not an object; cut short
        (tmp_path / "config.json").write_text(damaged)
        update_config_json(tmp_path, TrainConfig(lr=0.001))
        written = json.loads((tmp_path / "config.json").read_text())
        assert written["lr"] == 0.001 and written["layout"] == "towers"
    assert "max_steps" not in written  # how this start ran is not the run's to keep
    blocked = tmp_path / "blocked"
    (blocked / "config.json").mkdir(parents=True)
    with caplog.at_level(logging.WARNING):
        update_config_json(blocked, TrainConfig(lr=0.001))
    assert f"warning: could not update {blocked / 'config.json'} (" in caplog.text
    assert "it holds the options of an earlier start of the run" in caplog.text
    assert [p.name for p in blocked.iterdir()] == ["config.json"]  # no partial file left beside it


def test_milestones_the_run_never_reaches_are_warned_of_and_an_epoch_named_twice_is_refused():
    at = PAPER_RECIPE_MIN_IMAGES
    never = ("warning: the rate's milestones 30 60 80 (--lr-milestones) are never reached in this run's 10 epochs: "
             "give milestones below --epochs")
    assert recipe_warnings(_resolved(at, data="photos", schedule="fixed", epochs=10), at) == [never]
    assert recipe_warnings(_resolved(at, data="photos", schedule="fixed", epochs=81), at) == []
    (warning,) = recipe_warnings(_resolved(at, data="photos", schedule="fixed", epochs=10, lr_milestones=(5, 10)), at)
    assert "milestone 10 (--lr-milestones) is never reached" in warning
    assert recipe_warnings(_resolved(at, data="photos", epochs=10), at) == []  # plateau: no milestones
    for epochs in (1, 2, 3):  # the small recipe's own milestone, beyond a run of one or two epochs: no warning
        assert recipe_warnings(_resolved(330, recipe="small", epochs=epochs), 330, milestones_given=False) == []
    for given in ((1, 2), (2,)):  # given, the same as the recipe's or not: warned of
        (warning,) = recipe_warnings(_resolved(330, recipe="small", epochs=2, lr_milestones=given), 330)
        assert "milestone 2 (--lr-milestones) is never reached in this run's 2 epochs" in warning
    small_set = recipe_warnings(_resolved(500, data="photos", schedule="fixed", epochs=10), 500)
    assert len(small_set) == 2 and "has 500" in small_set[0] and small_set[1] == never  # one does not hide the other
    with pytest.raises(ValueError, match="--lr-milestones 2 2 names an epoch twice"):
        check_schedule_options(TrainConfig(schedule="fixed", lr_milestones=(2, 2)))
    with pytest.raises(ValueError, match=r"^--lr-milestones must be epochs from 1 on, got none$"):  # a config.json's []
        TrainConfig(schedule="fixed", lr_milestones=[]).validate()
    with pytest.raises(ValueError, match="--lr-milestones 2 2 names an epoch twice"):  # given anew to a resumed run
        check_schedule_options(TrainConfig(resume="run", lr_milestones=(2, 2)))
    check_schedule_options(TrainConfig(eval_only="run", lr_milestones=(2, 2)))  # refused as a training option
    # a run saved with such milestones (before they were refused) resumes as it was saved
    saved = _resolved(360, data="photos", recipe="small", lr_milestones=(2, 2))
    arch = {name: getattr(saved, name) for name in ARCHITECTURE_OPTIONS}
    payload = {"config": dataclasses.asdict(saved), "arch": arch}
    check_schedule_options(TrainConfig(resume="run"))
    assert resumed_config(TrainConfig(resume="run"), payload).lr_milestones == (2, 2)


def test_help_explains_the_recipes():
    text = " ".join(build_parser().format_help().split())
    assert "--recipe {paper,small}" in text
    for words in ("'paper' with --data, 'small' for the built-in dataset", f"at least {SMALL_MIN_STEPS} steps",
                  f"{PAPER_RECIPE_MIN_IMAGES:,} training images"):
        assert words in text
    assert parse_config(["--recipe", "small"]).recipe == "small"
    with pytest.raises(SystemExit) as exit_info:
        parse_config(["--recipe", "imagenet"])
    assert exit_info.value.code == 2


def test_help_gives_every_options_default():
    """--help names each option's default (the README says so); a recipe's option gives the
    paper recipe's value, which the recipe chosen fills in."""
    actions = [a for a in build_parser()._actions if a.dest != "help"]
    assert {a.dest for a in actions} == {f.name for f in dataclasses.fields(TrainConfig)}
    for action in actions:
        text = " ".join(action.help.split())
        assert "default" in text.lower() or "(paper: " in text, f"{action.option_strings[0]}: {text}"
        if action.dest in PAPER_RECIPE:
            value = PAPER_RECIPE[action.dest]
            shown = " ".join(map(str, value)) if isinstance(value, tuple) else str(value)
            assert f"(paper: {shown}" in text, f"{action.option_strings[0]}: {text}"
    switches = {a.dest: " ".join(a.help.split()) for a in actions if a.dest in ("lrn", "ten_crop")}
    assert all(text.endswith("(default: on)") for text in switches.values()), switches  # both on unless --no-...


@pytest.mark.parametrize("argv, words", [
    (["--data", "photos", "--lr-milestones", "5"], "--lr-milestones divides the rate at fixed epochs, but this "
                                                   "run's schedule is the paper recipe's plateau: add --schedule fixed"),
    (["--schedule", "plateau", "--lr-milestones", "5"], "this run's schedule is --schedule plateau"),
    (["--patience", "4"], "--patience acts on the plateau schedule, but this run's schedule is the small recipe's "
                          "fixed: add --schedule plateau, or drop it"),
    (["--data", "photos", "--schedule", "fixed", "--patience", "4", "--max-reductions", "1"],
     "--patience and --max-reductions act on the plateau schedule"),
])
def test_options_of_the_schedule_not_used_are_refused(argv, words, tmp_path, caplog):
    with pytest.raises(ValueError) as refused:
        check_schedule_options(parse_config(argv))
    assert words in str(refused.value)
    assert words in _log_of([*argv, "--out", tmp_path], caplog)  # before the data is looked for
    assert not any(tmp_path.iterdir())


def test_options_of_the_schedule_used_are_accepted():
    for argv in (["--data", "photos", "--schedule", "fixed", "--lr-milestones", "5"], ["--lr-milestones", "2"],
                 ["--data", "photos", "--patience", "4", "--max-reductions", "1"],
                 ["--recipe", "small", "--schedule", "plateau", "--patience", "1"],
                 ["--resume", "run", "--patience", "4"]):  # a resumed run's schedule is checked against its own
        check_schedule_options(parse_config(argv))


# ---------------------------------------------------------------- through the program

def _log_of(argv, caplog) -> str:
    caplog.clear()
    caplog.set_level(logging.INFO)
    assert main([str(a) for a in argv]) == 2
    return caplog.text


def _recipe_warnings(caplog) -> list:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "recipe" in r.getMessage()]


def test_the_program_warns_when_the_papers_recipe_meets_a_small_set(tiny_data, tmp_path, caplog):
    # Each command fails after the recipe is chosen (a batch larger than the 30 training images),
    # so nothing trains and no run folder is made.
    out = ["--data", tiny_data, "--out", tmp_path / "runs", "--batch-size", "64"]
    text = _log_of(out, caplog)
    assert "recipe: paper (the default with --data" in text
    warnings = _recipe_warnings(caplog)
    assert len(warnings) == 1 and "this set has 30" in warnings[0] and "--recipe small" in warnings[0]
    text = _log_of([*out, "--recipe", "small"], caplog)
    assert "recipe: small (--recipe small" in text and "given as options: --batch-size 64" in text
    assert not _recipe_warnings(caplog)
    assert not (tmp_path / "runs").exists()


def test_a_resumed_run_keeps_its_recipe():
    saved = _resolved(360, data="photos", recipe="small")
    arch = {name: getattr(saved, name) for name in ARCHITECTURE_OPTIONS}  # as a checkpoint's arch records it
    payload = {"config": dataclasses.asdict(saved), "arch": arch}
    assert resumed_config(TrainConfig(resume="run"), payload).recipe == "small"
    assert resumed_config(TrainConfig(resume="run", recipe="small"), payload).recipe == "small"
    with pytest.raises(ValueError, match="--recipe paper differs from the resumed run's small"):
        resumed_config(TrainConfig(resume="run", recipe="paper"), payload)
    # trained longer: the milestone stays where the first start put it (13 of 19), unless given anew
    longer = resumed_config(TrainConfig(resume="run", epochs=30), payload)
    assert (longer.epochs, longer.lr_milestones) == (30, (13,))
    assert "recipe: small (the resumed run's, which a resume may change by --epochs, --lr, --warmup-steps and " \
           "--lr-milestones): --epochs 30 " in describe_recipe(longer, 360)
    moved = resumed_config(TrainConfig(resume="run", epochs=30, lr_milestones=(20,)), payload)
    assert (moved.epochs, moved.lr_milestones) == (30, (20,))
    # FC8's place is how the towers run, not the recipe: the checkpoint holds the whole net
    assert resumed_config(TrainConfig(resume="run", fc8_placement="split"), payload).fc8_placement == "split"
    split = {**payload, "config": {**payload["config"], "fc8_placement": "split"}}
    assert resumed_config(TrainConfig(resume="run"), split).fc8_placement == "split"  # kept unless given
    plateau = {**payload, "config": {**payload["config"], "schedule": "plateau"}}
    with pytest.raises(ValueError, match="^--lr-milestones divides the rate at fixed epochs, but the resumed run's "
                                         "schedule is plateau: drop --lr-milestones$"):
        resumed_config(TrainConfig(resume="run", lr_milestones=(20,)), plateau)
    # saved with --patience 0 before it was refused: resumed as 1, which it acted as, --patience 1 not refused
    zero = {**plateau, "config": {**plateau["config"], "patience": 0}}
    for given in ({}, {"patience": 1}):
        resumed = resumed_config(TrainConfig(resume="run", **given), zero)
        resumed.validate()
        assert resumed.patience == 1
    # saved before --recipe existed: the recipe that was the dataset's default, its values kept
    for data, recipe in (("photos", "paper"), (None, "small")):
        old = dataclasses.asdict(dataclasses.replace(saved, data=data))
        del old["recipe"]
        resumed = resumed_config(TrainConfig(resume="run"), {"config": old, "arch": arch})
        assert resumed.recipe == recipe and _recipe(resumed) == _recipe(saved)


def test_an_evaluation_computes_in_the_arithmetic_the_run_trained_in_unless_given():
    """As the run's own evaluations did (its summary's numbers): a bf16 run's --eval-only ran
    in float32, and gave other numbers, saying only "arithmetic: float32"."""
    saved = dataclasses.replace(_resolved(360, recipe="small"), precision="bf16")
    arch = {**{name: getattr(saved, name) for name in ARCHITECTURE_OPTIONS}, **dataclasses.asdict(architecture(saved))}
    payload = {"config": dataclasses.asdict(saved), "arch": arch}

    def evaluated(*options):
        argv = ["--eval-only", "run", *options]
        return evaluated_config(parse_config(argv), payload, given_options(argv)).precision

    assert (evaluated(), evaluated("--precision", "fp32"), evaluated("--precision", "bf16")) == ("bf16", "fp32", "bf16")
    del payload["config"]["precision"]  # saved before --precision: in float32, as it trained
    assert evaluated() == "fp32"


def test_options_given_at_their_default_values_count_on_resume():
    """An option typed at its default value is as given as any other: refused where it would
    change the resumed run's recipe. The layout and the arithmetic not given are the run's."""
    saved = dataclasses.replace(_resolved(360, data="photos", recipe="small"), activation="tanh", dropout=0.0,
                                layout="single", precision="bf16", checkpoint_every=50, log_every=5, ten_crop=False,
                                workers=7, timeout=900.0)
    payload = {"config": dataclasses.asdict(saved), "arch": {name: getattr(saved, name) for name in ARCHITECTURE_OPTIONS}}

    def resumed(*options):
        argv = ["--resume", "run", *options]
        return resumed_config(parse_config(argv), payload, given_options(argv))

    for options, words in ((["--activation", "relu"], "--activation relu differs from the resumed run's tanh"),
                           (["--dropout", "0.5"], "--dropout 0.5 differs from the resumed run's 0.0")):
        with pytest.raises(ValueError) as refused:
            resumed(*options)
        assert words in str(refused.value)
    assert resumed("--activation", "tanh", "--dropout", "0").activation == "tanh"  # the run's own values
    assert (resumed().layout, resumed().precision) == ("single", "bf16")
    assert (resumed("--layout", "towers", "--precision", "fp32").layout,
            resumed("--precision", "fp32").precision) == ("towers", "fp32")
    # how often it saves and logs, and its last test, as the run went (a run saving every 50 steps on a
    # machine that may be taken away goes on saving so); the machine's own --workers and --timeout, not
    kept = resumed()
    assert (kept.checkpoint_every, kept.log_every, kept.ten_crop, kept.workers, kept.timeout) == \
        (50, 5, False, None, TrainConfig().timeout)
    given = resumed("--checkpoint-every", "10", "--log-every", "1", "--ten-crop")
    assert (given.checkpoint_every, given.log_every, given.ten_crop) == (10, 1, True)


# What a resume may change, besides RUN_CONTROL (how this invocation runs): every other option is
# the run's recipe, refused where given otherwise than the run trained.
CHANGED_ON_RESUME = {"--epochs": "30", "--lr": "0.001", "--warmup-steps": "5", "--lr-milestones": "15",
                     "--data": "photos-moved"}
KEPT_ON_RESUME = {"--recipe": ("paper", "small"), "--batch-size": ("64", "32"), "--momentum": ("0.8", "0.9"),
                  "--weight-decay": ("0.001", "0.0005"), "--schedule": ("plateau", "fixed"),
                  "--patience": ("3", "2"), "--max-reductions": ("2", "3"), "--init": ("paper", "scaled"),
                  "--dropout": ("0.3", "0.5"), "--pooling": ("non-overlapping", "overlapping"),
                  "--activation": ("tanh", "relu"), "--seed": ("7", "0"), "--no-lrn": (None, "--lrn"),
                  "--val-limit": ("8", None)}


def test_a_resume_changes_only_the_options_it_may_and_refuses_the_rest_of_the_recipe():
    saved = _resolved(360, data="photos", recipe="small")
    arch = {name: getattr(saved, name) for name in ARCHITECTURE_OPTIONS}
    payload = {"config": dataclasses.asdict(saved), "arch": arch}
    named = {flag.replace("--no-", "--")[2:].replace("-", "_") for flag in (*CHANGED_ON_RESUME, *KEPT_ON_RESUME)}
    assert named == {field.name for field in dataclasses.fields(TrainConfig)} - RUN_CONTROL  # a new one placed too

    def resumed(*options):
        argv = ["--resume", "run", *options]
        return resumed_config(parse_config(argv), payload, given_options(argv))

    for flag, value in CHANGED_ON_RESUME.items():
        name = flag[2:].replace("-", "_")
        assert getattr(resumed(flag, value), name) == getattr(parse_config([flag, value]), name) != getattr(saved, name)
    for flag, (value, had) in KEPT_ON_RESUME.items():
        given = [flag] if value is None else [flag, value]
        said = f"'s {had}" if had is not None else f", which ran without {flag}"
        with pytest.raises(ValueError, match=f"^{' '.join(given)} differs from the resumed run{said}: a resumed run "
                                             f"keeps its recipe, so drop the option \\(or start a new run\\)$"):
            resumed(*given)


def test_a_checkpoint_that_lacks_parts_of_its_recipe_is_not_resumed():
    """A recipe option missing (a checkpoint another program or a hand wrote) would be filled by this
    command line's value: another run than the one saved, without a word."""
    saved = dataclasses.asdict(_resolved(360, data="photos", recipe="small"))
    arch = {name: saved[name] for name in ARCHITECTURE_OPTIONS}
    for missing in (("momentum",), ("seed", "weight_decay")):
        lacking = {name: value for name, value in saved.items() if name not in missing}
        with pytest.raises(CheckpointError, match=f"^run lacks parts of its run's recipe \\({', '.join(missing)}\\), "
                                                  f"so it cannot be resumed: evaluate it with --eval-only, or "
                                                  f"train afresh$"):
            resumed_config(TrainConfig(resume="run"), {"config": lacking, "arch": arch})
    for name, value in (("max_steps", 7), ("workers", 3)):  # this invocation's own: filled by its command line
        without = {"config": {k: v for k, v in saved.items() if k != name}, "arch": arch}
        assert getattr(resumed_config(TrainConfig(resume="run", **{name: value}), without), name) == value


@pytest.mark.slow
def test_a_small_run_and_its_resumption_keep_the_recipe_sized_at_the_start(tiny_data, tmp_path, caplog):
    # 30 training images at batch 4: 7 steps an epoch, so 29 epochs make 200 steps
    started = launch("--data", tiny_data, "--out", tmp_path, "--run-name", "run", "--recipe", "small",
                     "--max-steps", "1", "--val-limit", "4", *TINY)
    run = tmp_path / "run"
    config = json.loads((run / "config.json").read_text())
    assert (config["recipe"], config["epochs"], config["lr_milestones"]) == ("small", 29, [20])
    assert "recipe: small (--recipe small; 29 epochs of 7 steps for 30 training images at batch 4" in started.stderr
    assert "warning" not in started.stderr

    resumed = launch("--resume", run, "--max-steps", "2", "--epochs", "40", "--workers", "0")
    saved = load_checkpoint(run)
    assert saved["progress"]["global_step"] == 2
    # --epochs may grow on resume; the milestone stays where the run's recipe put it
    assert (saved["config"]["recipe"], saved["config"]["epochs"], saved["config"]["lr_milestones"]) == \
        ("small", 40, [20])
    assert "recipe: small (the resumed run's, which a resume may change" in resumed.stderr
    # A run of two epochs: the recipe's milestone lies beyond them, given by nobody, warned of never.
    short = launch("--data", tiny_data, "--out", tmp_path, "--run-name", "short", "--recipe", "small", "--epochs", "2",
                   "--max-steps", "1", "--val-limit", "4", *TINY)
    again = launch("--resume", tmp_path / "short", "--max-steps", "2")
    assert "warning" not in short.stderr + again.stderr, again.stderr
    # given anew to the resumed run, beyond its epochs: warned of, as a new run's are; not at its next start
    moved = launch("--resume", tmp_path / "short", "--max-steps", "3", "--lr-milestones", "5")
    assert "warning: the rate's milestone 5 (--lr-milestones) is never reached in this run's 2 epochs" in moved.stderr
    assert "warning" not in launch("--resume", tmp_path / "short", "--max-steps", "4").stderr
    # the saved milestone, left beyond a run shortened to it (or given again with --epochs): warned of
    for steps, options in ((5, ["--epochs", "3"]), (6, ["--epochs", "4", "--lr-milestones", "5"])):
        shorter = launch("--resume", tmp_path / "short", "--max-steps", str(steps), *options)
        assert f"milestone 5 (--lr-milestones) is never reached in this run's {options[1]} epochs" in shorter.stderr
    assert main(["--resume", str(run), "--max-steps", "3", "--recipe", "paper"]) == 2  # stops before any rank starts
    assert "--recipe paper differs from the resumed run's small" in caplog.text


def test_the_data_folder_and_the_checkpoint_evaluated_are_kept_as_absolute_paths(tmp_path, monkeypatch):
    """config.json and checkpoints keep --data: a run resumed, or drawn by launch.show, from
    another working folder must find the same data; an evaluation's config.json, the run it
    evaluated, which launch.show, given the evaluation's folder, names to draw instead."""
    monkeypatch.chdir(tmp_path)
    for option, name in (("--data", "data"), ("--eval-only", "eval_only")):
        assert getattr(parse_config([option, "images"]), name) == str(tmp_path / "images")
        assert getattr(parse_config([option, "~/images"]), name) == os.path.expanduser("~/images")
        assert getattr(parse_config([]), name) is None  # the built-in dataset; a training run
        with pytest.raises(ValueError, match=f"^{option} is empty"):  # not the working folder
            parse_config([option, ""]).validate()
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "a" / "b")
    for option, name in (("--data", "data"), ("--eval-only", "eval_only")):  # '..' after a link: as the OS takes it
        kept = getattr(parse_config([option, "link/../c"]), name)
        assert kept == str(tmp_path / "link" / ".." / "c") and os.path.realpath(kept) == str(tmp_path / "a" / "c")


def test_milestones_read_as_lists_are_kept_as_a_tuple():
    """argparse and a config.json give the milestones as a list: the config keeps them as the
    tuple the recipes hold, so that the same milestones compare equal however they came."""
    assert parse_config(["--lr-milestones", "30", "60", "80"]).lr_milestones == PAPER_RECIPE["lr_milestones"]
    assert TrainConfig(**json.loads('{"lr_milestones": [2]}')).lr_milestones == (2,)


# ---------------------------------------------------------------- the update rule

def test_the_papers_sgd_is_torchs_sgd_bit_for_bit():
    """paper_optimizer writes torch.optim.SGD's arithmetic out (without importing the compiler):
    the same weights and momentum buffers after every step, across a rate drop, with a
    parameter that gets no gradient, and with gradients zeroed rather than dropped."""
    import torch

    from launch.step import paper_optimizer

    generator = torch.Generator().manual_seed(0)
    shapes = [(7, 3, 5, 5), (7,), (11, 13), (4,)]
    ours = [torch.randn(s, generator=generator, requires_grad=True) for s in shapes]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    initial = [p.detach().clone() for p in ours]
    mine = paper_optimizer(ours, lr=0.01, momentum=0.9, weight_decay=5e-4)
    torchs = torch.optim.SGD(theirs, lr=0.01, momentum=0.9, weight_decay=5e-4)
    for step in range(5):
        if step == 3:  # the schedule divides the rate by ten
            for optimizer in (mine, torchs):
                optimizer.param_groups[0]["lr"] /= 10
        grads = [torch.randn(s, generator=generator) for s in shapes[:-1]]  # the last one gets none
        for params, optimizer in ((ours, mine), (theirs, torchs)):
            optimizer.zero_grad(set_to_none=step % 2 == 0)
            for p, g in zip(params, grads):
                p.grad = g.clone() if p.grad is None else p.grad.add_(g)
            optimizer.step()
        for a, b in zip(ours, theirs):
            assert torch.equal(a, b), step
        for a, b in zip(ours[:-1], theirs[:-1]):
            assert torch.equal(mine.state[a]["momentum_buffer"], torchs.state[b]["momentum_buffer"]), step
    assert "momentum_buffer" not in mine.state[ours[-1]] and torch.equal(ours[-1], initial[-1])
    assert not any(torch.equal(p, p0) for p, p0 in zip(ours[:-1], initial))  # the comparison is not vacuous


def test_a_step_is_section_5s_update_on_the_batchs_mean_cross_entropy():
    """train_step with paper_optimizer at its defaults (the benchmarks'), against section 5's
    rule written out with the paper's numbers: v <- 0.9 v - 0.0005 lr w - lr dL/dw, w <- w + v,
    where L is the mean cross-entropy over the batch (a sum would scale the step by the batch
    size); and it counts the batch's top-1 hits."""
    import torch
    import torch.nn.functional as F

    from launch.step import paper_optimizer, train_step

    lr = 0.1
    model = torch.nn.Linear(6, 4)
    with torch.no_grad():
        model.weight.copy_(torch.randn(4, 6, generator=torch.Generator().manual_seed(0)))
    weights = [p.detach().clone() for p in model.parameters()]
    velocity = [torch.zeros_like(w) for w in weights]
    images = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    labels = model(images).argmax(dim=1).detach()
    labels[:3] = (labels[:3] + 1) % 4  # five of the eight right at first
    optimizer = paper_optimizer(model.parameters(), lr=lr)
    for step in range(3):
        params = [w.clone().requires_grad_() for w in weights]
        logits = F.linear(images, *params)
        loss = -logits.log_softmax(dim=1)[torch.arange(8), labels].mean()
        grads = torch.autograd.grad(loss, params)
        result = train_step(model, optimizer, images, labels)
        assert result.loss.item() == pytest.approx(loss.item(), rel=1e-6), step
        assert result.correct.item() == (logits.argmax(dim=1) == labels).sum().item(), step
        assert step > 0 or result.correct.item() == 5
        for v, w, g in zip(velocity, weights, grads):
            v.mul_(0.9).sub_(0.0005 * lr * w + lr * g)
            w.add_(v)
        for p, w in zip(model.parameters(), weights):
            torch.testing.assert_close(p.detach(), w, rtol=1e-5, atol=1e-6)  # float32, another order of sums


def test_the_programs_defaults_are_section_5s():
    """The program's momentum 0.9 and weight decay 0.0005, and the rate "reduced three times
    prior to termination", as the paper gives them (the recipe's values are checked above)."""
    config = TrainConfig()
    assert (config.momentum, config.weight_decay, config.max_reductions) == (0.9, 0.0005, 3)
