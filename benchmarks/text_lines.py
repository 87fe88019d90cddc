"""Labelled test data for a text-line direction classifier: single lines of real English text, upright or turned 180°.

Each sample is one line of text as an OCR pipeline's text detector would crop it: a run of 2 to 6 consecutive
words (so the aspect ratio varies) from the English prose that ships with scikit-learn (``pages.corpus``), set
in one of matplotlib's bundled fonts (``pages.FONTS``, regular or bold) at a random size, dark grey to black text
on a light grey to white background, with small random margins round the ink (drawn from the same distribution
above as below, and left as right, so that turning a line does not change how its margins are drawn). Label 1
samples are such a line turned 180 degrees (``numpy.rot90(line, 2)``), label 0 samples are left upright: the
label is exact by construction. Classes are balanced, order shuffled, and nothing is downloaded.

Why at most 6 words: the model squeezes every line into 48 x 192, so a long line is squashed sideways several
times over. On 1200 calibration lines of 1 to 12 words, onnxruntime's accuracy was 95% at 1 word, 98% at 2, 100%
at 3, 97% at 4 and 5, 94-95% at 6 and 7, 88% at 8 to 10 and 82-84% at 11 and 12 (by aspect ratio: 95% below 4:1,
99% from 4:1 to 12:1, 95% from 12:1 to 20:1, 84% from 25:1 to 30:1, 76% beyond): a property of the model, not of
the labels. With 3 to 12 words 200 calibration lines scored 94.5% and 200 test lines 92%, below the 95% that
text_direction.py requires; with 2 to 6 words (aspect ratio 4:1 to 19:1 for 90% of the lines, so that only about
4% are narrower than 192 and padded), 96.8% of 1000 calibration lines and 97.5% of 200 test lines (seed 0).

The two splits never share text: ``calibration`` draws its words from ``pages.corpus('calibration')`` and
``test`` from ``pages.corpus('test')`` (disjoint halves of the description files), each with its own seed, and a
line that is also a run of words of the other split (a short common run such as 'of the') is drawn again.

Preprocessing is rapidocr_onnxruntime 1.3.24's ``TextClassifier.resize_norm_img`` (``ch_ppocr_v2_cls/text_cls.py``,
read from its wheel; ``cls_image_shape`` [3, 48, 192] in its ``config.yaml``), up to the normalisation:

- the crop goes in as 3 channels in BGR order (read with cv2); a line is grey, so the order cannot matter;
- ``resized_w = ceil(48 * w / h)``, capped at 192, and ``cv2.resize(img, (resized_w, 48))``: OpenCV's default
  INTER_LINEAR on uint8, reproduced here in numpy (``resize_linear``): OpenCV's sampling grid, its border rules
  (x clamped with the fraction zeroed, y rows replicated with the fraction kept), 11-bit fixed-point
  coefficients and the rounding of its SIMD vertical pass. OpenCV is not a dependency; the function matched
  ``cv2.resize`` (OpenCV 5.1.0, x86-64) to the bit on 300 random images of 5 to 300 rows, down- and upscaled,
  and the test pins hashes taken from it. Downscaling is not antialiased (2 taps), as in OpenCV;
- ``x / 255``, then ``(x - 0.5) / 0.5`` per channel, then zero padding on the right up to width 192 (after the
  normalisation, so the padding is 0.5 in [0, 1] pixel units).

``preprocess`` stops before the normalisation: it returns [0, 1] pixels (``uint8 / 255``), float32, 3 x 48 x 192,
padded on the right with 0.5, so that attack budgets are in pixel units and cloakonnx applies the normalisation
(``--bounds 0,1 --mean 0.5,0.5,0.5 --std 0.5,0.5,0.5``). Whether all this matches what the model expects is
checked on the model itself: text_direction.py stops below 95% onnxruntime accuracy.
"""
from __future__ import annotations

import math
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # pages.py, also when a test loads this file

import pages  # noqa: E402

