"""The fine-tuning loop: AdamW, one-cycle or cosine schedule, layer-wise learning rates, seeded augmentation,
the epoch with the best validation AUC kept; deterministic (seeded generators, deterministic torch algorithms)."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import DataError
from ..progress import Progress, resolve
from .modules import augment_batch, channels_last, make_intensity, resize_to, to_tensor, torch_module, network_units, wrap
from .options import AugmentConfig, FineTuneOptions


@dataclass
class FineTuneResult:
    module: object  # torch module: image (N,1,S,S) in [0,1] -> (embedding, features[, imagenet_logits])
    head_W: np.ndarray  # (k, d)
    head_b: np.ndarray  # (k,)
    history: list[dict]
    best_epoch: int
    seconds: float = 0.0
    resumed_after: list[int] = field(default_factory=list)  # epochs a restarted training resumed after (Ray)


def _auc(y: np.ndarray, s: np.ndarray) -> float:
    from ..metrics import roc_auc

    return float(roc_auc(y, s)) if len(np.unique(y)) == 2 else float("nan")


def fine_tune(spec, weights_path, X_train, y_train, X_val, y_val, *, epochs: int | None = None,
              batch_size: int | None = None, lr: float | None = None, seed: int = 0,
              augment: AugmentConfig | None = None, options: FineTuneOptions | None = None,
              on_epoch: Callable[[dict], None] | None = None, progress: Progress | None = None,
              device=None) -> FineTuneResult:
    """Fine-tune ``spec``'s network end to end on in-memory images; returns the best epoch's module and head.

    ``X_*``: (N, H, W) uint8 (or float in [0, 1]) gray images, square, at or a bit above the input size.
    ``epochs``, ``batch_size``, ``lr`` and ``augment`` override the fields of ``options``. ``device``: a torch
    device to train on (None: the CPU); the images stay on the CPU, where the seeded augmentation draws them, and
    each batch moves to the device. The returned module is on the CPU.
    """
    torch = torch_module()
    opts = _with_overrides(options, epochs=epochs, batch_size=batch_size, lr=lr, augment=augment)
    y_train, y_val = np.asarray(y_train, np.int64), np.asarray(y_val, np.int64)
    _check_trainable(spec, y_train)
    progress = resolve(progress)
    started = time.time()
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.manual_seed(seed)
    use_deterministic_algorithms(device)
    try:
        run = _setup(spec, weights_path, X_train, y_train, X_val, y_val, opts, seed, device)
        history = [_warm_up_head(run, seed, progress)] if opts.warmup_head else []
        best = _train_epochs(run, history, on_epoch, progress)
        run.load(best.weights)
        run.set_mode(train=False)
        W, b = (p.detach().cpu().numpy().astype(np.float32).copy() for p in (run.head.weight, run.head.bias))
        return FineTuneResult(run.module.cpu(), W, b, history, best.epoch, round(time.time() - started, 1))
    finally:
        torch.use_deterministic_algorithms(was_deterministic)


def use_deterministic_algorithms(device=None) -> None:
    """Torch's deterministic algorithms. Some CUDA kernels (e.g. average pooling's gradient) have none: on a GPU,
    torch warns where it uses a non-deterministic one instead of stopping, so a GPU run is seeded but not
    reproducible bit for bit; cuBLAS is asked for its deterministic workspace."""
    torch = torch_module()
    gpu = device is not None and torch.device(device).type == "cuda"
    if gpu:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=gpu)


def _with_overrides(options: FineTuneOptions | None, **overrides) -> FineTuneOptions:
    opts = copy.deepcopy(options) if options is not None else FineTuneOptions()
    for name, value in overrides.items():
        if value is not None:
            setattr(opts, name, value)
    return opts


def _check_trainable(spec, y_train: np.ndarray) -> None:
    if spec.builder is None:
        raise DataError(f"backbone '{spec.name}' cannot be fine-tuned (no torch builder); use a registry backbone")
    if len(np.unique(y_train)) < 2:
        raise DataError("fine-tuning needs at least two classes in the training split")


@dataclass
class _Run:
    """What one fine-tuning run works on: the network, the head, the data and the seeded generator."""

    opts: FineTuneOptions
    size: int  # the network's input side
    embed_dim: int
    module: object  # the wrapped backbone
    head: object  # torch.nn.Linear(embed_dim, k)
    trainable: list  # the units being trained, from the input side; the earlier ones are frozen
    Xtr: object  # (N, 1, H, W) tensors
    Xva: object
    y_train: np.ndarray
    y_val: np.ndarray
    k: int  # number of classes
    gen: object  # torch.Generator (on the CPU): the shuffling and augmentation randomness
    device: object = None  # torch.device of the module, the head and each batch; None: the CPU

    def set_mode(self, *, train: bool) -> None:
        bn = torch_module().nn.modules.batchnorm._BatchNorm
        self.module.eval()
        if train:
            for unit in self.trainable:
                for m in unit:
                    m.train()
        if self.opts.freeze_bn or not train:
            for m in self.module.modules():
                if isinstance(m, bn):
                    m.eval()

    def embed(self, X, bs: int = 32):
        """Embeddings of images ``X`` in eval mode, without gradients."""
        torch = torch_module()
        self.set_mode(train=False)
        out = []
        with torch.no_grad():
            for i in range(0, len(X), bs):
                out.append(self.module(self.to_device(channels_last(resize_to(X[i : i + bs], self.size))))[0])
        return torch.cat(out) if out else torch.zeros(0, self.embed_dim, device=self.device)

    def to_device(self, t):
        return t if self.device is None else t.to(self.device)

    def snapshot(self) -> tuple[dict, dict]:
        return copy.deepcopy(self.module.state_dict()), copy.deepcopy(self.head.state_dict())

    def load(self, weights: tuple[dict, dict]) -> None:
        self.module.load_state_dict(weights[0])
        self.head.load_state_dict(weights[1])


def _setup(spec, weights_path, X_train, y_train, X_val, y_val, opts: FineTuneOptions, seed: int,
           device=None) -> _Run:
    """The network (early units frozen), a fresh head, the images as tensors (on the CPU; the network and the
    head on ``device``, None: the CPU). Called after seeding torch: the order of these steps fixes the initial
    weights."""
    torch = torch_module()
    size = opts.input_size or spec.input_size
    k = int(max(y_train.max(), y_val.max() if len(y_val) else 0) + 1)
    gen = torch.Generator().manual_seed(seed)
    # channels_last: oneDNN's fast path for these convolutions on CPU (measured 1.9x per training step)
    module = wrap(spec.builder(spec, Path(weights_path)), make_intensity(opts.intensity, size)).to(
        memory_format=torch.channels_last)
    Xtr, Xva = to_tensor(X_train), to_tensor(X_val)
    Xva = resize_to(Xva, size) if len(Xva) else Xva
    head = torch.nn.Linear(spec.embed_dim, k)
    if opts.bn_momentum > 0:
        for m in module.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.momentum = opts.bn_momentum
    units = network_units(module.backbone)
    n_train = len(units) if opts.trainable_units < 0 else min(opts.trainable_units, len(units))
    for unit in units[: len(units) - n_train]:
        for m in unit:
            m.requires_grad_(False)
    if device is not None:
        module, head = module.to(device), head.to(device)
    return _Run(opts, size, spec.embed_dim, module, head, units[len(units) - n_train :], Xtr, Xva, y_train, y_val,
                k, gen, device)


def _warm_up_head(run: _Run, seed: int, progress: Progress) -> dict:
    """The linear path's regularised logistic regression on frozen embeddings, copied into the head;
    returns the history row (epoch 0)."""
    from ..head import LinearHead, select_C

    torch = torch_module()
    n = len(run.Xtr) + len(run.Xva)
    progress.start(n, "fine-tune: head warm-up (frozen embeddings)")
    E_tr = run.embed(run.Xtr).cpu().numpy()
    E_va = run.embed(run.Xva).cpu().numpy() if len(run.Xva) else np.zeros((0, run.embed_dim), np.float32)
    progress.advance(n)
    progress.close()
    C, _ = select_C(E_tr, run.y_train, E_va, run.y_val, seed=seed)
    lin = LinearHead(C=C, seed=seed).fit(E_tr, run.y_train)
    with torch.no_grad():
        run.head.weight.copy_(torch.from_numpy(lin.coef_))  # copy_ moves them to the head's device
        run.head.bias.copy_(torch.from_numpy(lin.intercept_))
    p_va = lin.predict_proba(E_va)[:, -1] if len(E_va) else np.zeros(0)
    return {"epoch": 0, "stage": "head warm-up", "C": C,
            "val_auc": _auc(run.y_val == run.k - 1, p_va) if run.k == 2 and len(E_va) else None}


@dataclass
class _Optimiser:
    """AdamW over layer-wise learning rates, its schedule, the loss, dropout and the optional weight average."""

    opt: object
    sched: object
    loss_fn: object
    dropout: object
    ema: "_Ema | None"

    @classmethod
    def of(cls, run: _Run) -> "_Optimiser":
        torch, opts = torch_module(), run.opts
        groups = [{"params": list(run.head.parameters()), "lr": opts.lr * opts.head_lr_mult, "name": "head"}]
        for depth, unit in enumerate(reversed(run.trainable)):
            params = [p for m in unit for p in m.parameters() if p.requires_grad]
            if params:
                groups.append({"params": params, "lr": opts.lr * opts.layer_decay ** depth, "name": f"unit-{depth}"})
        opt = torch.optim.AdamW(groups, lr=opts.lr, weight_decay=opts.weight_decay)
        total = max(1, opts.epochs * max(1, math.ceil(len(run.Xtr) / opts.batch_size)))
        if opts.schedule == "onecycle":
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in groups], total_steps=total,
                                                        pct_start=0.2, anneal_strategy="cos")
        elif opts.schedule == "cosine":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
        else:
            raise DataError(f"unknown schedule {opts.schedule!r}; use onecycle or cosine")
        return cls(opt, sched, torch.nn.CrossEntropyLoss(label_smoothing=opts.label_smoothing),
                   torch.nn.Dropout(opts.dropout), _Ema(run.module, run.head, opts.ema) if opts.ema > 0 else None)

    def step(self, run: _Run, xb, yb) -> tuple[float, int]:
        """One gradient step on a batch; returns its loss and number of correct answers."""
        logits = run.head(self.dropout(run.module(xb)[0]))
        loss = self.loss_fn(logits, yb)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()
        if self.ema is not None:
            self.ema.update()
        return float(loss.detach()), int((logits.argmax(1) == yb).sum())


def _train_epochs(run: _Run, history: list[dict], on_epoch, progress: Progress, *, resume: dict | None = None,
                  checkpoint: Callable[[dict, Callable[[], dict]], None] | None = None) -> "_Best":
    """Train epoch after epoch, keeping the best (early stopping after ``patience`` epochs without progress).

    ``checkpoint(row, state)``, when given, is called after ``on_epoch`` with a function returning the whole
    training state (``training_state``); ``resume``, such a state, continues at the epoch after its own, with the
    same result as a run never stopped."""
    optimiser = _Optimiser.of(run)
    best = _Best(run, history[0]["val_auc"] if history else None)
    first = 1 if resume is None else _restore(resume, run, optimiser, best, history) + 1
    last = _last(history[-1]) if history and "loss" in history[-1] else ""
    for epoch in range(first, run.opts.epochs + 1):
        if run.opts.patience > 0 and best.epochs_without_progress >= run.opts.patience:
            break
        row = _train_one_epoch(run, optimiser, epoch, f"fine-tune epoch {epoch}/{run.opts.epochs}{last}", progress)
        live = optimiser.ema.swap_in() if optimiser.ema is not None else None  # evaluate (and keep) the average
        _validate(run, row)
        best.consider(run, row)
        if live is not None:
            optimiser.ema.swap_out(live)
        history.append(row)
        last = _last(row)
        if on_epoch is not None:
            on_epoch(row)
        if checkpoint is not None:
            checkpoint(row, lambda: training_state(run, optimiser, best, history))
    return best


def _last(row: dict) -> str:
    return f" (last: loss {row['loss']:.3f}" + (
        f", val AUC {row['val_auc']:.3f}" if row.get("val_auc") is not None else "") + ")"


def training_state(run: _Run, optimiser: "_Optimiser", best: "_Best", history: list[dict]) -> dict:
    """Everything the next epoch depends on, on the CPU: the weights, the optimiser and its schedule, the weight
    average, the best epoch so far (its weights unless they are the live ones), the history and the random
    generators' states."""
    live = (_cpu(run.module.state_dict()), _cpu(run.head.state_dict()))
    best_is_live = optimiser.ema is None and best.epoch == history[-1]["epoch"]
    return {"epoch": history[-1]["epoch"], "history": copy.deepcopy(history), "weights": live,
            "optimiser": _cpu(optimiser.opt.state_dict()), "schedule": optimiser.sched.state_dict(),
            "ema": None if optimiser.ema is None else {"t": optimiser.ema.t, "shadow": _cpu(optimiser.ema.shadow)},
            "best": {"score": best.score, "loss": best.loss, "epoch": best.epoch,
                     "epochs_without_progress": best.epochs_without_progress,
                     "weights": None if best_is_live else _cpu(best.weights)},
            "rng": rng_state(run)}


