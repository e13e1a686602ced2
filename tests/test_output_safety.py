"""No cxrlab command deletes, hides or overwrites the user's data through an output path (issue 13).

Every command that writes is run, through the CLI, against the same classes of bad output: the input
itself, a folder inside it, a folder containing it, an existing folder or file cxrlab did not make, a
user's file inside a cxrlab folder. Each must end with one 'error:' line, before any work, leaving
every byte of the project as it was; a cxrlab-made folder must be reusable; modes follow the umask.
Training uses the tiny ONNX backbone of test_robustness so that the whole file runs in seconds.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import stat
import zipfile
from pathlib import Path

import pytest

import cxrlab
from cxrlab.cli import main
from cxrlab.compat import retrain_main
from cxrlab.modeldir import save_model
from cxrlab.outputs import MARKER, OutputError

from conftest import make_dataset  # noqa: E402
from conftest import write_tiny_backbone  # noqa: E402

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.fixture(scope="module")
def proj(tmp_path_factory):
    """A user's project: lungs/ (the images), model/ (a trained cxrlab model), the tiny backbone."""
    from cxrlab.backbones import create_backbone

    root = tmp_path_factory.mktemp("project")
    tiny = f"onnx:{write_tiny_backbone(tmp_path_factory.mktemp('bb') / 'tiny.onnx')}"
    create_backbone(tiny)
    lungs = make_dataset(root / "lungs", n_per_class=12, size=32)
    cxrlab.train(lungs, output=root / "model", backbone=tiny, ood=False, validation_percentage=25,
                 testing_percentage=30, how_many_training_steps=50)
    return {"root": root, "lungs": lungs, "abnormal": lungs / "abnormal", "model": root / "model", "tiny": tiny}


def archive(tmp_path: Path) -> Path:
    from PIL import Image

    path = tmp_path / "ChinaSet_AllFiles.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for name in ("CHNCXR_0001_0.png", "CHNCXR_0002_1.png"):
            buf = io.BytesIO()
            Image.new("L", (8, 8), 90).save(buf, format="PNG")
            zf.writestr(f"ChinaSet_AllFiles/CXR_png/{name}", buf.getvalue())
    return path


def argv(command: str, p: dict, out: Path, tmp_path: Path) -> list[str]:
    """The command line of ``command`` writing to ``out``."""
    lungs, model, tiny = str(p["lungs"]), str(p["model"]), p["tiny"]
    return {
        "train": ["train", lungs, "--output", str(out), "--backbone", tiny, "--no-ood", "--no-report", "-q",
                  "--bottleneck-dir", str(tmp_path / "bn"), "--how-many-training-steps", "20"],
        "evaluate": ["evaluate", "--model", model, lungs, "--output", str(out), "--no-ood"],
        "cv": ["cv", lungs, "--folds", "2", "--backbone", tiny, "--output", str(out)],
        "compare": ["compare", model, "--output", str(out)],
        "site-shift": ["site-shift", "--model", model, lungs, "--output", str(out)],
        "explain": ["explain", "--model", model, str(p["abnormal"]), "--output", str(out)],
        "predict": ["predict", "--model", model, str(p["abnormal"]), "--explain", str(out)],
        "datasets": ["datasets", "download", "shenzhen", str(out), "--archive", str(archive(tmp_path))],
    }[command]


# what each command writes into its output folder (explain: one heatmap per image)
WRITES = {"train": "model.onnx", "evaluate": "metrics.json", "cv": "metrics.json", "compare": "compare.html",
          "site-shift": "site_shift.json", "explain": "img_000.png", "predict": "img_000.png",
          "datasets": "abnormal"}
COMMANDS = list(WRITES)
INPUTS = {"train": ["lungs"], "cv": ["lungs"], "evaluate": ["lungs", "model"], "site-shift": ["lungs", "model"],
          "explain": ["abnormal", "model"], "predict": ["abnormal", "model"], "compare": ["model"]}


def cli(args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(args)
    return rc, out.getvalue(), err.getvalue()


def snapshot(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() and not p.is_symlink() else p.is_dir())
            for p in sorted(root.rglob("*"))}


