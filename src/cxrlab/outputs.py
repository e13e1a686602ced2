"""Where cxrlab may write: never over, around or inside the user's data.

Every folder cxrlab writes into carries ``.cxrlab-output``, a small JSON file naming the command that
made it and, for each file it holds, the command that wrote it. The rules, checked before any work
starts and again just before writing:

* no output equals, contains or lies inside an input (an image folder, the model read): heatmaps
  written over the X-rays, or a folder that becomes a new class at the next train, are refused;
* an existing folder is reused only when it is empty, a model directory (``cxrlab.json``) or marked;
  an existing file where a folder is expected is refused (writing there would hide it);
* inside a reused folder a file is replaced only when the same command wrote it;
* a folder is replaced as a whole (train's model directory) only when everything in it is cxrlab's;
* a dataset laid out by ``cxrlab datasets`` is data: no other command writes into or inside it, nor
  inside a folder whose subfolders are named like the classes (a new folder there becomes a class).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from ._version import __version__
from .errors import DataError
from .fsutil import atomic_write_bytes

MARKER = ".cxrlab-output"
MODEL_INFO = "cxrlab.json"
REPORT_FILES = ("metrics.json", "predictions.csv", "report.html")  # an evaluation (report.write_evaluation)
RUN_FILES = ("split.csv", *REPORT_FILES)  # a training run, besides the model files
MODEL_DOCS = ("MODEL_CARD.md", "evaluations.json")  # a model folder's documentation (see cxrlab.modelcard)
RUN_SUFFIX = ".run"  # `train --output M` writes the run's report, predictions and split into M.run/ beside M
DATASET_ENTRIES = (".downloads", "abnormal", "normal")
DATA_COMMANDS = frozenset({"datasets"})  # what they make is data, never an output folder of another command
_SHOWN = 3


class OutputError(DataError):
    """An output path that would overwrite, hide or delete the user's data, or mix outputs into it."""


@dataclass
class Made:
    """A folder cxrlab made: the command that made it and, per entry name, the command that wrote it."""

    command: str
    entries: dict[str, str]


def real_path(path: str | os.PathLike) -> Path:
    """Absolute, symlinks and '..' resolved; a symlink loop is left as is (Path.resolve raises on it)."""
    return Path(os.path.realpath(path))


def _some(names: list[str]) -> str:
    return ", ".join(names[:_SHOWN]) + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


