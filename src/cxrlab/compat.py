"""Seed compatibility: the tutorial's `retrain` and `label_image` commands, mapped onto cxrlab."""

from __future__ import annotations

import sys
from pathlib import Path

from .cli import (EXIT_STATUS, HelpFormatter, Parser, add_flag, add_train_options, add_trust_option,
                  add_version_option, render_prediction_text, render_train_result, run_parser, train_kwargs)

ARCHITECTURES = {"inception_v3": "inception-v3", "mobilenet": "efficientnet-lite0"}


def _run_retrain(a) -> int:
    from .cli import image_inputs, print_step
    from .fsutil import atomic_write_bytes
    from .progress import TqdmProgress
    from .training import train

    image_dir = image_inputs(a)
    if not image_dir or isinstance(image_dir, list):
        from .errors import CxrlabError

        raise CxrlabError("give one image folder with --image_dir" + (" (retrain takes a single folder; "
                          "`cxrlab train` takes one per site)" if image_dir else ""))
    from .validate import check_output_file

    graph = Path(check_output_file("--output_graph", a.output_graph))
    labels = Path(check_output_file("--output_labels", a.output_labels))
    model_dir = graph.with_name(graph.stem + ".cxrlab")
    _check_retrain_outputs(graph, labels, model_dir, image_dir)  # train() checks model_dir itself
    a.backbone = a.backbone or ARCHITECTURES.get(a.architecture, a.architecture)
    if a.fine_tune is None:  # the tutorial retrains the last layer only; --fine-tune opts in
        a.fine_tune = False
    r = train(image_dir, output=model_dir, on_step=print_step, progress=TqdmProgress(), **train_kwargs(a))
    render_train_result(r, print_misclassified=a.print_misclassified_test_images)
    atomic_write_bytes(graph, (model_dir / "model.onnx").read_bytes())
    atomic_write_bytes(labels, (model_dir / "labels.txt").read_bytes())
    print(f"Wrote {graph} (ONNX) and {labels}; full model directory: {model_dir}")
    return 0


def _check_retrain_outputs(graph: Path, labels: Path, model_dir: Path, image_dir) -> None:
    """--output_graph / --output_labels: an existing file is replaced only if cxrlab wrote it (an ONNX
    file cxrlab produced; a labels file matching that graph or the model directory beside it)."""
    from .outputs import OutputError, check_output_file, real_path

    if real_path(graph) == real_path(labels):
        raise OutputError(f"--output_graph and --output_labels are the same file ({graph}); give two names")
    graph_labels = _cxrlab_graph_labels(graph) if graph.is_file() else None
    check_output_file(graph, "--output_graph", inputs=[image_dir],
                      written_by_cxrlab=lambda path: graph_labels is not None)
    known = [graph_labels, _lines(model_dir / "labels.txt")]
    check_output_file(labels, "--output_labels", inputs=[image_dir],
                      written_by_cxrlab=lambda path: _lines(path) is not None and _lines(path) in known)


def _cxrlab_graph_labels(path: Path) -> list[str] | None:
    """The labels recorded in an ONNX file cxrlab produced; None for any other file."""
    import json

    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - whatever does not parse as ONNX was not written by cxrlab
        return None
    meta = {p.key: p.value for p in model.metadata_props}
    if model.producer_name != "cxrlab" or meta.get("producer") != "cxrlab":
        return None
    try:
        return [str(x) for x in json.loads(meta.get("labels", "[]"))]
    except (TypeError, ValueError):
        return []


def _lines(path: Path) -> list[str] | None:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None


def retrain_main(argv=None) -> int:
    return run_parser(build_retrain_parser(), argv)


def build_retrain_parser() -> Parser:
    p = Parser(prog="retrain", description="The TensorFlow retrain.py tutorial's command, run by cxrlab.",
               epilog=EXIT_STATUS, formatter_class=HelpFormatter)
    add_version_option(p)
    add_train_options(p)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    # embeddings go to the private per-user cache, never a shared /tmp folder
    p.set_defaults(func=_run_retrain, backbone=None, resumable=True)
    backbone = next(a for a in p._actions if a.dest == "backbone")  # argparse offers no public way to edit a help
    backbone.help += " (default: the one --architecture names)"
    add_flag(p, "output_graph", default="/tmp/output_graph.pb", metavar="FILE",
          help="the trained graph, written as ONNX (cxrlab's analogue of the .pb)")
    add_flag(p, "output_labels", default="/tmp/output_labels.txt", metavar="FILE", help="the class names, one a line")
    add_flag(p, "architecture", default="inception_v3",
          help="inception_v3 (the tutorial's) or any cxrlab backbone; --backbone, when given, wins")
    for ignored in ("model_dir", "final_tensor_name", "intermediate_output_graphs_dir", "intermediate_store_frequency"):
        add_flag(p, ignored, help="accepted for compatibility; not used")
    return p


def _run_label_image(a) -> int:
    from .predict import Model

    model = Model.from_graph(a.graph, a.labels, trust_modified=a.trust_modified_model)
    failed = False
    for image in a.image:
        for p in model.predict([image]):
            failed = failed or bool(p.error)
            print("\n".join(render_prediction_text(p, header=len(a.image) > 1,
                                                   positive_label=model.positive_label)))
    return 1 if failed else 0


def label_image_main(argv=None) -> int:
    return run_parser(build_label_image_parser(), argv)


def build_label_image_parser() -> Parser:
    p = Parser(prog="label_image", description="The tutorial's label_image, on a cxrlab model.",
               epilog="exit status: 0 when every image was labelled, 1 when any could not be read; "
                      "2 a bad option or an internal error", formatter_class=HelpFormatter)
    add_version_option(p)
    add_flag(p, "graph", default="/tmp/output_graph.pb", metavar="FILE", help="the graph written by retrain --output_graph")
    add_flag(p, "labels", default="/tmp/output_labels.txt", metavar="FILE",
          help="the labels written by retrain --output_labels")
    add_flag(p, "image", required=True, action="append", metavar="FILE", help="image file (repeat for several)")
    add_trust_option(p)
    for ignored in ("input_layer", "output_layer", "input_height", "input_width", "input_mean", "input_std"):
        add_flag(p, ignored, help="accepted for compatibility: the preprocessing lives in the model")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=_run_label_image)
    return p


if __name__ == "__main__":
    sys.exit(retrain_main())
