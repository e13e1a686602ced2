"""Download, checksum and lay out the NLM tuberculosis chest X-ray sets.

Jaeger S. et al., "Two public chest X-ray datasets for computer-aided screening of
pulmonary diseases", Quant Imaging Med Surg 2014;4(6):475-477.

``download(name, dest)`` leaves ``dest/abnormal/*.png`` and ``dest/normal/*.png`` (the
``_1`` / ``_0`` suffix of the file stem decides), with the archive kept in
``dest/.downloads/``. The SHA-256 digests of the official archives are not known to us, so
the registry stores ``sha256=None``: the first download records the digest it computed in
``<archive>.sha256`` and every later run checks the archive against that record. A digest
given by the caller (or later added to the registry) is checked instead. Nothing is printed;
anything worth telling the user is returned in ``DownloadResult.notes``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from .errors import CxrlabError, DataError
from .progress import resolve

LABELS = ("abnormal", "normal")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DEFAULT_RULE = r"_(?P<label>[01])$"
DEFAULT_MAP = {"1": "abnormal", "0": "normal"}
_CHUNK = 1 << 20
_NLM = "https://data.lhncbc.nlm.nih.gov/public/Tuberculosis-Chest-X-ray-Datasets"
_CITATION = ("Jaeger S, Candemir S, Antani S, Wang YX, Lu PX, Thoma G. Two public chest X-ray "
             "datasets for computer-aided screening of pulmonary diseases. Quant Imaging Med "
             "Surg. 2014;4(6):475-477.")
_LICENSE = ("Public release by the U.S. National Library of Medicine; cite the paper above and "
            "check the NLM terms of use before redistributing.")


class DownloadError(CxrlabError):
    """An archive could not be fetched, or its SHA-256 digest did not match."""


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    urls: tuple[str, ...]
    archive_name: str
    sha256: str | None          # None: unknown to us; recorded on first download
    label_rule: str = DEFAULT_RULE
    label_map: dict = field(default_factory=lambda: dict(DEFAULT_MAP))
    expected_counts: dict = field(default_factory=dict)
    citation: str = _CITATION
    license_note: str = _LICENSE


def _nlm_set(name: str, folder: str, archive: str, counts: dict) -> DatasetInfo:
    """An NLM set: the archive under ``folder`` of the NLM site, with the Open-i collection as the mirror."""
    urls = (f"{_NLM}/{folder}/{archive}", f"http://openi.nlm.nih.gov/imgs/collections/{archive}")
    return DatasetInfo(name=name, urls=urls, archive_name=archive, sha256=None, expected_counts=counts)


DATASETS: dict[str, DatasetInfo] = {
    "shenzhen": _nlm_set("shenzhen", "Shenzhen-Hospital-CXR-Set", "ChinaSet_AllFiles.zip",
                         {"abnormal": 336, "normal": 326}),
    "montgomery": _nlm_set("montgomery", "Montgomery-County-CXR-Set/MontgomerySet", "NLM-MontgomeryCXRSet.zip",
                           {"abnormal": 58, "normal": 80}),
}


@dataclass
class DownloadResult:
    dest: Path
    archive: Path
    sha256: str
    counts: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)


def get_info(name: str) -> DatasetInfo:
    try:
        return DATASETS[name.lower()]
    except KeyError:
        raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}") from None


def label_from_name(stem: str, rule: str | DatasetInfo = DEFAULT_RULE,
                    label_map: dict | None = None) -> str | None:
    """The label of a file stem ('CHNCXR_0001_1' -> 'abnormal'), or None if the rule does not match."""
    if isinstance(rule, DatasetInfo):
        rule, label_map = rule.label_rule, label_map or rule.label_map
    m = re.search(rule, stem)
    if m is None:
        return None
    key = m.group("label") if "label" in m.groupdict() else m.group(0)
    return (label_map or DEFAULT_MAP).get(key)


# --------------------------------------------------------------------------- checksums

def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _norm_digest(digest: str | None) -> str | None:
    if digest is None:
        return None
    d = digest.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", d):
        raise DataError(f"not a SHA-256 hex digest: {digest!r}")
    return d


def _read_record(path: Path) -> str | None:
    try:
        return _norm_digest(path.read_text().split()[0])
    except (OSError, IndexError, DataError):
        return None


# --------------------------------------------------------------------------- fetching

def _fail(info: DatasetInfo, url: str, reason: str, offline: bool) -> DownloadError:
    reason = " ".join(str(reason).split()) or "unknown error"
    hint = "You appear to be offline; download" if offline else "Download"
    return DownloadError(
        f"cannot download {info.name} from {url}: {reason}. {hint} {info.archive_name} by hand "
        f"and run: cxrlab datasets download {info.name} DEST --archive PATH")


def _fetch(info: DatasetInfo, url: str, archive: Path, progress, timeout: float) -> None:
    """Fetch url into archive via archive.part, resuming with an HTTP Range request."""
    part = archive.with_name(archive.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"User-Agent": "cxrlab"})
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 416 and have:          # nothing left to send: the .part is complete
            resp = None
        else:
            raise _fail(info, url, f"HTTP {e.code} {e.reason}", offline=False) from None
    except (urllib.error.URLError, socket.timeout, ConnectionError, OSError) as e:
        reason = getattr(e, "reason", None) or e
        raise _fail(info, url, str(reason), offline=True) from None
    if resp is not None:
        with resp:
            append = resp.status == 206 and (resp.headers.get("Content-Range") or "").startswith(
                f"bytes {have}-")
            if not append:
                have = 0                     # 200 (or an unexpected range): start from zero
            length = int(resp.headers.get("Content-Length") or 0)
            progress.start(have + length if length else 0, f"download {info.name}")
            progress.advance(have)
            try:
                with open(part, "ab" if append else "wb") as fh:
                    while chunk := resp.read(_CHUNK):
                        fh.write(chunk)
                        progress.advance(len(chunk))
                    fh.flush()
                    os.fsync(fh.fileno())
            except (socket.timeout, ConnectionError, urllib.error.URLError) as e:
                raise _fail(info, url, f"connection lost ({e}); run again to resume",
                            offline=True) from None
            finally:
                progress.close()
            if length and part.stat().st_size != have + length:
                raise _fail(info, url, "transfer ended early; run again to resume", offline=False)
    os.replace(part, archive)


def _verify(info: DatasetInfo, archive: Path, expected: str | None, notes: list,
            record: Path | None, delete_on_mismatch: bool) -> str:
    digest = _sha256_file(archive)
    recorded = _read_record(record) if record is not None else None
    want, source = (expected, "expected") if expected else (recorded, f"recorded in {record}")
    if want and digest != want:
        if delete_on_mismatch:
            archive.unlink(missing_ok=True)
        raise DownloadError(
            f"SHA-256 mismatch for {archive.name}: got {digest}, {source} {want}"
            + ("; the file was deleted, run again to re-download" if delete_on_mismatch else "")
            + ("" if expected else f" (delete {record} if the archive was legitimately updated)"))
    if record is not None and recorded != digest:
        record.write_text(f"{digest}  {archive.name}\n")
        if not expected:
            notes.append(f"no published SHA-256 for {archive.name}; recorded {digest} in {record}")
    return digest


# --------------------------------------------------------------------------- unpacking

def _safe_member(name: str) -> PurePosixPath:
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or re.match(r"^[A-Za-z]:", name) or ".." in p.parts:
        raise DataError(f"unsafe path in archive (zip-slip): {name!r}")
    return p


def _members(archive: Path):
    """Yield (path, opener) for every regular file; reject unsafe names before extracting anything."""
    if zipfile.is_zipfile(archive):
        zf = zipfile.ZipFile(archive)
        try:
            infos = [(i, _safe_member(i.filename)) for i in zf.infolist()]
        except DataError:
            zf.close()
            raise
        return zf, [(p, (lambda i=i: zf.open(i))) for i, p in infos if not i.is_dir()]
    try:
        tf = tarfile.open(archive)
    except (tarfile.TarError, OSError) as e:
        raise DataError(f"{archive}: not a zip or tar archive ({e})") from None
    try:
        infos = [(m, _safe_member(m.name)) for m in tf.getmembers()]
    except DataError:
        tf.close()
        raise
    return tf, [(p, (lambda m=m: tf.extractfile(m))) for m, p in infos if m.isfile()]


def _layout(info: DatasetInfo, archive: Path, dest: Path, digest: str, notes: list,
            progress) -> dict:
    marker = dest / ".downloads" / f"{info.archive_name}.layout.json"
    counts = _count(dest)
    try:
        done = json.loads(marker.read_text())
        if done.get("sha256") == digest and all(
                counts.get(k, 0) >= n for k, n in done.get("counts", {}).items()):
            return dict(done["counts"])
    except (OSError, ValueError, AttributeError):
        pass
    try:
        handle, members = _members(archive)
    except zipfile.BadZipFile as e:
        raise DataError(f"{archive}: corrupt zip archive ({e})") from None
    picked: dict[str, tuple[str, object]] = {}
    skipped = 0
    for path, opener in members:
        if "__MACOSX" in path.parts or path.name.startswith("._"):
            continue
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        label = label_from_name(path.stem, info)
        if label is None:
            skipped += 1
        elif path.name not in picked:
            picked[path.name] = (label, opener)
    if not picked:
        handle.close()
        raise DataError(f"{archive}: no .png/.jpg images with a _0/_1 label suffix inside")
    if skipped:
        notes.append(f"{skipped} image(s) in {archive.name} have no _0/_1 suffix and were skipped")
    counts = {k: 0 for k in LABELS}
    tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=dest))
    progress = resolve(progress)
    progress.start(len(picked), f"lay out {info.name}")
    try:
        with handle:
            for name, (label, opener) in sorted(picked.items()):
                with opener() as src, open(tmp / name, "wb") as out:
                    shutil.copyfileobj(src, out, _CHUNK)
                (dest / label).mkdir(exist_ok=True)
                os.replace(tmp / name, dest / label / name)
                counts[label] += 1
                progress.advance()
    finally:
        progress.close()
        shutil.rmtree(tmp, ignore_errors=True)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"sha256": digest, "counts": counts}))
    return counts


def _count(dest: Path) -> dict:
    return {k: sum(1 for p in (dest / k).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if (dest / k).is_dir() else 0 for k in LABELS}


def _check_counts(info: DatasetInfo, counts: dict, notes: list) -> None:
    if info.expected_counts and {k: counts.get(k, 0) for k in info.expected_counts} != info.expected_counts:
        notes.append(f"{info.name}: laid out {counts}, expected {info.expected_counts}; "
                     "the archive may be incomplete or a different release")


# --------------------------------------------------------------------------- public API

def _check_dest(dest: str | os.PathLike) -> Path:
    """DEST must be new, empty or a previous cxrlab layout (its .downloads/ folder, made first, marks
    it): the set is never mixed into, nor written over, other files."""
    from .outputs import DATASET_ENTRIES, check_output_dir

    return check_output_dir(dest, "datasets", files=DATASET_ENTRIES, classes=LABELS, option="DEST")


def download(name: str, dest: str | os.PathLike, *, url: str | None = None,
             sha256: str | None = None, progress=None, timeout: float = 30.0) -> DownloadResult:
    """Fetch (or reuse) the archive of dataset ``name`` and lay it out as dest/abnormal, dest/normal."""
    info = get_info(name)
    dest = _check_dest(dest)
    downloads = dest / ".downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    archive = downloads / info.archive_name
    record = archive.with_name(archive.name + ".sha256")
    expected = _norm_digest(sha256) or _norm_digest(info.sha256)
    notes: list[str] = []
    progress = resolve(progress)
    if not archive.exists():
        errors = []
        for u in ([url] if url else list(info.urls)):
            try:
                _fetch(info, u, archive, progress, timeout)
                break
            except DownloadError as e:
                errors.append(e)
        else:
            raise errors[0]
        if len(errors):
            notes.append(f"first URL failed, used a mirror: {errors[0]}")
    digest = _verify(info, archive, expected, notes, record, delete_on_mismatch=True)
    counts = _layout(info, archive, dest, digest, notes, progress)
    _check_counts(info, counts, notes)
    return DownloadResult(dest=dest, archive=archive, sha256=digest, counts=counts, notes=notes)


def layout_archive(name: str, archive: str | os.PathLike, dest: str | os.PathLike, *,
                   sha256: str | None = None, progress=None) -> DownloadResult:
    """Verify and lay out an archive the user already has (``--archive PATH``); it is not moved."""
    info = get_info(name)
    archive = Path(archive)
    if not archive.is_file():
        raise DataError(f"archive not found: {archive}")
    dest = _check_dest(dest)
    expected = _norm_digest(sha256) or _norm_digest(info.sha256)
    notes: list[str] = []
    digest = _verify(info, archive, expected, notes, None, delete_on_mismatch=False)  # before dest is touched
    (dest / ".downloads").mkdir(parents=True, exist_ok=True)
    counts = _layout(info, archive, dest, digest, notes, progress)
    _check_counts(info, counts, notes)
    return DownloadResult(dest=dest, archive=archive, sha256=digest, counts=counts, notes=notes)
