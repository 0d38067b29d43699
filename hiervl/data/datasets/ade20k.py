"""ADE20K (SceneParsing ``ADEChallengeData2016``), 150 classes.

Raw annotations use 0 for "other / unlabelled" and 1..150 for the classes. The benchmark
protocol ("reduce_zero_label") ignores 0 and shifts the classes to 0..149. That is done
ONCE, at prepare time: ``datasets/prepare_ade20k.py`` writes the shifted labels to
``annotations_detectron2/`` (:func:`reduce_zero_label`: 0 -> 255, k -> k-1), and the
registrations read only those. So the records, the mappers and detectron2's
``SemSegEvaluator`` all see labels 0..149 with 255 = ignore, and nothing downstream needs
to know about the shift.

Layout under the datasets root (``datasets/README.md``)::

    ADEChallengeData2016/
      images/{training,validation}/ADE_*.jpg
      annotations/{training,validation}/ADE_*.png             raw (0 = other, 1..150)
      annotations_detectron2/{training,validation}/ADE_*.png  written by prepare_ade20k.py
"""

import logging
import os
from typing import Dict, List, Tuple

import numpy as np
from detectron2.data.datasets.builtin_meta import ADE20K_SEM_SEG_CATEGORIES
from PIL import Image

from hiervl.data.datasets import palettes
from hiervl.data.datasets.common import (
    IGNORE_LABEL,
    Benchmark,
    DatasetNotFoundError,
    list_files,
    parallel_map,
    require_dir,
)

logger = logging.getLogger(__name__)

CLASSES = tuple(ADE20K_SEM_SEG_CATEGORIES)
assert len(CLASSES) == 150, "ADE20K class table changed"
DIR_NAME = "ADEChallengeData2016"
PARTS = {"train": "training", "val": "validation"}
IMAGE_DIR = "images"
RAW_LABEL_DIR = "annotations"
LABEL_DIR = "annotations_detectron2"
PREPARE_SCRIPT = "prepare_ade20k.py"
LABEL_COUNTS = (158, 316, 632, 1263, 2526)
_HINT = f"prepare it with `python datasets/{PREPARE_SCRIPT}` (see datasets/README.md)"


def list_images(droot: str, part: str) -> List[str]:
    folder = f"{IMAGE_DIR}/{PARTS[part]}"
    names = list_files(os.path.join(droot, folder), ".jpg", f"ADE20K {folder}", _HINT)
    converted = os.path.join(droot, LABEL_DIR, PARTS[part])
    if not os.path.isdir(converted):
        # The raw labels alone must not be used: they are off by one and 0 is not ignored.
        raise DatasetNotFoundError(
            f"ADE20K labels with reduce_zero_label applied not found: expected {converted}; {_HINT}"
        )
    return [f"{folder}/{name}" for name in names]


def label_file(droot: str, image: str) -> str:
    part = os.path.basename(os.path.dirname(image))
    return os.path.join(droot, LABEL_DIR, part, image_id(image) + ".png")


def image_id(image: str) -> str:
    return os.path.splitext(os.path.basename(image))[0]


BENCHMARK = Benchmark(
    key="ade20k",
    dir_name=DIR_NAME,
    prepare_script=PREPARE_SCRIPT,
    classes=CLASSES,
    train_name="ade20k_train",
    label_counts=LABEL_COUNTS,
    image_root=f"{IMAGE_DIR}/{PARTS['train']}",
    sem_seg_root=f"{LABEL_DIR}/{PARTS['train']}",
    list_images=list_images,
    label_file=label_file,
    image_id=image_id,
    colors=palettes.ADE20K,
)


def reduce_zero_label(raw: np.ndarray) -> np.ndarray:
    """Raw ADE20K labels (0 = other, 1..150) -> benchmark labels (255 = ignore, 0..149)."""
    if raw.size and int(raw.max()) > len(CLASSES):
        raise ValueError(f"raw ADE20K label value {int(raw.max())} > {len(CLASSES)}")
    out = raw.astype(np.int32) - 1
    out[raw == 0] = IGNORE_LABEL
    return out.astype(np.uint8)


def _convert_one(job: Tuple[str, str, bool]) -> bool:
    src, dst, overwrite = job
    if not overwrite and os.path.isfile(dst):
        return False
    raw = np.asarray(Image.open(src))
    if raw.ndim != 2:
        raise ValueError(f"{src}: expected a single-channel label PNG, got shape {raw.shape}")
    tmp = dst + ".tmp.png"
    Image.fromarray(reduce_zero_label(raw)).save(tmp)
    os.replace(tmp, dst)
    return True


def convert_annotations(droot: str, *, workers: int, overwrite: bool = False) -> Dict[str, int]:
    """Write ``annotations_detectron2/{training,validation}`` from the raw annotations.
    Returns the number of written and kept files."""
    jobs = []
    for part in PARTS.values():
        src_dir = os.path.join(droot, RAW_LABEL_DIR, part)
        require_dir(src_dir, "ADE20K raw annotations", "see datasets/README.md for the download")
        dst_dir = os.path.join(droot, LABEL_DIR, part)
        os.makedirs(dst_dir, exist_ok=True)
        names = list_files(src_dir, ".png", "ADE20K raw annotations", "")
        jobs += [(os.path.join(src_dir, n), os.path.join(dst_dir, n), overwrite) for n in names]
    written = parallel_map(
        _convert_one, jobs, total=len(jobs), workers=workers, desc="ADE20K reduce_zero_label"
    )
    return {"written": sum(written), "kept": len(written) - sum(written)}
