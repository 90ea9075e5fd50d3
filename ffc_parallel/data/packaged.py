"""Real image sets built from data that ships inside installed packages (no download), written as ImageFolders.

* ``glyphs``: Unicode characters (letters, digits, symbols, punctuation of many scripts) rendered from
  matplotlib's DejaVu fonts with a random affine transform each; one class per character (about 3,000
  after dropping characters that look the same), training images from the DejaVu fonts except DejaVu Serif
  (Sans, Sans Mono, Serif Bold / Italic, each regular, bold and slanted), test images from DejaVu Serif:
  a different font than any training image.
* ``digits``: scikit-learn's 1,797 handwritten 8x8 digits enlarged onto a bigger canvas with a random
  affine transform per image; training images from the first 1,400 digits, test images from the others
  (other writers' samples).

    python -m ffc_parallel.data.packaged glyphs OUT [--size 32] [--classes 0] [--train-per-class 32]
                                                    [--test-per-class 2] [--seed 0]

writes ``OUT/train/<class>/<i>.png`` and ``OUT/test/<class>/<i>.png`` (greyscale, white on black); the
class folders of both splits have the same names, so ``ffc-train --data-path OUT/train --eval-data-path
OUT/test`` evaluates on the test font.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import unicodedata
from pathlib import Path

import numpy as np

PACKAGED_SETS = ("glyphs", "digits")
TEST_FONT = "DejaVuSerif.ttf"
_MIN_TRAIN_FONTS = 4
_DIGITS_TRAIN = 1400


def _font_dir() -> Path:
    import matplotlib
    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def _affine(rng: np.random.Generator, size: int, jitter: float) -> tuple:
    """PIL's inverse affine coefficients of a random rotation (+-10 deg), scale (0.85-1.1), shear (+-0.15)
    and shift (+-``jitter`` of the side) about the centre of a ``size`` canvas."""
    angle, scale = np.deg2rad(rng.uniform(-10, 10)), rng.uniform(0.85, 1.1)
    shear, (tx, ty) = rng.uniform(-0.15, 0.15), rng.uniform(-jitter, jitter, 2) * size
    forward = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) @ \
        np.array([[1.0, shear], [0.0, 1.0]])
    inv = np.linalg.inv(forward)
    c = np.array([size / 2, size / 2])
    offset = c - inv @ (c + np.array([tx, ty]))
    return (inv[0, 0], inv[0, 1], offset[0], inv[1, 0], inv[1, 1], offset[1])


class _Glyphs:
    """Renders characters ``[size, size]`` uint8 from the fonts of :func:`_font_dir`."""

    def __init__(self, size: int):
        from fontTools.ttLib import TTFont
        from PIL import ImageFont

        self.size, self.canvas = size, 2 * size   # draw at twice the size, then downsample (antialiasing)
        names = sorted(p.name for p in _font_dir().glob("DejaVu*.ttf") if "Display" not in p.name)
        self.fonts = {n: ImageFont.truetype(str(_font_dir() / n), int(self.canvas * 0.62)) for n in names}
        self.cmaps = {n: set(TTFont(str(_font_dir() / n)).getBestCmap()) for n in names}
        self.train_fonts = [n for n in names if n != TEST_FONT]

    def render(self, char: str, font: str, rng=None) -> np.ndarray:
        from PIL import Image, ImageDraw

        img = Image.new("L", (self.canvas, self.canvas), 0)
        ImageDraw.Draw(img).text((self.canvas / 2, self.canvas / 2), char, fill=255, font=self.fonts[font],
                                 anchor="mm")
        if rng is not None:
            img = img.transform(img.size, Image.AFFINE, _affine(rng, self.canvas, 0.06), Image.BILINEAR)
        return np.asarray(img.resize((self.size, self.size), Image.BILINEAR))

    def classes(self, limit: int) -> list[int]:
        """Code points drawn by the test font and at least 4 training fonts, visible, and unlike every
        earlier one in both the test font and DejaVu Sans (Latin A, Greek Alpha and Cyrillic A are one class)."""
        seen, chosen = set(), []
        for cp in sorted(self.cmaps[TEST_FONT]):
            if unicodedata.category(chr(cp))[0] not in "LNSP":
                continue
            if sum(cp in self.cmaps[f] for f in self.train_fonts) < _MIN_TRAIN_FONTS:
                continue
            look = [self.render(chr(cp), f) for f in (TEST_FONT, "DejaVuSans.ttf")]
            if look[0].max() < 64:
                continue
            keys = [hashlib.sha1((a > 96).tobytes()).digest() for a in look]
            if any(k in seen for k in keys):
                continue
            seen.update(keys)
            chosen.append(cp)
            if limit and len(chosen) == limit:
                break
        return chosen


def _save(path: Path, pixels: np.ndarray) -> None:
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def write_glyphs(out, size: int = 32, classes: int = 0, train_per_class: int = 32, test_per_class: int = 2,
                 seed: int = 0) -> int:
    """The ``glyphs`` set under ``out/train`` and ``out/test`` (``classes=0``: every usable character);
    returns the number of classes."""
    glyphs, out = _Glyphs(size), Path(out)
    chosen = glyphs.classes(classes)
    for c, cp in enumerate(chosen):
        name = f"u{cp:05x}"
        fonts = [f for f in glyphs.train_fonts if cp in glyphs.cmaps[f]]
        rng = np.random.default_rng([seed, cp])
        for i in range(train_per_class):
            _save(out / "train" / name / f"{i:03d}.png", glyphs.render(chr(cp), fonts[i % len(fonts)], rng))
        for i in range(test_per_class):
            _save(out / "test" / name / f"{i:03d}.png", glyphs.render(chr(cp), TEST_FONT, rng))
    return len(chosen)


def write_digits(out, size: int = 32, train_per_class: int = 0, test_per_class: int = 0, copies: int = 8,
                 seed: int = 0) -> int:
    """The ``digits`` set: every training digit ``copies`` times, every test digit twice, each copy enlarged
    to half the canvas and placed by a random affine transform (``*_per_class`` > 0 caps the images per class)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    bunch, out = load_digits(), Path(out)
    images = (bunch.images * (255.0 / 16.0)).astype(np.uint8)
    rng = np.random.default_rng(seed)
    counts = {}
    for i, (image, label) in enumerate(zip(images, bunch.target)):
        split, reps, cap = (("train", copies, train_per_class) if i < _DIGITS_TRAIN else
                            ("test", 2, test_per_class))
        for r in range(reps):
            n = counts.get((split, label), 0)
            if cap and n >= cap:
                break
            counts[(split, label)] = n + 1
            canvas = Image.new("L", (2 * size, 2 * size), 0)
            canvas.paste(Image.fromarray(image).resize((size, size), Image.BILINEAR), (size // 2, size // 2))
            canvas = canvas.transform(canvas.size, Image.AFFINE, _affine(rng, 2 * size, 0.1), Image.BILINEAR)
            _save(out / split / f"digit{label}" / f"{i:04d}_{r}.png",
                  np.asarray(canvas.resize((size, size), Image.BILINEAR)))
    return 10


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ffc_parallel.data.packaged", description=__doc__.split("\n\n")[0])
    p.add_argument("set", choices=PACKAGED_SETS)
    p.add_argument("out", help="output directory (train/ and test/ ImageFolders)")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--classes", type=int, default=0, help="glyphs: at most this many classes (0: all)")
    p.add_argument("--train-per-class", type=int, default=None, help="glyphs: 32; digits: all (8 per digit)")
    p.add_argument("--test-per-class", type=int, default=None, help="glyphs: 2; digits: all (2 per digit)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if Path(args.out).exists() and any(Path(args.out).iterdir()):
        p.error(f"{args.out} is not empty")
    if args.set == "glyphs":
        n = write_glyphs(args.out, args.size, args.classes, args.train_per_class or 32, args.test_per_class or 2,
                         args.seed)
    else:
        n = write_digits(args.out, args.size, args.train_per_class or 0, args.test_per_class or 0, seed=args.seed)
    files = {s: sum(1 for _ in (Path(args.out) / s).rglob("*.png")) for s in ("train", "test")}
    print(f"{args.set}: {n} classes, {files['train']} training and {files['test']} test images under {args.out} "
          f"({os.cpu_count()} CPUs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
