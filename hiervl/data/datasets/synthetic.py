"""HierVL's built-in dataset: procedurally generated shapes, no download.

Two variants share the classes (background, circle, square, triangle, star, stripes):

- ``basic``: one to four objects on a smooth textured background. Every class has a
  colour cue (stripes: a texture cue), objects sometimes wear another class's colour so
  the shape must decide, and later objects occlude earlier ones: learnable, not trivial.
  Registered as ``synthetic_*`` (tests, ``configs/tiny/hiervl_tiny_16.yaml``).
- ``hard`` (:mod:`hiervl.data.datasets.synthetic_hard`): one to three larger objects whose
  colour cue holds for four in five of them only, varied fills, shapes that vary within a
  class, four kinds of background including distractor clutter. Registered as
  ``synthetic_hard_*`` with the sizes of :data:`HARD` (``make quickstart``); its scenes
  also give the captions of the CLIP pretraining (``python -m hiervl.tools.pretrain_clip``),
  drawn from their own seed words (:data:`PRETRAIN_SPLITS`), so they never repeat a train
  or val image.

Class names are real words, so CLIP text queries mean something.

Files are written on first use (when a dataset function is called), under
``<root>/hiervl_synthetic/`` (``hiervl_synthetic_hard/``): ``images/{train,val}/*.jpg``
and ``annotations/{train,val}/*.png`` (class ids, 0 = background). A marker file records
the generator version and parameters; a mismatch regenerates. Output bytes are a function
of the seed alone (each image has its own generator), and generation is atomic (written
to a temporary folder, then renamed), so concurrent processes are safe.

The labelled subset of ``n`` images is a seeded draw from the train split; its seed (the
*split seed*, 0 unless given) is separate from the images' seed, so that several labelled
subsets of the same images can be compared (``..._labeled_<n>_split<k>``).

Shape letters: S image side (height = width).
"""

import hashlib
import json
import logging
import os
import shutil
import tempfile
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image, ImageDraw

from hiervl.data.datasets import synthetic_hard
from hiervl.data.datasets.synthetic_hard import Scene, render_hard

logger = logging.getLogger(__name__)

CLASSES = ("background", "circle", "square", "triangle", "star", "stripes")
# Colour cue of each foreground class (RGB); stripes alternate with STRIPES_LIGHT.
CLASS_COLORS = {
    1: (210, 50, 45),
    2: (45, 85, 210),
    3: (40, 170, 60),
    4: (235, 200, 35),
    5: (150, 60, 170),
}
STRIPES_LIGHT = (235, 235, 225)
# Colours for visualisation (background grey).
STUFF_COLORS = [[128, 128, 128]] + [list(CLASS_COLORS[k]) for k in range(1, len(CLASSES))]
IGNORE_LABEL = 255

DIR_NAME = "hiervl_synthetic"
# Folder of each variant under the dataset root.
VARIANT_DIRS = {"basic": DIR_NAME, "hard": "hiervl_synthetic_hard"}
MARKER = "GENERATED.json"
# Bump when the drawing code changes (the folders and the small CLIP's cache are also keyed
# by generator_digest(), the hash of the drawing code, so a forgotten bump still regenerates).
# 2: the hard variant (the basic drawing is unchanged).
# 3: the hard variant's objects larger and fewer (1-3), colour cue 0.8 instead of 0.5.
GENERATOR_VERSION = 3


def generator_digest() -> str:
    """Hash of the drawing code's source (this module and ``synthetic_hard``): stored in
    the dataset marker and in the small CLIP's cache key, so that editing a drawing constant
    regenerates both even where GENERATOR_VERSION was not bumped."""
    h = hashlib.sha256()
    for path in (__file__, synthetic_hard.__file__):
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


DEFAULTS = {"seed": 0, "num_train": 400, "num_val": 50, "image_size": 128, "variant": "basic"}
# Labelled-subset sizes registered as synthetic_train_{labeled,unlabeled}_<n>.
LABELED_COUNTS = (16, 32, 64)
# The quickstart's task: the hard variant at 64 pixels (README, "What make quickstart
# shows"), registered as synthetic_hard_*.
HARD = {"seed": 0, "num_train": 1000, "num_val": 100, "image_size": 64, "variant": "hard"}
HARD_LABELED_COUNTS = (4, 8, 16, 32)
# Split seeds registered as ..._labeled_<n>_split<k> (k = 0 is the unsuffixed name).
SPLIT_SEEDS = tuple(range(10))
JPEG_QUALITY = 90
# Seed words: split ids, and the labelled/unlabelled partition. The pretraining splits
# are never written to disk; their ids keep their images apart from train and val.
_SPLIT_IDS = {"train": 0, "val": 1, "pretrain": 3, "pretrain_heldout": 4}
PRETRAIN_SPLITS = ("pretrain", "pretrain_heldout")
_PARTITION_WORD = 2

