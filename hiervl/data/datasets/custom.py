"""A custom dataset from the user's folders, no code: ``DATASETS.CUSTOM.*`` in a config or
on the command line::

    python train_net.py --config-file configs/custom/hiervl_custom.yaml \\
        DATASETS.CUSTOM.ROOT /data/mine DATASETS.CUSTOM.CLASSES_FILE /data/mine/classes.txt

Layout ``parts`` (``DATASETS.CUSTOM.LAYOUT``, the default): one folder per part, relative
to ROOT or absolute; images may lie in nested sub-folders::

    labeled/images/<sub>/<stem>.<jpg|png|...>  labeled/masks/<sub>/<stem>.png   LABELED.*
    unlabeled/images/<sub>/<stem>.<jpg|...>    (no masks)                       UNLABELED.*
    val/images/...                             val/masks/...                    VAL.*

(``LABELED.IMAGES``, ``LABELED.MASKS``, ``UNLABELED.IMAGES``, ``VAL.IMAGES``,
``VAL.MASKS``.)

The val part is optional (VAL.IMAGES "" or a folder that does not exist): without it
there is no periodic evaluation (:func:`drop_absent_val`).

Layout ``single_folder`` (benchmark replication): every image below IMAGE_DIR (nested
sub-folders allowed, e.g. ``images/{train,val}``), masks mirrored below MASK_DIR; the
parts come from split files (LABELED_SPLIT, VAL_SPLIT: one image per line, see
:func:`~hiervl.data.datasets.custom_files.resolve_entries`) or from seeded fractions
(LABELED_FRACTION, VAL_FRACTION, SEED).

Masks are single-channel PNGs: value k = class k of the class list (CLASSES or
CLASSES_FILE), 255 = ignore. Registered names: ``<NAME>_train_labeled``,
``<NAME>_train_unlabeled`` (records without ``sem_seg_file_name``), ``<NAME>_val`` and
``<NAME>_train`` (every labelled train image: the labelled part in ``parts``, all train
images in ``single_folder``).

Registration reads only the class file. A part is validated the first time it is loaded
in a process (:mod:`hiervl.data.validation`: every image decoded with its EXIF orientation,
every mask checked against the oriented size and the class count), and all its problems
are raised together in one ValueError naming the files.
"""

import logging
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from hiervl.data.datasets import custom_files as files
from hiervl.data.datasets import palettes
from hiervl.data.datasets.common import (
    EVALUATOR_TYPE,
    IGNORE_LABEL,
    DatasetNotFoundError,
    register,
)
from hiervl.data.validation import Sample, SampleResult, problems_error, validate_samples
from hiervl.modeling.backbone.class_names import validate_class_names

logger = logging.getLogger(__name__)

LAYOUTS = ("parts", "single_folder")
LABELED, UNLABELED, VAL, TRAIN = "train_labeled", "train_unlabeled", "val", "train"
PARTS = (TRAIN, LABELED, UNLABELED, VAL)
# Second word of the seed of the labelled draw (the val draw uses the seed alone).
_LABELED_DRAW = 1
CHECK_HINT = (
    "\n  (`python -m hiervl.data.check --config-file ...` lists every problem and draws check.png)"
)


@dataclass(frozen=True)
class Folders:
    """A part's folders (absolute; "" = not given) and the keys that set them."""

    images: str
    masks: str
    images_key: str
    masks_key: str = ""


@dataclass(frozen=True)
class CustomSpec:
    """Everything that defines a custom dataset (the ``DATASETS.CUSTOM`` keys)."""

    name: str
    root: str
    layout: str
    classes: Tuple[str, ...]
    class_source: str
    labeled: Folders
    unlabeled: Folders
    val: Folders
    labeled_split: str
    val_split: str
    labeled_fraction: float
    val_fraction: float
    seed: int

    def dataset_name(self, part: str) -> str:
        return f"{self.name}_{part}"


