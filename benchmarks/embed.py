"""Embedding and prediction throughput per engine, precision and memory, each against a baseline from the same run.

    python benchmarks/embed.py [IMAGE_DIR] [--backbones efficientnet-lite0,inception-v3]
                               [--engines onnxruntime:fp32,openvino:fp32,openvino:bf16] [--precisions fp32,int8]
                               [--model MODEL_DIR] [--scale 20000] [--eager-images 64]

The baseline of every ratio is a plain ONNX Runtime fp32 loop over the same graph, measured in the same run:
each file read, decoded and resized in turn (cxrlab's own decoder), then run through the graph in batches of
32, nothing overlapped. For every backbone, graph precision (fp32, int8) and engine (runtime:precision, see
cxrlab.runtime): images/s end to end from files (read + decode + resize + forward, no cache) through
cxrlab's Embedder in a fresh process, the ratio to that loop, its peak RSS and the share of the machine's peak
FLOP rate; and the ratio to a naive PyTorch eager loop. Then the whole `cxrlab predict` process over every image
(engine auto) against a whole-process plain loop over the same model.onnx, the warm `cxrlab train` wall time
(every embedding a cache hit), a cold `cxrlab predict` of one image, and optionally a scale run on generated
images (peak RSS at 1k vs N images, and the time to load N cached embeddings).

Peak FLOP rate: measured, not looked up: the best float32 matrix-multiply rate ONNX Runtime's own
kernels reach on this machine with all cores (a 2048^3 MatMul, best of 5), which is what its dense
convolution kernels can at most approach. Model FLOPs are counted from the ONNX graph (2 x MACs of
every Conv and Gemm/MatMul, shapes from ONNX Runtime's symbolic shape inference at batch 1); int8 and bf16
rows count the same operations against the same float32 peak, so their share can exceed what float32 could reach.

Network alone: the same engine (and the baseline's plain session) over images decoded beforehand, so that the
end-to-end ratio can be read against what the network itself allows on this CPU: no pipeline can beat it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DEFAULT_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "shenzhen"


def images(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})


def peak_gflops() -> float:
    """Best float32 GEMM rate of ONNX Runtime's own kernels (MLAS) on all cores: 2048^3, best of 5."""
    from onnx import TensorProto, helper, numpy_helper

    from cxrlab.embed import make_session

    n = 2048
    b = numpy_helper.from_array(np.random.default_rng(0).random((n, n), dtype=np.float32), "b")
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "gemm",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n])],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])], [b])
    session = make_session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    a = np.random.default_rng(1).random((n, n), dtype=np.float32)
    session.run(None, {"a": a})
    best = min(_timed(lambda: session.run(None, {"a": a})) for _ in range(5))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def model_gflop(onnx_path: str, size: int = 0) -> float:
    import onnx
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    model = onnx.load(onnx_path)
    inp = model.graph.input[0].type.tensor_type.shape
    inp.dim[0].dim_value = 1
    model = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.value_info}
    shapes.update({v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.output})
    weights = {w.name: list(w.dims) for w in model.graph.initializer}
    macs = 0
    for node in model.graph.node:
        if node.op_type == "Conv" and node.output[0] in shapes and node.input[1] in weights:
            out, w = shapes[node.output[0]], weights[node.input[1]]
            macs += int(np.prod(out)) * int(np.prod(w[1:]))
        elif node.op_type in ("Gemm", "MatMul") and node.input[1] in weights and node.output[0] in shapes:
            macs += int(np.prod(shapes[node.output[0]])) * weights[node.input[1]][0 if node.op_type == "MatMul" else -1]
    return 2 * macs / 1e9