# Drawing parameters, as fractions of S where they are lengths.
_OBJECTS_PER_IMAGE = (1, 4)
_RADIUS_RANGE = (0.09, 0.28)
_OFF_COLOR_PROB = 0.15  # an object wears another class's colour
_OBJECT_COLOR_JITTER = 18.0  # std of the per-object colour offset
_PIXEL_NOISE = 10.0  # std of per-pixel noise on objects
_BACKGROUND_GRID = 5  # the background is a smooth upsampling of a GxG colour grid
_BACKGROUND_LEVEL = (70.0, 170.0)  # grey level range of the background grid
_BACKGROUND_TINT = 15.0  # std of the per-channel tint (keeps the background muted)
_BACKGROUND_NOISE = 8.0
_STAR_INNER = 0.45  # inner/outer radius of the five-pointed star
_STRIPE_PERIOD = (4.0, 8.0)  # pixels
_STRIPE_ASPECT = 0.6  # height/width of the striped rectangle


def _polygon(cx: float, cy: float, radii: Sequence[float], angle: float) -> List[Tuple]:
    """Vertices at equal angular steps from ``angle``, vertex i at distance radii[i]."""
    step = 2 * np.pi / len(radii)
    return [
        (cx + r * np.cos(angle + i * step), cy + r * np.sin(angle + i * step))
        for i, r in enumerate(radii)
    ]


def _shape_mask(class_id: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """(S, S) bool mask of one object of class ``class_id`` at a random pose."""
    radius = rng.uniform(*_RADIUS_RANGE) * size
    cx, cy = rng.uniform(radius / 2, size - radius / 2, size=2)
    angle = rng.uniform(0, 2 * np.pi)
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    name = CLASSES[class_id]
    if name == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=1)
    elif name == "square":
        draw.polygon(_polygon(cx, cy, [radius] * 4, angle), fill=1)
    elif name == "triangle":
        draw.polygon(_polygon(cx, cy, [radius] * 3, angle), fill=1)
    elif name == "star":
        draw.polygon(_polygon(cx, cy, [radius, radius * _STAR_INNER] * 5, angle), fill=1)
    else:
        assert name == "stripes", f"no drawing rule for class {name}"
        half_w, half_h = radius, radius * _STRIPE_ASPECT
        corners = [(-half_w, -half_h), (half_w, -half_h), (half_w, half_h), (-half_w, half_h)]
        cos, sin = np.cos(angle), np.sin(angle)
        draw.polygon([(cx + x * cos - y * sin, cy + x * sin + y * cos) for x, y in corners], 1)
    return np.asarray(canvas, dtype=bool)


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """(S, S, 3) float smooth, muted colour field with fine noise."""
    grid = rng.uniform(*_BACKGROUND_LEVEL, size=(_BACKGROUND_GRID, _BACKGROUND_GRID, 1))
    grid = grid + rng.normal(0, _BACKGROUND_TINT, size=(_BACKGROUND_GRID, _BACKGROUND_GRID, 3))
    grid = np.clip(grid, 0, 255).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(grid).resize((size, size), Image.BICUBIC), np.float64)
    return smooth + rng.normal(0, _BACKGROUND_NOISE, size=(size, size, 3))


def _object_fill(class_id: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """(S, S, 3) float appearance of one object (only its masked pixels are used)."""
    color_id = class_id
    if rng.random() < _OFF_COLOR_PROB:
        color_id = int(rng.choice([k for k in CLASS_COLORS if k != class_id]))
    base = np.asarray(CLASS_COLORS[color_id], np.float64) + rng.normal(0, _OBJECT_COLOR_JITTER, 3)
    fill = np.broadcast_to(base, (size, size, 3)).copy()
    if CLASSES[class_id] == "stripes":
        period = rng.uniform(*_STRIPE_PERIOD)
        direction = rng.uniform(0, np.pi)
        yy, xx = np.mgrid[0:size, 0:size]
        phase = (xx * np.cos(direction) + yy * np.sin(direction)) / period
        light = (phase % 1.0) < 0.5
        fill[light] = np.asarray(STRIPES_LIGHT, np.float64)
    return fill + rng.normal(0, _PIXEL_NOISE, size=(size, size, 3))


def _render_basic(rng: np.random.Generator, size: int) -> Tuple[np.ndarray, np.ndarray]:
    image = _background(size, rng)
    label = np.zeros((size, size), dtype=np.uint8)
    num_objects = int(rng.integers(_OBJECTS_PER_IMAGE[0], _OBJECTS_PER_IMAGE[1] + 1))
    for _ in range(num_objects):
        class_id = int(rng.integers(1, len(CLASSES)))
        mask = _shape_mask(class_id, size, rng)
        image[mask] = _object_fill(class_id, size, rng)[mask]
        label[mask] = class_id
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), label


