"""The epochs of a Ray Train run as they end, on the driver: the Ray Train controller (another process) calls
``EpochRelay.after_report`` once every worker has reported an epoch and its checkpoint is stored; the relay adds
the epoch's row to an ``EpochLog`` actor, and ``EpochFeed`` (on the driver, beside ``TorchTrainer.fit``) takes the
new rows a few times a second and hands each epoch to ``on_epoch`` once.

Imported only with Ray installed (``finetune.distributed``)."""

from __future__ import annotations

import threading

import ray
from ray.train import UserCallback

POLL_S = 0.2


class EpochLog:
    """The rows reported so far (a Ray actor, no CPU of its own)."""

    def __init__(self):
        self.rows: list[dict] = []
        self.taken = 0

    def add(self, row: dict) -> None:
        self.rows.append(row)

    def take(self) -> list[dict]:
        """The rows added since the last ``take``."""
        new, self.taken = self.rows[self.taken :], len(self.rows)
        return new

    def last_epoch(self) -> int:
        """The last epoch reported with its checkpoint: a run restarted now resumes after it."""
        return max((row["epoch"] for row in self.rows), default=0)


class EpochRelay(UserCallback):
    """On the Ray Train controller: each reported epoch (rank 0's row: the figures are every worker's average)
    to the log. Ray calls the checkpoint manager first, so the epoch's checkpoint is registered by then."""

    def __init__(self, log):
        self.log = log

    def after_report(self, run_context, metrics, checkpoint):
        if metrics and "epoch" in metrics[0]:
            ray.get(self.log.add.remote(dict(metrics[0])))


class EpochFeed:
    """``with EpochFeed(on_epoch) as feed:`` around ``fit``: ``on_epoch(row)`` for each new epoch as it is
    reported (a second report of an epoch, after a restart without a checkpoint, is not passed on);
    ``feed.resumed_after`` lists the epochs a restarted worker group resumed after."""

    def __init__(self, on_epoch=None):
        self.log = ray.remote(num_cpus=0)(EpochLog).remote()
        self.on_epoch, self.seen, self.resumed_after = on_epoch, set(), []
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._poll, name="cxrlab-epochs", daemon=True)

    def callback(self) -> EpochRelay:
        return EpochRelay(self.log)

    def __enter__(self) -> "EpochFeed":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        try:
            if exc[0] is None:
                self._deliver()  # what was reported after the last poll
        finally:
            ray.kill(self.log)
        if self._error is not None and exc[0] is None:
            raise self._error

    def _poll(self) -> None:
        while not self._stop.wait(POLL_S):
            try:
                self._deliver()
            except BaseException as exc:  # raised on the driver's thread when fit ends
                self._error = exc
                return

    def _deliver(self) -> None:
        for row in ray.get(self.log.take.remote()):
            if "resumed_after_epoch" in row:
                self.resumed_after.append(int(row["resumed_after_epoch"]))
            if row["epoch"] in self.seen:
                continue
            self.seen.add(row["epoch"])
            if self.on_epoch is not None:
                self.on_epoch(row)
