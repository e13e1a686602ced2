"""The two questions, measured: is it a chest X-ray (refusals), and is it like the training images (shift warnings).

    python benchmarks/ood.py MODEL_DIR [MODEL_DIR ...] [--data ../shared/data]

For each model, prints on each folder the share refused as "not a chest X-ray" and the share of the accepted
films warned as unlike the training images:
- ../shared/data/not_cxr (target: 100 % refused) and generated pictures (noise, text, gradients, colour photos,
  blank; target: 100 % refused);
- the Shenzhen test split of the default hash split (target: 0 % refused), and the same films under each of
  cxrlab's site shifts (cxrlab.siteshift; an inverted film is refused by design), India DA (target: <= 1 % refused),
  the 36 frontal films of cxr_variants (target: at most 1 refused) and its 11 laterals (refused by design);
- the time the check adds to ``Model.predict`` on the Shenzhen test films, as a ratio against predict with the
  check off, both measured in this run (target: <= 1.05).
The check's own cross-validated figures (by source, on the folders it was fitted on) are in
src/cxrlab/assets/CHESTCHECK.md, written by scripts/build_chest_check.py.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

REPO = Path(__file__).resolve().parents[1]


def generated(seed: int = 0) -> dict[str, bytes]:
    """PNG bytes of pictures that are not radiographs: noise, text, gradients, colour photos, blank."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    out = {}
    for i in range(5):
        out[f"noise{i}"] = rng.integers(0, 256, (256, 256), dtype=np.uint8)
        page = Image.new("L", (320, 320), 240)
        draw = ImageDraw.Draw(page)
        for row in range(14):
            draw.text((10, 10 + 22 * row), "".join(chr(c) for c in rng.integers(65, 91, 30)), fill=20)
        out[f"text{i}"] = np.asarray(page)
        a, b = rng.uniform(-1, 1, 2)
        yy, xx = np.mgrid[0:256, 0:256] / 255
        out[f"gradient{i}"] = (255 * np.clip(0.5 + a * (xx - 0.5) + b * (yy - 0.5), 0, 1)).astype(np.uint8)
        out[f"colour{i}"] = (rng.random((8, 8, 3)) * 255).astype(np.uint8).repeat(32, 0).repeat(32, 1)
    out["blank"] = np.zeros((256, 256), np.uint8)
    try:  # scikit-image's sample photos, where installed (not used to fit the check)
        import skimage.data

        for name in ("astronaut", "coffee", "chelsea", "rocket", "camera", "brick", "cell", "retina",
                     "shepp_logan_phantom", "microaneurysms", "colorwheel", "logo"):
            a = np.asarray(getattr(skimage.data, name)())
            if a.dtype != np.uint8:
                a = (255 * (a - a.min()) / (np.ptp(a) or 1)).astype(np.uint8)
            out[f"skimage {name}"] = a
    except ImportError:
        pass
    pngs = {}
    for name, a in out.items():
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "PNG")
        pngs[name] = buf.getvalue()
    return pngs


def shenzhen_test(data: Path) -> list[str]:
    from cxrlab.discover import discover
    from cxrlab.split import split_samples

    manifest, _ = split_samples(discover(data / "shenzhen").samples)
    return [str(data / "shenzhen" / e.relpath) for e in manifest.subset("test")]


def line(name: str, preds, want: str) -> str:
    n = len(preds)
    refused = [p for p in preds if p.ood]
    accepted = [p for p in preds if not p.ood and not p.error]
    warned = sum(bool(p.shift) for p in accepted)
    text = (f"  {name:38} refused {len(refused):3d}/{n:<3d} ({len(refused) / max(n, 1):6.1%})   shift-warned "
            f"{warned:3d}/{len(accepted):<3d}   target: {want}")
    return text


def site_shifts(files: list[str]) -> None:
    """The check (the same for every model) on the Shenzhen test films under each of cxrlab's site shifts."""
    from cxrlab import chest
    from cxrlab.decode import decode_image
    from cxrlab.siteshift import SHIFTS

    pixels = [decode_image(f, min_size=224).pixels for f in files]
    print(f"chest X-ray check on the {len(files)} Shenzhen test films under each site shift (target: 0 refused; "
          "'inverted' is refused by design):")
    for name, fn in SHIFTS.items():
        verdicts = chest.check([np.clip(fn(p), 0, 1).astype(np.float32) for p in pixels])
        print(f"  {name:18} refused {sum(not v.chest for v in verdicts):3d}/{len(verdicts)}")


def main(argv=None) -> None:
    import cxrlab
    from cxrlab.discover import walk_images

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+")
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    a = p.parse_args(argv)
    d = a.data
    folders = {"not_cxr": sorted(str(f) for f in walk_images(d / "not_cxr")),
               "cxr_variants frontal": sorted(str(f) for f in walk_images(d / "cxr_variants")
                                              if not f.name.startswith("lateral")),
               "cxr_variants lateral": sorted(str(f) for f in walk_images(d / "cxr_variants")
                                              if f.name.startswith("lateral")),
               "Shenzhen test split": shenzhen_test(d),
               "India DA (never trained on)": sorted(str(f) for f in walk_images(d / "india_da"))}
    targets = {"not_cxr": "100% refused", "cxr_variants frontal": "at most 1 refused",
               "cxr_variants lateral": "refused by design", "Shenzhen test split": "0% refused",
               "India DA (never trained on)": "<= 1% refused"}
    pictures = generated()
    site_shifts(folders["Shenzhen test split"])
    for m in a.models:
        model = cxrlab.load_model(m)
        recipe = "fine-tuned" if model.info.get("fine_tune") else "linear head"
        print(f"{m}: {model.info['backbone'].get('id', '?')}, {recipe}; chest check "
              f"{'on' if model.chest_check else 'off'}, shift reference {'on' if model.ood_gate else 'off'}")
        gen = [model.predict_bytes(data, name) for name, data in pictures.items()]
        print(line("generated pictures", gen, "100% refused"))
        missed = [p.path for p in gen if not p.ood]
        if missed:
            print(f"    accepted: {', '.join(missed)}")
        for name, files in folders.items():
            preds = model.predict(files)
            print(line(name, preds, targets[name]))
            wrong = [Path(p.path).name for p in preds if bool(p.ood) != (name in ("not_cxr", "cxr_variants lateral"))]
            if wrong and len(wrong) <= 8:
                print(f"    {'accepted' if name in ('not_cxr', 'cxr_variants lateral') else 'refused'}: {', '.join(wrong)}")
        files = folders["Shenzhen test split"]
        model.predict(files[:8])  # warm both paths
        times = {True: [], False: []}
        for _ in range(3):
            for check in (False, True):
                start = time.perf_counter()
                model.predict(files, ood=check)
                times[check].append(time.perf_counter() - start)
        on, off = min(times[True]), min(times[False])
        print(f"  predict time of {len(files)} films: checks on {on:.2f} s, off {off:.2f} s: ratio {on / off:.3f} "
              f"(target <= 1.05)")


if __name__ == "__main__":
    main()