def read_class_names(path: str) -> Tuple[str, ...]:
    """One class name per line; blank lines and ``#`` comments are skipped."""
    if not os.path.isfile(path):
        raise ValueError(f"DATASETS.CUSTOM.CLASSES_FILE {path} does not exist")
    with open(path, encoding="utf-8") as f:
        names = [line.strip() for line in f]
    return tuple(n for n in names if n and not n.startswith("#"))


def _folder(root: str, value: str, key: str) -> str:
    if not value:
        return ""
    value = os.path.expanduser(value)
    if os.path.isabs(value):
        return value
    if not root:
        raise ValueError(f"{key} {value!r} is relative but DATASETS.CUSTOM.ROOT is empty")
    return os.path.join(root, value)


def _classes(d, root: str) -> Tuple[Tuple[str, ...], str]:
    listed, classes_file = list(d.CUSTOM.CLASSES), d.CUSTOM.CLASSES_FILE
    if bool(listed) == bool(classes_file):
        raise ValueError(
            "set exactly one of DATASETS.CUSTOM.CLASSES and DATASETS.CUSTOM.CLASSES_FILE"
        )
    if classes_file:
        source = _folder(root, classes_file, "DATASETS.CUSTOM.CLASSES_FILE")
        names = read_class_names(source)
    else:
        source, names = "DATASETS.CUSTOM.CLASSES", tuple(listed)
    names = validate_class_names(names, source)
    if len(names) > IGNORE_LABEL:
        raise ValueError(
            f"{source}: {len(names)} classes; masks are 8-bit with {IGNORE_LABEL} = ignore, "
            f"so at most {IGNORE_LABEL} classes"
        )
    return names, source


def spec_from_cfg(cfg) -> Optional[CustomSpec]:
    """The custom dataset of ``cfg`` (None when ``DATASETS.CUSTOM.NAME`` is empty).
    Checks the keys; reads only the class file."""
    d = cfg.DATASETS
    name = d.CUSTOM.NAME
    if not name:
        return None
    if any(ch.isspace() for ch in name):
        raise ValueError(f"DATASETS.CUSTOM.NAME {name!r} must not contain whitespace")
    if d.CUSTOM.LAYOUT not in LAYOUTS:
        raise ValueError(f"DATASETS.CUSTOM.LAYOUT {d.CUSTOM.LAYOUT!r} must be one of {LAYOUTS}")
    root = os.path.expanduser(d.CUSTOM.ROOT)
    if not root and d.CUSTOM.LAYOUT == "single_folder":
        raise ValueError(f"DATASETS.CUSTOM.ROOT is empty (custom dataset {name!r})")
    classes, class_source = _classes(d, root)
    labeled_fraction, val_fraction = float(d.CUSTOM.LABELED_FRACTION), float(d.CUSTOM.VAL_FRACTION)
    if not 0.0 < labeled_fraction <= 1.0:
        raise ValueError(f"DATASETS.CUSTOM.LABELED_FRACTION {labeled_fraction} not in (0, 1]")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"DATASETS.CUSTOM.VAL_FRACTION {val_fraction} not in [0, 1)")
    key = "DATASETS.CUSTOM."
    if d.CUSTOM.LAYOUT == "single_folder":
        images = _folder(root, d.CUSTOM.IMAGE_DIR, key + "IMAGE_DIR")
        masks = _folder(root, d.CUSTOM.MASK_DIR, key + "MASK_DIR")
        shared = Folders(images, masks, key + "IMAGE_DIR", key + "MASK_DIR")
        labeled = unlabeled = val = shared
    else:
        labeled = Folders(
            _folder(root, d.CUSTOM.LABELED.IMAGES, key + "LABELED.IMAGES"),
            _folder(root, d.CUSTOM.LABELED.MASKS, key + "LABELED.MASKS"),
            key + "LABELED.IMAGES",
            key + "LABELED.MASKS",
        )
        unlabeled = Folders(
            _folder(root, d.CUSTOM.UNLABELED.IMAGES, key + "UNLABELED.IMAGES"),
            "",
            key + "UNLABELED.IMAGES",
        )
        # VAL.IMAGES "" = no val part: its masks folder is then irrelevant.
        val = Folders(
            _folder(root, d.CUSTOM.VAL.IMAGES, key + "VAL.IMAGES"),
            _folder(root, d.CUSTOM.VAL.MASKS, key + "VAL.MASKS") if d.CUSTOM.VAL.IMAGES else "",
            key + "VAL.IMAGES",
            key + "VAL.MASKS",
        )
    return CustomSpec(
        name=name,
        root=root,
        layout=d.CUSTOM.LAYOUT,
        classes=classes,
        class_source=class_source,
        labeled=labeled,
        unlabeled=unlabeled,
        val=val,
        labeled_split=d.CUSTOM.LABELED_SPLIT,
        val_split=d.CUSTOM.VAL_SPLIT,
        labeled_fraction=labeled_fraction,
        val_fraction=val_fraction,
        seed=int(d.CUSTOM.SEED),
    )