def refused(args, root: Path, *words: str) -> str:
    """Run ``args``; it must end with one error line naming the reason and change nothing under ``root``."""
    before = snapshot(root)
    rc, _, err = cli(args)
    assert rc == 1, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, err
    assert snapshot(root) == before, "a refused command changed the user's files"
    return err


# ------------------------------------------------------------------ output vs. inputs
CASES = [(c, i) for c in INPUTS for i in INPUTS[c]]


@pytest.mark.parametrize("command,which", CASES, ids=[f"{c}-{i}" for c, i in CASES])
@pytest.mark.parametrize("relation", ["itself", "inside", "contains"])
def test_output_overlapping_an_input_is_refused(proj, tmp_path, command, which, relation):
    given = proj[which]
    out = {"itself": given, "inside": given / "new", "contains": given.parent}[relation]
    refused(argv(command, proj, out, tmp_path), proj["root"], relation, str(out))
    assert not (tmp_path / "bn").exists(), "train embedded images before refusing its output"


@pytest.mark.parametrize("spelling", ["symlink", "dotdot"])
def test_overlap_is_found_through_symlinks_and_dotdot(proj, tmp_path, spelling):
    if spelling == "symlink":
        out = tmp_path / "link"
        out.symlink_to(proj["lungs"], target_is_directory=True)
    else:
        out = proj["model"] / ".." / "lungs" / "." / "abnormal" / ".."
    refused(argv("train", proj, out, tmp_path), proj["root"], "itself")
    refused(argv("explain", proj, Path(str(out)) / "abnormal", tmp_path), proj["root"], "itself")


def test_explain_over_the_images_given_one_by_one(proj, tmp_path):
    files = sorted(map(str, proj["abnormal"].glob("*.png")))
    args = ["explain", "--model", str(proj["model"]), *files, "--output", str(proj["abnormal"])]
    refused(args, proj["root"], "contains")


def test_train_default_output_inside_the_data_is_refused(proj, tmp_path, monkeypatch):
    monkeypatch.chdir(proj["lungs"])
    args = argv("train", proj, tmp_path, tmp_path)
    del args[2:4]  # no --output: runs/<timestamp> under the working directory, i.e. inside lungs/
    refused(args, proj["root"], "inside")


# ------------------------------------------------------------------ existing things cxrlab did not make
@pytest.mark.parametrize("command", COMMANDS)
def test_existing_user_folder_is_refused(proj, tmp_path, command):
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "chapter1.docx").write_bytes(b"years of work")
    refused(argv(command, proj, out, tmp_path), tmp_path, "did not make", "chapter1.docx")


@pytest.mark.parametrize("command", COMMANDS)
def test_existing_user_file_is_refused(proj, tmp_path, command):
    out = tmp_path / "thesis.docx"
    out.write_bytes(b"years of work")
    refused(argv(command, proj, out, tmp_path), tmp_path, "existing file")


@pytest.mark.parametrize("command", [c for c in COMMANDS if c != "datasets"])
def test_dataset_laid_out_by_cxrlab_is_data_not_an_output(proj, tmp_path, command):
    data = tmp_path / "shenzhen"
    assert main(["datasets", "download", "shenzhen", str(data), "--archive", str(archive(tmp_path))]) == 0
    refused(argv(command, proj, data, tmp_path), tmp_path, "dataset")
    refused(argv(command, proj, data / "heatmaps", tmp_path), tmp_path, f"lies inside {data}")


@pytest.mark.parametrize("command", [c for c in COMMANDS if c != "compare"])
def test_no_output_inside_a_folder_of_class_subfolders(proj, tmp_path, command):
    """A folder made there becomes a class (or its heatmaps training images) at the next train."""
    other_site = make_dataset(tmp_path / "other_site", n_per_class=1, size=8)
    for out in (other_site / "heatmaps", other_site / "abnormal" / "heatmaps"):
        refused(argv(command, proj, out, tmp_path), tmp_path, f"lies inside {other_site}", "class")
    if command in ("explain", "predict"):  # the images given are lungs/abnormal: lungs/ is their training tree
        refused(argv(command, proj, proj["lungs"] / "heatmaps", tmp_path), proj["root"], "class subfolders")


