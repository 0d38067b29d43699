"""COCO 2017 as an 81-class semantic segmentation benchmark (background + 80 things), the
semi-supervised literature's protocol: semantic masks are made from the instance
annotations by ``datasets/prepare_coco.py`` (:func:`convert_instances`).

Layout under the datasets root (``datasets/README.md``)::

    coco/
      train2017/<id>.jpg  val2017/<id>.jpg
      annotations/instances_{train,val}2017.json
      masks/<id>.png          written by prepare_coco.py (ids are unique across the splits)

Mask values: 0 = background, k = the k-th thing category in COCO category-id order (1..80).
Where instances overlap, larger instances are painted first and smaller ones over them, so
the smaller instance wins (ties: lower annotation id first); small objects stay visible.
Crowd regions are painted like other instances (they are pixels of their class).
"""

import json
import logging
import os
from collections import defaultdict
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
from PIL import Image
from pycocotools import mask as mask_utils

from hiervl.data.datasets import palettes
from hiervl.data.datasets.common import Benchmark, list_files, parallel_map

logger = logging.getLogger(__name__)

_THINGS = [c for c in COCO_CATEGORIES if c["isthing"]]
THING_IDS = tuple(c["id"] for c in _THINGS)
CLASSES = ("background",) + tuple(c["name"] for c in _THINGS)
assert len(CLASSES) == 81 and list(THING_IDS) == sorted(THING_IDS), "COCO thing table changed"
# COCO category id -> mask value.
CATEGORY_TO_LABEL = {cat_id: k + 1 for k, cat_id in enumerate(THING_IDS)}
BACKGROUND = 0

DIR_NAME = "coco"
IMAGE_DIRS = {"train": "train2017", "val": "val2017"}
MASK_DIR = "masks"
ANNOTATION_FILES = {
    "train": os.path.join("annotations", "instances_train2017.json"),
    "val": os.path.join("annotations", "instances_val2017.json"),
}
PREPARE_SCRIPT = "prepare_coco.py"
LABEL_COUNTS = (232, 463, 925, 1849, 3697)


def list_images(droot: str, part: str) -> List[str]:
    folder = IMAGE_DIRS[part]
    hint = f"prepare it with `python datasets/{PREPARE_SCRIPT}` (see datasets/README.md)"
    names = list_files(os.path.join(droot, folder), ".jpg", f"COCO {folder}", hint)
    return [f"{folder}/{name}" for name in names]


def label_file(droot: str, image: str) -> str:
    return os.path.join(droot, MASK_DIR, image_id(image) + ".png")


def image_id(image: str) -> str:
    return os.path.splitext(os.path.basename(image))[0]


BENCHMARK = Benchmark(
    key="coco",
    dir_name=DIR_NAME,
    prepare_script=PREPARE_SCRIPT,
    classes=CLASSES,
    train_name="coco_train",
    label_counts=LABEL_COUNTS,
    image_root=IMAGE_DIRS["train"],
    sem_seg_root=MASK_DIR,
    list_images=list_images,
    label_file=label_file,
    image_id=image_id,
    colors=palettes.COCO,
)


def segmentation_to_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """(H, W) bool mask of a COCO ``segmentation``: a list of polygons, an uncompressed RLE
    (``counts`` a list, used by crowd annotations) or a compressed RLE (``counts`` a string)."""
    if isinstance(segmentation, list):
        rles = mask_utils.frPyObjects(segmentation, height, width)
        rle = mask_utils.merge(rles)
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        # pycocotools leaves the pixels after the last run uninitialised (garbage, not zeros)
        # when the runs do not cover the image: refuse such an RLE.
        covered = sum(int(c) for c in segmentation["counts"])
        if covered != height * width:
            raise ValueError(
                f"uncompressed RLE covers {covered} pixels, the image has {height}x{width}"
                f" = {height * width}"
            )
        rle = mask_utils.frPyObjects(segmentation, height, width)
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), (str, bytes)):
        rle = dict(segmentation)
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
    else:
        raise ValueError(f"unsupported COCO segmentation of type {type(segmentation).__name__}")
    mask = mask_utils.decode(rle).astype(bool)
    if mask.shape != (height, width):
        raise ValueError(f"segmentation decodes to {mask.shape}, the image is {(height, width)}")
    return mask


def instances_to_semantic(annotations: Sequence[Dict], height: int, width: int) -> np.ndarray:
    """(H, W) uint8 class map of one image's instance annotations (see the module docstring
    for the overlap rule)."""
    painted: List[Tuple[int, int, int, np.ndarray]] = []
    for ann in annotations:
        if ann["category_id"] not in CATEGORY_TO_LABEL:
            raise ValueError(f"annotation {ann.get('id')}: unknown category {ann['category_id']}")
        try:
            mask = segmentation_to_mask(ann["segmentation"], height, width)
        except ValueError as e:
            raise ValueError(f"annotation {ann.get('id')}: {e}") from None
        painted.append(
            (-int(mask.sum()), int(ann["id"]), CATEGORY_TO_LABEL[ann["category_id"]], mask)
        )
    semantic = np.full((height, width), BACKGROUND, dtype=np.uint8)
    for _, _, label, mask in sorted(painted, key=lambda p: (p[0], p[1])):
        semantic[mask] = label
    return semantic


def _convert_one(job: Tuple[Dict, List[Dict], str, bool]) -> bool:
    """Write one image's mask; False when it existed and was kept."""
    image, annotations, out_dir, overwrite = job
    path = os.path.join(out_dir, os.path.splitext(image["file_name"])[0] + ".png")
    if not overwrite and os.path.isfile(path):
        return False
    try:
        semantic = instances_to_semantic(annotations, image["height"], image["width"])
    except ValueError as e:
        raise ValueError(f"image {image['file_name']} (id {image['id']}): {e}") from None
    tmp = path + ".tmp.png"
    Image.fromarray(semantic).save(tmp)
    os.replace(tmp, path)  # an interrupted run leaves no half-written mask behind
    return True


def convert_instances(
    annotation_file: str, out_dir: str, *, workers: int, overwrite: bool = False
) -> Dict[str, int]:
    """Write ``out_dir/<id>.png`` for every image of a COCO instances json (images without
    annotations become all background). Returns counts of written and kept masks."""
    if not os.path.isfile(annotation_file):
        raise FileNotFoundError(
            f"COCO annotations not found: expected {annotation_file} (see datasets/README.md)"
        )
    logger.info("Reading %s ...", annotation_file)
    with open(annotation_file, encoding="utf-8") as f:
        data = json.load(f)
    by_image: Dict[int, List[Dict]] = defaultdict(list)
    for ann in data["annotations"]:
        by_image[ann["image_id"]].append(ann)
    os.makedirs(out_dir, exist_ok=True)
    images = sorted(data["images"], key=lambda im: im["id"])
    jobs = ((im, by_image.get(im["id"], []), out_dir, overwrite) for im in images)
    written = parallel_map(
        _convert_one, jobs, total=len(images), workers=workers,
        desc=f"COCO masks {os.path.basename(annotation_file)}",
    )  # fmt: skip
    return {"written": sum(written), "kept": len(written) - sum(written)}
