"""The `cxrlab` command: each subcommand parses, makes one library call, and renders the result."""

from __future__ import annotations

import argparse
import contextlib
import csv
import errno
import json
import os
import signal
import sys
from pathlib import Path

from . import validate as v
from ._version import __version__
from .backbones import DEFAULT_BACKBONE
from .errors import CxrlabError
from .finetune.options import FineTuneOptions
from .progress import TqdmProgress
from .runtime import EXECUTION_PRECISIONS, RUNTIMES, TRAIN_PRECISIONS as PRECISIONS
from .runtime import RAY_DEVICES
from .train_options import CV_POSITIVE_LABEL, DEFAULT_FOLDS, TrainOptions

EPILOG = {
    "train": "example: cxrlab train lungs/ --output models/tb",
    "predict": "example: cxrlab predict --model models/tb CHNCXR_0327_1.jpg",
    "evaluate": "example: cxrlab evaluate --model models/tb other_hospital/ --output eval/",
    "cv": "example: cxrlab cv lungs/ --folds 5",
    "ood-check": "example: cxrlab ood-check --model models/tb cow.jpg lungs/normal/\n"
                 "exit status: 0 when every image is accepted, 1 when any is refused or unreadable",
    "datasets": "example: cxrlab datasets download shenzhen data/shenzhen",
    "serve": "example: cxrlab serve --model models/tb --port 8000",
    "explain": "example: cxrlab explain --model models/tb lungs/abnormal --output heatmaps/ --summary",
    "compare": "example: cxrlab compare runs/a/model eval/other --output cmp/",
    "site-shift": "example: cxrlab site-shift --model models/tb lungs_test/",
    "dicom-listen": "example: cxrlab dicom-listen --model models/tb --ae-title CXRLAB --port 11112 "
                    "--send-to ORTHANC@127.0.0.1:4242 --audit audit.db",
    "audit": "example: cxrlab audit audit.db",
}
EXIT_STATUS = ("exit status: 0 success; 1 an input or output failed (one 'error:' line says which); "
               "2 a bad option or an internal error; 130 interrupted")
_PRINT_ONLY = " (default: none, the figures are only printed)"
PROGRESS_MIN_FILES = 8  # predict shows a bar on a terminal from this many files
PROGRESS_ALWAYS_FILES = 1000  # ... and even when stderr is a log file from this many


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `error: argument --x: ...` and exit status 2, no usage dump."""

    def error(self, message):
        self.exit(2, f"error: {message} (see '{self.prog} --help')\n")

    def _get_option_tuples(self, option_string):
        """An abbreviation matching only the two spellings of one option (--top -> --top-k, --top_k) is that option."""
        tuples = super()._get_option_tuples(option_string)
        actions = {id(t[0]) for t in tuples}
        return tuples[:1] if len(actions) == 1 else tuples


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilogs' line breaks and appends '(default: X)' to every option with a default worth showing."""

    def _get_help_string(self, action):
        text = action.help or ""
        d = action.default
        if "%(default)" in text or d is None or d is False or d is argparse.SUPPRESS or d == [] or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def add_flag(parser, name: str, *short: str, **kwargs):
    """Accept both the tutorial's --snake_case spelling and --kebab-case (and any short alias, e.g. -o)."""
    names = sorted({f"--{name}", f"--{name.replace('_', '-')}"})
    return parser.add_argument(*short, *names, **{"dest": name, **kwargs})


# ------------------------------------------------------------------ option groups shared by several commands
def add_model_options(p) -> None:
    add_flag(p, "model", "-m", required=True, metavar="MODEL_DIR", help="model folder written by 'cxrlab train'")
    add_trust_option(p)
    add_runtime_option(p)
    add_flag(p, "precision", default="auto", choices=EXECUTION_PRECISIONS,
             help="auto: bf16 where this CPU has native bf16 and the model passed its bf16 parity check "
                  "(cxrlab.json runtime.bf16), else fp32; bf16 runs on OpenVINO")


def add_runtime_option(p) -> None:
    add_flag(p, "runtime", default="auto", choices=RUNTIMES,
             help="inference engine: auto = OpenVINO for bf16, else ONNX Runtime")


def add_trust_option(p) -> None:
    add_flag(p, "trust_modified_model", action="store_true",
          help="load a model directory whose files differ from their SHA-256 record (edited or damaged); "
               "its values are still validated, and a warning is printed")


def add_output_option(p, contents: str, *, required: bool = False, default_help: str = "") -> None:
    """--output / -o: always a folder (created if missing), never a single file."""
    add_flag(p, "output", "-o", required=required, metavar="DIR",
          help=f"folder for {contents} (created if missing){default_help}")


def add_label_from_name_option(p) -> None:
    add_flag(p, "label_from_name", metavar="REGEX", type=v.regex,
          help="label from the file name: 'nlm' (_1 abnormal, _0 normal) or a regex with a (?P<label>...) group "
               "(default: the subfolder name)")


def add_group_regex_option(p) -> None:
    add_flag(p, "group_regex", metavar="REGEX", type=v.regex,
          help="regex on the relative path whose (?P<group>...) keeps one patient's images in one split "
               "(default: the file name, ignoring anything after _nohash_, as in the tutorial)")


def add_positive_label_option(p, default=None) -> None:
    add_flag(p, "positive_label", metavar="CLASS", default=default,
          help="the class that counts as positive" + ("" if default else " (default: abnormal, if there is one)"))


def add_backbone_option(p, default=DEFAULT_BACKBONE) -> None:
    add_flag(p, "backbone", default=default, metavar="NAME", help="efficientnet-lite0|1|2, inception-v3 or onnx:PATH")


def add_precision_option(p, default: str) -> None:
    add_flag(p, "precision", default=default, choices=PRECISIONS,
          help="auto: bf16 on a CPU with native bf16 for a backbone whose cross-validated AUC it kept, else fp32; "
               "bf16 (OpenVINO); int8: quantised backbone, calibrated on training images, linear head only")
    add_runtime_option(p)


def add_seed_option(p, default: int) -> None:
    add_flag(p, "seed", type=v.seed, default=default, metavar="N", help=f"random seed of the split and the fit, 0 to {v.SEED_MAX}")


