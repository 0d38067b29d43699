"""Cityscapes (fine annotations), 19 evaluation classes (``labelTrainIds``, 255 = ignore).

Layout under the datasets root (``datasets/README.md``)::

    cityscapes/
      leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
      gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_polygons.json   (shipped)
      gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png    (shipped)
      gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelTrainIds.png
                                            written by datasets/prepare_cityscapes.py

``prepare_cityscapes.py`` renders the trainId PNGs with cityscapesscripts (from the
polygons) when it is installed; otherwise it maps the shipped ``labelIds`` PNGs through the
official id -> trainId table (:func:`label_ids_to_train_ids`), which gives the same result.
"""

import glob
import importlib.util
import logging
import os
from typing import Dict, List, Tuple

import numpy as np
from detectron2.data.datasets.builtin_meta import CITYSCAPES_CATEGORIES
from PIL import Image

from hiervl.data.datasets import palettes
from hiervl.data.datasets.common import (
    IGNORE_LABEL,
    Benchmark,
    list_files,
    parallel_map,
    require_dir,
)

logger = logging.getLogger(__name__)

_BY_TRAIN_ID = sorted(CITYSCAPES_CATEGORIES, key=lambda c: c["trainId"])
CLASSES = tuple(c["name"] for c in _BY_TRAIN_ID)
assert [c["trainId"] for c in _BY_TRAIN_ID] == list(range(19)), "Cityscapes table changed"
# Official label id -> trainId; every id not evaluated (void, parking, caravan, ...) -> 255.
ID_TO_TRAIN_ID = np.full(256, IGNORE_LABEL, dtype=np.uint8)
for _c in _BY_TRAIN_ID:
    ID_TO_TRAIN_ID[_c["id"]] = _c["trainId"]

DIR_NAME = "cityscapes"
IMAGE_DIR = "leftImg8bit"
LABEL_DIR = "gtFine"
IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_IDS_SUFFIX = "_gtFine_labelIds.png"
TRAIN_IDS_SUFFIX = "_gtFine_labelTrainIds.png"
PARTS = ("train", "val")
PREPARE_SCRIPT = "prepare_cityscapes.py"
LABEL_COUNTS = (100, 186, 372, 744, 1488)
PIP_HINT = "pip install cityscapesscripts"
_HINT = f"prepare it with `python datasets/{PREPARE_SCRIPT}` (see datasets/README.md)"


def list_images(droot: str, part: str) -> List[str]:
    part_dir = os.path.join(droot, IMAGE_DIR, part)
    require_dir(part_dir, f"Cityscapes {IMAGE_DIR}/{part}", _HINT)
    images = []
    for city in sorted(e.name for e in os.scandir(part_dir) if e.is_dir()):
        names = list_files(os.path.join(part_dir, city), IMAGE_SUFFIX, "Cityscapes city", _HINT)
        images += [f"{IMAGE_DIR}/{part}/{city}/{name}" for name in names]
    return images


def image_id(image: str) -> str:
    return os.path.basename(image)[: -len(IMAGE_SUFFIX)]


def label_file(droot: str, image: str) -> str:
    _, part, city, _ = image.split("/")
    return os.path.join(droot, LABEL_DIR, part, city, image_id(image) + TRAIN_IDS_SUFFIX)


BENCHMARK = Benchmark(
    key="cityscapes",
    dir_name=DIR_NAME,
    prepare_script=PREPARE_SCRIPT,
    classes=CLASSES,
    train_name="cityscapes_train",
    label_counts=LABEL_COUNTS,
    image_root=f"{IMAGE_DIR}/train",
    sem_seg_root=f"{LABEL_DIR}/train",
    list_images=list_images,
    label_file=label_file,
    image_id=image_id,
    colors=palettes.CITYSCAPES,
)


def label_ids_to_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """Official label ids (``*_gtFine_labelIds.png``) -> trainIds (0..18, 255 = ignore).
    The license plate id (-1) never appears in the PNGs."""
    return ID_TO_TRAIN_ID[label_ids]


def _convert_one(job: Tuple[str, bool]) -> bool:
    src, overwrite = job
    dst = src[: -len(LABEL_IDS_SUFFIX)] + TRAIN_IDS_SUFFIX
    if not overwrite and os.path.isfile(dst):
        return False
    label_ids = np.asarray(Image.open(src))
    if label_ids.ndim != 2 or label_ids.dtype != np.uint8:
        raise ValueError(f"{src}: expected an 8-bit single-channel PNG, got {label_ids.shape}")
    tmp = dst + ".tmp.png"
    Image.fromarray(label_ids_to_train_ids(label_ids)).save(tmp)
    os.replace(tmp, dst)
    return True


def has_cityscapesscripts() -> bool:
    return importlib.util.find_spec("cityscapesscripts") is not None


def create_train_ids(
    droot: str, *, method: str = "auto", workers: int, overwrite: bool = False
) -> Dict[str, int]:
    """Create ``*_gtFine_labelTrainIds.png`` next to the shipped annotations.

    Args:
        method: "cityscapesscripts" (render from the polygons with the official tool),
            "labelids" (map the shipped labelIds PNGs), or "auto" (the first when installed).
    Returns:
        counts of written and kept files (``{"written": -1}`` when cityscapesscripts ran:
        it does not report them).
    """
    if method not in ("auto", "cityscapesscripts", "labelids"):
        raise ValueError(f"unknown method {method!r} (auto | cityscapesscripts | labelids)")
    require_dir(os.path.join(droot, LABEL_DIR), "Cityscapes gtFine", "see datasets/README.md")
    if method == "auto":
        method = "cityscapesscripts" if has_cityscapesscripts() else "labelids"
        if method == "labelids":
            logger.warning(
                "cityscapesscripts is not installed (`%s`); mapping the shipped labelIds PNGs "
                "with the built-in id -> trainId table instead", PIP_HINT,
            )  # fmt: skip
    if method == "cityscapesscripts":
        if not has_cityscapesscripts():
            raise ModuleNotFoundError(f"cityscapesscripts is not installed: `{PIP_HINT}`")
        from cityscapesscripts.preparation import createTrainIdLabelImgs

        # The tool finds the dataset through this variable and converts every polygon file.
        os.environ["CITYSCAPES_DATASET"] = droot
        createTrainIdLabelImgs.main()
        return {"written": -1, "kept": 0}
    sources = []
    for part in PARTS:
        pattern = os.path.join(droot, LABEL_DIR, part, "*", "*" + LABEL_IDS_SUFFIX)
        sources += sorted(glob.glob(pattern))
    if not sources:
        raise FileNotFoundError(
            f"no *{LABEL_IDS_SUFFIX} under {os.path.join(droot, LABEL_DIR)}; install "
            f"cityscapesscripts (`{PIP_HINT}`) to render trainIds from the polygons"
        )
    written = parallel_map(
        _convert_one, [(s, overwrite) for s in sources], total=len(sources), workers=workers,
        desc="Cityscapes labelTrainIds",
    )  # fmt: skip
    return {"written": sum(written), "kept": len(written) - sum(written)}
