"""A tiny progress protocol: the library reports, the CLI decides how to show it."""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def start(self, total: int, desc: str) -> None: ...
    def advance(self, n: int = 1) -> None: ...
    def close(self) -> None: ...


class Silent:
    """The default: report nothing."""

    def start(self, total: int, desc: str) -> None:
        pass

    def advance(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


class TqdmProgress:
    """A tqdm bar on stderr showing images/s."""

    def __init__(self, unit: str = "img"):
        self.unit = unit
        self._bar = None

    def start(self, total: int, desc: str) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=total, desc=desc, unit=self.unit, dynamic_ncols=True, leave=True)

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def resolve(progress: Progress | None) -> Progress:
    return Silent() if progress is None else progress