def add_fine_tune_options(p, what: str) -> None:
    recipe = p.add_mutually_exclusive_group()
    add_flag(recipe, "fine_tune", action="store_const", const=True, default=None,
             help=f"fine-tune the backbone end to end in torch {what} (the default for registry backbones)")
    add_flag(recipe, "head_only", dest="fine_tune", action="store_const", const=False,
             help="the tutorial's recipe: a linear head on frozen embeddings (fast, less accurate elsewhere)")
    add_flag(p, "epochs", type=v.positive_int, default=FineTuneOptions.epochs, metavar="N",
          help="fine-tuning epochs, >= 1")
    add_flag(p, "ft", action="append", default=[], metavar="KEY=VALUE", type=ft_option,
          help="a fine-tuning choice, e.g. lr=1e-4, intensity=window, input_size=299, "
               "augment.gamma=0.3 (see cxrlab.finetune.FineTuneOptions); repeat for several "
               "(default: none, the measured recipe)")


def add_no_ood_option(p, help_: str = "score every image: no chest X-ray check, no shift warning") -> None:
    add_flag(p, "no_ood", action="store_true", help=help_)


def add_ray_option(p, workers: bool = True, fine_tunes: bool = False) -> None:
    """--ray [ADDRESS] (and --workers N; --ray-device where the command fine-tunes): run on a Ray cluster; Ray
    itself is imported only then."""
    add_flag(p, "ray", nargs="?", const="auto", default=None, metavar="ADDRESS",
             help="run on a Ray cluster (pip install -e .[cluster]): auto (the default: RAY_ADDRESS, or the cluster "
                  "`ray start --head` started here), local (start one for this run) or HOST:PORT (default: none, run here)")
    if workers:
        add_flag(p, "workers", type=v.positive_int, default=None, metavar="N",
                 help="with --ray: Ray workers, >= 1 and at most one per core of the cluster (default: one per core)")
    if fine_tunes:
        add_flag(p, "ray_device", choices=RAY_DEVICES, default="auto",
                 help="with --ray: what the fine-tuning workers train on: auto (one GPU each, NCCL, when the cluster "
                      "has GPUs, else one core each, gloo), cpu (force CPU workers) or gpu")


def add_quiet_option(p) -> None:
    add_flag(p, "quiet", "-q", action="store_true", help="print only the results, no progress")


def add_train_options(p) -> None:
    t = TrainOptions()
    p.add_argument("image_dir_pos", nargs="*", metavar="IMAGE_DIR",
                   help="folder with one subfolder per class; several folders: one per site (hospital), "
                        "trained on together with figures per site; a CSV with path,label[,site] columns also works")
    add_flag(p, "image_dir", metavar="IMAGE_DIR", help="the tutorial's spelling of IMAGE_DIR (default: the IMAGE_DIR arguments)")
    add_output_option(p, "the deployable model: model.onnx, labels.txt, cxrlab.json, MODEL_CARD.md; the run's "
                         "report.html, predictions and split.csv go beside it, into DIR.run",
                      default_help=" (default: runs/<timestamp>/model)")
    add_backbone_option(p, t.backbone)
    add_flag(p, "bottleneck_dir", metavar="DIR", help="embedding cache folder (default: the user cache dir)")
    add_label_from_name_option(p)
    add_group_regex_option(p)
    add_flag(p, "split_file", metavar="CSV",
          help="reuse the split of this CSV manifest (default: a new split, from a hash of each image's path)")
    add_flag(p, "testing_percentage", type=v.percentage, default=t.testing_percentage, metavar="PCT",
          help="0 to <100; with the validation share, under 100")
    add_flag(p, "validation_percentage", type=v.percentage, default=t.validation_percentage, metavar="PCT", help="0 to <100")
    add_flag(p, "solver", default=t.solver, choices=["lbfgs", "sgd"],
          help="lbfgs: regularised logistic regression; sgd: the tutorial's")
    add_flag(p, "how_many_training_steps", type=v.positive_int, default=t.how_many_training_steps, metavar="N",
          help="a whole number >= 1")
    add_flag(p, "learning_rate", type=v.positive_float, default=t.learning_rate, metavar="RATE", help="> 0 (sgd)")
    add_flag(p, "train_batch_size", type=v.batch_or_all, default=t.train_batch_size, metavar="N", help=">= 1, or -1 for all (sgd)")
    add_flag(p, "eval_step_interval", type=v.positive_int, default=t.eval_step_interval, metavar="N", help=">= 1")
    add_flag(p, "validation_batch_size", type=v.batch_or_all, default=t.validation_batch_size, metavar="N", help=">= 1, or -1 for all")
    add_flag(p, "test_batch_size", type=v.batch_or_all, default=t.test_batch_size, metavar="N", help=">= 1, or -1 for all")
    add_flag(p, "print_misclassified_test_images", action="store_true", help="list the test images the model gets wrong")
    add_positive_label_option(p, t.positive_label)
    add_flag(p, "operating_point", default=t.operating_point, type=v.operating_point, metavar="RULE",
          help="who | youden | sensitivity=0.90 | specificity=0.70, chosen on validation")
    add_flag(p, "robust_operating_point", action="store_true",
          help="choose the threshold on the validation images under simulated site shifts too (more conservative)")
    add_flag(p, "flip_left_right", action="store_true", help="augment with mirrored copies of the training images")
    for kind in ("crop", "scale", "brightness"):
        add_flag(p, f"random_{kind}", type=v.percentage_0_100, default=getattr(t, f"random_{kind}"), metavar="PCT",
              help=f"random {kind} augmentation, percent, 0 to 100")
    add_no_ood_option(p, "save no chest X-ray check and no shift reference: the model scores every image")
    add_flag(p, "no_shift_reference", action="store_true",
             help="keep the chest X-ray check but fit no shift reference (no 'unlike the training images' warning): "
                  "skips embedding site-shifted copies of up to 160 training images, most of retrain's time "
                  "with inception-v3")
    add_flag(p, "no_report", action="store_true", help="do not write report.html")
    add_flag(p, "summaries_dir", metavar="DIR",
          help="also write TensorBoard scalars into this folder (needs tensorboard) (default: none)")
    add_precision_option(p, t.precision)
    add_flag(p, "workers", type=v.positive_int, default=t.workers, metavar="N",
             help="decode threads, >= 1 (default: up to 4, one per core); with --ray: the Ray workers that embed "
                  "and fine-tune (default: one per core of the cluster; fine-tuning on GPUs: one per GPU)")
    add_flag(p, "batch_size", type=v.positive_int, default=t.batch_size, metavar="N",
          help="images in the network at once while embedding, shared by its lanes (one per core), >= 1")
    add_fine_tune_options(p, "(slower, more accurate)")
    add_seed_option(p, t.seed)
    add_quiet_option(p)
    add_ray_option(p, workers=False, fine_tunes=True)


