"""Every code block of README.md runs, in order, on a small sample, so that the README cannot rot.

Each command line (4-space indented or fenced blocks; `a && b` is two steps; `.venv/bin/X` is X) runs in a
fresh folder laid out like a user's: `lungs/`, `site_a/` ..., `x.jpg`, `cow.jpg`, `ChinaSet_AllFiles.zip`, and
`../shared/data/shenzhen` beside it. The films are a sample of the shared Shenzhen set when it is present (299 px
copies, so the chest X-ray check is on), else synthetic pictures (conftest.synthetic_xray). `cxrlab`, `retrain`
and `label_image` run in this process (their `main` functions, which the console scripts call); `python
benchmarks/...` and `cxrlab serve` run as subprocesses; the Python block runs as a script. A failure names the
README line.

What differs from a user's run is listed in SPEED_UPS, NOT_RUN and the mappings below, each with its reason; a
command the test cannot place fails rather than being skipped. What each command must leave behind is in CLAIMS
(easy to adjust when a command's outputs move).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import resource
import shlex
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxrlab.cli import main as cxrlab_main
from cxrlab.compat import label_image_main, retrain_main

from conftest import SHENZHEN, synthetic_xray

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
ANSWER = re.compile(r"\b(abnormal|normal|unknown)\b")  # a class of the sample, or a refusal
WARNING_LINE = re.compile(r"Warning\b|warnings\.warn|Triggered internally")
PROGRAMS = ("cxrlab", "retrain", "label_image", "python", "./install.sh", "source")

# Lines that are not run, and why. (A pattern matched against the whole step.)
NOT_RUN = {
    r"^\./install\.sh": "the test runs inside the environment install.sh made (CI runs it just before the tests)",
    r"^python -m pytest": "the command that runs this very test",
}

# Changes made to a step so that the whole README runs in about two minutes; each keeps the command's own path.
SPEED_UPS = {
    "setup-train": (["--epochs", "1", "--ft", "input_size=64"],
                    "the set-up command's default recipe (fine-tuning) runs once, 1 epoch at 64 px instead of 6 at "
                    "224 (as tests/test_finetune.py): every step of it, in seconds"),
    "train": (["--head-only"], "fine-tuning runs once (the set-up command); the other trainings check their own "
                               "inputs, outputs and report with the tutorial's linear head"),
    "cv": (["--head-only"], "as for train: one linear head per fold instead of one fine-tune per fold"),
    "retrain": (["--no-shift-reference"], "retrain spends most of its time on the shift reference (1280 Inception "
                                          "pictures on Shenzhen); its bar and skip are tested in test_progress.py"),
    "benchmarks/accuracy.py": (["--ft", "epochs=1", "--ft", "input_size=64"],
                               "the fine-tuned variant with 1 epoch at 64 px, as the set-up command"),
    "serve": (["--port", "{free_port}"], "a free port (8000 may be taken); started, asked for its page, stopped"),
    "dicom-listen": (["--port", "{free_port}"], "a free port (11112 may be taken); started, sent a DICOM C-ECHO, "
                                                "stopped; its PACS (--send-to) is not there, and no film is sent: "
                                                "tests/test_dicom_net.py runs it against a real Orthanc"),
}
# A training command with its own fine-tuning recipe cannot take --head-only: its options are parsed (argparse
# and FineTuneOptions validate every --ft KEY=VALUE) but it is not trained, for time.
PARSE_ONLY_REASON = "its own fine-tuning recipe: the options are parsed and checked, not trained (time)"

# Exit status other than 0 that the README's own comment promises.
EXPECTED_EXIT = {"ood-check": (1, "REJECT")}  # cow.jpg is refused: exit 1 when any file is refused


def _found(folder: Path, *names: str) -> bool:
    """Every name somewhere under folder (a model's files may sit in a subfolder of a run's)."""
    return folder.is_dir() and all(any(folder.rglob(name)) for name in names)


def _trained(ws: Path, output: str | None) -> bool:
    """A model folder (model files only) and the run's report beside it."""
    if output is None:
        return _found(ws / "runs", "model.onnx", "labels.txt", "cxrlab.json", "MODEL_CARD.md", "report.html")
    model, run = ws / output, ws / (output.rstrip("/") + ".run")
    return (all((model / name).is_file() for name in ("model.onnx", "labels.txt", "cxrlab.json", "MODEL_CARD.md"))
            and not (model / "report.html").exists() and (run / "report.html").is_file())


