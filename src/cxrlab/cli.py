"""The `cxrlab` command: each subcommand parses, makes one library call, and renders the result."""

from __future__ import annotations

import argparse
import csv
import json
import signal
import sys
from pathlib import Path

from .errors import CxrlabError

EPILOG = {
    "train": "example: cxrlab train lungs/ --output models/tb",
    "predict": "example: cxrlab predict --model models/tb CHNCXR_0327_1.jpg",
    "evaluate": "example: cxrlab evaluate --model models/tb other_hospital/ --output eval/",
    "cv": "example: cxrlab cv lungs/ --folds 5",
    "ood-check": "example: cxrlab ood-check --model models/tb cow.jpg lungs/normal/",
    "datasets": "example: cxrlab datasets download shenzhen data/shenzhen",
    "serve": "example: cxrlab serve --model models/tb --port 8000",
    "explain": "example: cxrlab explain --model models/tb lungs/abnormal --output heatmaps/ --summary",
    "compare": "example: cxrlab compare runs/a/model eval/other --output cmp/",
    "site-shift": "example: cxrlab site-shift --model models/tb lungs_test/",
}


def _flag(parser, name: str, **kwargs):
    """Accept both the tutorial's --snake_case spelling and --kebab-case."""
    names = {f"--{name}", f"--{name.replace('_', '-')}"}
    parser.add_argument(*sorted(names), dest=name, **kwargs)


def add_train_options(p) -> None:
    p.add_argument("image_dir_pos", nargs="?", metavar="IMAGE_DIR", help="folder with one subfolder per class")
    _flag(p, "image_dir", help="same as IMAGE_DIR")
    p.add_argument("--output", "-o", help="model directory to write (default runs/<timestamp>/model)")
    p.add_argument("--backbone", default="efficientnet-lite0", help="efficientnet-lite0|1|2, inception-v3 or onnx:PATH")
    _flag(p, "bottleneck_dir", help="embedding cache folder (default: the user cache dir)")
    _flag(p, "label_from_name", metavar="REGEX", help="label from the file name: 'nlm' (_1 abnormal, _0 normal) or a regex with a (?P<label>...) group")
    _flag(p, "group_regex", help="regex on the relative path whose (?P<group>...) keeps one patient's images in one split")
    _flag(p, "split_file", help="reuse the split of this CSV manifest")
    _flag(p, "testing_percentage", type=float, default=10.0)
    _flag(p, "validation_percentage", type=float, default=10.0)
    _flag(p, "solver", default="lbfgs", choices=["lbfgs", "sgd"], help="lbfgs: regularised logistic regression (default); sgd: the tutorial's")
    _flag(p, "how_many_training_steps", type=int, default=4000)
    _flag(p, "learning_rate", type=float, default=0.01)
    _flag(p, "train_batch_size", type=int, default=100)
    _flag(p, "eval_step_interval", type=int, default=10)
    _flag(p, "validation_batch_size", type=int, default=100)
    _flag(p, "test_batch_size", type=int, default=-1)
    _flag(p, "print_misclassified_test_images", action="store_true")
    _flag(p, "positive_label", help="the class that counts as positive (default: abnormal)")
    _flag(p, "operating_point", default="who", help="who | youden | sensitivity=0.90 | specificity=0.70, chosen on validation")
    _flag(p, "robust_operating_point", action="store_true",
          help="choose the threshold on the validation images under simulated site shifts too (more conservative)")
    _flag(p, "flip_left_right", action="store_true")
    _flag(p, "random_crop", type=float, default=0.0)
    _flag(p, "random_scale", type=float, default=0.0)
    _flag(p, "random_brightness", type=float, default=0.0)
    _flag(p, "no_ood", action="store_true", help="do not fit the out-of-distribution gate")
    _flag(p, "no_report", action="store_true", help="do not write report.html")
    _flag(p, "summaries_dir", help="also write TensorBoard scalars here (needs the tensorboard package)")
    _flag(p, "precision", default="fp32", choices=["fp32", "int8"], help="int8: quantised backbone, calibrated on training images")
    _flag(p, "workers", type=int, default=None, help="decode threads (default: up to 4, one per core)")
    _flag(p, "batch_size", type=int, default=32, help="images per ONNX Runtime batch while embedding")
    _flag(p, "fine_tune", action="store_true", help="fine-tune the backbone end to end in torch (slower, more accurate)")
    _flag(p, "epochs", type=int, default=8, help="fine-tuning epochs (with --fine-tune)")
    p.add_argument("--ft", action="append", default=[], metavar="KEY=VALUE",
                   help="a fine-tuning choice, e.g. lr=1e-4, intensity=window, input_size=299, augment.gamma=0.3 "
                        "(see cxrlab.finetune.FineTuneOptions)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", "-q", action="store_true")