CHANNELS, HEIGHT, WIDTH = 3, 48, 192  # rapidocr's cls_image_shape
PAD = 0.5  # the zero padding after (x - 0.5) / 0.5, in [0, 1] pixel units
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
LABELS = ("0", "180")  # config.yaml's label_list: class 0 upright, class 1 turned 180 degrees
SPLITS = pages.SPLITS
WORDS = (2, 6)  # words per line, inclusive
FONT_SIZE = (16, 44)  # pixels, inclusive


# --- text ---------------------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def words(split: str) -> tuple[str, ...]:
    """The words of ``split``'s paragraphs (``pages.corpus``), in order: a line is a run of consecutive words."""
    return tuple(w for kind, text in pages.corpus(split) if kind == "para" for w in text.split())


@lru_cache(maxsize=None)
def other_text(split: str) -> str:
    """The words of every other split, space-separated, with a space at each end: a line of ``split`` that occurs
    in it (a short common run such as 'of the') is drawn again."""
    return " " + " ".join(w for other in SPLITS if other != split for w in words(other)) + " "


def line_text(rng: np.random.Generator, split: str) -> str:
    """A run of WORDS[0] to WORDS[1] consecutive words of ``split``'s prose, starting at a random word, that is not
    also a run of words of another split (drawn again until it is not)."""
    ws, others = words(split), other_text(split)
    for _ in range(1000):
        n = int(rng.integers(WORDS[0], WORDS[1] + 1))
        start = int(rng.integers(len(ws) - n + 1))
        text = " ".join(ws[start : start + n])
        if f" {text} " not in others:
            return text
    raise RuntimeError(f"no line of the {split} split found that the other splits do not share")


# --- rendering ----------------------------------------------------------------------------------------------


def render_line(rng: np.random.Generator, text: str) -> np.ndarray:
    """One upright line of ``text`` (uint8, H x W, grey): random font (regular or bold) and size, ink 0..70 on
    paper 190..255, margins round the ink box drawn from the same distribution on each side (0.05 to 0.4 of
    the font size above and below, 0.1 to 0.8 left and right)."""
    from PIL import Image, ImageDraw

    regular, bold = pages.FONTS[int(rng.integers(len(pages.FONTS)))]
    name = bold if rng.random() < 0.2 else regular
    size = int(rng.integers(FONT_SIZE[0], FONT_SIZE[1] + 1))
    font = pages._font(name, size)
    ink, paper = int(rng.integers(0, 71)), int(rng.integers(190, 256))
    top, bottom = (round(size * rng.uniform(0.05, 0.4)) for _ in range(2))
    left, right = (round(size * rng.uniform(0.1, 0.8)) for _ in range(2))
    x0, y0, x1, y1 = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), text, font=font)
    img = Image.new("L", (x1 - x0 + left + right, y1 - y0 + top + bottom), paper)
    ImageDraw.Draw(img).text((left - x0, top - y0), text, font=font, fill=ink)
    return np.asarray(img, dtype=np.uint8)


def turn(line: np.ndarray, label: int) -> np.ndarray:
    """The sample of class ``label``: the upright line (0) or the line turned 180 degrees (1)."""
    return np.ascontiguousarray(np.rot90(line, 2 * int(label)))


# --- OpenCV's INTER_LINEAR resize, 8-bit ----------------------------------------------------------------------

_COEF_BITS = 11  # OpenCV's INTER_RESIZE_COEF_BITS
_COEF_SCALE = 1 << _COEF_BITS