def ft_option(text: str) -> tuple[str, str]:
    """argparse type of --ft: KEY=VALUE with a known key and a value of the right type and range."""
    from .errors import DataError

    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE, e.g. lr=1e-4")
    try:
        FineTuneOptions().set(key.strip(), value.strip())
    except DataError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return key.strip(), value.strip()


def print_step(info) -> None:
    print(f"Step {info.step}: Train accuracy = {info.train_accuracy * 100:.1f}%")
    print(f"Step {info.step}: Cross entropy = {info.cross_entropy:f}")
    if info.validation_accuracy is not None:
        print(f"Step {info.step}: Validation accuracy = {info.validation_accuracy * 100:.1f}% (N={info.validation_n})")


def run_train(a) -> int:
    from .progress import TqdmProgress
    from .training import train

    image_dir = image_inputs(a)
    if not image_dir:
        raise CxrlabError("give the image folder: cxrlab train IMAGE_DIR (or --image-dir)")
    r = train(image_dir, output=a.output, on_step=None if a.quiet else print_step,
              progress=None if a.quiet else TqdmProgress(), **train_kwargs(a))
    render_train_result(r, print_misclassified=a.print_misclassified_test_images)
    return 0


def image_inputs(a):
    """train's image folder(s): IMAGE_DIR arguments and --image-dir together; one folder as itself."""
    found = ([a.image_dir] if a.image_dir else []) + list(getattr(a, "image_dir_pos", None) or [])
    return found[0] if len(found) == 1 else found


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
                random_brightness=a.random_brightness, ood=not a.no_ood,
                shift_reference=not a.no_shift_reference, report=not a.no_report, seed=a.seed,
                summaries_dir=a.summaries_dir, precision=a.precision, runtime=a.runtime, workers=a.workers,
                batch_size=a.batch_size, ray=getattr(a, "ray", None),
                ray_device=getattr(a, "ray_device", "auto"), **_fine_tune_args(a))


def _fine_tune_args(a) -> dict:
    if getattr(a, "fine_tune", None) is False:
        if getattr(a, "ft", None):
            raise CxrlabError("--ft options are fine-tuning choices; drop --head-only")
        return {"fine_tune": False}
    options = FineTuneOptions(epochs=a.epochs)
    for key, value in a.ft:
        options.set(key, value)
    options.validate()  # the combination (e.g. batch_size=1 needs freeze_bn=true), before any work

    def on_epoch(row):
        if not getattr(a, "quiet", False):
            auc = f", validation AUC {row['val_auc']:.3f}" if row.get("val_auc") is not None else ""
            resumed = (f" (a Ray worker failed: resumed from the epoch {row['resumed_after_epoch']} checkpoint)"
                       if row.get("resumed_after_epoch") else "")
            print(f"Epoch {row['epoch']}: loss {row['loss']:.4f}{auc}{' (best so far)' if row.get('best') else ''}"
                  f"{resumed}", flush=True)

    return {"fine_tune": a.fine_tune, "epochs": a.epochs, "fine_tune_options": options, "on_epoch": on_epoch}


def render_train_result(r, *, print_misclassified: bool = False) -> None:
    """The run's summary: the test figures of the shipped model (its operating point) first, then the tutorial's
    argmax line, labelled as such."""
    from .metrics import percent

    test = r.metrics.get("test") or {}
    if "threshold" in test:
        print(f"Test at the shipped operating point (P({r.metrics.get('positive_label')}) >= {test['threshold']:.4f}): "
              f"accuracy {percent(test['accuracy'], test.get('accuracy_ci'))}, "
              f"sensitivity {percent(test['sensitivity'], test.get('sensitivity_ci'))}, "
              f"specificity {percent(test['specificity'], test.get('specificity_ci'))} (N={test['n']})")
    if r.final_test_accuracy_argmax is not None:
        label = " [the tutorial's figure: highest score wins, i.e. 0.5; not the shipped decision]" \
            if "threshold" in test else ""
        print(f"Final test accuracy = {r.final_test_accuracy_argmax * 100:.1f}% (N={r.n_test}){label}")
    if print_misclassified:
        print("=== MISCLASSIFIED TEST IMAGES ===" + (" (at the shipped operating point)" if "threshold" in test else ""))
        for path, _, predicted in r.misclassified:
            print(f"{Path(path).name:>70}  {predicted}")
    if "auc" in test:
        lo, hi = test["auc_ci"]
        print(f"Test ROC AUC = {test['auc']:.3f} [{lo:.3f}-{hi:.3f}]")
    if "who_verdict" in test:
        print(test["who_verdict"])
    if test.get("sample_warning"):
        print(f"warning: test split: {test['sample_warning']}", file=sys.stderr)
    for site, m in (r.metrics.get("test_by_site") or {}).items():
        print(f"Site {site}: " + (f"AUC {m['auc']:.3f}, sensitivity {percent(m['sensitivity'])}, "
                                  f"specificity {percent(m['specificity'])} (N={m['n']})" if "auc" in m
                                  else f"{m['n']} test image(s) of a single class: no AUC"))
        if m.get("sample_warning"):
            print(f"warning: site {site}: {m['sample_warning']}", file=sys.stderr)
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
    print(f"Model written to {r.model_dir}" + (f" (model card: {Path(r.model_dir) / 'MODEL_CARD.md'})"
                                                if (Path(r.model_dir) / "MODEL_CARD.md").is_file() else ""))
    if r.report_path is not None:
        print(f"Report written to {r.report_path} (with the run's predictions and split in {r.run_dir})")
    elif Path(r.run_dir, "split.csv").is_file():
        print(f"Split written to {Path(r.run_dir) / 'split.csv'}")