def print_step(info) -> None:
    print(f"Step {info.step}: Train accuracy = {info.train_accuracy * 100:.1f}%")
    print(f"Step {info.step}: Cross entropy = {info.cross_entropy:f}")
    if info.validation_accuracy is not None:
        print(f"Step {info.step}: Validation accuracy = {info.validation_accuracy * 100:.1f}% (N={info.validation_n})")


def run_train(a) -> int:
    from .progress import TqdmProgress
    from .training import train

    image_dir = a.image_dir or a.image_dir_pos
    if not image_dir:
        raise CxrlabError("give the image folder: cxrlab train IMAGE_DIR (or --image-dir)")
    r = train(image_dir, output=a.output, on_step=None if a.quiet else print_step,
              progress=None if a.quiet else TqdmProgress(), **train_kwargs(a))
    render_train_result(r, print_misclassified=a.print_misclassified_test_images)
    return 0


def train_kwargs(a) -> dict:
    """The train() keywords that `cxrlab train` and `retrain` share, from parsed options."""
    return dict(backbone=a.backbone, bottleneck_dir=a.bottleneck_dir, label_from_name=a.label_from_name,
                group_regex=a.group_regex, split_file=a.split_file, testing_percentage=a.testing_percentage,
                validation_percentage=a.validation_percentage, solver=a.solver,
                how_many_training_steps=a.how_many_training_steps, learning_rate=a.learning_rate,
                train_batch_size=a.train_batch_size, eval_step_interval=a.eval_step_interval,
                validation_batch_size=a.validation_batch_size, test_batch_size=a.test_batch_size,
                positive_label=a.positive_label, operating_point=a.operating_point,
                robust_operating_point=a.robust_operating_point,
                flip_left_right=a.flip_left_right, random_crop=a.random_crop, random_scale=a.random_scale,
                random_brightness=a.random_brightness, ood=not a.no_ood, report=not a.no_report, seed=a.seed,
                summaries_dir=a.summaries_dir, precision=a.precision, workers=a.workers, batch_size=a.batch_size,
                **_fine_tune_args(a))


def _fine_tune_args(a) -> dict:
    if not getattr(a, "fine_tune", False):
        if getattr(a, "ft", None):
            raise CxrlabError("--ft options need --fine-tune")
        return {}
    from .finetune import FineTuneOptions

    options = FineTuneOptions(epochs=a.epochs)
    for item in a.ft:
        key, sep, value = item.partition("=")
        if not sep:
            raise CxrlabError(f"--ft {item!r}: expected KEY=VALUE")
        options.set(key.strip(), value.strip())

    def on_epoch(row):
        if not a.quiet:
            auc = f", validation AUC {row['val_auc']:.3f}" if row.get("val_auc") is not None else ""
            print(f"Epoch {row['epoch']}: loss {row['loss']:.4f}{auc}{' (best so far)' if row.get('best') else ''}",
                  flush=True)

    return {"fine_tune": True, "epochs": a.epochs, "fine_tune_options": options, "on_epoch": on_epoch}