def rng_state(run: _Run) -> dict:
    """This process's random generators: the run's (shuffling, augmentation), torch's (dropout) and the GPU's."""
    torch = torch_module()
    rng = {"gen": run.gen.get_state(), "torch": torch.get_rng_state()}
    if run.device is not None and torch.device(run.device).type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(run.device)
    return rng


def _restore(state: dict, run: _Run, optimiser: "_Optimiser", best: "_Best", history: list[dict]) -> int:
    """Put ``training_state``'s ``state`` back into this run; returns its epoch."""
    torch = torch_module()
    run.load(state["weights"])
    optimiser.opt.load_state_dict(state["optimiser"])  # onto the parameters' device
    optimiser.sched.load_state_dict(state["schedule"])
    if optimiser.ema is not None:
        optimiser.ema.t = state["ema"]["t"]
        optimiser.ema.shadow = [{k: v.to(run.device or "cpu") for k, v in d.items()} for d in state["ema"]["shadow"]]
    b = state["best"]
    best.score, best.loss, best.epoch, best.epochs_without_progress = \
        b["score"], b["loss"], b["epoch"], b["epochs_without_progress"]
    best.weights = run.snapshot() if b["weights"] is None else b["weights"]
    history[:] = copy.deepcopy(state["history"])
    run.gen.set_state(state["rng"]["gen"])
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"]:
        torch.cuda.set_rng_state(state["rng"]["cuda"], run.device)
    return int(state["epoch"])


