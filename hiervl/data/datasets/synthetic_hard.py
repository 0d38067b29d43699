"""The "hard" variant of the built-in synthetic dataset, and the captions of its images.

Same classes as the basic variant (background, circle, square, triangle, star, stripes),
with more variation within each class and a harder background:

- colour is a cue, not a rule: an object wears its class's cue colour with probability
  ``CUE_PROB`` (0.8), else a colour drawn uniformly from a palette of named colours that
  includes the other classes' cues, so on about one object in five only the shape (for
  stripes, the texture) tells the class. A model trained on a few labelled images learns
  the colours and little of the shapes; with many images it learns both (measured in
  benchmarks/RESULTS.md: 8 labelled images 39.6 mIoU, all 1000 labelled 66.5, same
  iterations), which leaves room for the unlabelled images to help;
- fills vary: solid, a gradient, speckled, or solid with a dark outline;
- shapes vary within a class: ellipses of aspect 0.75-1 for circles, rectangles of
  aspect 0.75-1 for squares, triangles with jittered corners, stars with a random inner
  radius, striped rectangles of aspect 0.45-0.8 with a random stripe period;
- four kinds of background: plain (a smooth muted field, as the basic variant), a
  gradient, a noisy one, and a cluttered one with small dots and thin lines in palette
  colours (distractors, labelled background);
- some images are slightly blurred, and every image gets a random brightness/contrast.

:func:`render_hard` returns the image, its label map and a :class:`Scene` that names what
is visible; :func:`caption` turns a scene into one of many English captions ("a red
circle and stripes on a noisy background", "a cluttered background with a star", ...),
the image-text pairs of ``python -m hiervl.tools.pretrain_clip``.

Shape letters: S image side (height = width).
"""

from __future__ import annotations

from typing import Dict, List, NamedTuple, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = ["BACKGROUNDS", "CUE_COLORS", "CUE_PROB", "PALETTE", "Scene", "caption", "render_hard"]

# Class names, as in synthetic.CLASSES (kept here so this module imports no detectron2).
_CLASSES = ("background", "circle", "square", "triangle", "star", "stripes")
# Named object colours (RGB); the names appear in captions.
PALETTE: Dict[str, Tuple[int, int, int]] = {
    "red": (200, 40, 40),
    "orange": (230, 130, 30),
    "yellow": (225, 205, 40),
    "green": (50, 160, 60),
    "teal": (30, 150, 150),
    "blue": (40, 80, 200),
    "purple": (130, 60, 170),
    "pink": (230, 120, 170),
    "brown": (120, 75, 40),
    "white": (235, 235, 235),
    "black": (30, 30, 30),
}
# Cue colour of each foreground class (as in the basic variant: red circles, blue
# squares, green triangles, yellow stars, purple stripes).
CUE_COLORS = {1: "red", 2: "blue", 3: "green", 4: "yellow", 5: "purple"}
CUE_PROB = 0.8
BACKGROUNDS = ("plain", "gradient", "noisy", "cluttered")
FILLS = ("solid", "gradient", "speckled", "outlined")

_OBJECTS_PER_IMAGE = (1, 3)
_RADIUS_RANGE = (0.20, 0.38)  # fraction of S: 13-24 px radius at S = 64
_COLOR_JITTER = 15.0
_PIXEL_NOISE = 6.0
_SPECKLE_NOISE = 30.0
_GRADIENT_DARKEN = 0.55  # far end of a gradient fill, times the object colour
_OUTLINE_DARKEN = 0.35
_ASPECT = {"circle": (0.75, 1.0), "square": (0.75, 1.0), "stripes": (0.45, 0.8)}
_TRIANGLE_JITTER = np.deg2rad(15.0)
_STAR_INNER = (0.38, 0.55)
_STRIPE_PERIOD = (3.0, 6.0)  # fraction of S/64, i.e. pixels at S = 64
_BACKGROUND_GRID = 5
_BACKGROUND_LEVEL = (70.0, 170.0)
_BACKGROUND_TINT = 15.0
_BACKGROUND_NOISE = (6.0, 25.0)  # plain/gradient/cluttered, noisy
_CLUTTER_COUNT = (4, 10)
_CLUTTER_DOT_RADIUS = (0.02, 0.045)  # fraction of S
_BLUR_PROB = 0.3
_BLUR_SIGMA = (0.3, 0.8)  # pixels at S = 64
_CONTRAST = (0.8, 1.2)
_BRIGHTNESS = (-15.0, 15.0)
# A class counts as visible (is named in the caption) when it covers at least this share
# of the image after occlusion.
_VISIBLE_SHARE = 0.01


class Scene(NamedTuple):
    """What an image shows: per visible class (ascending id) its colour name and object
    count, and the background kind."""

    classes: Tuple[int, ...]
    colors: Tuple[str, ...]
    counts: Tuple[int, ...]
    background: str


def _random_color(rng: np.random.Generator, cue: str = "") -> Tuple[str, np.ndarray]:
    """A palette colour (name, jittered RGB): ``cue`` with probability CUE_PROB when given,
    else uniform over the palette."""
    names = list(PALETTE)
    if cue and rng.random() < CUE_PROB:
        name = cue
    else:
        name = names[int(rng.integers(len(names)))]
    return name, np.asarray(PALETTE[name], np.float64) + rng.normal(0, _COLOR_JITTER, 3)