def render_prediction_text(p, top_k: int | None = None, header: bool = False, positive_label: str | None = None
                           ) -> list[str]:
    """The decision first (at the model's operating point), then the tutorial's score lines."""
    lines = [f"{p.path}:"] if header else []
    if p.error:
        return lines + [f"error: {p.error}" if header else f"error: {p.path}: {p.error}"]
    if p.ood:
        return lines + [f"unknown (not a chest X-ray: {p.ood_reason})"]
    if p.threshold is not None and p.positive_score is not None:
        side = "at or above" if p.positive_score >= p.threshold else "below"
        lines.append(f"decision: {p.label} (P({positive_label or 'positive'}) = {p.positive_score:.3f}, {side} the "
                     f"threshold {p.threshold:.3f})")
    for label, score in p.ranked()[:top_k]:
        lines.append(f"{label} (score = {score:.5f})")
    if p.shift:
        lines.append(shift_warning(p))
    return lines


def shift_warning(p) -> str:
    return f"warning: unlike the training images (shift score {p.shift_score:.1f} > {p.shift_threshold:.1f})"


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _show_progress(n_files: int) -> bool:
    return n_files >= PROGRESS_ALWAYS_FILES or (n_files >= PROGRESS_MIN_FILES and _stderr_is_terminal())


class BarForLongInputs(TqdmProgress):
    """A progress bar (tqdm, on stderr) only for inputs long enough to want one: see _show_progress."""

    def start(self, total: int, desc: str) -> None:
        if _show_progress(total):
            super().start(total, desc)


def predict_with_progress(model, paths, *, ood: bool = True, cluster=None, audit=None, explain=None) -> list:
    """model.predict over the expanded files, with a bar on stderr for long inputs; on ``cluster``
    (cluster.Cluster) with --ray; each answer goes into the ``audit`` log when one is given (its latency: the
    run's time shared by its files). ``explain``: a folder that gets each scored image's heatmap, from the same
    pass through the network (on a cluster: a second pass here)."""
    import time

    from .explain import explain_paths
    from .predict import expand_paths, predict_files

    files = expand_paths(paths)
    bar = BarForLongInputs()
    started = time.monotonic()
    if explain and cluster is None:
        preds = []
        explain_paths(model, files, explain, ood=ood, progress=bar, predictions=preds,
                      title="predicting and explaining")
    else:
        preds = predict_files(model, files, ood=ood, progress=bar, cluster=cluster)
        if explain:
            explain_paths(model, [p.path for p in preds if not p.error], explain, ood=ood, progress=BarForLongInputs())
    if audit is not None:
        _audit_files(audit, model, preds, (time.monotonic() - started) / max(1, len(preds)))
    return preds


def _audit_files(audit, model, preds, latency_s: float) -> None:
    """One audit row per file: its SHA-256 (never its name, which may hold a patient's), the answer."""
    from .audit import sha256

    for p in preds:
        try:
            with open(p.path, "rb") as f:
                digest = sha256(f.read())
        except OSError:
            digest = None
        audit.record(p, model=model, surface="cli", source="cli", input_sha256=digest, latency_s=latency_s)


def open_audit_arg(a):
    """The --audit database of a command, opened before any work (None without the option)."""
    if not getattr(a, "audit", None):
        return None
    from .audit import open_audit

    return open_audit(a.audit)


def _cell(value) -> str:
    return "" if value is None else str(value)


def load_model_arg(a):
    """The --model of a command, with its --trust-modified-model choice."""
    from .predict import load_model

    return load_model(a.model, trust_modified=a.trust_modified_model, runtime=a.runtime, precision=a.precision)


def run_predict(a) -> int:
    if a.explain:  # before any work
        from .explain import check_output

        v.check_writable_dir("--explain", a.explain)
        check_output(a.explain, a.model, a.paths)
    cluster = None
    if a.ray:
        from .cluster import Cluster

        cluster = Cluster(a.ray, a.workers)  # joined (or refused in one line) before the model is loaded
    audit = open_audit_arg(a)
    model = load_model_arg(a)
    try:
        preds = predict_with_progress(model, a.paths, ood=not a.no_ood, cluster=cluster, audit=audit,
                                      explain=a.explain)
    finally:
        if audit is not None:
            audit.close()
    if a.format == "json":
        print(json.dumps([p.to_dict() for p in preds], indent=2))
    elif a.format == "csv":
        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerow(["path", "label", *[f"score_{lab}" for lab in model.labels], "threshold", "ood", "ood_score",
                    "ood_reason", "shift", "shift_score", "error"])
        for p in preds:
            w.writerow([p.path, p.label or "", *[p.scores.get(lab, "") for lab in model.labels],
                        p.threshold if p.threshold is not None else "", *[_cell(v) for v in (
                            p.ood, p.ood_score, p.ood_reason, p.shift, p.shift_score, p.error)]])
    else:
        for p in preds:
            print("\n".join(render_prediction_text(p, a.top_k, header=len(preds) > 1,
                                                   positive_label=model.positive_label)))
    if a.explain:
        n = sum(1 for p in preds if not p.error and p.scores)
        print(f"{n} heatmap(s) written to {a.explain}", file=sys.stderr)
    return 1 if any(p.error for p in preds) else 0


