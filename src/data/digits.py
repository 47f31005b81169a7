"""The embedded default world: coloured handwritten digits moving on a black canvas.

Glyphs are scikit-learn's bundled 8x8 handwritten digits (1,797 images with values 0..16,
shipped inside the wheel, so nothing is downloaded). A video is one glyph upscaled ``scale``
times (nearest), tinted with one colour, moving ``speed`` px per frame in one direction, fully
inside a square black canvas for every frame. Train and validation use disjoint glyphs.

Coordinates are image coordinates: ``x`` is the column, ``y`` the row (growing downwards), and
``start_xy`` is the top-left corner of the glyph in the first frame.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "cyan": (0, 255, 255),
    "magenta": (255, 0, 255),
    "white": (255, 255, 255),
}
DIRECTIONS: dict[str, tuple[int, int]] = {  # (dx, dy) per frame, in units of `speed`
    "left": (-1, 0),
    "right": (1, 0),
    "up": (0, -1),
    "down": (0, 1),
}
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

CANVAS_SIZE = 64
SCALE = 3
SPEED = 2
NUM_FRAMES = 17
FPS = 8
VAL_FRACTION = 0.1  # share of each digit's glyphs held out for validation
GLYPH_SPLIT_SEED = 0  # fixed: the validation handwriting must not change with the data seed
SPLITS = ("train", "val")

# how the non-canonical captions say the direction
_MOTION_PHRASES = {
    "left": "to the left",
    "right": "to the right",
    "up": "upward",
    "down": "downward",
}
# words parse_caption maps back to a direction
_DIRECTION_WORDS = {
    "left": "left",
    "leftward": "left",
    "leftwards": "left",
    "right": "right",
    "rightward": "right",
    "rightwards": "right",
    "up": "up",
    "upward": "up",
    "upwards": "up",
    "top": "up",
    "down": "down",
    "downward": "down",
    "downwards": "down",
    "bottom": "down",
}


@dataclass(frozen=True)
class DigitSpec:
    """Everything needed to render one video (given the canvas/scale/speed/frames settings)."""

    digit: int
    color: str
    direction: str
    glyph_id: int
    start_xy: tuple[int, int]  # top-left corner (x, y) of the glyph in frame 0


@functools.lru_cache(maxsize=1)
def _glyph_table() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # local import: sklearn is slow to import

    data = load_digits()
    images = (data.images / 16.0).astype(np.float32)  # (1797, 8, 8) in [0, 1]
    labels = data.target.astype(np.int64)  # (1797,)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def num_glyphs() -> int:
    """Number of bundled glyphs (1,797)."""
    return len(_glyph_table()[1])


def glyph_digit(glyph_id: int) -> int:
    """The digit (0..9) a glyph shows."""
    return int(_glyph_table()[1][glyph_id])


def glyph_image(glyph_id: int, scale: int = SCALE) -> np.ndarray:
    """Glyph intensity in [0, 1], upscaled by ``scale`` with nearest neighbour: ``(8s, 8s)``."""
    image = _glyph_table()[0][glyph_id]
    return np.kron(image, np.ones((scale, scale), dtype=np.float32))


@functools.lru_cache(maxsize=8)
def split_glyph_ids(
    split: str, val_fraction: float = VAL_FRACTION, seed: int = GLYPH_SPLIT_SEED
) -> np.ndarray:
    """Sorted glyph ids of ``split`` ("train" or "val"), stratified by digit, disjoint."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    _, labels = _glyph_table()
    rng = np.random.default_rng(seed)
    val: list[np.ndarray] = []
    for digit in range(10):
        ids = rng.permutation(np.flatnonzero(labels == digit))
        val.append(ids[: max(1, round(len(ids) * val_fraction))])
    val_ids = np.sort(np.concatenate(val))
    ids = val_ids if split == "val" else np.setdiff1d(np.arange(len(labels)), val_ids)
    ids.setflags(write=False)
    return ids