def worker(args: dict) -> dict:
    """Runs in a fresh process so that its peak RSS is its own."""
    paths = [Path(p) for p in Path(args["paths_file"]).read_text().splitlines()]
    if args.get("plain_model"):
        elapsed = _timed(lambda: plain_loop(args["plain_model"], paths, output="probabilities"))
        return {"img_s": len(paths) / elapsed, "rss_mb": peak_rss_mb()}
    from cxrlab.backbones import create_backbone
    from cxrlab.embed import Embedder
    from cxrlab.runtime import Engine, bf16_offered, resolve

    bb = create_backbone(args["backbone"])
    if args["precision"] != "fp32":
        from cxrlab.precision import with_precision

        bb = with_precision(bb, args["precision"], paths[::7])
    if args.get("plain"):
        plain_loop(str(bb.onnx_path), paths[:32])
        elapsed = _timed(lambda: plain_loop(str(bb.onnx_path), paths))
    else:
        engine = args.get("engine", "auto")
        embedder = Embedder(bb, engine=resolve(bf16_ok=bf16_offered(bb.id)) if engine == "auto"
                            else Engine(*engine.split(":")))
        embedder.embed_files(paths[:32])
        elapsed = _timed(lambda: embedder.embed_files(paths))
    out = {"img_s": len(paths) / elapsed, "rss_mb": peak_rss_mb()}
    if args.get("network"):  # after the row's peak RSS is taken: every image is held decoded here
        if args.get("plain"):
            out["network_img_s"] = plain_network(str(bb.onnx_path), paths)
        else:
            arrays = decoded(paths, bb.spec.input_size)
            out["network_img_s"] = len(arrays) / _timed(lambda: embedder.embed_arrays(arrays))
    return out


def peak_rss_mb() -> float:
    """This process's own peak resident memory (VmHWM). Not getrusage's ru_maxrss: Linux carries that over a
    fork and exec, so a worker would report its parent's peak whenever the parent had used more."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def decoded(paths, size: int) -> list:
    from cxrlab.embed import prepare, read_file

    return [prepare(read_file(p), size, str(p))[0] for p in paths]


def plain_network(onnx_path: str, paths, batch: int = 32) -> float:
    """The baseline's network alone: the same ONNX Runtime fp32 session over images decoded beforehand."""
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    arrays = decoded(paths, session.get_inputs()[0].shape[2])
    batches = [np.stack(arrays[i:i + batch])[:, None] for i in range(0, len(arrays), batch)]
    session.run(["embedding"], {"image": batches[0]})
    return len(arrays) / _timed(lambda: [session.run(["embedding"], {"image": b}) for b in batches])


def plain_loop(onnx_path: str, paths, output: str = "embedding", batch: int = 32) -> None:
    """The baseline: ONNX Runtime fp32, each file read, decoded and resized in turn, then batches of 32."""
    import onnxruntime as ort

    from cxrlab.embed import prepare, read_file

    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    size = session.get_inputs()[0].shape[2]
    for i in range(0, len(paths), batch):
        arrays = [prepare(read_file(p), size, str(p))[0] for p in paths[i:i + batch]]
        session.run([output], {"image": np.stack(arrays)[:, None]})


def eager_rate(paths, backbone: str) -> float:
    import torch
    from PIL import Image

    from cxrlab.backbones import weights_path, get_spec

    spec = get_spec(backbone)
    module = spec.builder(spec, weights_path(spec)).eval()
    torch.set_num_threads(os.cpu_count() or 1)

    def load(p):
        img = Image.open(p).convert("L").resize((spec.input_size, spec.input_size), Image.BILINEAR)
        return np.asarray(img, np.float32)[None] / 255.0

    with torch.no_grad():
        module(torch.from_numpy(np.stack([load(paths[0])])))
        start = time.perf_counter()
        for i in range(0, len(paths), 16):
            module(torch.from_numpy(np.stack([load(p) for p in paths[i : i + 16]])))
    return len(paths) / (time.perf_counter() - start)


def in_subprocess(args: dict) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(str(p) for p in args.pop("paths")))
    args["paths_file"] = f.name
    try:
        out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(args)], check=True,
                             capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    return json.loads(out.stdout.strip().splitlines()[-1])


def cli_seconds(cmd: list[str]) -> float:
    """Whole-process wall time; exit status 1 (an image refused) is an answer, not a failure."""
    def run():
        done = subprocess.run([sys.executable, "-m", "cxrlab", *cmd], capture_output=True)
        if done.returncode not in (0, 1):
            sys.exit(f"cxrlab {' '.join(cmd[:3])} ... failed: {done.stderr.decode()[-500:]}")
    return _timed(run)


