"""Build ``fontdigits``: a second offline 10-class 8x8 digit data set, for checking results on data
nothing was tuned on.

The digits 0-9 are rendered with the TrueType fonts that matplotlib ships (DejaVu, STIX, Computer
Modern: all under free licences, installed with the package, nothing downloaded), each with a random
font, size, rotation (+-15 degrees), shear and shift, on a 32x32 canvas, then reduced to 8x8 by
4x4 block sums scaled to 0..16 -- the format of scikit-learn's handwritten digits. They are
*printed* digits, not handwriting: a different distribution from digits, not more of the same.

    python benchmarks/make_fontdigits.py [--out benchmarks/data/fontdigits.npz] [--n 1800]

Deterministic in ``--seed``. The npz holds ``x`` (N, 8, 8) uint8 and ``y`` (N,) int64; the npz
loader splits it 80/20 stratified (``data.name = "npz"``, ``data.root = <file>``).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def font_files() -> list[Path]:
    import matplotlib
    d = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    fonts = sorted(p for p in d.glob("*.ttf")
                   if not any(k in p.name for k in ("Display", "cmex", "cmsy", "cmmi", "STIXNonUni",
                                                     "STIXSiz")))
    if not fonts:
        raise FileNotFoundError(f"no TrueType fonts under {d}")
    return fonts


def render(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(x uint8 (n, 8, 8) in 0..16, y int64 (n,)): n rendered digits, classes balanced."""
    from PIL import Image, ImageDraw, ImageFont
    rng = np.random.default_rng(seed)
    fonts = font_files()
    xs, ys = [], []
    for i in range(n):
        digit = i % 10
        f = fonts[rng.integers(len(fonts))]
        size = int(rng.integers(20, 30))
        font = ImageFont.truetype(str(f), size)
        img = Image.new("L", (48, 48), 0)
        ImageDraw.Draw(img).text((24, 24), str(digit), fill=255, font=font, anchor="mm")
        ang = float(rng.uniform(-15, 15))
        sh = float(rng.uniform(-0.25, 0.25))
        img = img.rotate(ang, resample=Image.BILINEAR, center=(24, 24))
        img = img.transform((48, 48), Image.AFFINE, (1, sh, -sh * 24, 0, 1, 0), Image.BILINEAR)
        a = np.asarray(img, dtype=np.float64)
        ys_, xs_ = np.nonzero(a > 32)
        if len(xs_) == 0:
            continue
        # crop the glyph's bounding box to a square, jitter it, resize to 32x32
        cy, cx = (ys_.min() + ys_.max()) / 2, (xs_.min() + xs_.max()) / 2
        half = max(ys_.max() - ys_.min(), xs_.max() - xs_.min()) / 2 + 2
        cy += rng.uniform(-0.1, 0.1) * half
        cx += rng.uniform(-0.1, 0.1) * half
        box = (int(cx - half), int(cy - half), int(cx + half), int(cy + half))
        a = np.asarray(img.crop(box).resize((32, 32), Image.BILINEAR), dtype=np.float64)
        b = a.reshape(8, 4, 8, 4).sum(axis=(1, 3))
        b = np.round(16 * b / max(b.max(), 1e-9))
        xs.append(b.astype(np.uint8))
        ys.append(digit)
    return np.stack(xs), np.asarray(ys, dtype=np.int64)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "data" / "fontdigits.npz"))
    ap.add_argument("--n", type=int, default=1800)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    x, y = render(a.n, a.seed)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, x=x, y=y)
    print(f"{len(y)} images -> {out}")


if __name__ == "__main__":
    main()
