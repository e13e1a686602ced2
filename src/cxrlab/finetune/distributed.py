"""Fine-tuning on a Ray cluster: data-parallel training with Ray Train's ``TorchTrainer``: gloo on CPU workers,
NCCL on GPU workers (``plan_workers`` decides from the cluster's resources).

Each worker runs the local loop's own pieces (``loop._setup``, ``_train_epochs``: the same optimiser, schedule,
augmentation, validation and best-epoch rule) on its shard of the training images, with the network and head
wrapped in ``DistributedDataParallel`` so that every step averages the workers' gradients. The recipe's batch
size is the global one: each of N workers takes batch_size / N images per step, so a step sees as many images
and the schedule has as many steps as on one machine. BatchNorm statistics are each worker's own (as DDP does).

Every epoch ends with a Ray Train checkpoint (rank 0 writes the whole training state, ``loop.training_state``,
with every worker's random generators); a worker that dies makes Ray Train restart the worker group
(``FailureConfig``), which resumes from the last checkpoint and ends with the model a run never stopped ends
with. The epochs reach the driver as they end (``ray_epochs``). The last checkpoint holds the best epoch's
weights; the driver rebuilds the module from them and ``finetune.stage`` exports it as it exports a local run.
"""

from __future__ import annotations

import copy
import os
import shutil
import signal
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..backbones import cache_dir, weights_path as registry_weights
from ..runtime import RAY_DEVICES as DEVICES
from ..errors import CxrlabError
from ..progress import resolve
from .loop import (FineTuneResult, _check_trainable, _setup, _train_epochs, _warm_up_head, _with_overrides, rng_state,
                   use_deterministic_algorithms)
from .modules import make_intensity, torch_module, wrap

MAX_FAILURES = 2  # worker-group restarts before the run is given up
STATE_FILE = "state.pt"
# Fault injection for the resume test: "EPOCH:MARKER" makes the last worker kill itself (SIGKILL) at the start of
# EPOCH, once the previous epoch's checkpoint is registered, if it can create the file MARKER (so: once).
KILL_ONCE_ENV = "CXRLAB_RAY_KILL_ONCE"


@dataclass(frozen=True)
class WorkerPlan:
    """How many Ray Train workers, on what, with which collective backend."""

    workers: int
    use_gpu: bool
    backend: str  # "nccl" (GPU workers) or "gloo" (CPU workers)
    resources_per_worker: dict = field(default_factory=dict)