def run_evaluate(a) -> int:
    from .evaluate import evaluate
    from .progress import TqdmProgress

    r = evaluate(load_model_arg(a), a.data, label_from_name=a.label_from_name, output=a.output, ood=not a.no_ood,
                 progress=TqdmProgress(), ray=a.ray, workers=a.workers)
    m = r.metrics
    print(f"Images: {m['n_images'] - m['n_rejected']} scored, {m['n_rejected']} rejected as not a chest X-ray (no "
          f"score), {m['n_shift']} warned as unlike the training images, {m['n_skipped']} unreadable")
    rows = [("all images", m.get("all")), ("accepted only", m.get("accepted")),
            ("no shift warning", m.get("in_distribution")), ("internal test", m.get("internal_test"))]
    from .metrics import percent

    print(f"{'':16} {'AUC':>6} {'sens':>6} {'spec':>6} {'acc':>6}   (at the model's operating point)")
    for name, rep in rows:
        if rep:
            auc = f"{rep['auc']:6.3f}" if isinstance(rep.get("auc"), float) else f"{'-':>6}"
            print(f"{name:16} {auc} " + " ".join(f"{percent(rep.get(k)):>6}" if rep.get(k) is not None else f"{'-':>6}"
                                                 for k in ("sensitivity", "specificity", "accuracy")))
    if m.get("n_rejected") and m.get("all"):
        print("(all images: a refused image counts as not flagged)")
    if "who_verdict" in (m.get("all") or {}):
        print(m["all"]["who_verdict"])
    if (m.get("all") or {}).get("sample_warning"):
        print(f"warning: {m['all']['sample_warning']}", file=sys.stderr)
    for key in ("all_note", "accepted_note", "in_distribution_note"):
        if m.get(key):
            print(f"note: {m[key]}", file=sys.stderr)
    if r.skipped:
        print(f"Skipped {len(r.skipped)} unreadable file(s):", file=sys.stderr)
        for path, reason in r.skipped:
            print(f"  {path}: {reason}", file=sys.stderr)
    for note in r.notes:
        print(f"note: {note}", file=sys.stderr)
    if r.output_dir:
        print(f"Report written to {r.output_dir / 'report.html'}")
    if r.model_card:
        print(f"Evaluation added to the model card {r.model_card}")
    return 0


def run_cv(a) -> int:
    from .fsutil import atomic_write_bytes
    from .crossval import cross_validate
    from .outputs import check_output_dir, claim, folder_classes
    from .progress import TqdmProgress

    if a.output:  # before any work
        v.check_writable_dir("--output", a.output)
        check_output_dir(a.output, "cv", inputs=a.image_dir, files=["metrics.json"],
                         classes=[c for d in a.image_dir for c in folder_classes(d)])
    ft = _fine_tune_args(a)
    r = cross_validate(a.image_dir if len(a.image_dir) > 1 else a.image_dir[0], by_site=a.by_site, folds=a.folds, backbone=a.backbone, label_from_name=a.label_from_name,
                       group_regex=a.group_regex, positive_label=a.positive_label, seed=a.seed, progress=TqdmProgress(),
                       precision=a.precision, runtime=a.runtime, fine_tune=ft["fine_tune"],
                       fine_tune_options=ft.get("fine_tune_options"), ray=a.ray, workers=a.workers,
                       ray_device=a.ray_device)
    from .metrics import percent

    print("Each fold at its own operating point (chosen on its validation split, as train ships it):")
    for row in r["folds"]:
        print(f"{'site ' + row['site'] if 'site' in row else 'fold ' + str(row['fold'])}: AUC {row['auc']:.3f}  "
              f"threshold {row['threshold']:.4f}  accuracy {percent(row['accuracy'])}  sensitivity "
              f"{percent(row['sensitivity'])}  specificity {percent(row['specificity'])}  (N={row['n']})")
    for key, s in r["summary"].items():
        print(f"{key:12} {s['mean']:.3f} ± {s['sd']:.3f}" if key == "auc" else
              f"{key:12} {percent(s['mean'])} ± {percent(s['sd'])}")
    if a.output:
        out = claim(a.output, "cv", inputs=a.image_dir, files=["metrics.json"])
        atomic_write_bytes(out / "metrics.json", json.dumps(r, indent=2).encode())
    return 0


def run_adapt(a) -> int:
    from .adaptation import adapt

    r = adapt(a.model, a.images, a.output, labelled=a.labelled, operating_point=a.operating_point,
              batchnorm=not a.no_batchnorm, label_from_name=a.label_from_name, trust_modified=a.trust_modified_model)
    before, after = r.shift["before"], r.shift["after"]
    print(f"Site {r.site}: {r.n_images} image(s)" + (f", {r.n_labelled} labelled" if r.n_labelled else ""))
    print(f"BatchNorm statistics re-estimated in {r.batchnorm_layers} layer(s)" if r.batchnorm_layers
          else "BatchNorm statistics kept")
    if "mean_positive_score" in before:
        print(f"Mean positive score: {before['mean_positive_score']:.3f} -> {after['mean_positive_score']:.3f} "
              f"(Kolmogorov-Smirnov distance of the scores {r.shift['ks_distance']:.3f})")
    if "flagged_at_parent_threshold" in before:
        print(f"Flagged at the parent's threshold: {before['flagged_at_parent_threshold']:.1%} -> "
              f"{after['flagged_at_parent_threshold']:.1%}")
    print(f"Refused as not a chest X-ray: {before['refused']:.1%}")
    if "shift_warned" in before:
        print(f"Warned as unlike the training images: {before['shift_warned']:.1%} -> {after['shift_warned']:.1%}")
    op = r.operating_point
    if op:
        (slo, shi), (plo, phi) = op["sensitivity_ci"], op["specificity_ci"]
        print(f"Site operating point ({op['rule']}): threshold {op['threshold']:.4f}, sensitivity "
              f"{op['sensitivity']:.1%} [{slo:.1%}-{shi:.1%}], specificity {op['specificity']:.1%} "
              f"[{plo:.1%}-{phi:.1%}] on {op['n_positive'] + op['n_negative']} films")
    for note in r.notes:
        print(f"note: {note}", file=sys.stderr)
    for path, reason in r.skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    print(f"Model written to {r.model_dir}")
    return 0


def run_ood_check(a) -> int:
    model = load_model_arg(a)
    if model.chest_check is None and model.ood_gate is None:
        raise CxrlabError(f"{a.model}: this model has neither the chest X-ray check nor a shift reference "
                          "(trained with --no-ood)")
    preds = predict_with_progress(model, a.paths)
    for p in preds:
        print(f"{ood_check_line(p)}  {p.path}")
    return 1 if any(p.error or p.ood for p in preds) else 0