def _json_dict(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _marker(folder: Path) -> Made | None:
    if not os.path.lexists(folder / MARKER):
        return None
    data = _json_dict(folder / MARKER) or {}  # cxrlab's name but unreadable: a cxrlab folder owning nothing
    entries = data.get("entries") if isinstance(data.get("entries"), dict) else {}
    return Made(str(data.get("command", "unknown")), {str(k): str(v) for k, v in entries.items()})


def _legacy(folder: Path) -> Made | None:
    """Folders known without the marker: a dataset layout (its .downloads/ folder, made first) or a
    model directory written before the marker existed."""
    if (folder / ".downloads").is_dir():
        return Made("datasets", {name: "datasets" for name in DATASET_ENTRIES})
    info = _json_dict(folder / MODEL_INFO)
    if info is None or "schema_version" not in info or not isinstance(info.get("files"), dict):
        return None
    names = [MODEL_INFO, *map(str, info["files"]), *MODEL_DOCS, *RUN_FILES]
    return Made("train", {name: "train" for name in names})


def run_dir_for(model_dir: str | os.PathLike) -> Path:
    """The run folder beside a model folder given as --output: ``models/tb`` -> ``models/tb.run``. The model
    folder holds what is deployed and nothing else: no patient image, no per-image prediction."""
    p = Path(model_dir)
    if p.name in ("", ".", ".."):
        p = Path(os.path.abspath(p))
    return p.with_name(p.name + RUN_SUFFIX)


def find_run_dir(model_dir: str | os.PathLike) -> Path | None:
    """Where the run files of a model folder are: beside it (``M.run/``), its parent (the default
    ``runs/<time>/model`` layout) or, for a model trained before the split, the model folder itself."""
    p = Path(model_dir)
    parent = made_by_cxrlab(p.parent) if p.parent.is_dir() else None
    holds_model = parent is not None and parent.command == "train" and p.name in parent.entries
    for candidate in (run_dir_for(p), p.parent if holds_model else None, p):
        if candidate is not None and any((candidate / name).is_file() for name in RUN_FILES):
            return candidate
    return None


def made_by_cxrlab(folder: str | os.PathLike) -> Made | None:
    """What cxrlab made ``folder`` for and which entries it wrote, or None if it is not a cxrlab folder."""
    folder = Path(folder)
    marker, legacy = _marker(folder), _legacy(folder)
    if marker is not None and legacy is not None and legacy.command != "datasets":
        legacy = None  # a marked model directory lists what it holds
    if marker is None and legacy is None:
        return None
    found = [m for m in (legacy, marker) if m is not None]
    command = "datasets" if any(m.command == "datasets" for m in found) else found[-1].command
    entries = {k: v for m in found for k, v in m.entries.items()}
    entries[MARKER] = command
    return Made(command, entries)


def _identity(path: Path, cache: dict) -> tuple[int, int] | None:
    if path not in cache:
        try:
            st = path.stat()
            cache[path] = (st.st_dev, st.st_ino)
        except OSError:
            cache[path] = None
    return cache[path]


def check_not_input(output: str | os.PathLike, inputs: Iterable, option: str = "--output", *,
                    allow_contains: bool = False) -> None:
    """Refuse an output that is, contains or lies inside one of ``inputs`` (symlinks and '..' resolved;
    the same folder under another spelling, e.g. on a case-insensitive disk, is caught by identity)."""
    out = real_path(output)
    ids: dict = {}
    out_id = _identity(out, ids)
    around = {i for i in (_identity(p, ids) for p in (out, *out.parents)) if i is not None}
    for given in inputs:
        if given is None:
            continue
        inp = real_path(given)
        inp_id = _identity(inp, ids)
        if out == inp or (out_id is not None and out_id == inp_id):
            raise OutputError(f"{option} {output} is the input {given} itself: cxrlab never writes over its "
                              "inputs. Choose a new folder outside your data.")
        if not allow_contains and (out in inp.parents or (out_id is not None and any(
                _identity(p, ids) == out_id for p in inp.parents))):
            raise OutputError(f"{option} {output} contains the input {given}: writing there could overwrite or "
                              "delete your data. Choose a new folder outside it.")
        if inp.is_dir() and (inp in out.parents or inp_id in around):
            raise OutputError(f"{option} {output} lies inside the input folder {given}: cxrlab never writes into "
                              "its inputs (a new folder there becomes a class at the next train). "
                              "Choose a folder outside it.")


def _dataset_above(real: Path) -> Path | None:
    for parent in real.parents:
        made = made_by_cxrlab(parent) if parent.is_dir() else None
        if made is not None and made.command in DATA_COMMANDS:
            return parent
    return None


def model_labels(model) -> list[str]:
    """The classes of a model (a Model or its folder), to recognise a folder of class subfolders."""
    if hasattr(model, "labels"):
        return list(model.labels)
    try:
        return (Path(model) / "labels.txt").read_text(encoding="utf-8").split()
    except (OSError, UnicodeDecodeError, TypeError):
        return []


def folder_classes(image_dir) -> list[str]:
    """The subfolder names of an image folder (its classes, as train will find them)."""
    try:
        return [e.name for e in os.scandir(image_dir) if e.is_dir() and not e.name.startswith(".")]
    except OSError:
        return []


def _check_not_in_data(path: Path, real: Path, classes, option: str) -> None:
    """Refuse an output inside a dataset cxrlab laid out or inside a folder whose subfolders are the
    classes: a folder there becomes a class, or its images training images, at the next train."""
    data = _dataset_above(real)
    if data is not None:
        raise OutputError(f"{option} {path} lies inside {data}, a dataset laid out by cxrlab datasets: a folder "
                          "there becomes a class at the next train. Choose a folder outside it.")
    classes = sorted(set(classes))
    for parent in real.parents if len(classes) >= 2 else ():
        found = [c for c in classes if (parent / c).is_dir()]
        if len(found) >= 2:
            shown = ", ".join(f"{c}/" for c in found[:_SHOWN])
            raise OutputError(f"{option} {path} lies inside {parent}, a folder of class subfolders ({shown}): a "
                              "folder there becomes a class, or its images training images, at the next train. "
                              "Choose a folder outside it.")


def _check_place(path: Path, real: Path, option: str) -> None:
    """The path does not exist yet: it must be creatable, under folders (not files) we may write to."""
    if os.path.lexists(path):
        raise OutputError(f"{option} {path} is a broken symbolic link; remove it or choose another {option}")
    above = next(p for p in real.parents if os.path.lexists(p))
    if not above.is_dir():
        raise OutputError(f"{option} {path}: {above} is a file, not a folder; choose another {option}")
    if not os.access(above, os.W_OK | os.X_OK):
        raise OutputError(f"{option} {path}: no permission to create it in {above}; choose another {option}")


def _check_existing(path: Path, real: Path, command: str, files, replace: bool, option: str) -> None:
    try:
        names = sorted(os.listdir(real))
    except OSError as exc:
        raise OutputError(f"{option} {path}: cannot read the folder ({exc.strerror})") from None
    if not os.access(real, os.W_OK | os.X_OK):
        raise OutputError(f"{option} {path}: no permission to write in this folder; choose another {option}")
    if not names:
        return
    made = made_by_cxrlab(real)
    if made is None:
        raise OutputError(f"{option} {path} is an existing folder that cxrlab did not make (it holds {_some(names)}): "
                          f"cxrlab writes only into a new, empty or cxrlab-made folder, so that it never "
                          f"overwrites or deletes your files. Choose another {option}.")
    if (made.command in DATA_COMMANDS or command in DATA_COMMANDS) and made.command != command:
        what = "a dataset laid out by cxrlab datasets" if made.command in DATA_COMMANDS else \
            f"the output of cxrlab {made.command}, not a dataset"
        raise OutputError(f"{option} {path} holds {what}; choose another {option}")
    if replace:
        foreign = [n for n in names if n not in made.entries and not (n.startswith(".") and n.endswith(".tmp"))]
        if foreign:
            raise OutputError(f"{option} {path} holds files cxrlab did not write ({_some(foreign)}); replacing the "
                              f"folder would delete them. Move them out or choose another {option}.")
        return
    for name in files:
        if os.path.lexists(real / name) and made.entries.get(name) != command:
            owner = made.entries.get(name)
            who = f"cxrlab {owner}" if owner else "someone other than cxrlab"
            raise OutputError(f"{option} {path}: {name} there was written by {who} and cxrlab {command} never "
                              f"overwrites it. Move it or choose another {option}.")


def check_output_dir(path: str | os.PathLike, command: str, *, inputs: Iterable = (), files: Iterable[str] = (),
                     replace: bool = False, classes: Iterable[str] = (), option: str = "--output") -> Path:
    """Refuse, before any work and without writing anything, an output folder where ``command`` would
    overwrite, hide or delete the user's data. ``files``: the names it will write there; ``replace``:
    the whole folder is replaced (train's model directory); ``classes``: the class names of the data
    (no output inside a folder whose subfolders bear them)."""
    path = Path(path)
    check_not_input(path, inputs, option)
    real = real_path(path)
    _check_not_in_data(path, real, classes, option)
    if not real.exists():
        _check_place(path, real, option)
    elif not real.is_dir():
        raise OutputError(f"{option} {path} is an existing file, not a folder: writing there would hide or "
                          f"replace it. Give a new or empty folder.")
    else:
        _check_existing(path, real, command, list(files), replace, option)
    return path


def marker_bytes(command: str, entries: dict[str, str]) -> bytes:
    body = {"cxrlab_output": 1, "command": command, "created_by": f"cxrlab {__version__}",
            "entries": dict(sorted(entries.items()))}
    return (json.dumps(body, indent=1) + "\n").encode("utf-8")


def claim(path: str | os.PathLike, command: str, *, files: Iterable[str] = (), inputs: Iterable = (),
          classes: Iterable[str] = (), option: str = "--output") -> Path:
    """Check again, create the folder if needed and record ``files`` as written by ``command`` in its
    marker, before they are written (so that a later run may replace them, and nothing else)."""
    files = list(files)
    path = check_output_dir(path, command, inputs=inputs, files=files, classes=classes, option=option)
    real = real_path(path)
    made = made_by_cxrlab(real) if real.is_dir() else None
    real.mkdir(parents=True, exist_ok=True)
    entries = {k: v for k, v in (made.entries if made else {}).items() if k != MARKER}
    wanted = {**entries, **{name: command for name in files}}
    if made is None or wanted != entries or _marker(real) is None:
        atomic_write_bytes(real / MARKER, marker_bytes(made.command if made else command, wanted))
    return path


def check_output_file(path: str | os.PathLike, option: str, *, inputs: Iterable = (),
                      written_by_cxrlab: Callable[[Path], bool]) -> Path:
    """An output file (retrain's --output_graph, --output_labels): an existing one is replaced only
    when ``written_by_cxrlab`` says cxrlab wrote it."""
    path = Path(path)
    check_not_input(path, inputs, option)
    real = real_path(path)
    _check_not_in_data(path, real, (), option)
    if not real.exists():
        _check_place(path, real, option)
    elif real.is_dir():
        raise OutputError(f"{option} {path} is a folder; give a file name")
    elif not written_by_cxrlab(real):
        raise OutputError(f"{option} {path} exists and was not written by cxrlab, which never overwrites it. "
                          f"Move it or choose another {option}.")
    return path
