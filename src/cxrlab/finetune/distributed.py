"""Fine-tuning on a Ray cluster: data-parallel training with Ray Train's ``TorchTrainer`` (gloo on CPU workers).

Each worker runs the local loop's own pieces (``loop._setup``, ``_train_epochs``: the same optimiser, schedule,
augmentation, validation and best-epoch rule) on its shard of the training images, with the network and head
wrapped in ``DistributedDataParallel`` so that every step averages the workers' gradients. The recipe's batch
size is the global one: each of N workers takes batch_size / N images per step, so a step sees as many images
and the schedule has as many steps as on one machine. BatchNorm statistics are each worker's own (as DDP does).

The best epoch's weights come back as a Ray Train checkpoint; the driver rebuilds the module from them and
``finetune.stage`` exports it as it exports a local run. A worker that dies is replaced and the run starts over
(``FailureConfig``); it is seeded, so the result is the same.
"""

from __future__ import annotations

import copy
import os
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from ..backbones import cache_dir, weights_path as registry_weights
from ..errors import CxrlabError
from ..progress import resolve
from .loop import FineTuneResult, _check_trainable, _setup, _train_epochs, _warm_up_head, _with_overrides
from .modules import make_intensity, torch_module, wrap

MAX_FAILURES = 2  # worker-group restarts before the run is given up
BEST_FILE = "best.pt"


def fine_tune_on_ray(spec, weights_path, X_train, y_train, X_val, y_val, *, workers: int | None = None,
                     epochs: int | None = None, batch_size: int | None = None, lr: float | None = None,
                     seed: int = 0, augment=None, options=None, on_epoch=None, progress=None) -> FineTuneResult:
    """``finetune.fine_tune`` on ``workers`` Ray Train workers (None: as many as the recipe's batch allows,
    at most one per core of the cluster); the same arguments, the same result."""
    from ray import train as ray_train
    from ray.train.torch import TorchConfig, TorchTrainer

    from ..cluster import cluster_cpus, ray_module

    ray = ray_module()
    opts = _with_overrides(options, epochs=epochs, batch_size=batch_size, lr=lr, augment=augment)
    y_train, y_val = np.asarray(y_train, np.int64), np.asarray(y_val, np.int64)
    _check_trainable(spec, y_train)
    n = workers or max(1, min(cluster_cpus(), opts.batch_size // 2))
    if n > cluster_cpus():  # Ray Train would wait for ever for the cores it cannot place
        raise CxrlabError(f"--workers {n}: the Ray cluster has {cluster_cpus()} CPU(s); use at most that many")
    if opts.batch_size // n < 2 and not opts.freeze_bn:
        raise CxrlabError(f"--workers {n}: each worker would train on {opts.batch_size // n} image(s) per step; "
                          f"BatchNorm needs 2, so use at most {opts.batch_size // 2} workers or a larger --ft batch_size")
    started = time.time()
    storage = Path(os.environ.get("CXRLAB_RAY_STORAGE") or tempfile.mkdtemp(prefix="ray-train-", dir=_scratch()))
    config = {"spec": spec, "weights_path": str(weights_path), "options": opts, "seed": seed,
              "data": ray.put((np.asarray(X_train), y_train, np.asarray(X_val), y_val))}
    trainer = TorchTrainer(
        _train_worker, train_loop_config=config,
        scaling_config=ray_train.ScalingConfig(num_workers=n, use_gpu=False, resources_per_worker={"CPU": 1}),
        torch_config=TorchConfig(backend="gloo"),
        run_config=ray_train.RunConfig(name=f"cxrlab-finetune-{uuid.uuid4().hex[:12]}", storage_path=str(storage),
                                       failure_config=ray_train.FailureConfig(max_failures=MAX_FAILURES)))
    result = trainer.fit()
    if result.checkpoint is None:
        raise CxrlabError(f"fine-tuning on Ray ended without a model ({result.error or 'no checkpoint'})")
    torch = torch_module()
    with result.checkpoint.as_directory() as folder:
        best = torch.load(Path(folder) / BEST_FILE, map_location="cpu", weights_only=False)
    size = opts.input_size or spec.input_size
    module = wrap(spec.builder(spec, _weights(spec, weights_path)), make_intensity(opts.intensity, size)).to(
        memory_format=torch.channels_last)
    module.load_state_dict(best["module"])
    module.eval()
    for row in best["history"]:
        if on_epoch is not None and "loss" in row:
            on_epoch(row)
    return FineTuneResult(module, best["head_W"], best["head_b"], best["history"], best["best_epoch"],
                          round(time.time() - started, 1))


def _scratch() -> Path:
    folder = cache_dir() / "ray-train"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _weights(spec, given) -> Path:
    """The base weights: the driver's path, or this machine's copy of the same package."""
    return Path(given) if Path(given).is_file() else registry_weights(spec)


def _shard(n: int, rank: int, world: int) -> np.ndarray:
    """This worker's training rows: every ``world``-th, the list padded by wrapping round so that every
    worker has as many (and so as many steps: DDP needs them equal), as torch's DistributedSampler does."""
    padded = np.resize(np.arange(n), -(-n // world) * world)
    return padded[rank::world]


def _train_worker(config: dict) -> None:
    """One Ray Train worker: the local loop on its shard, gradients averaged by DDP; rank 0 saves the best epoch."""
    import ray
    from ray import train as ray_train
    from torch.nn.parallel import DistributedDataParallel

    torch = torch_module()
    context = ray_train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    X_train, y_train, X_val, y_val = ray.get(config["data"]) if isinstance(config["data"], ray.ObjectRef) \
        else config["data"]
    spec, seed = config["spec"], config["seed"]
    opts = copy.deepcopy(config["options"])
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    run = _setup(spec, _weights(spec, config["weights_path"]), X_train, y_train, X_val, y_val, opts, seed)
    history = [_warm_up_head(run, seed, resolve(None))] if opts.warmup_head else []  # on every image, as on one machine
    rows = torch.from_numpy(_shard(len(run.Xtr), rank, world))
    run.Xtr, run.y_train = run.Xtr[rows], run.y_train[rows.numpy()]
    run.opts = copy.deepcopy(opts)
    run.opts.batch_size = max(1, opts.batch_size // world)
    run.gen.manual_seed(seed + rank)  # each worker its own shuffling and augmentation draws
    # The network's ImageNet logits take no part in the loss: their weights get no gradient.
    run.module = DistributedDataParallel(run.module, find_unused_parameters=True)
    run.head = DistributedDataParallel(run.head)

    def report(row: dict) -> None:
        mean = torch.tensor([row["loss"], row["train_accuracy"]], dtype=torch.float64)
        torch.distributed.all_reduce(mean)  # the epoch's figures over every worker's shard
        row["loss"], row["train_accuracy"] = (mean / world).tolist()
        ray_train.report({k: v for k, v in row.items() if isinstance(v, (int, float, bool))})

    best = _train_epochs(run, history, report, resolve(None))
    run.load(best.weights)
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if rank == 0:
            torch.save({"module": run.module.module.state_dict(), "head_W": _numpy(run.head.module.weight),
                        "head_b": _numpy(run.head.module.bias), "history": history, "best_epoch": best.epoch},
                       Path(folder) / BEST_FILE)
            checkpoint = ray_train.Checkpoint.from_directory(folder)
        ray_train.report({"best_epoch": best.epoch}, checkpoint=checkpoint)


def _numpy(t) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float32).copy()
