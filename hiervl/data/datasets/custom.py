"""A custom dataset from a folder, no code: images + PNG class masks + class names, set in
the config (``DATASETS.CUSTOM.*``) or on the command line, e.g.::

    python train_net.py --config-file ... DATASETS.CUSTOM.NAME cells \\
        DATASETS.CUSTOM.ROOT /data/cells DATASETS.CUSTOM.CLASSES_FILE classes.txt \\
        DATASETS.TRAIN_LABELED "('cells_train_labeled',)" \\
        DATASETS.TRAIN_UNLABELED "('cells_train_unlabeled',)" DATASETS.TEST "('cells_val',)"

Folder: ``<ROOT>/<IMAGE_DIR>/<stem>.<jpg|jpeg|png|bmp|tif|tiff|webp>`` and
``<ROOT>/<MASK_DIR>/<stem>.png``: single-channel, value k = class k of the class list,
255 = ignore. Every image needs a mask (the labels of the unlabelled part are hidden, not
absent). Registered parts: ``<NAME>_train`` (all train images, labelled),
``<NAME>_train_labeled``, ``<NAME>_train_unlabeled`` (the rest of train, no labels) and
``<NAME>_val``.

Parts come from split files (one image per line: a stem, a file name or an
``image_path label_path`` line; paths relative to ROOT) or, without them, from seeded
random fractions. The folder is validated when a part is first loaded (once per process):
unreadable images, missing masks, masks that are not single-channel, whose size differs
from the image, or with values >= K other than 255 raise a ValueError naming the files.
"""

import logging
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Set, Tuple

import numpy as np
from PIL import Image

from hiervl.data import split_files
from hiervl.data.datasets.common import (
    EVALUATOR_TYPE,
    IGNORE_LABEL,
    make_records,
    register,
    require_dir,
)

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
MASK_EXTENSION = ".png"
# Problems listed in one validation error before "...".
_MAX_PROBLEMS = 20
# Second word of the seed of the labelled draw (the val draw uses the seed alone).
_LABELED_DRAW = 1
_validated: Set["CustomSpec"] = set()


@dataclass(frozen=True)
class CustomSpec:
    """Everything that defines a custom dataset (the ``DATASETS.CUSTOM`` keys)."""

    name: str
    root: str
    image_dir: str
    mask_dir: str
    classes: Tuple[str, ...]
    labeled_split: str
    val_split: str
    labeled_fraction: float
    val_fraction: float
    seed: int


def read_class_names(path: str) -> Tuple[str, ...]:
    """One class name per line; blank lines and ``#`` comments are skipped."""
    if not os.path.isfile(path):
        raise ValueError(f"DATASETS.CUSTOM.CLASSES_FILE {path} does not exist")
    with open(path, encoding="utf-8") as f:
        names = [line.strip() for line in f]
    return tuple(n for n in names if n and not n.startswith("#"))