def render_train_result(r, *, print_misclassified: bool = False) -> None:
    if r.final_test_accuracy is not None:
        print(f"Final test accuracy = {r.final_test_accuracy * 100:.1f}% (N={r.n_test})")
    if print_misclassified:
        print("=== MISCLASSIFIED TEST IMAGES ===")
        for path, _, predicted in r.misclassified:
            print(f"{Path(path).name:>70}  {predicted}")
    test = r.metrics.get("test") or {}
    if "auc" in test:
        lo, hi = test["auc_ci"]
        print(f"Test ROC AUC = {test['auc']:.3f} [{lo:.3f}-{hi:.3f}]")
    if "who_verdict" in test:
        print(test["who_verdict"])
    heat = r.metrics.get("heatmaps") or {}
    if heat.get("mean_border_share") is not None:
        print(f"Border heat share: mean {heat['mean_border_share'] * 100:.1f}% (n={heat['n']})")
        if heat.get("flag"):
            print("warning: the model's heat sits mostly on the image border, where hospitals print text "
                  "markers: it may be using a shortcut (see 'Where the model looked' in report.html)", file=sys.stderr)
    print(f"Embedding cache: {r.cache_hits} hit(s), {r.cache_misses} miss(es)")
    for note in r.notes:
        print(f"note: {note}", file=sys.stderr)
    if r.skipped:
        print(f"Skipped {len(r.skipped)} file(s):", file=sys.stderr)
        for s in r.skipped:
            print(f"  {s.path}: {s.reason}", file=sys.stderr)
    print(f"Model written to {r.model_dir}")


def render_prediction_text(p, top_k: int | None = None, header: bool = False) -> list[str]:
    lines = [f"{p.path}:"] if header else []
    if p.error:
        return lines + [f"error: {p.error}" if header else f"error: {p.path}: {p.error}"]
    if p.ood:
        lines.append(f"unknown (not a chest X-ray like the training images: ood score {p.ood_score:.1f} > {p.ood_threshold:.1f})")
    for label, score in p.ranked()[:top_k]:
        lines.append(f"{label} (score = {score:.5f})")
    if p.threshold is not None and not p.ood:
        lines.append(f"decision: {p.label} (P = {p.positive_score:.3f}, threshold {p.threshold:.3f})")
    return lines


def run_predict(a) -> int:
    from .predict import load_model

    model = load_model(a.model)
    preds = model.predict(a.paths, ood=not a.no_ood)
    if a.format == "json":
        print(json.dumps([p.to_dict() for p in preds], indent=2))
    elif a.format == "csv":
        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerow(["path", "label", *[f"score_{lab}" for lab in model.labels], "threshold", "ood", "ood_score", "error"])
        for p in preds:
            w.writerow([p.path, p.label or "", *[p.scores.get(lab, "") for lab in model.labels],
                        p.threshold if p.threshold is not None else "", p.ood, p.ood_score, p.error or ""])
    else:
        for p in preds:
            print("\n".join(render_prediction_text(p, a.top_k, header=len(preds) > 1)))
    if a.explain:
        from .explain import explain_paths

        n = len(explain_paths(model, [p.path for p in preds if not p.error], a.explain))
        print(f"{n} heatmap(s) written to {a.explain}", file=sys.stderr)
    return 1 if preds and all(p.error for p in preds) else 0


def run_evaluate(a) -> int:
    from .evaluate import evaluate
    from .progress import TqdmProgress

    r = evaluate(a.model, a.data, label_from_name=a.label_from_name, output=a.output, ood=not a.no_ood,
                 progress=TqdmProgress())
    m = r.metrics
    print(f"Images: {m['n_images']} scored, {m['n_rejected']} rejected as out-of-distribution, {m['n_skipped']} unreadable")
    rows = [("all images", m["all"]), ("accepted only", m.get("accepted")), ("internal test", m.get("internal_test"))]
    print(f"{'':16} {'AUC':>6} {'sens':>6} {'spec':>6} {'acc':>6}")
    for name, rep in rows:
        if rep:
            vals = [rep.get(k) for k in ("auc", "sensitivity", "specificity", "accuracy")]
            print(f"{name:16} " + " ".join(f"{v:6.3f}" if isinstance(v, float) else f"{'-':>6}" for v in vals))
    if "who_verdict" in m["all"]:
        print(m["all"]["who_verdict"])
    if r.skipped:
        print(f"Skipped {len(r.skipped)} unreadable file(s):", file=sys.stderr)
        for path, reason in r.skipped:
            print(f"  {path}: {reason}", file=sys.stderr)
    if r.output_dir:
        print(f"Report written to {r.output_dir / 'report.html'}")
    return 0