def _cpu(obj):
    """A copy of ``obj`` (tensors in dicts, lists, tuples) with every tensor on the CPU."""
    torch = torch_module()
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return copy.deepcopy(obj)


def _train_one_epoch(run: _Run, optimiser: _Optimiser, epoch: int, title: str, progress: Progress) -> dict:
    """One pass over the shuffled, augmented training images; returns the epoch's history row."""
    torch = torch_module()
    run.set_mode(train=True)
    order = torch.randperm(len(run.Xtr), generator=run.gen)
    y = torch.from_numpy(run.y_train)
    progress.start(len(run.Xtr), title)
    losses, correct = [], 0
    for i in range(0, len(run.Xtr), run.opts.batch_size):
        idx = order[i : i + run.opts.batch_size]
        xb = channels_last(augment_batch(run.Xtr[idx], run.size, run.opts.augment, run.gen))
        loss, right = optimiser.step(run, run.to_device(xb), run.to_device(y[idx]))
        losses.append(loss)
        correct += right
        progress.advance(len(idx))
    progress.close()
    return {"epoch": epoch, "loss": float(np.mean(losses)), "train_accuracy": correct / len(run.Xtr)}


def _validate(run: _Run, row: dict) -> None:
    """Add the validation loss, accuracy and (two classes) AUC to ``row``; nothing without validation images."""
    if not len(run.Xva):
        return
    torch = torch_module()
    with torch.no_grad():
        lv = run.head(run.embed(run.Xva))
        pv = torch.softmax(lv, 1).cpu().numpy()
        row["val_loss"] = float(torch.nn.functional.cross_entropy(lv, run.to_device(torch.from_numpy(run.y_val))))
    row["val_accuracy"] = float(np.mean(pv.argmax(1) == run.y_val))
    row["val_auc"] = _auc(run.y_val == run.k - 1, pv[:, run.k - 1]) if run.k == 2 else None


