"""Split: samples -> train/validation/test by a stable hash of the group key; CSV manifest."""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

from .discover import Sample, printable_name
from .errors import DataError

SPLITS = ("train", "validation", "test")
_MAX_PER_CLASS = 2**27 - 1  # the tutorial's MAX_NUM_IMAGES_PER_CLASS
MANIFEST_FIELDS = ("relpath", "label", "group", "split", "site")
_OPTIONAL_FIELDS = ("site",)  # split files written before sites were recorded lack it


@dataclass(frozen=True)
class Entry:
    relpath: str
    label: str
    group: str
    split: str
    site: str = ""


def group_key(relpath: str, group_regex: str | re.Pattern | None = None) -> str:
    """The key hashed for the split: same key, same split.

    Default is the tutorial's rule: anything after ``_nohash_`` in the file name is ignored, so
    ``a/p1_nohash_0.jpg`` and ``a/p1_nohash_1.jpg`` stay together. A ``group_regex`` (searched
    in the relative path; its ``group`` group or first group, else the whole match) groups by
    patient across class folders.
    """
    if group_regex is not None:
        regex = re.compile(group_regex) if isinstance(group_regex, str) else group_regex
        m = regex.search(relpath)
        if m:
            if "group" in regex.groupindex:
                return m.group("group")
            return m.group(1) if regex.groups else m.group(0)
    head, _, name = relpath.rpartition("/")
    stem = re.sub(r"_nohash_.*$", "", name)
    return f"{head}/{stem}" if head else stem


def assign_split(key: str, *, validation_percentage: float, testing_percentage: float) -> str:
    """The tutorial's which_set(), on a key that does not depend on where the folder lives."""
    # surrogateescape: a name that is not UTF-8 hashes as its bytes instead of raising.
    h = int(hashlib.sha1(key.encode("utf-8", "surrogateescape")).hexdigest(), 16)
    percentage = (h % (_MAX_PER_CLASS + 1)) * (100.0 / _MAX_PER_CLASS)
    if percentage < validation_percentage:
        return "validation"
    if percentage < validation_percentage + testing_percentage:
        return "test"
    return "train"


@dataclass
class Manifest:
    entries: list[Entry]

    def subset(self, split: str) -> list[Entry]:
        return [e for e in self.entries if e.split == split]

    def counts(self) -> dict[str, int]:
        return {s: sum(e.split == s for e in self.entries) for s in SPLITS}

    def to_csv(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(MANIFEST_FIELDS)
        for e in sorted(self.entries, key=lambda e: e.relpath):
            writer.writerow([printable_name(e.relpath), printable_name(e.label), printable_name(e.group), e.split,
                             printable_name(e.site)])
        return buf.getvalue()

    def digest(self) -> str:
        return hashlib.sha256(self.to_csv().encode("utf-8")).hexdigest()

    def write(self, path: str | os.PathLike) -> None:
        from .fsutil import atomic_write_bytes

        atomic_write_bytes(Path(path), self.to_csv().encode("utf-8"))

    @classmethod
    def read(cls, path: str | os.PathLike) -> "Manifest":
        shown = printable_name(os.fspath(path))
        try:
            with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's BOM
                rows = list(csv.reader(f))
        except OSError as exc:
            raise DataError(f"{shown}: cannot read split file: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:
            raise DataError(f"{shown}: split file is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
        except csv.Error as exc:
            raise DataError(f"{shown}: not a cxrlab split file ({exc})") from None
        header = rows[0] if rows else []
        if rows and set(MANIFEST_FIELDS) - set(_OPTIONAL_FIELDS) - set(header):
            raise DataError(f"{shown}: not a cxrlab split file; expected columns {', '.join(MANIFEST_FIELDS)}")
        column = {name: header.index(name) for name in MANIFEST_FIELDS if name in header} if rows else {}
        entries = []
        for i, row in enumerate(rows[1:], start=2):
            if not row:
                continue
            if len(row) < len(header):
                raise DataError(f"{shown}, line {i}: {len(row)} column(s), expected {len(header)}")
            relpath, label, group, split, site = (row[column[name]] if name in column else ""
                                                  for name in MANIFEST_FIELDS)
            if split not in SPLITS:
                raise DataError(f"{shown}, line {i}: split {split!r} is not one of {', '.join(SPLITS)}")
            entries.append(Entry(relpath, label, group, split, site))
        return cls(entries)


def split_samples(
    samples: list[Sample],
    *,
    validation_percentage: float = 10.0,
    testing_percentage: float = 10.0,
    group_regex: str | None = None,
    previous: Manifest | None = None,
) -> tuple[Manifest, list[str]]:
    """Assign every sample to a split; samples listed in ``previous`` keep their split. The split hashes each
    image's group key, so every site is split in the same proportions (within each site, not across them).

    Returns the manifest and notes (e.g. images of the split file that are no longer on disk).
    """
    if not 0 <= validation_percentage < 100 or not 0 <= testing_percentage < 100 or (
        validation_percentage + testing_percentage >= 100
    ):
        raise DataError("validation and testing percentages must be >= 0 and add up to less than 100")
    regex = re.compile(group_regex) if group_regex else None
    known = {e.relpath: e for e in previous.entries} if previous else {}
    entries, notes = [], []
    for s in samples:
        old = known.get(s.relpath)
        if old is not None:
            if old.label != s.label:
                raise DataError(
                    f"{s.relpath}: labelled '{s.label}' on disk but '{old.label}' in the split file; "
                    "fix the folder or drop --split-file"
                )
            entries.append(replace(old, site=s.site))
            continue
        key = group_key(s.relpath, regex)
        split = assign_split(key, validation_percentage=validation_percentage, testing_percentage=testing_percentage)
        entries.append(Entry(s.relpath, s.label, key, split, s.site))
    if previous:
        on_disk = {s.relpath for s in samples}
        missing = [r for r in known if r not in on_disk]
        if missing:
            notes.append(f"{len(missing)} image(s) of the split file are not on disk any more (e.g. {missing[0]})")
        added = sum(s.relpath not in known for s in samples)
        if added:
            notes.append(f"{added} new image(s) not in the split file were assigned by hash")
    return Manifest(entries), notes


def assign_folds(groups, labels, k: int, seed: int = 0) -> "np.ndarray":
    """Fold index (0..k-1) of every sample: patient groups stay whole, classes are balanced across folds
    (scikit-learn's StratifiedGroupKFold, shuffled with ``seed``; same inputs, same folds)."""
    import warnings

    import numpy as np
    from sklearn.model_selection import StratifiedGroupKFold

    groups, labels = list(groups), np.asarray(labels)
    n_groups = len(set(groups))
    if k < 2 or n_groups < k:
        raise DataError(f"{k} folds need at least {k} patient groups and k >= 2 (found {n_groups} group(s))")
    fold = np.zeros(len(groups), dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # "least populated class has only n members": fine for group folds
        warnings.simplefilter("ignore", UserWarning)
        for f, (_, held) in enumerate(splitter.split(np.zeros(len(groups)), labels, groups)):
            fold[held] = f
    return fold