def run_cv(a) -> int:
    from .crossval import cross_validate
    from .fsutil import atomic_write_bytes
    from .progress import TqdmProgress

    r = cross_validate(a.image_dir, folds=a.folds, backbone=a.backbone, label_from_name=a.label_from_name,
                       group_regex=a.group_regex, positive_label=a.positive_label, seed=a.seed, progress=TqdmProgress(),
                       precision=a.precision)
    for row in r["folds"]:
        print(f"fold {row['fold']}: AUC {row['auc']:.3f}  accuracy {row['accuracy']:.3f}  "
              f"sensitivity {row['sensitivity']:.3f}  specificity {row['specificity']:.3f}  (N={row['n']})")
    for key, s in r["summary"].items():
        print(f"{key:12} {s['mean']:.3f} ± {s['sd']:.3f}")
    if a.output:
        atomic_write_bytes(Path(a.output) / "metrics.json", json.dumps(r, indent=2).encode())
    return 0


def run_ood_check(a) -> int:
    from .predict import load_model

    model = load_model(a.model)
    if model.ood_gate is None:
        raise CxrlabError(f"{a.model}: this model has no out-of-distribution gate (trained with --no-ood)")
    for p in model.predict(a.paths):
        verdict = "error: " + p.error if p.error else ("REJECT" if p.ood else "accept")
        score = "" if p.error else f"{p.ood_score:8.2f} (threshold {p.ood_threshold:.2f})  "
        print(f"{score}{verdict}  {p.path}")
    return 0


def run_datasets(a) -> int:
    from .datasets import download, layout_archive
    from .progress import TqdmProgress

    if a.archive:
        r = layout_archive(a.name, a.archive, a.dest)
    else:
        r = download(a.name, a.dest, url=a.url, sha256=a.sha256, progress=TqdmProgress(unit="B"))
    for note in r.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"{a.name}: " + ", ".join(f"{n} {label}" for label, n in sorted(r.counts.items())) + f" in {r.dest}")
    return 0


def run_explain(a) -> int:
    from .explain import explain_paths, summary
    from .predict import load_model

    skipped: list[tuple[str, str]] = []
    heatmaps = explain_paths(load_model(a.model), a.paths, a.output, skipped=skipped)
    print(f"{len(heatmaps)} heatmap(s) written to {a.output}")
    if skipped:
        print(f"Skipped {len(skipped)} unreadable file(s):", file=sys.stderr)
        for path, reason in skipped:
            print(f"  {path}: {reason}", file=sys.stderr)
    if a.summary and heatmaps:
        s = summary(heatmaps)
        m = s["mean_border_share"]
        print(f"border heat share: mean {m * 100:.1f}% (n={s['n']}); central region {(1 - m) * 100:.1f}%")
        if s["flag"]:
            print("warning: most of the heat is in the image border: the model may be looking at text markers "
                  "or borders rather than the lungs")
    return 0 if heatmaps else 1


def run_compare(a) -> int:
    from .compare import compare, format_table

    r = compare(a.dirs, output=a.output, names=a.names)
    print("\n".join(format_table(r)))
    for note in r["notes"]:
        print(f"note: {note}", file=sys.stderr)
    if a.output:
        print(f"Comparison written to {Path(a.output) / 'compare.html'}")
    return 0


def run_site_shift(a) -> int:
    from .predict import load_model
    from .siteshift import format_rows, site_shift_folder

    rows = site_shift_folder(load_model(a.model), a.data, label_from_name=a.label_from_name)
    print("\n".join(format_rows(rows)))
    if a.output:
        from .fsutil import atomic_write_bytes

        atomic_write_bytes(Path(a.output), json.dumps(rows, indent=2).encode())
    return 0