class _Best:
    """The best epoch so far and a copy of its weights: the highest validation AUC (else the lowest validation
    loss), a lower validation loss breaking a tie; without validation images, the latest epoch."""

    def __init__(self, run: _Run, warm_up_auc: float | None):
        self.score = warm_up_auc if warm_up_auc is not None else -1.0
        self.loss, self.epoch, self.epochs_without_progress = float("inf"), 0, 0
        self.weights = run.snapshot()

    def consider(self, run: _Run, row: dict) -> None:
        """Keep ``row``'s epoch if it is better; marks ``row["best"]``."""
        score = row["val_auc"] if row.get("val_auc") is not None else -row.get("val_loss", -row["epoch"])
        tie = abs(score - self.score) <= 1e-9 and row.get("val_loss", 0) < self.loss
        if score > self.score + 1e-9 or tie or not len(run.Xva):
            self.score, self.loss, self.epoch = score, row.get("val_loss", float("inf")), row["epoch"]
            self.weights = run.snapshot()
            self.epochs_without_progress = 0
        else:
            self.epochs_without_progress += 1
        row["best"] = self.epoch == row["epoch"]


class _Ema:
    """Shadow copy of module + head weights, w <- w + (1 - d) (w_live - w), d = min(decay, (1 + t) / (10 + t))."""

    def __init__(self, module, head, decay: float):
        self.parts, self.decay, self.t = (module, head), decay, 0
        self.shadow = [copy.deepcopy(m.state_dict()) for m in self.parts]

    def update(self) -> None:
        torch = torch_module()
        self.t += 1
        d = min(self.decay, (1 + self.t) / (10 + self.t))
        with torch.no_grad():
            for m, shadow in zip(self.parts, self.shadow):
                for name, live in m.state_dict().items():
                    if live.dtype.is_floating_point:
                        shadow[name].lerp_(live, 1.0 - d)
                    else:
                        shadow[name].copy_(live)

    def swap_in(self) -> list[dict]:
        live = [copy.deepcopy(m.state_dict()) for m in self.parts]
        for m, shadow in zip(self.parts, self.shadow):
            m.load_state_dict(shadow)
        return live

    def swap_out(self, live: list[dict]) -> None:
        for m, state in zip(self.parts, live):
            m.load_state_dict(state)


def state_sha256(module, extra: dict | None = None) -> str:
    """Identity of the fine-tuned weights (and the in-graph preprocessing)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(np.ascontiguousarray(t.detach().cpu().numpy()).tobytes())
    h.update(json.dumps(extra or {}, sort_keys=True).encode())
    return h.hexdigest()