# ------------------------------------------------------------------ cxrlab's own folders
@pytest.mark.parametrize("command", COMMANDS)
def test_empty_and_cxrlab_made_folders_are_reused(proj, tmp_path, command):
    out = tmp_path / "out"
    out.mkdir()
    for _ in range(2):
        rc, _, err = cli(argv(command, proj, out, tmp_path))
        assert rc == 0, err
        assert (out / WRITES[command]).exists()
    if command != "datasets":  # a dataset layout is marked by its .downloads/ folder
        marker = json.loads((out / MARKER).read_text())
        assert marker["entries"][WRITES[command]] == ("train" if command == "train" else
                                                      "explain" if command == "predict" else command)


def test_retrain_into_an_old_model_directory_without_marker(proj, tmp_path):
    out = tmp_path / "m"
    assert cli(argv("train", proj, out, tmp_path))[0] == 0
    (out / MARKER).unlink()  # as written by cxrlab before the marker existed
    rc, _, err = cli(argv("train", proj, out, tmp_path))
    assert rc == 0, err
    assert cxrlab.load_model(out).labels == ["abnormal", "normal"]


# ------------------------------------------------------------------ a user's file inside a cxrlab folder
@pytest.mark.parametrize("command", [c for c in COMMANDS if c not in ("explain", "predict", "datasets")])
def test_user_file_in_a_cxrlab_folder_is_never_overwritten(proj, tmp_path, command):
    out = tmp_path / "out"
    other = "cv" if command != "cv" else "compare"
    assert cli(argv(other, proj, out, tmp_path))[0] == 0  # a folder cxrlab made, for another command
    user = out / (WRITES[command] if command != "train" else "notes.txt")
    user.write_bytes(b"the user's own file")
    if command in ("evaluate", "cv"):  # cv/compare write metrics.json; take a folder where the user owns it
        (out / MARKER).write_text(json.dumps({"command": other, "entries": {}}))
    refused(argv(command, proj, out, tmp_path), tmp_path, str(user.name))
    assert user.read_bytes() == b"the user's own file"


@pytest.mark.parametrize("command", ["explain", "predict"])
def test_heatmap_never_overwrites_a_user_file_of_the_same_name(proj, tmp_path, command):
    out = tmp_path / "out"
    assert cli(argv(command, proj, out, tmp_path))[0] == 0
    user = out / "img_001.png"
    user.unlink()
    (out / MARKER).write_text((out / MARKER).read_text().replace('"img_001.png"', '"mine.png"'))
    user.write_bytes(b"the user's own file")
    rc, _, err = cli(argv(command, proj, out, tmp_path))
    assert rc == 0, err
    assert user.read_bytes() == b"the user's own file"
    assert (out / "img_001-2.png").is_file() and (out / "img_001-2.npy").is_file()
    assert (out / "img_000.png").is_file()  # its own heatmap of the first run, replaced


def test_train_never_deletes_a_user_file_in_a_model_directory(proj, tmp_path):
    out = tmp_path / "m"
    assert cli(argv("train", proj, out, tmp_path))[0] == 0
    (out / "notes.txt").write_text("mine")
    refused(argv("train", proj, out, tmp_path), tmp_path, "notes.txt", "delete")


def test_save_model_refuses_a_folder_it_did_not_make(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "cat.jpg").write_bytes(b"\xff\xd8 a cat")
    with pytest.raises(OutputError, match="did not make"):
        save_model(folder, onnx_bytes=b"x", labels=["a", "b"], info={})
    assert (folder / "cat.jpg").read_bytes() == b"\xff\xd8 a cat" and len(list(folder.iterdir())) == 1