def ood_check_line(p) -> str:
    """Both answers: is it a frontal chest X-ray (accept / REJECT), and is it like the training images."""
    if p.error:
        return f"error: {p.error}"
    if p.ood:
        return f"REJECT  not a chest X-ray: {p.ood_reason}"
    chest = f"chest score {1 - p.ood_score:.2f}" if p.ood_score is not None else "chest check off"
    if p.shift_score is None:
        return f"accept  {chest}"
    like = "unlike the training images" if p.shift else "like the training images"
    return f"accept  {chest}  shift score {p.shift_score:.1f} ({like}; warning above {p.shift_threshold:.1f})"


def run_datasets(a) -> int:
    from .datasets import download, layout_archive
    from .progress import TqdmProgress

    v.check_writable_dir("DEST", a.dest)
    if a.archive:
        r = layout_archive(a.name, a.archive, a.dest, sha256=a.sha256, progress=TqdmProgress(unit="file"))
    else:
        r = download(a.name, a.dest, url=a.url, sha256=a.sha256, progress=TqdmProgress(unit="B"))
    for note in r.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"{a.name}: " + ", ".join(f"{n} {label}" for label, n in sorted(r.counts.items())) + f" in {r.dest}")
    return 0


def run_explain(a) -> int:
    from .explain import explain_paths, summary

    v.check_writable_dir("--output", a.output)
    skipped: list[tuple[str, str]] = []
    heatmaps = explain_paths(load_model_arg(a), a.paths, a.output, skipped=skipped, progress=BarForLongInputs())
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
    return 0 if heatmaps and not skipped else 1  # like predict: 1 when any requested file failed


def run_compare(a) -> int:
    from .compare import compare, format_table

    if a.output:
        v.check_writable_dir("--output", a.output)
    r = compare(a.dirs, output=a.output, names=a.names)
    print("\n".join(format_table(r)))
    for note in r["notes"]:
        print(f"note: {note}", file=sys.stderr)
    if a.output:
        print(f"Comparison written to {Path(a.output) / 'compare.html'}")
    return 0


def run_site_shift(a) -> int:
    from .outputs import check_output_dir, claim, model_labels
    from .progress import TqdmProgress
    from .siteshift import format_rows, site_shift_folder

    inputs = [a.model, a.data]
    v.check_existing_dir("DATA", a.data)
    if a.output:  # before any work
        v.check_writable_dir("--output", a.output)
        check_output_dir(a.output, "site-shift", inputs=inputs, files=["site_shift.json"],
                         classes=model_labels(a.model))
    rows = site_shift_folder(load_model_arg(a), a.data, label_from_name=a.label_from_name, progress=TqdmProgress())
    print("\n".join(format_rows(rows)))
    if a.output:
        from .fsutil import atomic_write_bytes

        out = claim(a.output, "site-shift", inputs=inputs, files=["site_shift.json"])
        atomic_write_bytes(out / "site_shift.json", json.dumps(rows, indent=2).encode())
        print(f"Table written to {out / 'site_shift.json'}")
    return 0


def run_dicom_listen(a) -> int:
    import logging

    from .dicom_net import check_ae_title, listen, parse_destination
    from .predict import load_model

    send_to = parse_destination(a.send_to)  # options first, then the model
    check_ae_title(a.ae_title, "--ae-title")
    audit = open_audit_arg(a)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # Films are answered in parallel (one per worker), so each ONNX Runtime run gets one thread, as in serve.
    model = load_model(a.model, trust_modified=a.trust_modified_model, threads=1, runtime=a.runtime,
                       precision=a.precision)
    try:
        listen(model, ae_title=a.ae_title, port=a.port, send_to=send_to, host=a.host, audit=audit, workers=a.workers)
    finally:
        if audit is not None:
            audit.close()
    return 0


def run_audit(a) -> int:
    from .audit import format_summary, summarise

    summary = summarise(a.database)
    print(json.dumps(summary, indent=2) if a.format == "json" else "\n".join(format_summary(summary)))
    return 0


