"""Fuzz the decoding entry point for longer than CI does.

Random and mutated image bytes go through ``decode_image`` and then ``resize`` (what every command does
with a file); only cxrlab's own ``ImageError`` may come out, and a decoded image must satisfy the same
invariants as in tests/test_decode.py (float32, 2-D, finite, in [0, 1]). The seeds, the mutation strategy
and the invariant check are that test's (tests/test_decode.py), reused here, not copied.

    python benchmarks/fuzz.py                            # hypothesis, 60 s
    python benchmarks/fuzz.py --engine random --seconds 300 --save-dir fuzz-failures/
    python benchmarks/fuzz.py --engine atheris           # coverage-guided, if atheris is installed

Prints the cases tried, the failures found (one line per distinct exception site) and the slowest case.
Exit status 1 when a failure was found.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import random
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "src"))

from cxrlab.decode import decode_image, resize  # noqa: E402
from cxrlab.errors import ImageError  # noqa: E402


def _load_test_module():
    import test_decode  # needs pytest, hypothesis and pydicom, like the test itself

    return test_decode


class Fuzzer:
    def __init__(self, size: int, max_pixels: int, slow: float, save_dir: Path | None):
        self.size, self.max_pixels, self.slow, self.save_dir = size, max_pixels, slow, save_dir
        self.tried = 0
        self.failures: Counter = Counter()
        self.examples: dict[str, bytes] = {}
        self.slowest = (0.0, b"")
        self.check = _load_test_module().check_invariants

    def one(self, data: bytes) -> None:
        self.tried += 1
        t = time.perf_counter()
        try:
            d = decode_image(data, name="fuzz.bin", max_pixels=self.max_pixels, min_size=self.size)
            self.check(d)
            out = resize(d.pixels, self.size)
            assert out.shape == (self.size, self.size) and np.isfinite(out).all()
        except ImageError as e:
            if e.path != "fuzz.bin" or not e.reason:
                self._fail(data, f"ImageError without path/reason: {e!r}")
        except BaseException as e:  # noqa: BLE001 - anything else is a finding
            if isinstance(e, KeyboardInterrupt):
                raise
            frame = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
            where = f"{Path(frame.filename).name}:{frame.lineno}" if frame else "?"
            self._fail(data, f"{type(e).__name__} at {where}: {' '.join(str(e).split())[:160]}")
        dt = time.perf_counter() - t
        if dt > self.slowest[0]:
            self.slowest = (dt, data)
        if dt > self.slow:
            self._fail(data, f"slow: more than {self.slow:g} s for one file")

    def _fail(self, data: bytes, signature: str) -> None:
        self.failures[signature] += 1
        if signature not in self.examples:
            self.examples[signature] = data
            if self.save_dir is not None:
                self.save_dir.mkdir(parents=True, exist_ok=True)
                (self.save_dir / f"crash-{hashlib.sha256(data).hexdigest()[:16]}.bin").write_bytes(data)

    def report(self, engine: str, seconds: float) -> int:
        print(f"engine: {engine}; cases tried: {self.tried} in {seconds:.1f} s "
              f"({self.tried / max(seconds, 1e-9):.0f}/s); failures: {sum(self.failures.values())} "
              f"({len(self.failures)} distinct)")
        for sig, n in self.failures.most_common():
            data = self.examples[sig]
            print(f"  {n:6d} x {sig}\n         e.g. {len(data)} bytes starting {data[:16].hex(' ')}")
        dt, data = self.slowest
        print(f"slowest case: {dt * 1000:.0f} ms ({len(data)} bytes starting {data[:8].hex(' ')})")
        return 1 if self.failures else 0


# ----------------------------------------------------------------- plain random mutation
def extra_seeds() -> list[bytes]:
    """test_decode.SEEDS plus the other formats a user may hand in."""
    from PIL import Image

    td = _load_test_module()
    seeds = list(td.SEEDS)
    rng = np.random.default_rng(3)
    gray = Image.fromarray(rng.integers(0, 255, (20, 28), np.uint8))
    for fmt, img, kw in [("GIF", gray, {}), ("TIFF", gray, {}), ("BMP", gray, {}), ("WEBP", gray, {"lossless": True}),
                         ("PNG", Image.fromarray((rng.random((16, 16)) * 65535).astype(np.uint16)), {}),
                         ("PNG", gray.convert("P"), {}), ("PNG", gray.convert("RGBA"), {}),
                         ("JPEG", gray.convert("CMYK"), {}), ("TIFF", gray, {"compression": "tiff_lzw"})]:
        buf = io.BytesIO()
        img.save(buf, fmt, **kw)
        seeds.append(buf.getvalue())
    buf = io.BytesIO()
    frames = [gray, gray.point(lambda v: 255 - v)]
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    seeds.append(buf.getvalue())
    seeds.append(td.bomb_png(5000, 5000))
    buf = io.BytesIO()
    td.dicom(buf, td.RAMP12[:8, :8].copy(), photometric="MONOCHROME1", bits_stored=12)
    seeds.append(buf.getvalue())
    return seeds


INTERESTING = [b"\x00\x00\x00\x00", b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff", b"\x80\x00\x00\x00", b"\x00\x00\x00\x01"]


def mutate(rng: random.Random, seeds: list[bytes]) -> bytes:
    data = bytearray(rng.choice(seeds))
    for _ in range(rng.randint(1, 6)):
        op = rng.randrange(6)
        if not data:
            data = bytearray(rng.randbytes(rng.randint(0, 64)))
            continue
        i = rng.randrange(len(data))
        if op == 0:  # flip a byte
            data[i] = rng.randrange(256)
        elif op == 1:  # truncate
            del data[i:]
        elif op == 2:  # insert random bytes
            data[i:i] = rng.randbytes(rng.randint(1, 16))
        elif op == 3:  # an extreme 32-bit value (sizes, lengths, offsets)
            data[i:i + 4] = rng.choice(INTERESTING)
        elif op == 4:  # duplicate a slice
            j = rng.randrange(i, len(data))
            data[j:j] = data[i:j][:256]
        else:  # splice with another seed
            other = rng.choice(seeds)
            data = data[:i] + other[rng.randrange(len(other)):]
    return bytes(data)


def run_random(f: Fuzzer, deadline: float, cases: int | None, seed: int) -> None:
    rng = random.Random(seed)
    seeds = extra_seeds()
    while time.monotonic() < deadline and (cases is None or f.tried < cases):
        f.one(rng.randbytes(rng.randint(0, 256)) if rng.random() < 0.05 else mutate(rng, seeds))


# ----------------------------------------------------------------- hypothesis (the CI test's strategy)
def run_hypothesis(f: Fuzzer, deadline: float, cases: int | None, seed: int) -> None:
    """The CI test's strategy, in rounds of 500 examples with fresh seeds until the time or case budget ends.
    Failures are recorded, not raised, so hypothesis neither stops nor spends the budget shrinking."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hseed
    from hypothesis import strategies as st

    td = _load_test_module()
    rounds = 0
    while time.monotonic() < deadline and (cases is None or f.tried < cases):
        n = 500 if cases is None else max(1, min(500, cases - f.tried))

        @hseed(seed * 100_003 + rounds)
        @settings(max_examples=n, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(st.one_of(st.binary(max_size=4096), td.mutated()))
        def prop(data):
            f.one(data)

        prop()
        rounds += 1


class _Stop(Exception):
    pass


# ----------------------------------------------------------------- atheris (optional)
def run_atheris(f: Fuzzer, deadline: float, cases: int | None, seed: int) -> None:
    import atheris

    def one_input(data: bytes) -> None:
        if time.monotonic() > deadline or (cases is not None and f.tried >= cases):
            raise _Stop
        f.one(data)

    corpus = Path.cwd() / ".fuzz-corpus"
    corpus.mkdir(exist_ok=True)
    for s in extra_seeds():
        (corpus / hashlib.sha256(s).hexdigest()[:16]).write_bytes(s)
    atheris.Setup([sys.argv[0], f"-seed={seed}", str(corpus)], one_input)
    try:
        atheris.Fuzz()
    except _Stop:
        pass


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", choices=["hypothesis", "random", "atheris", "auto"], default="hypothesis",
                   help="auto: atheris if installed, else random mutation")
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--cases", type=int, default=None, help="stop after this many cases")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=224, help="network input size the decoded image is resized to")
    p.add_argument("--max-pixels", type=int, default=None, help="decompression-bomb limit (default: cxrlab's)")
    p.add_argument("--slow", type=float, default=5.0, help="a single case slower than this counts as a failure")
    p.add_argument("--save-dir", type=Path, help="write one input per distinct failure here")
    a = p.parse_args(argv)
    from cxrlab.decode import MAX_PIXELS

    engine = a.engine
    if engine == "auto":
        try:
            import atheris  # noqa: F401

            engine = "atheris"
        except ImportError:
            engine = "random"
    f = Fuzzer(a.size, a.max_pixels or MAX_PIXELS, a.slow, a.save_dir)
    start = time.monotonic()
    run = {"hypothesis": run_hypothesis, "random": run_random, "atheris": run_atheris}[engine]
    try:
        run(f, start + a.seconds, a.cases, a.seed)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
    return f.report(engine, time.monotonic() - start)


if __name__ == "__main__":
    sys.exit(main())