def spec_from_cfg(cfg) -> Optional[CustomSpec]:
    """The custom dataset of ``cfg`` (None when ``DATASETS.CUSTOM.NAME`` is empty).
    Checks the keys; reads only the class file."""
    name = cfg.DATASETS.CUSTOM.NAME
    if not name:
        return None
    if any(c.isspace() for c in name):
        raise ValueError(f"DATASETS.CUSTOM.NAME {name!r} must not contain whitespace")
    root = cfg.DATASETS.CUSTOM.ROOT
    if not root:
        raise ValueError(f"DATASETS.CUSTOM.ROOT is empty (custom dataset {name!r})")
    root = os.path.expanduser(root)
    listed, classes_file = list(cfg.DATASETS.CUSTOM.CLASSES), cfg.DATASETS.CUSTOM.CLASSES_FILE
    if bool(listed) == bool(classes_file):
        raise ValueError(
            "set exactly one of DATASETS.CUSTOM.CLASSES and DATASETS.CUSTOM.CLASSES_FILE"
        )
    if classes_file and not os.path.isabs(classes_file):
        classes_file = os.path.join(root, classes_file)
    classes = tuple(listed) if listed else read_class_names(classes_file)
    where = classes_file or "DATASETS.CUSTOM.CLASSES"
    if not classes or len(set(classes)) != len(classes) or len(classes) > IGNORE_LABEL:
        raise ValueError(f"{where}: need 1..{IGNORE_LABEL} distinct class names, got {classes}")
    labeled_fraction = float(cfg.DATASETS.CUSTOM.LABELED_FRACTION)
    val_fraction = float(cfg.DATASETS.CUSTOM.VAL_FRACTION)
    if not 0.0 < labeled_fraction <= 1.0:
        raise ValueError(f"DATASETS.CUSTOM.LABELED_FRACTION {labeled_fraction} not in (0, 1]")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"DATASETS.CUSTOM.VAL_FRACTION {val_fraction} not in [0, 1)")
    return CustomSpec(
        name=name,
        root=root,
        image_dir=cfg.DATASETS.CUSTOM.IMAGE_DIR,
        mask_dir=cfg.DATASETS.CUSTOM.MASK_DIR,
        classes=classes,
        labeled_split=cfg.DATASETS.CUSTOM.LABELED_SPLIT,
        val_split=cfg.DATASETS.CUSTOM.VAL_SPLIT,
        labeled_fraction=labeled_fraction,
        val_fraction=val_fraction,
        seed=int(cfg.DATASETS.CUSTOM.SEED),
    )


def list_images(spec: CustomSpec) -> Dict[str, str]:
    """stem -> image file name, for every image of the image folder."""
    folder = os.path.join(spec.root, spec.image_dir)
    require_dir(
        folder,
        f"custom dataset {spec.name!r} image folder",
        "check DATASETS.CUSTOM.ROOT / IMAGE_DIR",
    )
    images: Dict[str, str] = {}
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        stem, ext = os.path.splitext(entry.name)
        if not entry.is_file() or ext.lower() not in IMAGE_EXTENSIONS:
            continue
        if stem in images:
            raise ValueError(
                f"{folder}: two images share the stem {stem!r} ({images[stem]}, {entry.name})"
            )
        images[stem] = entry.name
    if not images:
        raise ValueError(f"{folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return images


def _read_stems(path: str, root: str, known: Dict[str, str]) -> List[str]:
    path = path if os.path.isabs(path) else os.path.join(root, path)
    if not os.path.isfile(path):
        raise ValueError(f"custom split file {path} does not exist")
    stems = [os.path.splitext(os.path.basename(entry))[0] for entry in split_files.read_list(path)]
    unknown = [s for s in stems if s not in known]
    if unknown:
        raise ValueError(
            f"{path}: {len(unknown)} entries name no image of the folder: {unknown[:5]}"
        )
    return stems


def _draw(stems: List[str], count: int, seed) -> List[str]:
    order = np.random.default_rng(seed).permutation(len(stems))
    return sorted(stems[i] for i in order[:count])


def partition(spec: CustomSpec, images: Dict[str, str]) -> Dict[str, List[str]]:
    """Stems of the parts ``train``, ``train_labeled``, ``train_unlabeled`` and ``val``."""
    stems = sorted(images)
    if spec.val_split:
        val = _read_stems(spec.val_split, spec.root, images)
    else:
        count = round(spec.val_fraction * len(stems))
        val = _draw(stems, max(count, 1) if spec.val_fraction > 0 else 0, spec.seed)
    val_set = set(val)
    train = [s for s in stems if s not in val_set]
    if not train:
        raise ValueError(f"custom dataset {spec.name!r}: no train images left after the val part")
    if spec.labeled_split:
        labeled = _read_stems(spec.labeled_split, spec.root, images)
        in_val = [s for s in labeled if s in val_set]
        if in_val:
            raise ValueError(f"{spec.labeled_split}: images also in the val part: {in_val[:5]}")
    else:
        count = max(1, round(spec.labeled_fraction * len(train)))
        labeled = _draw(train, count, [spec.seed, _LABELED_DRAW])
    labeled_set = set(labeled)
    unlabeled = [s for s in train if s not in labeled_set]
    return {"train": train, "train_labeled": labeled, "train_unlabeled": unlabeled, "val": val}


def _mask_path(spec: CustomSpec, stem: str) -> str:
    return os.path.join(spec.root, spec.mask_dir, stem + MASK_EXTENSION)


def _problems_of(spec: CustomSpec, stem: str, image_name: str) -> List[str]:
    image_path = os.path.join(spec.root, spec.image_dir, image_name)
    try:
        with Image.open(image_path) as image:
            image.load()
            size = image.size
    except (OSError, SyntaxError, ValueError) as e:
        return [f"{image_path}: unreadable image ({e})"]
    mask_path = _mask_path(spec, stem)
    if not os.path.isfile(mask_path):
        return [f"{image_path}: no mask (expected {mask_path})"]
    try:
        with Image.open(mask_path) as mask_image:
            mask = np.asarray(mask_image)
    except (OSError, SyntaxError, ValueError) as e:
        return [f"{mask_path}: unreadable mask ({e})"]
    if mask.ndim != 2:
        return [f"{mask_path}: mask must be single-channel class ids, got shape {mask.shape}"]
    if (mask.shape[1], mask.shape[0]) != size:
        return [
            f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]}, image {image_path} is "
            f"{size[0]}x{size[1]}"
        ]
    values = np.unique(mask)
    bad = values[(values >= len(spec.classes)) & (values != IGNORE_LABEL)]
    if bad.size:
        return [
            f"{mask_path}: label values {bad.tolist()} >= K={len(spec.classes)} and not "
            f"{IGNORE_LABEL} (ignore)"
        ]
    return []