def _muted_field(size: int, rng: np.random.Generator) -> np.ndarray:
    grid = rng.uniform(*_BACKGROUND_LEVEL, size=(_BACKGROUND_GRID, _BACKGROUND_GRID, 1))
    grid = grid + rng.normal(0, _BACKGROUND_TINT, size=(_BACKGROUND_GRID, _BACKGROUND_GRID, 3))
    grid = np.clip(grid, 0, 255).astype(np.uint8)
    return np.asarray(Image.fromarray(grid).resize((size, size), Image.BICUBIC), np.float64)


def _ramp(size: int, rng: np.random.Generator) -> np.ndarray:
    """(S, S) values in [0, 1] rising along a random direction."""
    direction = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    ramp = xx * np.cos(direction) + yy * np.sin(direction)
    return (ramp - ramp.min()) / max(ramp.max() - ramp.min(), 1e-6)


def _background(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """(S, S, 3) float background of one kind (distractors of "cluttered" included)."""
    if kind == "gradient":
        ends = rng.uniform(*_BACKGROUND_LEVEL, size=(2, 1)) + rng.normal(
            0, _BACKGROUND_TINT, size=(2, 3)
        )
        t = _ramp(size, rng)[..., None]
        field = ends[0] * (1 - t) + ends[1] * t
    else:
        field = _muted_field(size, rng)
    noise = _BACKGROUND_NOISE[1] if kind == "noisy" else _BACKGROUND_NOISE[0]
    field = field + rng.normal(0, noise, size=(size, size, 3))
    if kind == "cluttered":
        canvas = Image.fromarray(np.clip(np.rint(field), 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(canvas)
        for _ in range(int(rng.integers(_CLUTTER_COUNT[0], _CLUTTER_COUNT[1] + 1))):
            color = tuple(int(c) for c in np.clip(_random_color(rng)[1], 0, 255))
            x, y = rng.uniform(0, size, size=2)
            if rng.random() < 0.5:
                r = rng.uniform(*_CLUTTER_DOT_RADIUS) * size
                draw.ellipse((x - r, y - r, x + r, y + r), fill=color)
            else:
                length = rng.uniform(0.15, 0.35) * size
                angle = rng.uniform(0, np.pi)
                end = (x + length * np.cos(angle), y + length * np.sin(angle))
                draw.line([(x, y), end], fill=color, width=1)
        field = np.asarray(canvas, np.float64)
    return field


def _rotated(points: np.ndarray, cx: float, cy: float, angle: float) -> List[Tuple]:
    cos, sin = np.cos(angle), np.sin(angle)
    x, y = points[:, 0], points[:, 1]
    return list(zip(cx + x * cos - y * sin, cy + x * sin + y * cos))


def _outline(name: str, radius: float, rng: np.random.Generator) -> np.ndarray:
    """(V, 2) polygon of one object of class ``name`` around the origin, unrotated."""
    if name in ("circle", "square", "stripes"):
        aspect = rng.uniform(*_ASPECT[name])
        if name == "circle":
            t = np.linspace(0, 2 * np.pi, 32, endpoint=False)
            return np.stack([radius * np.cos(t), radius * aspect * np.sin(t)], axis=1)
        half_w, half_h = radius * 0.85, radius * 0.85 * aspect
        if name == "stripes":
            half_w, half_h = radius, radius * aspect
        return np.asarray(
            [(-half_w, -half_h), (half_w, -half_h), (half_w, half_h), (-half_w, half_h)]
        )
    if name == "triangle":
        t = np.arange(3) * 2 * np.pi / 3 + rng.uniform(-_TRIANGLE_JITTER, _TRIANGLE_JITTER, 3)
        r = radius * rng.uniform(0.85, 1.0, 3)
        return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)
    assert name == "star", f"no drawing rule for class {name}"
    t = np.arange(10) * np.pi / 5
    r = np.where(np.arange(10) % 2 == 0, radius, radius * rng.uniform(*_STAR_INNER))
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _shape_mask(name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """(S, S) bool mask of one object at a random pose."""
    radius = rng.uniform(*_RADIUS_RANGE) * size
    cx, cy = rng.uniform(radius / 2, size - radius / 2, size=2)
    polygon = _rotated(_outline(name, radius, rng), cx, cy, rng.uniform(0, 2 * np.pi))
    canvas = Image.new("L", (size, size), 0)
    ImageDraw.Draw(canvas).polygon(polygon, fill=1)
    return np.asarray(canvas, dtype=bool)


def _object_fill(
    class_id: int, mask: np.ndarray, rng: np.random.Generator
) -> Tuple[str, np.ndarray]:
    """Colour name and (S, S, 3) float appearance of one object (only ``mask`` is used)."""
    size, name = mask.shape[0], _CLASSES[class_id]
    color_name, color = _random_color(rng, CUE_COLORS[class_id])
    fill = np.broadcast_to(color, (size, size, 3)).copy()
    style = FILLS[int(rng.integers(len(FILLS)))]
    if name == "stripes":
        # The texture is the class: stripes of the colour and a light or dark second tone.
        period = rng.uniform(*_STRIPE_PERIOD) * size / 64
        phase = (_ramp(size, rng) * size * 1.4 / period) % 1.0
        other = np.full(3, 235.0 if color.mean() < 128 else 25.0)
        fill[phase < 0.5] = other
    elif style == "gradient":
        t = _ramp(size, rng)[..., None]
        fill = color * (1 - t) + color * _GRADIENT_DARKEN * t
    elif style == "speckled":
        fill = fill + rng.normal(0, _SPECKLE_NOISE, size=(size, size, 3))
    elif style == "outlined":
        inner = np.asarray(
            Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.MinFilter(3))
        )
        fill[mask & (inner == 0)] = color * _OUTLINE_DARKEN
    return color_name, fill + rng.normal(0, _PIXEL_NOISE, size=(size, size, 3))


def render_hard(rng: np.random.Generator, size: int) -> Tuple[np.ndarray, np.ndarray, Scene]:
    """Draw one image of the hard variant from ``rng``.

    Returns:
        image (S, S, 3) uint8 RGB, label (S, S) uint8 class ids (0 = background), and the
        :class:`Scene` of the classes visible in the label map.
    """
    kind = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    image = _background(kind, size, rng)
    label = np.zeros((size, size), dtype=np.uint8)
    colors: Dict[int, str] = {}
    counts: Dict[int, int] = {}
    for _ in range(int(rng.integers(_OBJECTS_PER_IMAGE[0], _OBJECTS_PER_IMAGE[1] + 1))):
        class_id = int(rng.integers(1, len(_CLASSES)))
        mask = _shape_mask(_CLASSES[class_id], size, rng)
        color_name, fill = _object_fill(class_id, mask, rng)
        image[mask] = fill[mask]
        label[mask] = class_id
        colors.setdefault(class_id, color_name)
        counts[class_id] = counts.get(class_id, 0) + 1
    image = image * rng.uniform(*_CONTRAST) + rng.uniform(*_BRIGHTNESS)
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    if rng.random() < _BLUR_PROB:
        sigma = rng.uniform(*_BLUR_SIGMA) * size / 64
        image = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(sigma)))
    share = np.bincount(label.ravel(), minlength=len(_CLASSES)) / label.size
    visible = tuple(k for k in sorted(counts) if share[k] >= _VISIBLE_SHARE)
    scene = Scene(
        classes=visible,
        colors=tuple(colors[k] for k in visible),
        counts=tuple(counts[k] for k in visible),
        background=kind,
    )
    return image, label, scene