def _sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    if split not in _SPLIT_IDS:
        raise ValueError(f"unknown synthetic split {split!r} (expected one of {list(_SPLIT_IDS)})")
    return np.random.default_rng([seed, _SPLIT_IDS[split], index])


def render_sample(
    seed: int, split: str, index: int, size: int, variant: str = "basic"
) -> Tuple[np.ndarray, np.ndarray]:
    """Draw image ``index`` of ``split`` (a function of these arguments alone).

    Returns:
        image (S, S, 3) uint8 RGB, label (S, S) uint8 class ids (0 = background).
    """
    if variant not in VARIANT_DIRS:
        raise ValueError(f"unknown synthetic variant {variant!r} (expected {list(VARIANT_DIRS)})")
    rng = _sample_rng(seed, split, index)
    if variant == "hard":
        return render_hard(rng, size)[:2]
    return _render_basic(rng, size)


def render_scene(
    seed: int, split: str, index: int, size: int
) -> Tuple[np.ndarray, np.ndarray, Scene]:
    """Image, label and :class:`Scene` (what is visible, for captions) of the hard
    variant's image ``index`` of ``split``; the same image as ``render_sample``."""
    return render_hard(_sample_rng(seed, split, index), size)


def _file_paths(folder: str, split: str, index: int) -> Tuple[str, str]:
    stem = f"{index:06d}"
    return (
        os.path.join(folder, "images", split, stem + ".jpg"),
        os.path.join(folder, "annotations", split, stem + ".png"),
    )


def _read_marker(folder: str):
    path = os.path.join(folder, MARKER)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _write_all(folder: str, spec: Dict[str, Any]) -> None:
    for split, count in (("train", spec["num_train"]), ("val", spec["num_val"])):
        for sub in ("images", "annotations"):
            os.makedirs(os.path.join(folder, sub, split), exist_ok=True)
        for index in range(count):
            image, label = render_sample(
                spec["seed"], split, index, spec["image_size"], spec["variant"]
            )
            image_path, label_path = _file_paths(folder, split, index)
            Image.fromarray(image).save(image_path, quality=JPEG_QUALITY)
            Image.fromarray(label).save(label_path)
    # Written last: a folder with a matching marker is complete.
    with open(os.path.join(folder, MARKER), "w") as f:
        json.dump(spec, f, indent=2, sort_keys=True)