def has_val(spec: CustomSpec) -> bool:
    """Whether the dataset has a val part (its folder given and present, or a split)."""
    if spec.layout == "single_folder":
        return bool(spec.val_split) or spec.val_fraction > 0
    return bool(spec.val.images) and os.path.isdir(spec.val.images)


def folders_of(spec: CustomSpec, part: str) -> Folders:
    return {TRAIN: spec.labeled, LABELED: spec.labeled, UNLABELED: spec.unlabeled}.get(
        part, spec.val
    )


def partition(spec: CustomSpec, images: Dict[str, str]) -> Dict[str, List[str]]:
    """single_folder: image ids of the parts ``train``, ``train_labeled``,
    ``train_unlabeled`` and ``val``."""
    ids = sorted(images)
    image_dir = os.path.relpath(spec.labeled.images, spec.root)
    if spec.val_split:
        val = files.read_split(spec.val_split, spec.root, images, image_dir)
    else:
        count = round(spec.val_fraction * len(ids))
        val = files.draw(ids, max(count, 1) if spec.val_fraction > 0 else 0, spec.seed)
    val_set = set(val)
    train = [i for i in ids if i not in val_set]
    if not train:
        raise ValueError(f"custom dataset {spec.name!r}: no train images left after the val part")
    if spec.labeled_split:
        labeled = files.read_split(spec.labeled_split, spec.root, images, image_dir)
        in_val = [i for i in labeled if i in val_set]
        if in_val:
            raise ValueError(f"{spec.labeled_split}: images also in the val part: {in_val[:5]}")
    else:
        count = max(1, round(spec.labeled_fraction * len(train)))
        labeled = files.draw(train, count, [spec.seed, _LABELED_DRAW])
    labeled_set = set(labeled)
    unlabeled = [i for i in train if i not in labeled_set]
    return {TRAIN: train, LABELED: labeled, UNLABELED: unlabeled, VAL: val}


def _single_folder_samples(spec: CustomSpec, part: str) -> Tuple[List[Sample], List[str]]:
    folders = spec.labeled
    images, problems = files.scan_images(folders.images, "custom images", folders.images_key)
    chosen = partition(spec, images)[part]
    if part == UNLABELED:
        return [Sample(images[i], None, i) for i in chosen], problems
    masks = files.scan_masks(folders.masks, "custom masks", folders.masks_key)
    part_images = {i: images[i] for i in chosen}
    samples, no_mask, _ = files.pair(part_images, masks, folders.masks, folders.images)
    # The other parts' masks have images; a mask of no image at all is a problem.
    no_image = files.pair(images, masks, folders.masks, folders.images)[2]
    return samples, problems + no_mask + no_image