def plan_workers(resources: dict, *, workers: int | None, batch_size: int, freeze_bn: bool,
                 device: str = "auto") -> WorkerPlan:
    """The workers for a cluster with ``resources`` (``ray.cluster_resources()``). ``device``: ``auto`` (one GPU
    per worker when the cluster has GPUs, else one core), ``cpu`` or ``gpu``. ``workers`` None: as many as there
    are GPUs (or cores) and the batch allows (2 images per worker and step, for BatchNorm)."""
    if device not in DEVICES:
        raise CxrlabError(f"--ray-device {device}: use one of {', '.join(DEVICES)}")
    cpus, gpus = max(1, int(resources.get("CPU", 1))), int(resources.get("GPU", 0))
    use_gpu = gpus >= 1 if device == "auto" else device == "gpu"
    if use_gpu and gpus < 1:
        raise CxrlabError("--ray-device gpu: the Ray cluster has no GPU; use --ray-device cpu (or auto)")
    slots, kind = (min(gpus, cpus), "GPU") if use_gpu else (cpus, "CPU")
    n = workers or max(1, min(slots, batch_size // 2))
    if n > slots:  # Ray Train would wait for ever for the workers it cannot place
        raise CxrlabError(f"--workers {n}: the Ray cluster has {slots} {kind}(s) for training workers; use at most "
                          f"that many")
    if batch_size // n < 2 and not freeze_bn:
        raise CxrlabError(f"--workers {n}: each worker would train on {batch_size // n} image(s) per step; "
                          f"BatchNorm needs 2, so use at most {batch_size // 2} workers or a larger --ft batch_size")
    return WorkerPlan(n, use_gpu, "nccl" if use_gpu else "gloo", {"CPU": 1, "GPU": 1} if use_gpu else {"CPU": 1})


def fine_tune_on_ray(spec, weights_path, X_train, y_train, X_val, y_val, *, workers: int | None = None,
                     epochs: int | None = None, batch_size: int | None = None, lr: float | None = None,
                     seed: int = 0, augment=None, options=None, on_epoch=None, progress=None,
                     device: str = "auto") -> FineTuneResult:
    """``finetune.fine_tune`` on Ray Train workers (``plan_workers``: ``workers`` and ``device``); the same
    arguments, the same result. ``on_epoch`` is called here as each epoch ends on the workers."""
    from ..cluster import ray_module
    from .ray_epochs import EpochFeed

    ray, torch = ray_module(), torch_module()
    opts = _with_overrides(options, epochs=epochs, batch_size=batch_size, lr=lr, augment=augment)
    y_train, y_val = np.asarray(y_train, np.int64), np.asarray(y_val, np.int64)
    _check_trainable(spec, y_train)
    plan = plan_workers(ray.cluster_resources(), workers=workers, batch_size=opts.batch_size,
                        freeze_bn=opts.freeze_bn, device=device)
    started = time.time()
    given = os.environ.get("CXRLAB_RAY_STORAGE")
    storage = Path(given or tempfile.mkdtemp(prefix="ray-train-", dir=_scratch()))
    name = f"cxrlab-finetune-{uuid.uuid4().hex[:12]}"
    try:
        with EpochFeed(on_epoch) as feed:
            config = {"spec": spec, "weights_path": str(weights_path), "options": opts, "seed": seed,
                      "use_gpu": plan.use_gpu, "epoch_log": feed.log, "kill_once": _kill_once(),
                      "data": ray.put((np.asarray(X_train), y_train, np.asarray(X_val), y_val))}
            result = _fit(plan, storage, name, feed, config)
        if result.checkpoint is None:
            raise CxrlabError(f"fine-tuning on Ray ended without a model ({result.error or 'no checkpoint'})")
        with result.checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=False)
    finally:
        shutil.rmtree(storage / name if given else storage, ignore_errors=True)  # this run's checkpoints
    weights = state["weights"] if state["best"]["weights"] is None else state["best"]["weights"]
    unwrap = torch.nn.modules.utils.consume_prefix_in_state_dict_if_present
    for part in weights:
        unwrap(part, "module.")  # DistributedDataParallel's prefix
    size = opts.input_size or spec.input_size
    module = wrap(spec.builder(spec, _weights(spec, weights_path)), make_intensity(opts.intensity, size)).to(
        memory_format=torch.channels_last)
    module.load_state_dict(weights[0])
    module.eval()
    head_W, head_b = (weights[1][k].numpy().astype(np.float32).copy() for k in ("weight", "bias"))
    return FineTuneResult(module, head_W, head_b, state["history"], state["best"]["epoch"],
                          round(time.time() - started, 1), feed.resumed_after)


def _fit(plan: WorkerPlan, storage: Path, name: str, feed, config: dict):
    """Ray Train's run of ``_train_worker`` on ``plan``'s workers: a checkpoint per epoch (the last one kept),
    the epochs to ``feed``, the workers restarted from the last checkpoint after a failure."""
    from ray import train as ray_train
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        _train_worker, train_loop_config=config,
        scaling_config=ray_train.ScalingConfig(num_workers=plan.workers, use_gpu=plan.use_gpu,
                                               resources_per_worker=plan.resources_per_worker),
        torch_config=TorchConfig(backend=plan.backend),
        run_config=ray_train.RunConfig(
            name=name, storage_path=str(storage), callbacks=[feed.callback()],
            checkpoint_config=ray_train.CheckpointConfig(num_to_keep=1),  # each holds all a resume needs
            failure_config=ray_train.FailureConfig(max_failures=MAX_FAILURES)))
    return trainer.fit()