def _linear_taps(src: int, dst: int, clamp: bool) -> tuple[np.ndarray, np.ndarray]:
    """Source indices (dst x 2) and fixed-point weights (dst x 2, int64) of OpenCV's INTER_LINEAR along one axis:
    f = (d + 0.5) * src/dst - 0.5 in float32, taps floor(f) and floor(f) + 1, weights 1 - t and t rounded to 11
    bits. Along x (``clamp``) a tap left of 0 or at the last column moves there with t = 0; along y the taps
    are only clipped to the image, the weights kept (``resizeGeneric``)."""
    index = np.empty((dst, 2), dtype=np.int64)
    weight = np.empty((dst, 2), dtype=np.int64)
    scale = src / dst
    for d in range(dst):
        f = np.float32((d + 0.5) * scale - 0.5)
        s = math.floor(f)
        t = np.float32(f - s)
        if clamp and s < 0:
            t, s = np.float32(0), 0
        if clamp and s >= src - 1:
            t, s = np.float32(0), src - 1
        weight[d] = [int(np.rint((np.float32(1) - t) * np.float32(_COEF_SCALE))),
                     int(np.rint(t * np.float32(_COEF_SCALE)))]
        index[d] = np.clip([s, s + 1], 0, src - 1)
    return index, weight


def resize_linear(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """``cv2.resize(img, (width, height))`` (INTER_LINEAR) for a 2-D uint8 image: horizontal pass in integers,
    vertical pass with the rounding of OpenCV's SIMD path, ``((b0 * (r0 >> 4)) >> 16) + ((b1 * (r1 >> 4)) >> 16)
    + 2 >> 2``, saturated to 0..255."""
    src_h, src_w = img.shape
    xi, xw = _linear_taps(src_w, width, clamp=True)
    yi, yw = _linear_taps(src_h, height, clamp=False)
    rows = (img.astype(np.int64)[:, xi] * xw).sum(axis=2)  # src_h x width
    r0, r1 = rows[yi[:, 0]] >> 4, rows[yi[:, 1]] >> 4
    out = (((yw[:, :1] * r0) >> 16) + ((yw[:, 1:] * r1) >> 16) + 2) >> 2
    return np.clip(out, 0, 255).astype(np.uint8)


def resized_width(h: int, w: int) -> int:
    """rapidocr's target width: ceil(48 * w / h), at most 192."""
    ratio = w / float(h)
    return min(WIDTH, math.ceil(HEIGHT * ratio))


def preprocess(line: np.ndarray) -> np.ndarray:
    """rapidocr's ``resize_norm_img`` of a grey uint8 line up to the normalisation: height 48, aspect kept, width at
    most 192 (INTER_LINEAR), 3 equal channels, / 255, padded on the right with PAD to width 192.
    Returns float32, 3 x 48 x 192, in [0, 1]."""
    h, w = line.shape
    rw = resized_width(h, w)
    small = resize_linear(line, rw, HEIGHT).astype(np.float32) / np.float32(255)
    out = np.full((CHANNELS, HEIGHT, WIDTH), PAD, dtype=np.float32)
    out[:, :, :rw] = small
    return out


def normalise(x: np.ndarray) -> np.ndarray:
    """The package's last step, (x - 0.5) / 0.5, for running the model directly (the padding becomes 0)."""
    mean = np.asarray(MEAN, dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(STD, dtype=np.float32).reshape(1, 3, 1, 1)
    return ((x - mean) / std).astype(np.float32)


def draw_lines(n: int, split: str, seed: int = 0) -> tuple[list[str], list[np.ndarray], np.ndarray]:
    """The raw material of ``make_lines``: ``n`` texts, their upright renderings (uint8, H x W) and the labels
    (int64; balanced as n allows, order shuffled). Sample i is ``turn(upright[i], y[i])``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    rng = np.random.default_rng([seed, SPLITS[split], 0x7E47])
    y = rng.permutation(np.arange(n) % 2).astype(np.int64)
    texts, lines = [], []
    for _ in range(n):
        text = line_text(rng, split)
        texts.append(text)
        lines.append(render_line(rng, text))
    return texts, lines, y


def make_lines(n: int, split: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` lines of ``split`` ('calibration' or 'test'): x (n x 3 x 48 x 192 float32 in [0, 1], padded with 0.5)
    and y (n, int64): 0 upright, 1 turned 180 degrees."""
    _, lines, y = draw_lines(n, split, seed)
    x = np.empty((n, CHANNELS, HEIGHT, WIDTH), dtype=np.float32)
    for i, (line, label) in enumerate(zip(lines, y)):
        x[i] = preprocess(turn(line, label))
    return x, y