def run_serve(a) -> int:
    from .serve import serve
    from .serve_limits import limits_from_options

    limits = limits_from_options(max_upload_mb=a.max_upload_mb, max_request_mb=a.max_request_mb,
                                 max_decode_mb=a.max_decode_mb, decode_budget_mb=a.decode_budget_mb,
                                 request_timeout=a.request_timeout)
    serve(a.model, host=a.host, port=a.port, allowed_hosts=a.allowed_host or (), **limits)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cxrlab", description="Chest X-ray classifiers from a folder, used honestly.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name, func, help_):
        p = sub.add_parser(name, help=help_, description=help_, epilog=EPILOG.get(name))
        p.set_defaults(func=func)
        return p

    add_train_options(command("train", run_train, "train a classifier from a folder of labelled images"))
    p = command("predict", run_predict, "label images with a trained model")
    p.add_argument("--model", "-m", required=True)
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--format", choices=["text", "json", "csv"], default="text")
    p.add_argument("--no-ood", action="store_true", help="do not refuse out-of-distribution images")
    p.add_argument("--explain", metavar="OUT_DIR", help="also write class activation map overlays here")
    p = command("evaluate", run_evaluate, "metrics of a model on any labelled folder (external validation)")
    p.add_argument("--model", "-m", required=True)
    p.add_argument("data", metavar="DATA")
    p.add_argument("--label-from-name", metavar="REGEX")
    p.add_argument("--output", "-o", help="folder for metrics.json, predictions.csv, report.html")
    p.add_argument("--no-ood", action="store_true")
    p = command("cv", run_cv, "stratified, group-aware k-fold cross-validation on cached embeddings")
    p.add_argument("image_dir", metavar="IMAGE_DIR")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--backbone", default="efficientnet-lite0")
    p.add_argument("--label-from-name", metavar="REGEX")
    p.add_argument("--group-regex")
    p.add_argument("--positive-label", default="abnormal")
    p.add_argument("--precision", default="fp32", choices=["fp32", "int8"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", "-o", help="folder for metrics.json")
    p = command("ood-check", run_ood_check, "print the out-of-distribution score and verdict per image")
    p.add_argument("--model", "-m", required=True)
    p.add_argument("paths", nargs="+", metavar="PATH")
    p = command("datasets", run_datasets, "download and lay out the NLM TB chest X-ray sets")
    p.add_argument("action", choices=["download"])
    p.add_argument("name", choices=["shenzhen", "montgomery"])
    p.add_argument("dest")
    p.add_argument("--url", help="download from this address instead of the official one")
    p.add_argument("--sha256", help="expected SHA-256 of the archive")
    p.add_argument("--archive", help="lay out an archive you already downloaded (no network)")
    p = command("explain", run_explain, "write class activation map overlays (where the model looked)")
    p.add_argument("--model", "-m", required=True)
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--output", "-o", required=True, metavar="OUT_DIR")
    p.add_argument("--summary", action="store_true", help="print the share of heat in the image border")
    p = command("compare", run_compare, "tabulate metrics and overlay the ROC curves of several runs or evaluations")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="a 'train --output' model dir or an 'evaluate --output' dir")
    p.add_argument("--output", "-o", help="folder for compare.html and compare.json")
    p.add_argument("--names", help="comma-separated names for the rows, one per DIR")
    p = command("site-shift", run_site_shift, "AUC and sens/spec at the stored operating point under simulated hospital differences")
    p.add_argument("--model", "-m", required=True)
    p.add_argument("data", metavar="DATA", help="labelled folder (one subfolder per class)")
    p.add_argument("--label-from-name", metavar="REGEX")
    p.add_argument("--output", "-o", help="write the rows as JSON to this file")
    p = command("serve", run_serve, "a local web page and REST API")
    p.add_argument("--model", "-m", required=True)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--allowed-host", action="append", metavar="NAME",
                   help="a Host name clients use besides localhost and --host (repeatable; '*' allows any, "
                        "which turns off the DNS-rebinding guard)")
    p.add_argument("--max-upload-mb", type=float, metavar="MB", help="largest file (default 32)")
    p.add_argument("--max-request-mb", type=float, metavar="MB",
                   help="largest request body, all files together (default 128)")
    p.add_argument("--max-decode-mb", type=float, metavar="MB",
                   help="memory one image may take to decode, estimated from its header (default 1024)")
    p.add_argument("--decode-budget-mb", type=float, metavar="MB",
                   help="decode memory of all images in flight together (default 2048)")
    p.add_argument("--request-timeout", type=float, metavar="SECONDS",
                   help="time allowed for a request body to arrive (default 60)")
    return parser


def run(func, args, debug: bool = False) -> int:
    """Run a command; CxrlabError becomes one 'error:' line and exit code 1."""
    try:
        return func(args)
    except CxrlabError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: nothing half-written was left behind; run the same command again to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


def main(argv=None) -> int:
    signal.signal(signal.SIGINT, signal.default_int_handler)
    args = build_parser().parse_args(argv)
    return run(args.func, args, args.debug)


if __name__ == "__main__":
    sys.exit(main())
