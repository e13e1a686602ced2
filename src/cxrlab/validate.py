"""Checks of option values and paths, done before any image is read.

Each rule is used twice: as an argparse ``type`` (so that ``--help`` and the messages agree) and by
the library functions (``train``, ``cross_validate``, ``evaluate``) on their own arguments, so that a
Python caller gets the same one-line ``DataError`` before any discovery, embedding or fitting.
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import tempfile
from pathlib import Path

from .checks import option_message, check_choice, check_float, check_int
from .errors import DataError
from .runtime import RUNTIMES, TRAIN_PRECISIONS as PRECISIONS
from .runtime import RAY_DEVICES

SEED_MAX = 2**32 - 1  # numpy and scikit-learn accept seeds in [0, 2**32)
MIN_FREE_BYTES = 1  # an output on a device with no free byte at all fails up front


def check_percentages(validation_percentage, testing_percentage) -> None:
    v = check_float("--validation-percentage", validation_percentage, 0, 100, hi_open=True)
    t = check_float("--testing-percentage", testing_percentage, 0, 100, hi_open=True)
    if v + t >= 100:
        raise DataError(f"--validation-percentage {v:g} and --testing-percentage {t:g} add up to {v + t:g}; "
                        "they must add up to less than 100 so that some images are left to train on")


def check_regex(name: str, pattern: str | None) -> None:
    if pattern is None:
        return
    if not isinstance(pattern, str):
        raise DataError(option_message(name, f"must be a regular expression, got {pattern!r}"))
    try:
        re.compile(pattern)
    except re.error as exc:
        raise DataError(option_message(name, f"is not a valid regular expression ({exc})")) from None


def check_seed(value) -> int:
    return check_int("--seed", value, 0, SEED_MAX)


# ------------------------------------------------------------------ argparse types (the same rules)
def _argtype(check, name: str):
    def parse(text: str):
        try:
            return check(text)
        except DataError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = name
    return parse


positive_int = _argtype(lambda t: check_int("", t, 1), "positive_int")
non_negative_int = _argtype(lambda t: check_int("", t, 0), "non_negative_int")
batch_or_all = _argtype(lambda t: check_int("", t, 1, special=(-1,), special_text="or -1 for all"), "batch_or_all")
seed = _argtype(lambda t: check_int("", t, 0, SEED_MAX), "seed")
port = _argtype(lambda t: check_int("", t, 1, 65535), "port")
folds = _argtype(lambda t: check_int("", t, 2), "folds")
positive_float = _argtype(lambda t: check_float("", t, 0, lo_open=True), "positive_float")
fraction = _argtype(lambda t: check_float("", t, 0, 1), "fraction")
percentage = _argtype(lambda t: check_float("", t, 0, 100, hi_open=True), "percentage")  # a split share
percentage_0_100 = _argtype(lambda t: check_float("", t, 0, 100), "percentage_0_100")  # a distortion amount


def _operating_point(text: str) -> str:
    from .calibrate import parse_operating_point  # scipy: imported only when the option is given

    parse_operating_point(text)
    return text


operating_point = _argtype(_operating_point, "operating_point")
regex = _argtype(lambda t: check_regex("", t) or t, "regex")


# ------------------------------------------------------------------ names that are cheap to check
def check_backbone(name) -> str:
    """A registry name, or onnx:PATH of an existing file (read in full only later)."""
    from .backbones import REGISTRY, get_spec

    if not isinstance(name, str) or not name:
        raise DataError(f"--backbone must be a backbone name, got {name!r}")
    if name.startswith("onnx:"):
        path = Path(name[5:])
        if not path.is_file():
            missing = "" if path.exists() else " (it does not exist)"
            raise DataError(f"--backbone {name}: {path} is not a file{missing}")
        return name
    if name not in REGISTRY:
        try:
            get_spec(name)  # its message suggests the closest name
        except LookupError as exc:
            raise DataError(f"--backbone: {exc}") from None
    return name


# ------------------------------------------------------------------ paths
def as_path(name: str, path) -> Path:
    """``path`` as a Path, or DataError for what cannot be a file name (None, numbers, NUL bytes)."""
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
        raise DataError(option_message(name, f"must be a file or folder name, got {path!r}"))
    if "\x00" in str(path):
        raise DataError(option_message(name, f"{str(path)!r}: a file name cannot contain a NUL character"))
    return Path(path)


def check_existing_dir(name: str, path) -> Path:
    p = as_path(name, path)
    if not p.exists():
        raise DataError(option_message(name, f"{p}: no such folder"))
    if not p.is_dir():
        raise DataError(option_message(name, f"{p}: is a file, not a folder"))
    if not os.access(p, os.R_OK | os.X_OK):
        raise DataError(option_message(name, f"{p}: permission denied (cannot list the folder)"))
    return p


def check_image_inputs(name: str, inputs) -> list[Path]:
    """One image folder, or several (one per site); a CSV file (path,label[,site]) may stand for a folder."""
    many = inputs if isinstance(inputs, (list, tuple)) else [inputs]
    if not many:
        raise DataError(option_message(name, "give at least one image folder"))
    out = []
    for item in many:
        p = as_path(name, item)
        out.append(check_existing_file(name, p) if p.suffix.lower() == ".csv" and not p.is_dir()
                   else check_existing_dir(name, p))
    return out


def check_existing_file(name: str, path) -> Path:
    p = as_path(name, path)
    if not p.exists():
        raise DataError(option_message(name, f"{p}: no such file"))
    if p.is_dir():
        raise DataError(option_message(name, f"{p}: is a folder, not a file"))
    if not os.access(p, os.R_OK):
        raise DataError(option_message(name, f"{p}: permission denied"))
    return p


def _first_existing(p: Path) -> Path:
    p = Path(os.path.abspath(p))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _writable_problem(folder: Path) -> str | None:
    """Why nothing can be created in the existing folder ``folder``, or None.

    A real probe (an empty folder made and removed, as the atomic writers do) rather than os.access
    alone: root passes access() on mounts it still cannot write (/proc, some network file systems).
    """
    if not folder.is_dir():
        return f"{folder}: is a file, not a folder"
    try:
        os.rmdir(tempfile.mkdtemp(dir=folder, prefix=".cxrlab-write-test-"))
    except OSError as exc:
        cause = {errno.EROFS: "read-only file system", errno.ENOSPC: "no space left on the device",
                 errno.EDQUOT: "disk quota exceeded"}.get(exc.errno, "permission denied")
        return f"{folder}: {cause}"
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    free = (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize
    if st.f_blocks and free < MIN_FREE_BYTES:  # f_blocks 0: a pseudo file system that reports no sizes
        return f"{folder}: no space left on the device"
    return None


def check_writable_dir(name: str, path) -> Path:
    """A folder that can be created or written: writable, on a file system that is not read-only or full.

    Whether an existing path may be used at all (a user's file or folder, the data itself) is the output
    rule's question, asked by cxrlab.outputs with the inputs in hand; this only probes the file system."""
    p = as_path(name, path)
    if p.exists() and not p.is_dir():
        return p  # refused by cxrlab.outputs, which names the file and says why
    problem = _writable_problem(_first_existing(Path(os.path.abspath(p))))
    if problem:
        raise DataError(option_message(name, problem))
    return p


def check_output_file(name: str, path) -> Path:
    """A file that can be (over)written: not a folder, its folder creatable and writable."""
    p = as_path(name, path)
    if p.is_dir():
        raise DataError(option_message(name, f"{p}: is a folder; give a file name"))
    if p.exists() and not os.access(p, os.W_OK):
        raise DataError(option_message(name, f"{p}: permission denied"))
    problem = _writable_problem(_first_existing(Path(os.path.abspath(p)).parent))
    if problem:
        raise DataError(option_message(name, problem))
    return p


def _listing(p: Path):
    try:
        return os.scandir(p)
    except OSError as exc:
        raise DataError(f"{p}: {exc.strerror}") from None


# ------------------------------------------------------------------ whole calls
def train_arguments(*, image_dir, output, backbone, bottleneck_dir, label_from_name, group_regex, split_file,
                    testing_percentage, validation_percentage, solver, how_many_training_steps, learning_rate,
                    train_batch_size, eval_step_interval, validation_batch_size, test_batch_size, positive_label,
                    operating_point, calibration, random_crop, random_scale, random_brightness, distortion_copies,
                    seed, fine_tune, epochs, fine_tune_options, summaries_dir, precision, workers, batch_size,
                    runtime="auto", ray_device="auto", **_callbacks_and_flags) -> None:
    """Every argument of :func:`cxrlab.training.train` that can be wrong, checked before any work."""
    from .calibrate import parse_operating_point

    check_image_inputs("IMAGE_DIR", image_dir)
    check_backbone(backbone)
    check_choice("--solver", solver, ("lbfgs", "sgd"))
    check_choice("--precision", precision, PRECISIONS)
    check_choice("--runtime", runtime, RUNTIMES)
    if calibration not in ("auto", "temperature", "platt", "none"):
        raise DataError(f"unknown calibration {calibration!r}; use auto, temperature, platt or none")
    check_percentages(validation_percentage, testing_percentage)
    check_int("--how-many-training-steps", how_many_training_steps, 1)
    check_float("--learning-rate", learning_rate, 0, lo_open=True)
    for flag, value in (("--train-batch-size", train_batch_size), ("--validation-batch-size", validation_batch_size),
                        ("--test-batch-size", test_batch_size)):
        check_int(flag, value, 1, special=(-1,), special_text="or -1 for all")
    check_int("--eval-step-interval", eval_step_interval, 1)
    for flag, value in (("--random-crop", random_crop), ("--random-scale", random_scale),
                        ("--random-brightness", random_brightness)):
        check_float(flag, value, 0, 100)
    check_int("distortion_copies", distortion_copies, 1)
    check_seed(seed)
    check_int("--batch-size", batch_size, 1)
    if workers is not None:
        check_int("--workers", workers, 1)
    check_choice("--ray-device", ray_device, RAY_DEVICES)
    parse_operating_point(operating_point)
    if positive_label is not None and (not isinstance(positive_label, str) or not positive_label):
        raise DataError(f"--positive-label must be a class name, got {positive_label!r}")
    check_regex("--group-regex", group_regex)
    if label_from_name is not None and not isinstance(label_from_name, str):
        raise DataError(f"--label-from-name must be 'nlm' or a regular expression, got {label_from_name!r}")
    if split_file is not None:
        _check_split_file(split_file)
    if fine_tune not in (None, True, False):
        raise DataError(f"fine_tune must be True, False or None (the default recipe), got {fine_tune!r}")
    if fine_tune is not False:  # None: the default recipe fine-tunes where the backbone can be
        _check_fine_tune(backbone, fine_tune_options, epochs, required=bool(fine_tune))
    if bottleneck_dir is not None:
        check_writable_dir("--bottleneck-dir", bottleneck_dir)
    if summaries_dir is not None:
        check_writable_dir("--summaries-dir", summaries_dir)
    check_writable_dir("--output", output if output is not None else "runs")


def _check_fine_tune(backbone: str, fine_tune_options, epochs: int | None, required: bool = True) -> None:
    from .finetune import FineTuneOptions

    if epochs is not None:
        check_int("--epochs", epochs, 1)
    if required and backbone.startswith("onnx:"):
        raise DataError(f"--fine-tune needs a registry backbone with torch weights, not {backbone}; "
                        "drop --fine-tune or use e.g. --backbone efficientnet-lite0")
    options = fine_tune_options or (FineTuneOptions() if epochs is None else FineTuneOptions(epochs=epochs))
    if not isinstance(options, FineTuneOptions):
        raise DataError(f"fine_tune_options must be a FineTuneOptions, got {type(options).__name__}")
    options.validate()


def _check_split_file(split_file) -> None:
    from .split import Manifest

    check_existing_file("--split-file", split_file)
    try:
        Manifest.read(split_file)  # a few kB of CSV: its columns and splits are checked now, not after discovery
    except UnicodeDecodeError as exc:
        raise DataError(f"--split-file {split_file}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def cv_arguments(*, image_dir, folds, backbone, group_regex, positive_label, operating_point, bottleneck_dir, seed,
                 precision, fine_tune=False, fine_tune_options=None, runtime="auto", **_rest) -> None:
    """Every argument of :func:`cxrlab.crossval.cross_validate` that can be wrong, checked before any work."""
    from .calibrate import parse_operating_point

    check_image_inputs("IMAGE_DIR", image_dir)
    check_int("--folds", folds, 2)
    check_backbone(backbone)
    check_regex("--group-regex", group_regex)
    if not isinstance(positive_label, str) or not positive_label:
        raise DataError(f"--positive-label must be a class name, got {positive_label!r}")
    parse_operating_point(operating_point)
    check_seed(seed)
    check_choice("--precision", precision, PRECISIONS)
    check_choice("--runtime", runtime, RUNTIMES)
    if fine_tune is not False:
        _check_fine_tune(backbone, fine_tune_options, epochs=None, required=bool(fine_tune))
    if bottleneck_dir is not None:
        check_writable_dir("--bottleneck-dir", bottleneck_dir)


def check_folds(folds: int, groups_by_label: dict[str, set]) -> None:
    """Every class needs at least one group (patient, or image) per fold, or some folds cannot be scored."""
    for label, groups in sorted(groups_by_label.items()):
        if len(groups) < folds:
            raise DataError(f"--folds {folds}: class '{label}' has only {len(groups)} usable image(s) or patient "
                            f"group(s), fewer than the folds; use --folds {max(2, len(groups))} or fewer")


def evaluate_arguments(*, data_dir, label_from_name, output, **_rest) -> None:
    """The arguments of :func:`cxrlab.evaluate.evaluate` that can be wrong, checked before any image is read."""
    check_existing_dir("DATA", data_dir)
    if label_from_name is not None and not isinstance(label_from_name, str):
        raise DataError(f"--label-from-name must be 'nlm' or a regular expression, got {label_from_name!r}")
    if output is not None:
        check_writable_dir("--output", output)