# What a command must leave behind: (what, check(workspace, its --options, its stdout)). Outputs that are
# optional (evaluate without --output prints only) are checked when asked for.
CLAIMS = {
    "train": ("model.onnx, labels.txt, cxrlab.json and MODEL_CARD.md in --output, report.html in its run folder "
              "beside it (--output DIR.run; default: runs/<time>/model and runs/<time>)",
              lambda ws, opt, out: _trained(ws, opt.get("--output"))),
    "adapt": ("an adapted model under --output", lambda ws, opt, out: _found(ws / opt["--output"], "model.onnx")),
    "evaluate": ("metrics.json and report.html under --output", lambda ws, opt, out: (
        "--output" not in opt or _found(ws / opt["--output"], "metrics.json", "report.html"))),
    "compare": ("compare.html and compare.json under --output", lambda ws, opt, out: (
        "--output" not in opt or _found(ws / opt["--output"], "compare.html", "compare.json"))),
    "explain": ("a heatmap per image under --output", lambda ws, opt, out: any((ws / opt["--output"]).glob("*.png"))),
    "datasets": ("abnormal/ and normal/ with films in DEST", lambda ws, opt, out: all(
        (ws / opt["DEST"] / c).is_dir() and any((ws / opt["DEST"] / c).iterdir()) for c in ("abnormal", "normal"))),
    "predict": ("an answer per image (--format json: a JSON list)", lambda ws, opt, out: (
        isinstance(json.loads(out), list) if opt.get("--format") == "json" else ANSWER.search(out))),
    "cv": ("an AUC per fold or site", lambda ws, opt, out: "AUC" in out),
    "site-shift": ("a row per shift", lambda ws, opt, out: "contrast_curve" in out),
    "ood-check": ("an answer per file", lambda ws, opt, out: "REJECT" in out or "accept" in out),
    "retrain": ("output_graph.pb, output_labels.txt and the model folder output_graph.cxrlab/", lambda ws, opt, out: (
        Path(opt["--output_graph"]).is_file() and Path(opt["--output_labels"]).is_file()
        and _found(Path(opt["--output_graph"]).with_name("output_graph.cxrlab"), "model.onnx"))),
    "label_image": ("a label line", lambda ws, opt, out: ANSWER.search(out)),
    "serve": ("its web page at http://127.0.0.1:PORT/", lambda ws, opt, out: "<html" in out.lower()),
    "dicom-listen": ("a DICOM node answering C-ECHO, and its audit log", lambda ws, opt, out: (
        out == "echo: 0x0000" and ("--audit" not in opt or (ws / opt["--audit"]).is_file()))),
    "audit": ("a summary of the audit log", lambda ws, opt, out: bool(out.strip())),
    "benchmarks/accuracy.py": ("figures of each variant", lambda ws, opt, out: "linear" in out and "best" in out),
}


# ------------------------------------------------------------------ the README's blocks
@dataclass
class Block:
    line: int  # 1-based line of its first line in README.md
    lines: list[tuple[int, str]] = field(default_factory=list)

    @property
    def kind(self) -> str:
        first = self.lines[0][1].strip()
        if first.startswith(("import ", "from ")):
            return "python"
        return "commands" if _program(first) else "text"


def _program(line: str) -> str | None:
    word = line.split()[0] if line.split() else ""
    word = word.removeprefix(".venv/bin/")
    return word if word in PROGRAMS else None


def readme_blocks(text: str) -> list[Block]:
    """Fenced blocks and indented (4-space) blocks that follow a blank line."""
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("```"):
            block = Block(i + 2)
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                block.lines.append((i + 1, lines[i]))
                i += 1
            blocks.append(block)
        elif lines[i].startswith("    ") and lines[i].strip() and (i == 0 or not lines[i - 1].strip()):
            block = Block(i + 1)
            while i < len(lines) and (lines[i].startswith("    ") or not lines[i].strip()):
                if lines[i].strip():
                    block.lines.append((i + 1, lines[i][4:]))
                i += 1
            blocks.append(block)
            continue
        i += 1
    return [b for b in blocks if b.lines]


@dataclass
class Step:
    number: int  # README line
    line: str  # the whole README line
    text: str  # this step, comments dropped
    argv: list[str]

    @property
    def command(self) -> str:
        """cxrlab's subcommand, the script of `python SCRIPT`, else the program."""
        if self.argv[0] in ("cxrlab", "python") and len(self.argv) > 1:
            return self.argv[1]
        return self.argv[0]


def steps(block: Block) -> list[Step]:
    out = []
    for number, line in block.lines:
        for part in line.split("&&"):
            argv = shlex.split(part, comments=True)
            if argv:
                argv[0] = argv[0].removeprefix(".venv/bin/")
                out.append(Step(number, line.strip(), " ".join(argv), argv))
    return out