def _kill_once() -> tuple[int, str] | None:
    value = os.environ.get(KILL_ONCE_ENV)
    if not value:
        return None
    epoch, _, marker = value.partition(":")
    if not epoch.isdigit() or not marker:
        raise CxrlabError(f"{KILL_ONCE_ENV}={value}: expected EPOCH:MARKER_FILE")
    return int(epoch), marker


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
    """One Ray Train worker: the local loop on its shard, gradients averaged by DDP, from the last checkpoint
    when there is one; after each epoch, rank 0 saves the training state as a Ray Train checkpoint."""
    import ray
    from ray import train as ray_train
    from ray.train.torch import get_device
    from torch.nn.parallel import DistributedDataParallel

    torch = torch_module()
    context = ray_train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    X_train, y_train, X_val, y_val = ray.get(config["data"]) if isinstance(config["data"], ray.ObjectRef) \
        else config["data"]
    spec, seed = config["spec"], config["seed"]
    opts = copy.deepcopy(config["options"])
    device = get_device() if config["use_gpu"] else None  # None: the CPU, as the local loop
    if device is not None:
        torch.cuda.set_device(device)
    torch.manual_seed(seed)
    use_deterministic_algorithms(device)
    resume = _saved_state(ray_train.get_checkpoint(), rank, world)
    run = _setup(spec, _weights(spec, config["weights_path"]), X_train, y_train, X_val, y_val, opts, seed, device)
    history = [_warm_up_head(run, seed, resolve(None))] if opts.warmup_head and resume is None else []
    rows = torch.from_numpy(_shard(len(run.Xtr), rank, world))
    run.Xtr, run.y_train = run.Xtr[rows], run.y_train[rows.numpy()]
    run.opts = copy.deepcopy(opts)
    run.opts.batch_size = max(1, opts.batch_size // world)
    run.gen.manual_seed(seed + rank)  # each worker its own shuffling and augmentation draws
    # The network's ImageNet logits take no part in the loss: their weights get no gradient.
    ids = None if device is None else [device.index]
    run.module = DistributedDataParallel(run.module, device_ids=ids, find_unused_parameters=True)
    run.head = DistributedDataParallel(run.head, device_ids=ids)
    first = 1 if resume is None else resume["epoch"] + 1

    def average(row: dict) -> None:
        mean = torch.tensor([row["loss"], row["train_accuracy"]], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(mean)  # the epoch's figures over every worker's shard
        row["loss"], row["train_accuracy"] = (mean / world).tolist()

    def checkpoint(row: dict, state) -> None:
        rngs = [None] * world
        torch.distributed.all_gather_object(rngs, rng_state(run))  # a resumed worker draws what it would have
        metrics = dict(row, **({"resumed_after_epoch": first - 1} if resume and row["epoch"] == first else {}))
        with tempfile.TemporaryDirectory() as folder:
            saved = None
            if rank == 0:
                torch.save(dict(state(), rng=rngs), Path(folder) / STATE_FILE)
                saved = ray_train.Checkpoint.from_directory(folder)
            ray_train.report(metrics, checkpoint=saved)
        _maybe_kill(config, row["epoch"] + 1, rank, world)

    _train_epochs(run, history, average, resolve(None), resume=resume, checkpoint=checkpoint)


def _saved_state(checkpoint, rank: int, world: int) -> dict | None:
    """The training state of Ray Train's last checkpoint, with this worker's random generators; None: none yet."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        state = torch_module().load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=False)
    if len(state["rng"]) != world:
        raise CxrlabError(f"the checkpoint was written by {len(state['rng'])} workers, this run has {world}")
    state["rng"] = state["rng"][rank]
    return state


def _maybe_kill(config: dict, epoch: int, rank: int, world: int) -> None:
    """The fault of ``KILL_ONCE_ENV``, at the start of ``epoch``: waits until the driver's log has the previous
    epoch (its checkpoint registered), then the last worker dies at once, as a lost machine would."""
    if config["kill_once"] is None or rank != world - 1 or config["kill_once"][0] != epoch:
        return
    import ray

    while ray.get(config["epoch_log"].last_epoch.remote()) < epoch - 1:
        time.sleep(0.05)
    try:
        os.close(os.open(config["kill_once"][1], os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    os.kill(os.getpid(), signal.SIGKILL)

