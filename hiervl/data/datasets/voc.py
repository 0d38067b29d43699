"""Pascal VOC 2012 semantic segmentation, 21 classes (background + 20), with the SBD
"train_aug" train set (10,582 images) of the semi-supervised literature.

Layout under the datasets root (``datasets/README.md``)::

    VOCdevkit/VOC2012/
      JPEGImages/<id>.jpg
      SegmentationClassAug/<id>.png      class ids 0..20, 255 = ignore (SBD-augmented labels)
      SegmentationClass/<id>.png         official palette PNGs (fallback without the Aug set)
      ImageSets/Segmentation/val.txt     official 1,449 val ids
      ImageSets/Segmentation/train_aug.txt  written by datasets/prepare_voc.py

Label PNGs are read as class indices (palette PNGs decode to their indices), so both label
folders work as they are.
"""

import logging
import os
from typing import List, Tuple

from hiervl.data.datasets import palettes
from hiervl.data.datasets.common import Benchmark, DatasetNotFoundError, list_files, require_dir

logger = logging.getLogger(__name__)

CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "dining table", "dog", "horse", "motorbike", "person", "potted plant",
    "sheep", "sofa", "train", "tv monitor",
)  # fmt: skip
DIR_NAME = os.path.join("VOCdevkit", "VOC2012")
IMAGE_DIR = "JPEGImages"
AUG_LABEL_DIR = "SegmentationClassAug"
LABEL_DIR = "SegmentationClass"
LIST_DIR = os.path.join("ImageSets", "Segmentation")
TRAIN_AUG_LIST = "train_aug.txt"
VAL_LIST = "val.txt"
PREPARE_SCRIPT = "prepare_voc.py"
# Size of the standard train_aug set (SBD train+val and VOC train, minus VOC val).
TRAIN_AUG_SIZE = 10582
LABEL_COUNTS = (92, 183, 366, 732, 1464)


def label_dir(droot: str) -> str:
    """``SegmentationClassAug`` when present, else ``SegmentationClass``."""
    aug = os.path.join(droot, AUG_LABEL_DIR)
    return aug if os.path.isdir(aug) else os.path.join(droot, LABEL_DIR)


def _read_ids(path: str) -> List[str]:
    with open(path, encoding="utf-8") as f:
        return [line.split()[0] for line in f if line.strip()]


def list_images(droot: str, part: str) -> List[str]:
    name = TRAIN_AUG_LIST if part == "train" else VAL_LIST
    path = os.path.join(droot, LIST_DIR, name)
    if not os.path.isfile(path):
        raise DatasetNotFoundError(
            f"VOC {part} list not found: expected {path}; prepare it with "
            f"`python datasets/{PREPARE_SCRIPT}` (see datasets/README.md)"
        )
    return sorted(f"{IMAGE_DIR}/{i}.jpg" for i in _read_ids(path))


def label_file(droot: str, image: str) -> str:
    return os.path.join(label_dir(droot), os.path.splitext(os.path.basename(image))[0] + ".png")


def image_id(image: str) -> str:
    return os.path.splitext(os.path.basename(image))[0]


BENCHMARK = Benchmark(
    key="voc",
    dir_name=DIR_NAME,
    prepare_script=PREPARE_SCRIPT,
    classes=CLASSES,
    train_name="voc_train_aug",
    label_counts=LABEL_COUNTS,
    image_root=IMAGE_DIR,
    # The preferred folder; records fall back to SegmentationClass (see label_dir).
    sem_seg_root=AUG_LABEL_DIR,
    list_images=list_images,
    label_file=label_file,
    image_id=image_id,
    colors=palettes.VOC,
)


def write_train_aug_list(droot: str) -> Tuple[str, int]:
    """Write ``ImageSets/Segmentation/train_aug.txt``: every labelled image (label folder of
    :func:`label_dir`) that is not in ``val.txt``. Returns (path, number of images)."""
    hint = "see datasets/README.md for the VOC 2012 + SegmentationClassAug downloads"
    require_dir(os.path.join(droot, IMAGE_DIR), "VOC JPEGImages", hint)
    val_path = os.path.join(droot, LIST_DIR, VAL_LIST)
    if not os.path.isfile(val_path):
        raise DatasetNotFoundError(f"VOC val list not found: expected {val_path}; {hint}")
    labels = label_dir(droot)
    if not labels.endswith(AUG_LABEL_DIR):
        logger.warning(
            "%s not found: using %s, so train_aug holds only the official train images "
            "(the published splits expect the %d-image SBD-augmented set)",
            os.path.join(droot, AUG_LABEL_DIR),
            labels,
            TRAIN_AUG_SIZE,
        )
    val = set(_read_ids(val_path))
    ids = [name[: -len(".png")] for name in list_files(labels, ".png", "VOC labels", hint)]
    train = sorted(i for i in ids if i not in val)
    no_image = [i for i in train if not os.path.isfile(os.path.join(droot, IMAGE_DIR, i + ".jpg"))]
    if no_image:
        raise ValueError(
            f"{len(no_image)} labels in {labels} have no image in {IMAGE_DIR}/ "
            f"(first: {no_image[0]}.png)"
        )
    path = os.path.join(droot, LIST_DIR, TRAIN_AUG_LIST)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(f"{i}\n" for i in train)
    if len(train) != TRAIN_AUG_SIZE:
        logger.warning(
            "train_aug has %d images (the standard set has %d)", len(train), TRAIN_AUG_SIZE
        )
    return path, len(train)