# ------------------------------------------------------------------ the sample a user would have
def _films(n_abnormal: int, n_normal: int) -> dict[str, list[tuple[str, np.ndarray]]]:
    """(Shenzhen file stem, gray uint8 picture) per class: the shared set's first films, else synthetic ones named
    like them."""
    out = {}
    for label, n, first in (("abnormal", n_abnormal, 327), ("normal", n_normal, 1)):
        real = sorted((SHENZHEN / label).glob("CHNCXR_*")) if (SHENZHEN / label).is_dir() else []
        if len(real) >= n:
            out[label] = [(p.stem, np.asarray(Image.open(p).convert("L"))) for p in real[:n]]
        else:
            out[label] = [(f"CHNCXR_{first + i:04d}_{int(label == 'abnormal')}",
                           synthetic_xray(i * 2 + (label == "abnormal"), label == "abnormal", size=128))
                          for i in range(n)]
    return out


def _write(folder: Path, films, suffix=".png") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for stem, pixels in films:
        Image.fromarray(pixels).save(folder / f"{stem}{suffix}")


def make_workspace(root: Path) -> Path:
    """root/project (where the commands run) and root/shared/data/shenzhen (the README's ../shared/data/shenzhen).
    lungs/, ../shared/data/shenzhen and the archive hold the same PNG files, so the embedding cache serves them all
    after the first command, as it would a user who trains twice on one folder."""
    films = _films(62, 62)
    ws = root / "project"
    chunks = {"lungs": (0, 16), "site_a": (16, 21), "site_b": (21, 26), "site_c": (26, 31), "new_site": (31, 47),
              "other_hospital": (47, 53), "lungs_test": (53, 59)}
    for name, (a, b) in chunks.items():
        for label in ("abnormal", "normal"):
            _write(ws / name / label, films[label][a:b])
    for label in ("abnormal", "normal"):
        _write(root / "shared" / "data" / "shenzhen" / label, films[label][:16])
    _write(ws / "folder", films["normal"][59:62] + films["abnormal"][59:61], ".jpg")
    _write(ws / "more_xrays", films["normal"][59:61])
    Image.fromarray(films["abnormal"][61][1]).save(ws / "x.jpg")
    Image.fromarray(films["abnormal"][61][1]).save(ws / "x.png")
    Image.fromarray(films["normal"][61][1]).save(ws / "y.png")
    yy, xx = np.mgrid[0:96, 0:128]  # a colour picture, the tutorial's cow: refused as not a chest X-ray
    Image.fromarray(np.stack([xx * 2, 255 - yy * 2, (xx + yy) % 256], -1).astype(np.uint8)).save(ws / "cow.jpg")
    # The NLM archive's layout (ChinaSet_AllFiles/CXR_png/CHNCXR_0327_1.png ...), for `datasets download`.
    with zipfile.ZipFile(ws / "ChinaSet_AllFiles.zip", "w") as z:
        for label in ("abnormal", "normal"):
            for stem, _ in films[label][:16]:
                z.write(ws / "lungs" / label / f"{stem}.png", f"ChinaSet_AllFiles/CXR_png/{stem}.png")
    (ws / "tmp").mkdir()
    return ws


# ------------------------------------------------------------------ running one step
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _options(argv: list[str]) -> dict[str, str]:
    """--option VALUE pairs of a command line (the last wins), and DEST for `datasets download NAME DEST`."""
    opt = {a: b for a, b in zip(argv, argv[1:]) if a.startswith("-") and not b.startswith("-")}
    if argv[:3] == ["cxrlab", "datasets", "download"]:
        opt["DEST"] = argv[4]
    return opt