def scale_run(n: int, tmp: Path) -> None:
    from PIL import Image

    from cxrlab.backbones import create_backbone
    from cxrlab.cache import EmbeddingStore

    folder = tmp / "scale"
    folder.mkdir()
    rng = np.random.default_rng(0)
    base = np.asarray(Image.open(images(DEFAULT_DIR)[0]).convert("L").resize((256, 256)), np.float32)
    for i in range(n):
        noisy = np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(folder / f"img{i:05d}.png")
    paths = [str(p) for p in sorted(folder.iterdir())]
    small = in_subprocess({"backbone": "efficientnet-lite0", "precision": "fp32", "paths": paths[:1000]})
    big = in_subprocess({"backbone": "efficientnet-lite0", "precision": "fp32", "paths": paths})
    print(f"scale run (lite0, engine auto, generated 256 px PNGs): peak RSS {small['rss_mb']:.0f} MB at 1,000 images, "
          f"{big['rss_mb']:.0f} MB at {n:,} images ({big['img_s']:.0f} img/s)")
    bb = create_backbone("efficientnet-lite0")
    store = EmbeddingStore(tmp / "bn", bb.cache_key(), bb.spec.embed_dim)
    vecs = np.random.default_rng(1).random((n, bb.spec.embed_dim), dtype=np.float32)
    for i in range(0, n, 32):
        store.put_many([os.urandom(32) for _ in range(min(32, n - i))], vecs[i : i + 32])
    store.compact()
    seconds = _timed(lambda: EmbeddingStore(tmp / "bn", bb.cache_key(), bb.spec.embed_dim))
    print(f"loading {n:,} cached embeddings: {seconds:.3f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("image_dir", nargs="?", default=str(DEFAULT_DIR))
    ap.add_argument("--backbones", default="efficientnet-lite0,inception-v3")
    ap.add_argument("--precisions", default="fp32,int8", help="graph precisions (int8: a quantised backbone)")
    ap.add_argument("--engines", default="onnxruntime:fp32,openvino:fp32,openvino:bf16",
                    help="runtime:precision pairs to run each graph on")
    ap.add_argument("--model", help="also time `cxrlab predict` of this model directory (default: a head-only model "
                                    "trained here)")
    ap.add_argument("--no-commands", action="store_true", help="only the embedding rows (no train/predict timing)")
    ap.add_argument("--eager-images", type=int, default=64)
    ap.add_argument("--scale", type=int, default=0, help="also run the memory scale test on this many images")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(json.loads(a.worker))))
        return
    root = Path(a.image_dir)
    paths = images(root)
    if not paths:
        sys.exit(f"no images under {root}")
    from cxrlab.runtime import native_bf16

    peak = peak_gflops()
    print(f"images: {len(paths)}; cores: {os.cpu_count()}; measured peak (SGEMM): {peak:.0f} GFLOP/s; "
          f"native bf16: {'yes' if native_bf16() else 'no'}")
    print(f"{'backbone':20} {'graph':5} {'engine':18} {'img/s':>7} {'x plain':>7} {'x eager':>7} {'GFLOP/img':>9} "
          f"{'% peak':>7} {'RSS MB':>7} {'network img/s':>13} {'x plain':>7}")
    from cxrlab.backbones import create_backbone

    engines = a.engines.split(",")
    if not native_bf16():
        engines = [e for e in engines if not e.endswith(":bf16")]
    for backbone in a.backbones.split(","):
        eager = eager_rate(paths[: a.eager_images], backbone)
        gflop = model_gflop(str(create_backbone(backbone).onnx_path), 0)  # the fp32 graph's operations
        for precision in a.precisions.split(","):
            if precision != "fp32":
                from cxrlab.errors import BackboneError
                from cxrlab.precision import with_precision

                try:  # quantise here, so that the worker's peak RSS is the embedding's alone
                    with_precision(create_backbone(backbone), precision, paths[::7])
                except BackboneError as exc:
                    print(f"{backbone:20} {precision:5} not offered: {exc}")
                    continue
            job = {"backbone": backbone, "precision": precision, "paths": [str(p) for p in paths], "network": True}
            plain = in_subprocess({**job, "plain": True})
            print(f"{backbone:20} {precision:5} {'plain ORT fp32 loop':18} {plain['img_s']:7.1f} {1:6.2f}x "
                  f"{plain['img_s'] / eager:6.1f}x {gflop:9.2f} {100 * plain['img_s'] * gflop / peak:6.1f}% "
                  f"{plain['rss_mb']:7.0f} {plain['network_img_s']:13.1f} {1:6.2f}x")
            for engine in engines:
                r = in_subprocess({**job, "engine": engine})
                print(f"{backbone:20} {precision:5} {engine:18} {r['img_s']:7.1f} {r['img_s'] / plain['img_s']:6.2f}x "
                      f"{r['img_s'] / eager:6.1f}x {gflop:9.2f} {100 * r['img_s'] * gflop / peak:6.1f}% {r['rss_mb']:7.0f} "
                      f"{r['network_img_s']:13.1f} {r['network_img_s'] / plain['network_img_s']:6.2f}x")
    if a.no_commands:
        return
    with tempfile.TemporaryDirectory() as tmp:
        model = a.model or f"{tmp}/model"
        train = ["train", str(root), "--head-only", "--output", f"{tmp}/model", "--bottleneck-dir", f"{tmp}/bn",
                 "--quiet", "--no-report"]
        subprocess.run([sys.executable, "-m", "cxrlab", *train], check=True, capture_output=True)
        print(f"warm `cxrlab train --head-only` (all cache hits), whole process: {cli_seconds(train):.2f} s")
        print(f"cold `cxrlab predict` of one image, whole process: {cli_seconds(['predict', '--model', model, str(paths[0])]):.2f} s")
        plain = _timed(lambda: in_subprocess({"plain_model": str(Path(model) / "model.onnx"),
                                              "paths": [str(p) for p in paths]}))
        for engine in (["--runtime", "onnxruntime", "--precision", "fp32"], []):
            seconds = cli_seconds(["predict", "--model", model, *map(str, paths), "--format", "csv", *engine])
            print(f"`cxrlab predict` of {len(paths)} images, whole process, {' '.join(engine) or 'engine auto'}: "
                  f"{len(paths) / seconds:.1f} img/s, {plain / seconds:.2f}x a whole-process plain ONNX Runtime fp32 "
                  f"loop over its model.onnx ({len(paths) / plain:.1f} img/s)")
        print(graph_alone(str(Path(model) / "model.onnx"), paths))
        if a.scale:
            scale_run(a.scale, Path(tmp))