# ------------------------------------------------------------------ retrain's files
def retrain_args(proj, tmp_path, graph: Path, labels: Path) -> list[str]:
    return ["--image_dir", str(proj["lungs"]), "--output_graph", str(graph), "--output_labels", str(labels),
            "--architecture", proj["tiny"], "--bottleneck_dir", str(tmp_path / "bn"), "--no_ood", "--no_report",
            "--how_many_training_steps", "20", "-q"]


def retrain(args) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        return retrain_main(args), err.getvalue()


@pytest.mark.parametrize("which", ["graph", "labels"])
def test_retrain_never_overwrites_a_file_it_did_not_write(proj, tmp_path, which):
    graph, labels = tmp_path / "output_graph.pb", tmp_path / "output_labels.txt"
    (graph if which == "graph" else labels).write_bytes(b"a TensorFlow graph or the user's list")
    before = snapshot(tmp_path)
    rc, err = retrain(retrain_args(proj, tmp_path, graph, labels))
    assert rc == 1 and "not written by cxrlab" in err and err.count("\n") == 1, err
    assert snapshot(tmp_path) == before and not (tmp_path / "bn").exists()


def test_retrain_replaces_its_own_files_and_refuses_the_data(proj, tmp_path):
    graph, labels = tmp_path / "output_graph.pb", tmp_path / "output_labels.txt"
    for _ in range(2):
        rc, err = retrain(retrain_args(proj, tmp_path, graph, labels))
        assert rc == 0, err
    assert labels.read_text().split() == ["abnormal", "normal"]
    before = snapshot(proj["root"])
    rc, err = retrain(retrain_args(proj, tmp_path, proj["abnormal"] / "graph.pb", labels))
    assert rc == 1 and "inside the input folder" in err, err
    assert snapshot(proj["root"]) == before


# ------------------------------------------------------------------ permissions
@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_files_and_folders_follow_the_umask(proj, tmp_path, mask):
    old = os.umask(mask)
    try:
        assert cli(argv("train", proj, tmp_path / "m", tmp_path))[0] == 0
        assert cli(argv("evaluate", proj, tmp_path / "e", tmp_path))[0] == 0
        assert cli(argv("explain", proj, tmp_path / "h", tmp_path))[0] == 0
    finally:
        os.umask(old)
    for folder in ("m", "e", "h"):
        assert stat.S_IMODE((tmp_path / folder).stat().st_mode) == 0o777 & ~mask, folder
        for f in (tmp_path / folder).iterdir():
            assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask, f
    assert {"model.onnx", "cxrlab.json", "labels.txt", MARKER} <= {f.name for f in (tmp_path / "m").iterdir()}


@pytest.mark.skipif(IS_ROOT, reason="root may write anywhere")
def test_unwritable_place_is_refused_before_any_work(proj, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        refused(argv("train", proj, locked / "m", tmp_path), tmp_path, "permission")
    finally:
        locked.chmod(0o755)
    assert not (tmp_path / "bn").exists()


@pytest.mark.parametrize("flag", ["--summaries-dir", "--bottleneck-dir"])
def test_train_side_folders_never_land_in_the_data(proj, tmp_path, flag):
    args = argv("train", proj, tmp_path / "m", tmp_path)
    if flag in args:
        del args[args.index(flag):args.index(flag) + 2]
    refused([*args, flag, str(proj["abnormal"] / "tb")], proj["root"], "inside")
    assert not (tmp_path / "m").exists()


def test_train_run_folder_beside_the_model_follows_the_same_rules(proj, tmp_path):
    """`--output m` also writes m.run/ (report, predictions, split): a user's folder of that name is refused before
    any work, and a second run replaces only its own run files."""
    out = tmp_path / "m"
    mine = tmp_path / "m.run"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's own file")
    refused(argv("train", proj, out, tmp_path), tmp_path, "m.run", "the run folder beside --output")
    assert not (tmp_path / "bn").exists() and not out.exists()
    (mine / "notes.txt").unlink()
    assert cli(argv("train", proj, out, tmp_path))[0] == 0
    assert (mine / "split.csv").is_file() and not (out / "split.csv").exists()
    assert cli(argv("train", proj, out, tmp_path))[0] == 0  # its own run folder is reused