def _in_process(entry, argv: list[str]) -> tuple[int, str, str]:
    """The command's exit status, stdout and stderr; the warnings a user would see (Python's default filters,
    which pytest replaces) are written to stderr as Python would."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings(record=True) as seen:
        warnings.resetwarnings()
        warnings.simplefilter("default")
        for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.filterwarnings("ignore", category=category)
        rc = entry(argv)
    shown = "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno) for w in seen)
    return rc, out.getvalue(), err.getvalue() + shown


def _subprocess(argv: list[str], ws: Path, timeout: float = 300) -> tuple[int, str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run(argv, cwd=ws, capture_output=True, text=True, env=env, timeout=timeout)
    return r.returncode, r.stdout, r.stderr


def _serve(argv: list[str], ws: Path, wait_s: float = 90) -> tuple[int, str, str]:
    """Start the server, ask for its page until it answers (at most wait_s), stop it: (0 when the page came, the
    page, the server's stderr)."""
    port = argv[argv.index("--port") + 1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "cxrlab", *argv[1:]], cwd=ws, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    page, deadline = "", time.time() + wait_s
    try:
        while time.time() < deadline and proc.poll() is None and not page:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
                    page = r.read().decode("utf-8", "replace") if r.status == 200 else ""
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
    finally:
        proc.terminate()
        try:
            out, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    return (0 if page else 1), page, err


def _dicom_listen(argv: list[str], ws: Path, wait_s: float = 90) -> tuple[int, str, str]:
    """Start the listener, send it a C-ECHO until it answers (at most wait_s), stop it with SIGTERM: (0 when it
    answered and stopped cleanly, "echo: <status>", its stderr)."""
    from pynetdicom import AE

    port = int(argv[argv.index("--port") + 1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "cxrlab", *argv[1:]], cwd=ws, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    answer, deadline = "", time.time() + wait_s
    ae = AE(ae_title="READMETEST")
    ae.add_requested_context("1.2.840.10008.1.1")  # Verification
    try:
        while time.time() < deadline and proc.poll() is None and not answer:
            assoc = ae.associate("127.0.0.1", port, ae_title="CXRLAB")
            if assoc.is_established:
                status = assoc.send_c_echo()
                assoc.release()
                answer = f"echo: 0x{status.Status:04X}" if status else ""
            else:
                time.sleep(0.5)
    finally:
        proc.terminate()
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    return (0 if answer and proc.returncode == 0 else 1), answer, err


def prepare(step: Step, ws: Path) -> tuple[list[str] | None, str]:
    """The argv to run (None: parse only) and a note of what was changed and why."""
    argv, notes = [str(ws / a[1:]) if a.startswith("/tmp/") else a for a in step.argv], []  # never the real /tmp
    if argv[0] == "retrain":
        for flag, name in (("--output_graph", "output_graph.pb"), ("--output_labels", "output_labels.txt")):
            if flag not in argv:
                argv += [flag, str(ws / "tmp" / name)]
        notes.append("outputs in the test's tmp/, not /tmp")
    if argv[:4] == ["cxrlab", "datasets", "download", "shenzhen"] and "--archive" not in argv:
        argv += ["--url", (ws / "ChinaSet_AllFiles.zip").as_uri()]
        notes.append("no network in tests: the same fetch, from a file:// copy of a small archive")
    trains = step.command in ("train", "cv", "retrain")
    if trains and "--ft" in argv:
        return None, PARSE_ONLY_REASON
    key = "setup-train" if step.command == "train" and step.line.startswith("./install.sh") else step.command
    if key in SPEED_UPS and not (key in ("train", "cv") and {"--head-only", "--head_only"} & set(argv)):
        extra, why = SPEED_UPS[key]
        argv += [a.format(free_port=_free_port()) for a in extra]
        notes.append(f"{' '.join(extra)}: {why}")
    return argv, "; ".join(notes)


def parse_only(step: Step) -> None:
    """argparse, then the fine-tuning options together (FineTuneOptions.validate), as `cxrlab train` does first."""
    from cxrlab.cli import build_parser
    from cxrlab.compat import build_retrain_parser
    from cxrlab.finetune import FineTuneOptions

    parser = build_retrain_parser() if step.argv[0] == "retrain" else build_parser()
    a = parser.parse_args(step.argv[1:])
    options = FineTuneOptions(epochs=a.epochs)
    for key, value in a.ft:
        options.set(key, value)
    options.validate()


def run_step(argv: list[str], ws: Path) -> tuple[int, str, str]:
    program = argv[0]
    if program == "cxrlab" and argv[1] == "serve":
        return _serve(argv, ws)
    if program == "cxrlab" and argv[1] == "dicom-listen":
        return _dicom_listen(argv, ws)
    if program == "cxrlab":
        return _in_process(cxrlab_main, argv[1:])
    if program == "retrain":
        return _in_process(retrain_main, argv[1:])
    if program == "label_image":
        return _in_process(label_image_main, argv[1:])
    if program == "python":
        script = argv[1]
        assert (REPO / script).is_file(), f"{script} does not exist"
        return _subprocess([sys.executable, str(REPO / script), *argv[2:]], ws)
    raise AssertionError(f"no way to run {program!r}: add it to test_readme.py")


def run_python_block(block: Block, ws: Path) -> tuple[int, str, str]:
    """The block as a script. cxrlab.train's default recipe becomes the linear head (SPEED_UPS['train']), the
    only change: the real function, with fine_tune=False unless the block says otherwise."""
    code = textwrap.dedent("\n".join(text for _, text in block.lines))
    preamble = ("import cxrlab\n_train = cxrlab.train\n"
                "cxrlab.train = lambda *a, **k: _train(*a, **{'fine_tune': False, **k})\n")
    (ws / "readme_block.py").write_text(preamble + code)
    return _subprocess([sys.executable, "readme_block.py"], ws)


# ------------------------------------------------------------------ the tests
def test_blocks_are_found_and_every_command_is_known():
    blocks = readme_blocks(README.read_text(encoding="utf-8"))
    kinds = [b.kind for b in blocks]
    assert kinds.count("python") >= 1 and kinds.count("commands") >= 5, kinds
    for b in blocks:
        if b.kind == "text":  # a listing (the data layout): no command may hide in one
            assert not any(_program(t.strip()) for _, t in b.lines), f"README.md:{b.line}: a command in a listing"
        if b.kind == "commands":
            for number, text in b.lines:
                assert _program(text.strip()), f"README.md:{number}: {text.strip()!r} is not a known command"
    setup = [text for b in blocks if b.kind == "commands" for _, text in b.lines if text.startswith("./install.sh")]
    assert setup == ["./install.sh && .venv/bin/cxrlab train ../shared/data/shenzhen --output runs/shenzhen/model",
                     "./install.sh test && .venv/bin/python -m pytest -q"]


def test_readme_label_image_example_names_a_file_that_the_readme_makes():
    """The image label_image is pointed at is one `cxrlab datasets download shenzhen data/shenzhen` lays out."""
    text = README.read_text(encoding="utf-8")
    image = re.search(r"label_image .*--image (\S+)", text).group(1)
    assert image.startswith("data/shenzhen/abnormal/CHNCXR_") and image.endswith("_1.png"), image


@pytest.mark.slow
def test_every_readme_block_runs(tmp_path, monkeypatch):
    ws = make_workspace(tmp_path)
    monkeypatch.chdir(ws)
    monkeypatch.setenv("COLUMNS", "120")
    log = ["  wall    cpu  README line"]
    try:
        for block in readme_blocks(README.read_text(encoding="utf-8")):
            if block.kind == "python":
                t, cpu = time.time(), _cpu_seconds()
                rc, out, err = run_python_block(block, ws)
                log.append(f"{time.time() - t:6.1f}s {_cpu_seconds() - cpu:6.1f}s  README.md:{block.line}: the Python "
                           "block [train: linear head]")
                assert rc == 0, f"README.md:{block.line}: the Python block failed:\n{err[-3000:]}"
                noise = [line for line in err.replace("\r", "\n").splitlines() if WARNING_LINE.search(line)]
                assert not noise, f"README.md:{block.line}: the Python block printed warnings:\n" + "\n".join(noise)
            elif block.kind == "commands":
                for step in steps(block):
                    run_one(step, ws, log)
    finally:
        print("\n".join(log))


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the log's second column: wall time depends on load)."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def run_one(step: Step, ws: Path, log: list[str]) -> None:
    where = f"README.md:{step.number}: {step.text}"
    reason = next((why for pattern, why in NOT_RUN.items() if re.search(pattern, step.text)), None)
    if reason:
        log.append(f"not run  {where} ({reason})")
        return
    if step.argv[0] == "source":
        assert step.argv[1:] == [".venv/bin/activate"] and (Path(sys.prefix) / "bin" / "activate").is_file(), where
        log.append(f"checked  {where} (the environment this test runs in has it)")
        return
    argv, note = prepare(step, ws)
    if argv is None:
        try:
            parse_only(step)
        except SystemExit as exc:
            pytest.fail(f"{where}\nrefused by the option parser (exit {exc.code})")
        log.append(f"parsed   {where} ({note})")
        return
    t, cpu = time.time(), _cpu_seconds()
    rc, out, err = run_step(argv, ws)
    log.append(f"{time.time() - t:6.1f}s {_cpu_seconds() - cpu:6.1f}s  {where}" + (f"  [{note}]" if note else ""))
    want_rc, want_text = EXPECTED_EXIT.get(step.command, (0, ""))
    assert rc == want_rc and want_text in out, (
        f"{where}\nexit status {rc} (expected {want_rc})\n--- stdout\n{out[-2000:]}\n--- stderr\n{err[-3000:]}")
    noise = [line for line in err.replace("\r", "\n").splitlines() if WARNING_LINE.search(line)]
    assert not noise, f"{where}\nprinted warnings:\n" + "\n".join(noise)
    assert step.command in CLAIMS, f"{where}: say in CLAIMS what it leaves behind"
    what, check = CLAIMS[step.command]
    assert check(ws, _options(argv), out), f"{where}\ndid not leave {what}\n--- stdout\n{out[-2000:]}"
