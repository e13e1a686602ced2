"""Discover: image folders -> labelled samples (one class per subfolder, or a file-name rule), each image with
its site (hospital): one folder per site, or a CSV listing path, label and site."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .decode import looks_like_image_file
from .errors import DataError

MIN_IMAGES_PER_CLASS = 20
RENAME_HINT = "rename them to UTF-8 (e.g. convmv -f latin1 -t utf-8 -r --notest FOLDER)"

# The NLM TB sets (Shenzhen, Montgomery) encode the label in the name: CHNCXR_0327_1.png is abnormal.
NAME_RULES = {
    "nlm": (r"_(?P<label>[01])\.[A-Za-z0-9]+$", {"1": "abnormal", "0": "normal"}),
}


@dataclass(frozen=True)
class Sample:
    relpath: str  # POSIX path relative to the dataset's root
    label: str
    site: str = ""  # the hospital the image comes from (its site folder's name); "" for a single folder


@dataclass
class Dataset:
    root: Path  # every sample lies at root / relpath (the common folder of several sites)
    samples: list[Sample]
    labels: list[str]
    warnings: list[str] = field(default_factory=list)
    inputs: list[Path] = field(default_factory=list)  # the folders (or CSV) given: outputs must stay out of them

    def counts(self) -> dict[str, int]:
        out = {label: 0 for label in self.labels}
        for s in self.samples:
            out[s.label] += 1
        return out

    @property
    def sites(self) -> list[str]:
        return sorted({s.site for s in self.samples})

    def counts_by_site(self) -> dict[str, dict[str, int]]:
        out = {site: {label: 0 for label in self.labels} for site in self.sites}
        for s in self.samples:
            out[s.site][s.label] += 1
        return out


def walk_images(root: str | os.PathLike, *, follow_links: bool = True) -> Iterator[Path]:
    """Yield the image files under ``root`` in sorted order (folders sorted, then the files in each),
    skipping hidden files and folders. ``follow_links``: descend into linked folders too, except a
    link back to a folder already walked or to an ancestor (a loop); without it they are not entered."""
    seen_dirs = set()
    top = os.path.realpath(root)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=follow_links):
        real = os.path.realpath(dirpath)
        # A link to an ancestor ('up -> ..') is a loop that would list other classes' images under this one.
        if real in seen_dirs or (real != top and top.startswith(real.rstrip(os.sep) + os.sep)):
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if not name.startswith(".") and looks_like_image_file(path):
                yield path


def is_utf8_name(name: str) -> bool:
    """False for a name whose bytes are not UTF-8 (Python holds them as lone surrogates): it could
    not be written into the split file, report or predictions without corrupting them."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable_name(name: str) -> str:
    """A name for messages and files: undecodable bytes shown as \\xNN escapes."""
    return os.fsencode(name).decode("utf-8", "backslashreplace") if not is_utf8_name(name) else name


def _not_utf8_warning(names: list[str]) -> str:
    shown = ", ".join(printable_name(n) for n in names[:3]) + (", ..." if len(names) > 3 else "")
    return f"{len(names)} file(s) or folder(s) skipped because their names are not valid UTF-8 ({shown}); {RENAME_HINT}"


def _label_by_name(regex: re.Pattern, mapping: dict[str, str], name: str) -> str | None:
    m = regex.search(name)
    if not m:
        return None
    raw = m.group("label") if "label" in regex.groupindex else m.group(1)
    return mapping.get(raw, raw)


def parse_name_rule(rule: str, label_map: dict[str, str] | None = None):
    """Return (compiled regex, label map) for a preset name ('nlm') or a regex with a `label` group."""
    if rule in NAME_RULES:
        pattern, preset_map = NAME_RULES[rule]
        return re.compile(pattern), {**preset_map, **(label_map or {})}
    try:
        regex = re.compile(rule)
    except re.error as exc:
        raise DataError(f"--label-from-name: invalid regular expression {rule!r}: {exc}") from None
    if "label" not in regex.groupindex and regex.groups == 0:
        raise DataError(
            f"--label-from-name {rule!r} has no group: write the label part as (?P<label>...), "
            "or use the preset 'nlm' for the Shenzhen/Montgomery naming (_1 = abnormal, _0 = normal)."
        )
    return regex, dict(label_map or {})


def discover(
    root: str | os.PathLike,
    *,
    label_from_name: str | None = None,
    label_map: dict[str, str] | None = None,
    min_per_class: int = MIN_IMAGES_PER_CLASS,
    require_classes: int = 2,
) -> Dataset:
    """Find the labelled images under ``root``.

    Without ``label_from_name`` each direct subfolder is a class and every image below it
    (at any depth) belongs to it. With it, every image under root is labelled by the regex
    (or the preset ``'nlm'``) applied to its file name; files that do not match are ignored.
    """
    root = Path(root)
    shown = printable_name(str(root))
    if not root.is_dir():
        raise DataError(f"{shown}: not a folder. Give the folder that holds one subfolder per class.")
    warnings: list[str] = []
    not_utf8: list[str] = []
    if label_from_name:
        regex, mapping = parse_name_rule(label_from_name, label_map)
        candidates = [(path, _label_by_name(regex, mapping, path.name)) for path in walk_images(root)]
        unmatched = sum(label is None for _, label in candidates)
        if unmatched:
            warnings.append(f"{unmatched} image(s) under {shown} did not match --label-from-name and were ignored")
    else:
        class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        not_utf8 += [d.name + "/" for d in class_dirs if not is_utf8_name(d.name)]
        class_dirs = [d for d in class_dirs if is_utf8_name(d.name)]
        candidates = [(path, d.name) for d in class_dirs for path in walk_images(d)]
    samples: list[Sample] = []
    for path, label in candidates:
        relpath = path.relative_to(root).as_posix()
        if label is None:
            continue
        if is_utf8_name(relpath):
            samples.append(Sample(relpath, label))
        else:
            not_utf8.append(relpath)
    if not label_from_name:
        empty = [d.name for d in class_dirs if not any(s.label == d.name for s in samples)]
        if empty:
            warnings.append(f"class folder(s) with no images ignored: {', '.join(empty)}")
    if not_utf8:
        warnings.append(_not_utf8_warning(not_utf8))
    labels = sorted({s.label for s in samples})
    if len(labels) < require_classes:
        found = ", ".join(f"{label}/" for label in labels) or "none"
        raise DataError(
            f"{shown}: found {len(labels)} class(es) with images ({found}); training needs at least "
            f"{require_classes}. Put each class in its own subfolder, or use --label-from-name."
        )
    dataset = Dataset(root, samples, labels, warnings, [root])
    for label, n in dataset.counts().items():
        if n < min_per_class:
            warnings.append(f"class '{label}' has only {n} image(s); at least {min_per_class} are recommended")
    return dataset


