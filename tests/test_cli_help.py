"""The CLI layer: every command's --help (taken from the parser, not a hand list) lists every option with help
text and its default; --version; snake_case and kebab-case spellings parse alike; defaults are the library's."""

from __future__ import annotations

import argparse
import inspect

import pytest

from cxrlab import _version
from cxrlab.backbones import DEFAULT_BACKBONE
from cxrlab.cli import build_parser, main
from cxrlab.compat import build_label_image_parser, build_retrain_parser, label_image_main, retrain_main
from cxrlab.crossval import DEFAULT_FOLDS, cross_validate
from cxrlab.finetune.options import FineTuneOptions
from cxrlab.training import TrainOptions

SHARED = {  # option -> a value, for the options several commands share
    "--label-from-name": "nlm", "--group-regex": r"(?P<group>\d+)", "--positive-label": "abnormal",
    "--backbone": "inception-v3", "--precision": "fp32", "--seed": "7", "--output": "out", "--epochs": "3",
    "--ft": "lr=1e-4", "--trust-modified-model": None, "--fine-tune": None, "--no-ood": None, "--quiet": None,
    "--top-k": "2", "--image-dir": "lungs", "--how-many-training-steps": "50", "--testing-percentage": "20",
    "--audit": "a.db", "--ray-device": "cpu",
}


def commands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def shown_default(action) -> bool:
    d = action.default
    return action.option_strings and not (d is None or d is False or d is argparse.SUPPRESS or d == [])


def states_default(action) -> bool:
    """An optional option that takes a value but has no value of its own (None, an empty list): its help says in
    words what happens when it is not given. Flags the tutorial's commands accept and ignore have none."""
    d = action.default
    return (bool(action.option_strings) and action.nargs != 0 and not action.required and (d is None or d == [])
            and "accepted for compatibility" not in (action.help or ""))


def assert_help_complete(name: str, parser: argparse.ArgumentParser, out: str) -> None:
    """Every option of ``parser`` has help text and is listed in ``out``; its default is shown: the value
    (argparse's '(default: X)') or, where there is no value, the words that say what happens."""
    for action in parser._actions:
        assert action.help and action.help is not argparse.SUPPRESS, f"{name}: {action.dest} has no help text"
        for spelling in action.option_strings:
            assert spelling in out, f"{name} --help does not show {spelling}"
        if shown_default(action):
            assert f"(default: {action.default})" in out, f"{name}: default of {action.dest} not shown"
        if states_default(action):
            assert "(default: " in action.help, f"{name}: {action.option_strings[-1]} does not say its default"


def run_help(capsys, monkeypatch, entry, argv) -> str:
    monkeypatch.setenv("COLUMNS", "2000")  # one line per option: no default wrapped at a hyphen
    assert entry(argv) == 0
    return " ".join(capsys.readouterr().out.split())


COMMANDS = sorted(commands())


def test_the_command_list_is_the_parsers():
    assert {"train", "predict", "evaluate", "cv", "serve"} <= set(COMMANDS)


@pytest.mark.parametrize("name", COMMANDS)
def test_help_lists_every_option_with_help_and_default(name, capsys, monkeypatch):
    out = run_help(capsys, monkeypatch, main, [name, "--help"])
    assert_help_complete(name, commands()[name], out)


def test_top_level_help_lists_every_option(capsys, monkeypatch):
    assert_help_complete("cxrlab", build_parser(), run_help(capsys, monkeypatch, main, ["--help"]))


@pytest.mark.parametrize("entry,build", [(retrain_main, build_retrain_parser), (label_image_main, build_label_image_parser)])
def test_tutorial_commands_help(entry, build, capsys, monkeypatch):
    out = run_help(capsys, monkeypatch, entry, ["--help"])
    assert "--version" in out and "(default: /tmp/output_" in out
    assert_help_complete(build().prog, build(), out)


def test_serve_limit_defaults_in_the_help_are_the_servers():
    from cxrlab.serve_limits import ServeLimits

    limits, serve = ServeLimits(), commands()["serve"]
    shown = {a.dest: a.help for a in serve._actions}
    for dest, value in [("max_upload_mb", limits.max_upload_bytes / 2**20),
                        ("max_request_mb", limits.max_request_bytes / 2**20),
                        ("max_decode_mb", limits.max_decode_bytes / 2**20),
                        ("decode_budget_mb", limits.decode_budget_bytes / 2**20),
                        ("request_timeout", limits.body_timeout_s)]:
        assert f"(default: {value:g}" in shown[dest], dest