def ensure_generated(root: str, **params) -> str:
    """Generate the dataset under ``<root>/hiervl_synthetic`` (``hiervl_synthetic_hard``
    for the hard variant) unless an identical one is there; returns that folder.
    ``params`` override DEFAULTS (seed, num_train, num_val, image_size, variant)."""
    unknown = set(params) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown synthetic dataset parameters {sorted(unknown)}")
    spec = {
        **DEFAULTS,
        **params,
        "generator_version": GENERATOR_VERSION,
        "generator_digest": generator_digest(),
    }
    if spec["variant"] not in VARIANT_DIRS:
        raise ValueError(
            f"unknown synthetic variant {spec['variant']!r} (expected {list(VARIANT_DIRS)})"
        )
    dir_name = VARIANT_DIRS[spec["variant"]]
    target = os.path.join(root, dir_name)
    if _read_marker(target) == spec:
        return target
    if os.path.exists(target) and _read_marker(target) is None and os.listdir(target):
        raise ValueError(
            f"{target} exists but holds no {MARKER}; it is not a generated HierVL synthetic "
            "dataset, refusing to overwrite it (move it away or choose another root)"
        )
    logger.info("Generating the HierVL synthetic dataset %s in %s ...", spec, target)
    os.makedirs(root, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{dir_name}-", dir=root)
    try:
        _write_all(staging, spec)
        if os.path.exists(target):
            if _read_marker(target) == spec:  # another process finished first
                return target
            # Stale parameters: move aside atomically, then delete.
            stale = tempfile.mkdtemp(prefix=f".{dir_name}-stale-", dir=root)
            os.rename(target, os.path.join(stale, dir_name))
            shutil.rmtree(stale)
        try:
            os.rename(staging, target)
        except OSError:
            if _read_marker(target) != spec:
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _labeled_indices(seed: int, num_train: int, count: int, split_seed: int = 0) -> np.ndarray:
    if not 0 < count < num_train:
        raise ValueError(f"labelled subset of {count} images needs 0 < {count} < {num_train}")
    # Split seed 0 keeps the partition of GENERATOR_VERSION 1.
    words = [seed, _PARTITION_WORD] + ([split_seed] if split_seed else [])
    order = np.random.default_rng(words).permutation(num_train)
    return np.sort(order[:count])


def load_synthetic(
    root: str, split: str, labeled_count: int = 0, split_seed: int = 0, **params
) -> List[Dict]:
    """Dataset dicts (detectron2 semantic format) of one part, generating files if needed.

    Args:
        split: "train" or "val".
        labeled_count: 0 = the whole split, labelled; > 0 = the train subset of that many
            labelled images; < 0 = the train images outside the subset of -labeled_count,
            without labels.
        split_seed: which seeded draw the labelled subset is.
    """
    folder = ensure_generated(root, **params)
    spec = _read_marker(folder)
    count = spec["num_train"] if split == "train" else spec["num_val"]
    indices = np.arange(count)
    if labeled_count != 0:
        assert split == "train", "labelled/unlabelled subsets are parts of the train split"
        chosen = _labeled_indices(spec["seed"], count, abs(labeled_count), split_seed)
        indices = chosen if labeled_count > 0 else np.setdiff1d(indices, chosen)
    dicts = []
    for index in indices.tolist():
        image_path, label_path = _file_paths(folder, split, index)
        record = {
            "file_name": image_path,
            "height": spec["image_size"],
            "width": spec["image_size"],
            "image_id": f"{split}_{index:06d}",
        }
        if labeled_count >= 0:
            record["sem_seg_file_name"] = label_path
        dicts.append(record)
    return dicts


def _parts(prefix: str, counts: Sequence[int], split_seeds: Sequence[int]) -> Dict[str, tuple]:
    """Registered name -> (split, labeled_count, split_seed) of one family."""
    parts = {f"{prefix}_train": ("train", 0, 0), f"{prefix}_val": ("val", 0, 0)}
    for n in counts:
        for k in split_seeds:
            suffix = f"_split{k}" if k else ""
            parts[f"{prefix}_train_labeled_{n}{suffix}"] = ("train", n, k)
            parts[f"{prefix}_train_unlabeled_{n}{suffix}"] = ("train", -n, k)
    return parts


def register_synthetic(root: str, **params) -> List[str]:
    """Register the synthetic dataset's parts; returns their names.

    Names: ``synthetic_train`` (all train images, labelled), ``synthetic_val``, and for each
    n in LABELED_COUNTS ``synthetic_train_labeled_<n>`` / ``synthetic_train_unlabeled_<n>``
    (disjoint; together the train split), with ``params`` (default DEFAULTS). The hard
    variant with the sizes of :data:`HARD` is registered alongside as ``synthetic_hard_*``
    (n in HARD_LABELED_COUNTS), each labelled subset also under every split seed k > 0 of
    SPLIT_SEEDS as ``synthetic_hard_train_{labeled,unlabeled}_<n>_split<k>``. Nothing is
    generated until a dataset is loaded. Registering again replaces the earlier
    registration (e.g. with another root).
    """
    families = [
        ("synthetic", params, _parts("synthetic", LABELED_COUNTS, (0,))),
        ("synthetic_hard", HARD, _parts("synthetic_hard", HARD_LABELED_COUNTS, SPLIT_SEEDS)),
    ]
    names = []
    for _, family_params, parts in families:
        for name, (split, labeled_count, split_seed) in parts.items():
            if name in DatasetCatalog.list():
                DatasetCatalog.remove(name)
                MetadataCatalog.remove(name)
            DatasetCatalog.register(
                name,
                lambda s=split, n=labeled_count, k=split_seed, p=family_params: load_synthetic(
                    root, s, n, k, **p
                ),
            )
            MetadataCatalog.get(name).set(
                stuff_classes=list(CLASSES),
                stuff_colors=[list(c) for c in STUFF_COLORS],
                ignore_label=IGNORE_LABEL,
                evaluator_type="sem_seg",
            )
            names.append(name)
    return names