# ----------------------------------------------------------------------------- captions
_PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars"}
_NUMBERS = {2: "two", 3: "three", 4: "four"}
_COLOR_PROB = 0.25
# Probability that a caption names only some of the visible classes (a random non-empty
# subset), as real captions do; otherwise it names all of them.
_SUBSET_PROB = 0.5
_COUNT_PROB = 0.3
_BACKGROUND_PROB = 0.4
# {objs}: the objects phrase; {bg}: "a noisy background" etc.
_TEMPLATES_OBJECTS = ("{objs}.", "a photo of {objs}.", "an image of {objs}.", "there is {objs}.")
_TEMPLATES_BACKGROUND = (
    "{objs} on {bg}.",
    "a photo of {objs} on {bg}.",
    "{bg} with {objs}.",
    "an image of {objs} on {bg}.",
    "on {bg}, {objs}.",
)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _object_phrase(name: str, color: str, count: int, rng: np.random.Generator) -> str:
    words = [color] if rng.random() < _COLOR_PROB else []
    if count > 1 and name in _PLURALS and rng.random() < _COUNT_PROB:
        return " ".join([_NUMBERS.get(count, "many")] + words + [_PLURALS[name]])
    words.append(name)
    # "stripes" is a plural noun: no article.
    return " ".join(words) if name == "stripes" else " ".join([_article(words[0])] + words)


def _join(phrases: Sequence[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """One random English caption naming the visible classes of ``scene`` (in random
    order, sometimes with its colour or count) and sometimes its background."""
    order = rng.permutation(len(scene.classes))
    if len(order) > 1 and rng.random() < _SUBSET_PROB:
        order = order[: int(rng.integers(1, len(order)))]
    phrases = [
        _object_phrase(_CLASSES[scene.classes[i]], scene.colors[i], scene.counts[i], rng)
        for i in order
    ]
    if not phrases:
        return f"{_article(scene.background)} {scene.background} background."
    objs = _join(phrases)
    if rng.random() < _BACKGROUND_PROB:
        template = _TEMPLATES_BACKGROUND[int(rng.integers(len(_TEMPLATES_BACKGROUND)))]
        bg = f"{_article(scene.background)} {scene.background} background"
        return template.format(objs=objs, bg=bg)
    return _TEMPLATES_OBJECTS[int(rng.integers(len(_TEMPLATES_OBJECTS)))].format(objs=objs)