def run_serve(a) -> int:
    from .serve import serve
    from .serve_limits import limits_from_options

    limits = limits_from_options(max_upload_mb=a.max_upload_mb, max_request_mb=a.max_request_mb,
                                 max_decode_mb=a.max_decode_mb, decode_budget_mb=a.decode_budget_mb,
                                 request_timeout=a.request_timeout)
    serve(a.model, host=a.host, port=a.port, allowed_hosts=a.allowed_host or (), trust_modified=a.trust_modified_model,
          limits=limits, runtime=a.runtime, precision=a.precision, audit=open_audit_arg(a))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="cxrlab", description="Chest X-ray classifiers from a folder, used honestly.",
                    epilog=EXIT_STATUS, formatter_class=HelpFormatter)
    add_version_option(parser)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help="what to do; 'cxrlab COMMAND --help' lists its options")

    def command(name, func, help_, resumable=False):
        own = EPILOG.get(name, "")
        epilog = own if "exit status" in own else "\n".join(filter(None, [own, EXIT_STATUS]))
        p = sub.add_parser(name, help=help_, description=help_, epilog=epilog, formatter_class=HelpFormatter)
        p.set_defaults(func=func, resumable=resumable)
        add_debug_flag(p)
        return p

    add_train_options(command("train", run_train, "train a classifier from a folder of labelled images",
                              resumable=True))
    p = command("predict", run_predict, "label images with a trained model")
    add_model_options(p)
    p.add_argument("paths", nargs="+", metavar="PATH", help="image file or folder (repeat for several)")
    add_flag(p, "top_k", type=v.positive_int, default=None, metavar="K",
             help="show the K best labels, K >= 1 (default: all)")
    add_flag(p, "format", choices=["text", "json", "csv"], default="text", help="how to print the predictions")
    add_no_ood_option(p)
    add_flag(p, "explain", metavar="DIR",
             help="also write class activation map overlays into this folder (default: none)")
    add_ray_option(p)
    add_audit_option(p)
    p = command("evaluate", run_evaluate, "metrics of a model on any labelled folder (external validation)")
    add_model_options(p)
    p.add_argument("data", metavar="DATA", help="labelled folder (one subfolder per class)")
    add_label_from_name_option(p)
    add_output_option(p, "metrics.json, predictions.csv and report.html", default_help=_PRINT_ONLY)
    add_no_ood_option(p, "score every image as accepted: no chest X-ray check, no shift warning")
    add_ray_option(p)
    add_cv_options(command("cv", run_cv, "stratified, group-aware k-fold cross-validation on cached embeddings",
                           resumable=True))
    add_adapt_options(command("adapt", run_adapt, "adapt a model to a new site (hospital): BatchNorm statistics, "
                              "OOD reference and, with labelled films, the site's own operating point"))
    p = command("ood-check", run_ood_check, "per image: is it a frontal chest X-ray (else refused), and how unlike "
                                            "the training images it is (shift score, a warning only)")
    add_model_options(p)
    p.add_argument("paths", nargs="+", metavar="PATH", help="image file or folder (repeat for several)")
    p = command("datasets", run_datasets, "download and lay out the NLM TB chest X-ray sets")
    p.add_argument("action", choices=["download"], help="what to do (download)")
    p.add_argument("name", choices=["shenzhen", "montgomery"], help="which data set")
    p.add_argument("dest", metavar="DEST", help="folder to lay the images out in (one subfolder per class)")
    p.add_argument("--url", help="download from this address (default: the NLM site, then its Open-i mirror)")
    p.add_argument("--sha256", help="expected SHA-256 of the archive (default: the digest recorded at its first "
                                    "download, checked on every later run)")
    p.add_argument("--archive", metavar="FILE", help="lay out an archive you already downloaded, no network "
                                                     "(default: download it)")
    p = command("explain", run_explain, "write class activation map overlays (where the model looked)")
    add_model_options(p)
    p.add_argument("paths", nargs="+", metavar="PATH", help="image file or folder (repeat for several)")
    add_output_option(p, "the heatmaps", required=True)
    add_flag(p, "summary", action="store_true", help="print the share of heat in the image border")
    p = command("compare", run_compare, "tabulate metrics and overlay the ROC curves of several runs or evaluations")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="a 'train --output' model dir or an 'evaluate --output' dir")
    add_output_option(p, "compare.html and compare.json", default_help=_PRINT_ONLY)
    add_flag(p, "names", help="comma-separated names for the rows, one per DIR (default: the folder names)")
    p = command("site-shift", run_site_shift, "AUC and sens/spec at the stored operating point under simulated hospital differences")
    add_model_options(p)
    p.add_argument("data", metavar="DATA", help="labelled folder (one subfolder per class)")
    add_label_from_name_option(p)
    add_output_option(p, "site_shift.json (the rows as JSON)", default_help=_PRINT_ONLY)
    add_serve_options(command("serve", run_serve, "a local web page and REST API"))
    p = command("dicom-listen", run_dicom_listen, "receive films from a PACS (DICOM C-STORE) and send each answer "
                                                  "back into the film's study as a Secondary Capture and an SR")
    add_model_options(p)
    add_flag(p, "ae_title", default="CXRLAB", metavar="AE", help="this listener's AE title")
    p.add_argument("--port", type=v.port, default=11112, help="DICOM port to listen on, 1 to 65535")
    p.add_argument("--host", default="127.0.0.1", help="address to bind ('0.0.0.0': every interface, for a PACS "
                                                       "on another machine)")
    add_flag(p, "send_to", required=True, metavar="AE@HOST:PORT", help="the PACS that receives the answers")
    add_flag(p, "workers", type=v.positive_int, default=None, metavar="N", help="films answered at once (default: one per core)")
    add_audit_option(p)
    p = command("audit", run_audit, "summarise an audit log: counts, refusal and shift-warning rates, weekly scores")
    p.add_argument("database", metavar="DB", help="the audit database written with --audit")
    add_flag(p, "format", choices=["text", "json"], default="text", help="how to print the summary")
    return parser


def add_audit_option(p) -> None:
    add_flag(p, "audit", metavar="DB", help="record every answer in this SQLite audit log (created if missing): "
                                            "time, model hash, input SHA-256, source, decision, score, latency; "
                                            "no pixels, no names (default: none, nothing recorded)")


def add_adapt_options(p) -> None:
    add_model_options(p)
    p.add_argument("images", metavar="SITE_DIR", help="the new site's images (with --labelled: one subfolder per class)")
    add_output_option(p, "the adapted model directory", required=True)
    add_flag(p, "labelled", action="store_true",
             help="choose the site's own operating point on its labelled films (e.g. 30-100)")
    add_flag(p, "operating_point", default="who", type=v.operating_point, metavar="RULE",
             help="who | youden | sensitivity=0.90 | specificity=0.70, chosen on the site's labelled films")
    add_flag(p, "no_batchnorm", action="store_true", help="keep the network's BatchNorm statistics")
    add_label_from_name_option(p)


def add_serve_options(p) -> None:
    add_model_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (loopback only unless changed)")
    p.add_argument("--port", type=v.port, default=8000, help="1 to 65535")
    add_flag(p, "allowed_host", action="append", metavar="NAME",
                   help="a Host name clients use besides localhost and --host (repeatable; '*' allows any, "
                        "which turns off the DNS-rebinding guard) (default: none)")
    add_flag(p, "max_upload_mb", type=float, metavar="MB", help="largest file (default: 32)")
    add_flag(p, "max_request_mb", type=float, metavar="MB",
                   help="largest request body, all files together (default: 128, or 32 x --max-upload-mb + 1 "
                        "when that is less)")
    add_flag(p, "max_decode_mb", type=float, metavar="MB",
                   help="memory one image may take to decode, estimated from its header (default: 1024)")
    add_flag(p, "decode_budget_mb", type=float, metavar="MB",
                   help="decode memory of all images in flight together (default: 2048)")
    add_flag(p, "request_timeout", type=float, metavar="SECONDS",
                   help="time allowed for a request body to arrive (default: 60)")
    add_audit_option(p)