def graph_alone(onnx_path: str, paths, batch: int = 16) -> str:
    """The model's graph alone on images decoded beforehand: ONNX Runtime fp32 against bf16 on OpenVINO (where
    this CPU has it), one session on all cores each: the most any pipeline around it can gain."""
    from cxrlab.runtime import REFERENCE, Engine, make_session, native_bf16

    import onnxruntime as ort

    size = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"]).get_inputs()[0].shape[2]
    arrays = decoded(paths, size)
    batches = [np.stack(arrays[i:i + batch])[:, None] for i in range(0, len(arrays), batch)]
    rates = {}
    for engine in [REFERENCE] + ([Engine("openvino", "bf16")] if native_bf16() else []):
        session = make_session(onnx_path, engine=engine)
        session.run(["probabilities"], {"image": batches[0]})
        rates[str(engine)] = len(arrays) / _timed(lambda: [session.run(["probabilities"], {"image": b}) for b in batches])
    text = ", ".join(f"{k} {v:.1f} img/s" for k, v in rates.items())
    if len(rates) == 2:
        text += f" ({rates['openvino bf16'] / rates['onnxruntime fp32']:.2f}x)"
    return f"the model's graph alone (decoded beforehand, batch {batch}): {text}"


if __name__ == "__main__":
    main()