def _parts_samples(spec: CustomSpec, part: str) -> Tuple[List[Sample], List[str]]:
    folders = folders_of(spec, part)
    what = {UNLABELED: "unlabelled images", VAL: "val images"}.get(part, "labelled images")
    if part == VAL and not has_val(spec):
        raise DatasetNotFoundError(
            f"custom dataset {spec.name!r} has no val part: {folders.images_key} "
            f"{folders.images or '(empty)'} is not a folder"
        )
    if not folders.images:
        raise ValueError(f"{folders.images_key} is empty (custom dataset {spec.name!r})")
    try:
        images, problems = files.scan_images(folders.images, what, folders.images_key)
    except DatasetNotFoundError as e:
        flat = os.path.join(spec.root, "images")
        if part != UNLABELED and spec.root and os.path.isdir(flat):
            raise DatasetNotFoundError(
                f"{e}; {spec.root} holds images/: for one folder of images with split files "
                "or fractions set DATASETS.CUSTOM.LAYOUT single_folder"
            ) from None
        raise
    if part == UNLABELED:
        return [Sample(path, None, i) for i, path in images.items()], problems
    masks = files.scan_masks(folders.masks, what.replace("images", "masks"), folders.masks_key)
    samples, no_mask, no_image = files.pair(images, masks, folders.masks, folders.images)
    return samples, problems + no_mask + no_image


def list_part(spec: CustomSpec, part: str) -> Tuple[List[Sample], List[str]]:
    """The samples of ``part`` and the problems found pairing its files (nothing decoded).
    Raises DatasetNotFoundError when a folder the part needs is missing."""
    assert part in PARTS, f"unknown custom part {part}"
    if spec.layout == "single_folder":
        return _single_folder_samples(spec, part)
    return _parts_samples(spec, part)


def load_part(spec: CustomSpec, part: str, cache: Dict[Sample, SampleResult]) -> List[Dict]:
    """detectron2 records of one part, after validating every file of it."""
    samples, problems = list_part(spec, part)
    results = validate_samples(
        samples,
        num_classes=len(spec.classes),
        class_source=spec.class_source,
        cache=cache,
        desc=f"checking {spec.dataset_name(part)}",
    )
    problems += [p for r in results for p in r.problems]
    if problems:
        folder = folders_of(spec, part).images
        what = f"custom dataset {spec.name!r}, part {part} ({folder})"
        raise problems_error(what, problems, CHECK_HINT)
    records = []
    for r in results:
        record = {
            "file_name": r.sample.image,
            "height": r.height,
            "width": r.width,
            "image_id": r.sample.id,
        }
        if r.sample.mask is not None and part != UNLABELED:
            record["sem_seg_file_name"] = r.sample.mask
        records.append(record)
    return records


def register_custom(spec: CustomSpec) -> List[str]:
    """Register the four parts of ``spec`` (no file I/O); returns their names."""
    # Per registration: a re-registered dataset (files changed) is read again.
    cache: Dict[Sample, SampleResult] = {}
    names = []
    for part in PARTS:
        folders = folders_of(spec, part)
        metadata = {
            "stuff_classes": list(spec.classes),
            "stuff_colors": palettes.generated_palette(len(spec.classes)),
            "ignore_label": IGNORE_LABEL,
            "evaluator_type": EVALUATOR_TYPE,
            "dataset_root": spec.root,
            "image_root": folders.images,
            "sem_seg_root": folders.masks,
            "custom_layout": spec.layout,
        }
        name = spec.dataset_name(part)
        register(name, lambda part=part: load_part(spec, part, cache), metadata)
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


def drop_absent_val(cfg) -> Optional[str]:
    """Remove ``<NAME>_val`` from the (unfrozen) ``cfg.DATASETS.TEST`` when the custom
    dataset has no val part; returns the message to log once, else None."""
    spec = spec_from_cfg(cfg)
    name = spec.dataset_name(VAL) if spec is not None else ""
    if spec is None or has_val(spec) or name not in cfg.DATASETS.TEST:
        return None
    cfg.DATASETS.TEST = tuple(n for n in cfg.DATASETS.TEST if n != name)
    if spec.layout == "parts":
        why = f"{spec.val.images_key} {spec.val.images or '(empty)'} is not a folder"
    else:
        why = "DATASETS.CUSTOM.VAL_FRACTION is 0 and there is no VAL_SPLIT"
    left = f"; evaluating {list(cfg.DATASETS.TEST)}" if cfg.DATASETS.TEST else ""
    return f"custom dataset {spec.name!r} has no val part ({why}): no periodic evaluation{left}"
