"""Evaluation on Shenzhen: evaluate reproduces train's test numbers, report.html renders in Chromium, cv runs."""

import csv
import os

import pytest

from cxrlab.evaluate import evaluate

pytestmark = pytest.mark.slow


def test_evaluate_on_own_test_split_reproduces_train(shenzhen_run, shenzhen_dir, tmp_path):
    result, _ = shenzhen_run
    test_dir = tmp_path / "test_split"
    with open(result.run_dir / "split.csv", newline="") as f:
        for row in csv.DictReader(f):
            if row["split"] == "test":
                (test_dir / row["label"]).mkdir(parents=True, exist_ok=True)
                os.symlink(shenzhen_dir / row["relpath"], test_dir / row["label"] / os.path.basename(row["relpath"]))
    r = evaluate(result.model_dir, test_dir, output=tmp_path / "eval")
    train_test, ev = result.metrics["test"], r.metrics["all"]
    for key in ("n", "tp", "fp", "tn", "fn"):
        assert ev[key] == train_test[key], key
    for key in ("auc", "sensitivity", "specificity", "accuracy", "brier", "ece"):
        assert ev[key] == pytest.approx(train_test[key], abs=1e-6), key
    assert ev["who_verdict"] == train_test["who_verdict"]
    assert (tmp_path / "eval" / "report.html").is_file()


def test_report_renders_in_chromium(shenzhen_run):
    from test_browser import LAUNCH_ARGS, chromium_path

    if not chromium_path():
        pytest.skip("Chromium not found: .ci/run installs Debian's chromium")
    sync_api = pytest.importorskip("playwright.sync_api")
    result, _ = shenzhen_run
    report = result.run_dir / "report.html"
    errors = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=LAUNCH_ARGS)
        page = browser.new_page()
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(report.as_uri())
        images = page.eval_on_selector_all("img", "els => els.map(e => [e.alt, e.complete && e.naturalWidth > 0])")
        browser.close()
    assert errors == []
    assert images and all(ok for _, ok in images), [alt for alt, ok in images if not ok]
    alts = " ".join(alt.lower() for alt, _ in images)
    for plot in ("roc", "precision-recall", "reliability", "confusion", "histogram", "training"):
        assert plot in alts, plot


def test_cv_five_folds(shenzhen_dir, shenzhen_run):
    from cxrlab.crossval import cross_validate

    _, bn = shenzhen_run
    r = cross_validate(shenzhen_dir, folds=5, bottleneck_dir=bn, fine_tune=False)  # the cached-embedding path
    assert len(r["folds"]) == 5 and sum(f["n"] for f in r["folds"]) == 662
    assert 0.8 < r["summary"]["auc"]["mean"] < 1 and r["summary"]["auc"]["sd"] > 0