def validate_folder(spec: CustomSpec, images: Dict[str, str]) -> None:
    """Raise ValueError listing every unreadable image or bad/missing mask."""
    problems: List[str] = []
    for stem, name in images.items():
        problems += _problems_of(spec, stem, name)
    if problems:
        shown = "\n  ".join(problems[:_MAX_PROBLEMS])
        more = f"\n  ... ({len(problems)} problems in all)" if len(problems) > _MAX_PROBLEMS else ""
        raise ValueError(f"custom dataset {spec.name!r} in {spec.root}:\n  {shown}{more}")


def load_custom(spec: CustomSpec, part: str) -> List[Dict]:
    """Records of one part (``train_unlabeled`` ones without ``sem_seg_file_name``)."""
    images = list_images(spec)
    if spec not in _validated:
        validate_folder(spec, images)
        _validated.add(spec)
    stems = partition(spec, images)[part]
    paths = [os.path.join(spec.root, spec.image_dir, images[s]) for s in stems]
    labels = None if part == "train_unlabeled" else [_mask_path(spec, s) for s in stems]
    return make_records(paths, labels, stems)


def register_custom(spec: CustomSpec) -> List[str]:
    """Register the four parts of ``spec`` (no file I/O); returns their names."""
    metadata = {
        "stuff_classes": list(spec.classes),
        "ignore_label": IGNORE_LABEL,
        "evaluator_type": EVALUATOR_TYPE,
        "dataset_root": spec.root,
        "image_root": os.path.join(spec.root, spec.image_dir),
        "sem_seg_root": os.path.join(spec.root, spec.mask_dir),
    }
    names = []
    for part in ("train", "train_labeled", "train_unlabeled", "val"):
        name = f"{spec.name}_{part}"
        register(name, lambda part=part: load_custom(spec, part), metadata)
        names.append(name)
    return names


def register_custom_from_cfg(cfg) -> List[str]:
    """Register the custom dataset of ``cfg.DATASETS.CUSTOM`` (nothing when NAME is empty);
    returns the registered names."""
    spec = spec_from_cfg(cfg)
    if spec is None:
        return []
    names = register_custom(spec)
    logger.info(
        "Registered custom dataset %s (%d classes): %s", spec.name, len(spec.classes), names
    )
    return names