@pytest.mark.parametrize("entry", [main, retrain_main, label_image_main])
def test_version(entry, capsys):
    assert entry(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"cxrlab {_version.__version__}"


def test_output_is_a_folder_on_every_command():
    for name, parser in commands().items():
        for action in parser._actions:
            if "--output" in action.option_strings:
                assert action.help.startswith("folder for "), name
                assert "-o" in action.option_strings and action.metavar == "DIR", name


def _with_option(name: str, option: str, value) -> list[str]:
    """A command line of `name` that parses: its required positionals and options filled in."""
    argv = [name, option] + ([] if value is None else [value])
    required = {"predict": ["-m", "m", "x.png"], "evaluate": ["-m", "m", "d"], "site-shift": ["-m", "m", "d"],
                "ood-check": ["-m", "m", "x.png"], "explain": ["-m", "m", "x.png"], "serve": ["-m", "m"],
                "cv": ["d"], "compare": ["a"], "datasets": ["download", "shenzhen", "d"], "adapt": ["-m", "m", "d"],
                "dicom-listen": ["-m", "m", "--send-to", "PACS@h:104"], "audit": ["a.db"]}
    if name in ("explain", "adapt") and option != "--output":
        argv += ["-o", "out"]
    return argv + required.get(name, [])


CASES = [(name, opt, value) for name in COMMANDS for opt, value in SHARED.items()
         if any(opt in a.option_strings for a in commands()[name]._actions)]


@pytest.mark.parametrize("name,option,value", CASES)
def test_snake_and_kebab_spellings_parse_alike(name, option, value):
    snake = "--" + option[2:].replace("-", "_")
    kebab = build_parser().parse_args(_with_option(name, option, value))
    tutorial = build_parser().parse_args(_with_option(name, snake, value))
    assert vars(kebab) == vars(tutorial)
    assert vars(kebab) != vars(build_parser().parse_args(_with_option(name, "--debug", None)))


def test_every_multi_word_option_has_both_spellings():
    for name, parser in commands().items():
        for action in parser._actions:
            longs = [s for s in action.option_strings if s.startswith("--")]
            if any("-" in s[2:] or "_" in s[2:] for s in longs):
                spellings = {s.replace("_", "-") for s in longs}
                assert len(longs) == 2 * len(spellings), f"{name}: {longs}"


def test_short_spellings_still_work():
    a = build_parser().parse_args(["predict", "-m", "model", "x.png"])
    assert a.model == "model"
    a = build_parser().parse_args(["train", "lungs", "-o", "out", "-q"])
    assert (a.output, a.quiet, a.image_dir_pos) == ("out", True, ["lungs"])  # one folder per site
    a = build_parser().parse_args(["predict", "--top", "3", "-m", "m", "x.png"])  # a unique abbreviation
    assert a.top_k == 3


@pytest.mark.parametrize("argv", [["--debug", "cv", "d"], ["cv", "--debug", "d"], ["cv", "d", "--debug"]])
def test_debug_in_any_position(argv):
    assert build_parser().parse_args(argv).debug is True
    assert build_parser().parse_args([a for a in argv if a != "--debug"]).debug is False


def test_defaults_are_the_library_constants():
    t, ft = TrainOptions(), FineTuneOptions()
    train = build_parser().parse_args(["train", "lungs"])
    for field in ("backbone", "testing_percentage", "validation_percentage", "solver", "how_many_training_steps",
                  "learning_rate", "train_batch_size", "eval_step_interval", "validation_batch_size",
                  "test_batch_size", "positive_label", "operating_point", "random_crop", "random_scale",
                  "random_brightness", "precision", "workers", "batch_size", "seed"):
        assert getattr(train, field) == getattr(t, field), field
    assert train.epochs == ft.epochs
    assert train.ray_device == t.ray_device == inspect.signature(cross_validate).parameters["ray_device"].default
    assert t.backbone == DEFAULT_BACKBONE
    cv = build_parser().parse_args(["cv", "lungs"])
    signature = inspect.signature(cross_validate).parameters
    assert (cv.folds, cv.backbone, cv.epochs) == (DEFAULT_FOLDS, DEFAULT_BACKBONE, ft.epochs)
    for field in ("positive_label", "seed", "precision"):
        assert getattr(cv, field) == signature[field].default, field