def discover_sites(
    inputs,
    *,
    label_from_name: str | None = None,
    label_map: dict[str, str] | None = None,
    min_per_class: int = MIN_IMAGES_PER_CLASS,
) -> Dataset:
    """The labelled images of one or more sites: each input a folder (one site, laid out as ``discover``
    expects) or a CSV file with columns ``path,label[,site]`` (paths relative to the CSV's folder).

    One folder gives exactly ``discover(folder)``. Several inputs are joined under their common folder: relpaths
    then start with the site folder (``shenzhen/abnormal/x.png``), and every sample keeps its site's name.
    """
    inputs = [Path(p) for p in ([inputs] if isinstance(inputs, (str, os.PathLike)) else inputs)]
    if not inputs:
        raise DataError("give at least one image folder (one per site) or a CSV file")
    if len(inputs) == 1 and not _is_csv(inputs[0]):
        return discover(inputs[0], label_from_name=label_from_name, label_map=label_map, min_per_class=min_per_class)
    shown = [printable_name(str(p)) for p in inputs]
    if len(set(os.path.realpath(p) for p in inputs)) < len(inputs):
        raise DataError(f"the same folder is given twice among {', '.join(shown)}")
    parts: list[tuple[Path, list[tuple[Path, str, str]], list[str]]] = []
    for path in inputs:
        if _is_csv(path):
            parts.append((path, *_read_csv(path, label_map)))
            continue
        ds = discover(path, label_from_name=label_from_name, label_map=label_map, min_per_class=0, require_classes=1)
        parts.append((path, [(path / s.relpath, s.label, path.resolve().name) for s in ds.samples], ds.warnings))
    files = [f for _, rows, _ in parts for f, _, _ in rows]
    root = Path(os.path.commonpath([os.path.abspath(f.parent) for f in files])) if files else Path(".")
    samples, warnings = [], []
    for path, rows, notes in parts:
        warnings += [f"{printable_name(str(path))}: {n}" for n in notes]
        samples += [Sample(Path(os.path.abspath(f)).relative_to(root).as_posix(), label, site)
                    for f, label, site in rows]
    _check_site_names(samples, inputs)
    labels = sorted({s.label for s in samples})
    if len(labels) < 2:
        raise DataError(f"{', '.join(shown)}: found {len(labels)} class(es) with images in all sites together; "
                        "training needs at least 2")
    dataset = Dataset(root, samples, labels, warnings, inputs)
    for site, counts in dataset.counts_by_site().items():
        missing = [label for label, n in counts.items() if n == 0]
        if missing:
            warnings.append(f"site '{site}' has no '{', '.join(missing)}' images: its figures will be partial")
    for label, n in dataset.counts().items():
        if n < min_per_class:
            warnings.append(f"class '{label}' has only {n} image(s); at least {min_per_class} are recommended")
    return dataset


def _is_csv(path: Path) -> bool:
    return path.suffix.lower() == ".csv" and path.is_file()


def _read_csv(path: Path, label_map: dict[str, str] | None) -> tuple[list[tuple[Path, str, str]], list[str]]:
    """(file, label, site) rows of a CSV with columns path,label[,site]; missing files are reported, not fatal."""
    import csv

    shown = printable_name(str(path))
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{shown}: cannot read the image list ({exc})") from None
    if not rows or not {"path", "label"} <= set(rows[0]):
        raise DataError(f"{shown}: an image list needs a header with columns path,label (and optionally site)")
    out, missing = [], []
    for i, row in enumerate(rows, start=2):
        rel, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
        if not rel or not label:
            raise DataError(f"{shown}, line {i}: empty path or label")
        file = (path.parent / rel) if not os.path.isabs(rel) else Path(rel)
        if not file.is_file():
            missing.append(rel)
            continue
        site = (row.get("site") or "").strip() or path.stem
        out.append((file, (label_map or {}).get(label, label), site))
    notes = [f"{len(missing)} listed file(s) not found and left out (e.g. {printable_name(missing[0])})"] if missing else []
    return out, notes


def _check_site_names(samples: list[Sample], inputs: list[Path]) -> None:
    """Two site folders of the same name (a/lungs, b/lungs) would merge in the per-site figures."""
    folders = [p for p in inputs if not _is_csv(p)]
    names = [p.resolve().name for p in folders]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise DataError(f"two site folders are both named '{twice[0]}'; per-site figures need distinct names "
                        "(rename one, or list the images in a CSV with a site column)")