def add_cv_options(p) -> None:
    t = TrainOptions()  # cv shares train's defaults, but for its folds and its positive class
    d = {"folds": DEFAULT_FOLDS, "backbone": t.backbone, "positive_label": CV_POSITIVE_LABEL,
         "precision": t.precision, "seed": t.seed}
    p.add_argument("image_dir", nargs="+", metavar="IMAGE_DIR",
                   help="folder with one subfolder per class; several: one per site (folds stratified by site)")
    add_flag(p, "by_site", action="store_true",
          help="leave one site out: each site in turn is tested on a model trained on the others")
    add_flag(p, "folds", type=v.folds, default=d["folds"], metavar="K", help="2 or more, at most the images (patients) of a class")
    add_backbone_option(p, d["backbone"])
    add_label_from_name_option(p)
    add_group_regex_option(p)
    add_positive_label_option(p, d["positive_label"])
    add_precision_option(p, d["precision"])
    add_fine_tune_options(p, "per fold, as `cxrlab train --fine-tune` does (slow)")
    add_seed_option(p, d["seed"])
    add_output_option(p, "metrics.json", default_help=_PRINT_ONLY)
    add_ray_option(p, fine_tunes=True)


def add_version_option(p) -> None:
    p.add_argument("--version", action="version", version=f"cxrlab {__version__}", help="print the version and exit")


def add_debug_flag(p) -> None:
    """--debug after the subcommand too; SUPPRESS keeps a --debug given before it."""
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")


_OS_CAUSES = {
    errno.EACCES: "permission denied", errno.EPERM: "operation not permitted", errno.EROFS: "read-only file system",
    errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded", errno.EISDIR: "is a directory",
    errno.ENOTDIR: "not a directory (a part of the path is a file)", errno.ENOENT: "no such file or directory",
    errno.EEXIST: "already exists", errno.ENOTEMPTY: "folder not empty", errno.ENAMETOOLONG: "file name too long",
    errno.ELOOP: "too many levels of symbolic links", errno.EMFILE: "too many open files",
    errno.EIO: "input/output error",
}


def describe_os_error(exc: OSError) -> str:
    """'PATH: cause' of a failed file operation, in words, e.g. 'out/model: read-only file system'."""
    cause = _OS_CAUSES.get(exc.errno) or (exc.strerror or str(exc) or type(exc).__name__)
    paths = [os.fsdecode(p) if isinstance(p, bytes) else str(p) for p in (exc.filename, exc.filename2) if p is not None]
    return f"{' -> '.join(paths)}: {cause}" if paths else cause


def _inputs(args) -> str:
    """The command's main input, for messages (e.g. which folder was being read when memory ran out)."""
    for key in ("image_dir", "image_dir_pos", "data", "dirs", "paths", "image", "model"):
        value = getattr(args, key, None)
        if value:
            if isinstance(value, (list, tuple)):
                return str(value[0]) + (f" (and {len(value) - 1} more)" if len(value) > 1 else "")
            return str(value)
    return ""


def _printable(text: str, limit: int = 200) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")[:limit]


def _one_line(text: str) -> str:
    return str(text).replace("\r", "\\r").replace("\n", "\\n")


def run(func, args, debug: bool = False) -> int:
    """Run a command: every expected failure becomes one 'error:' line, never a traceback (unless --debug).

    1: CxrlabError, a file operation that failed (path and cause named), out of memory, text that is not
    UTF-8; 2: anything unexpected (an internal error); 130: interrupted.
    """
    try:
        return func(args)
    except KeyboardInterrupt:
        resume = "; run the same command again to resume" if getattr(args, "resumable", False) else ""
        print(f"interrupted: nothing half-written was left behind{resume}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _silence_stdout()
        return 0
    except MemoryError:
        if debug:
            raise
        where = _inputs(args)
        print(f"error: out of memory{f' while reading {where}' if where else ''}; close other programs, or use "
              "fewer or smaller images (or a smaller --batch-size / --workers)", file=sys.stderr)
        return 1
    except Exception as exc:
        if debug:
            raise
        message, code = _error_line(exc)
        print(f"error: {_one_line(message)}", file=sys.stderr)
        return code


def _error_line(exc: Exception) -> tuple[str, int]:
    if isinstance(exc, CxrlabError):
        return str(exc), 1
    if isinstance(exc, OSError):
        return describe_os_error(exc), 1
    if isinstance(exc, UnicodeEncodeError) and isinstance(exc.object, str):
        return (f"{_printable(exc.object)}: not valid UTF-8 (a file or option name from a system with another "
                "encoding?); rename it or pass it in UTF-8"), 1
    if isinstance(exc, UnicodeDecodeError):
        return (f"a file that should be UTF-8 text is not ({exc.reason} at byte {exc.start}); save it as UTF-8 "
                "(--debug shows where it was read)"), 1
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        return f"this needs the Python module '{exc.name}', which is not installed (e.g. pip install {exc.name})", 1
    detail = f"{type(exc).__name__}: {_printable(str(exc))}" if str(exc) else type(exc).__name__
    return f"internal error ({detail}); rerun with --debug for the traceback", 2


def _silence_stdout() -> None:
    """After a closed pipe (cxrlab predict ... | head), let the interpreter's final flush go nowhere."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _tolerant_streams() -> None:
    """File names that are not valid UTF-8 (surrogate-escaped by Python) print as \\x escapes, never crash."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError, OSError):  # a StringIO in tests, a closed stream
            stream.reconfigure(errors="backslashreplace")


def _parse(parser: argparse.ArgumentParser, argv) -> tuple[argparse.Namespace | None, int]:
    """(args, 0), or (None, exit status) for --help and bad options (argparse has printed the line)."""
    try:
        return parser.parse_args(argv), 0
    except SystemExit as exc:
        return None, 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 2


def run_parser(parser: argparse.ArgumentParser, argv=None) -> int:
    """Parse ``argv`` and run the chosen ``func``: the whole life of one command, as an exit status."""
    with contextlib.suppress(ValueError):  # only the main thread may set it; elsewhere keep the caller's
        signal.signal(signal.SIGINT, signal.default_int_handler)
    _tolerant_streams()
    args, code = _parse(parser, argv)
    return code if args is None else run(args.func, args, args.debug)


def main(argv=None) -> int:
    return run_parser(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