def start_ranges(
    direction: str,
    canvas_size: int = CANVAS_SIZE,
    scale: int = SCALE,
    speed: int = SPEED,
    num_frames: int = NUM_FRAMES,
) -> tuple[range, range]:
    """Valid start x and y for a trajectory that stays fully inside the canvas."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {list(DIRECTIONS)}, got {direction!r}")
    glyph_size = 8 * scale
    free = canvas_size - glyph_size  # largest top-left coordinate
    travel = speed * (num_frames - 1)
    if free < 0 or travel > free:
        raise ValueError(
            f"a {glyph_size}px digit moving {travel}px does not fit a {canvas_size}px canvas; "
            "lower scale, speed or num_frames, or enlarge canvas_size"
        )
    dx, dy = DIRECTIONS[direction]

    def axis(d: int) -> range:
        if d > 0:
            return range(0, free - travel + 1)
        if d < 0:
            return range(travel, free + 1)
        return range(0, free + 1)

    return axis(dx), axis(dy)


def make_spec(
    glyph_id: int,
    color: str,
    direction: str,
    seed: int,
    canvas_size: int = CANVAS_SIZE,
    scale: int = SCALE,
    speed: int = SPEED,
    num_frames: int = NUM_FRAMES,
) -> DigitSpec:
    """A spec whose start position is drawn from ``seed`` (deterministic in all arguments)."""
    if color not in COLORS:
        raise ValueError(f"color must be one of {list(COLORS)}, got {color!r}")
    xs, ys = start_ranges(direction, canvas_size, scale, speed, num_frames)
    key = [seed, glyph_id, list(COLORS).index(color), list(DIRECTIONS).index(direction)]
    rng = np.random.default_rng(key)
    start = (int(rng.choice(xs)), int(rng.choice(ys)))
    return DigitSpec(glyph_digit(glyph_id), color, direction, int(glyph_id), start)


def trajectory(
    spec: DigitSpec, speed: int = SPEED, num_frames: int = NUM_FRAMES
) -> list[tuple[int, int]]:
    """Top-left (x, y) of the glyph in every frame."""
    dx, dy = DIRECTIONS[spec.direction]
    x0, y0 = spec.start_xy
    return [(x0 + dx * speed * t, y0 + dy * speed * t) for t in range(num_frames)]


def render_video(
    spec: DigitSpec,
    canvas_size: int = CANVAS_SIZE,
    scale: int = SCALE,
    speed: int = SPEED,
    num_frames: int = NUM_FRAMES,
) -> np.ndarray:
    """Render ``spec`` as a uint8 video ``(T, H, W, 3)`` on a black canvas."""
    glyph = glyph_image(spec.glyph_id, scale)  # (g, g) in [0, 1]
    size = glyph.shape[0]
    tint = np.asarray(COLORS[spec.color], dtype=np.float32)  # (3,)
    sprite = np.round(glyph[..., None] * tint).astype(np.uint8)  # (g, g, 3)
    video = np.zeros((num_frames, canvas_size, canvas_size, 3), dtype=np.uint8)
    for t, (x, y) in enumerate(trajectory(spec, speed, num_frames)):
        if not (0 <= x <= canvas_size - size and 0 <= y <= canvas_size - size):
            raise ValueError(
                f"{spec} leaves the {canvas_size}px canvas at frame {t} (x={x}, y={y}); "
                "pick the start with make_spec/start_ranges"
            )
        video[t, y : y + size, x : x + size] = sprite
    return video


def iter_specs(
    num: int,
    split: str,
    seed: int,
    canvas_size: int = CANVAS_SIZE,
    scale: int = SCALE,
    speed: int = SPEED,
    num_frames: int = NUM_FRAMES,
) -> Iterator[DigitSpec]:
    """Yield ``num`` random specs drawing glyphs only from ``split`` (deterministic in seed)."""
    ids = split_glyph_ids(split)
    colors, directions = list(COLORS), list(DIRECTIONS)
    for i in range(num):
        rng = np.random.default_rng([seed, SPLITS.index(split), i])
        glyph_id = int(rng.choice(ids))
        color = colors[int(rng.integers(len(colors)))]
        direction = directions[int(rng.integers(len(directions)))]
        spec_seed = int(rng.integers(2**31))
        yield make_spec(
            glyph_id, color, direction, spec_seed, canvas_size, scale, speed, num_frames
        )


def canonical_caption(digit: int, color: str, direction: str) -> str:
    """The canonical caption, e.g. ``a red digit 7 moving left``."""
    return f"a {color} digit {digit} moving {direction}"


def caption_variants(digit: int, color: str, direction: str) -> list[str]:
    """All phrasings of the same facts; index 0 is the canonical caption."""
    word, motion = DIGIT_WORDS[digit], _MOTION_PHRASES[direction]
    return [
        canonical_caption(digit, color, direction),
        f"a {color} {word} drifting {motion}",
        f"a {color} {word} moving {direction}",
        f"the handwritten digit {digit} in {color}, sliding {motion}",
        f"a {color} number {word} travels {motion} across a black background",
    ]


def random_caption(
    digit: int,
    color: str,
    direction: str,
    rng: np.random.Generator,
    canonical_fraction: float = 0.5,
) -> str:
    """The canonical caption with probability ``canonical_fraction``, else another phrasing."""
    variants = caption_variants(digit, color, direction)
    if rng.random() < canonical_fraction:
        return variants[0]
    return variants[1 + int(rng.integers(len(variants) - 1))]


def parse_caption(text: str) -> tuple[int, str, str] | None:
    """Read ``(digit, color, direction)`` from any phrasing; ``None`` if absent or ambiguous."""
    tokens = re.findall(r"[a-z0-9]+", text.lower())
    digits = {int(t) for t in tokens if len(t) == 1 and t.isdigit()}
    digits |= {DIGIT_WORDS.index(t) for t in tokens if t in DIGIT_WORDS}
    colors = {t for t in tokens if t in COLORS}
    directions = {_DIRECTION_WORDS[t] for t in tokens if t in _DIRECTION_WORDS}
    if len(digits) != 1 or len(colors) != 1 or len(directions) != 1:
        return None
    return digits.pop(), colors.pop(), directions.pop()
