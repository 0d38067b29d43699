"""Dataset mappers: detectron2 semantic-segmentation dicts -> model inputs.

* ``LabeledMapper``   — labelled stream: random rescale, crop (label pad = ignore), flip.
* ``UnlabeledMapper`` — unlabelled stream: the same geometry, then a weak view, two strong
  views (each with its own CutMix box) and the mask of padded pixels. It never opens a
  label file, whatever the input dict holds.
* ``InferenceMapper`` — evaluation: the image at its own size (+ its label when known).

Shape letters: H, W the image as displayed (EXIF orientation applied, the size dataset
records hold); h, w the training crop (INPUT.CROP.SIZE as (h, w); the rescaled image when
cropping is off). Images are RGB ``uint8`` tensors; the model normalises them. Every file
is read by :mod:`hiervl.data.image_io`: images oriented, masks as stored (never rotated).
"height"/"width" in the outputs are the image's size (detectron2's convention: the
resolution predictions are returned at).

Randomness: ``__call__(dataset_dict, rng)`` draws everything from ``rng``; the two-stream
loader seeds it from (global seed, stream, sample position), which makes a sample's
augmentation independent of worker count, process count and resumption.
"""

from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch
from detectron2.config import configurable

from hiervl.data import image_io
from hiervl.data.augment import (
    random_crop_with_pad,
    random_rescale,
    sample_cutmix_box,
    strong_view,
)

# DESIGN §4: every dataset uses 255 as its ignore label.
IGNORE_LABEL = 255
# Fill value of padded image pixels (UniMatch pads with black; padded pixels carry the
# ignore label or are flagged in ``ignore_mask``, so their value never matters).
IMAGE_PAD_VALUE = 0
# The CLIP backbone's mean/std (config.CLIP_PIXEL_MEAN) are in RGB order.
SUPPORTED_FORMAT = "RGB"


def read_rgb(file_name: str) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB, EXIF orientation applied (the one reader,
    :func:`hiervl.data.image_io.read_image`; a truncated file is an error naming it)."""
    return image_io.read_image(file_name, format=SUPPORTED_FORMAT)


def read_label(file_name: str) -> np.ndarray:
    """A label PNG as an (H, W) array of class ids: the stored values (palette PNGs, e.g.
    VOC, give their indices), never rotated (:func:`hiervl.data.image_io.read_mask`)."""
    return image_io.read_mask(file_name)


def check_record_size(dataset_dict: Dict[str, Any], image: np.ndarray) -> None:
    """The image read has the (height, width) its dataset record says (records hold the
    oriented size, :func:`hiervl.data.image_io.image_size`); else a ValueError naming it.
    A record without them gets the image's (in place, as detectron2's check does)."""
    dataset_dict.setdefault("height", image.shape[0])
    dataset_dict.setdefault("width", image.shape[1])
    expected = (dataset_dict["height"], dataset_dict["width"])
    if expected == image.shape[:2]:
        return
    raise ValueError(
        f"image {dataset_dict['file_name']} is {image.shape[1]}x{image.shape[0]} (width x "
        f"height, EXIF orientation applied) but its dataset record says {expected[1]}x"
        f"{expected[0]}: the file changed after the dataset was registered?"
    )


def _read_matching_label(dataset_dict: Dict[str, Any], image: np.ndarray) -> np.ndarray:
    """Read the dict's label and check it has the (oriented) image's (H, W)."""
    label = read_label(dataset_dict["sem_seg_file_name"])
    if label.shape != image.shape[:2]:
        raise ValueError(
            f"mask {dataset_dict['sem_seg_file_name']} is {label.shape[1]}x{label.shape[0]} "
            f"but image {dataset_dict['file_name']} is {image.shape[1]}x{image.shape[0]} "
            "(width x height, EXIF orientation applied; masks are never rotated)"
        )
    return label


def _image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 array -> contiguous (3, H, W) uint8 tensor."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


def _check_format(image_format: str) -> None:
    if image_format != SUPPORTED_FORMAT:
        raise ValueError(
            f"INPUT.FORMAT is {image_format!r}; HierVL's mappers produce RGB images (CLIP's "
            f"channel order), set INPUT.FORMAT to {SUPPORTED_FORMAT!r}"
        )


def _crop_size_from_cfg(cfg) -> Optional[Sequence[int]]:
    if not cfg.INPUT.CROP.ENABLED:
        return None
    if cfg.INPUT.CROP.TYPE != "absolute":
        raise ValueError(
            f"INPUT.CROP.TYPE is {cfg.INPUT.CROP.TYPE!r}; the training mappers support only "
            "'absolute' crops of INPUT.CROP.SIZE = (h, w) pixels"
        )
    return tuple(int(s) for s in cfg.INPUT.CROP.SIZE)


def _geometry_from_cfg(cfg, is_train: bool) -> Dict[str, Any]:
    if not is_train:
        raise ValueError("training mappers need is_train=True; use InferenceMapper for evaluation")
    _check_format(cfg.INPUT.FORMAT)
    return {
        "scale_range": tuple(cfg.INPUT.SCALE_RANGE),
        "crop_size": _crop_size_from_cfg(cfg),
        "flip_prob": cfg.INPUT.FLIP_PROB,
        "ignore_label": IGNORE_LABEL,
    }


class _Geometry:
    """Rescale -> pad/crop -> horizontal flip, shared by both training streams."""

    def __init__(
        self,
        *,
        scale_range: Sequence[float],
        crop_size: Optional[Sequence[int]],
        flip_prob: float,
        ignore_label: int,
    ):
        if len(scale_range) != 2 or not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(
                f"INPUT.SCALE_RANGE must be [min, max] with 0 < min <= max, got {list(scale_range)}"
            )
        if crop_size is not None and (len(crop_size) != 2 or min(crop_size) <= 0):
            raise ValueError(f"INPUT.CROP.SIZE must be (h, w) > 0, got {crop_size}")
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"INPUT.FLIP_PROB must be in [0, 1], got {flip_prob}")
        self.scale_range = tuple(float(s) for s in scale_range)
        self.crop_size = None if crop_size is None else tuple(int(s) for s in crop_size)
        self.flip_prob = float(flip_prob)
        self.ignore_label = int(ignore_label)

    def __call__(self, image: np.ndarray, label: Optional[np.ndarray], rng: np.random.Generator):
        """Args: image (H, W, 3) uint8, label (H, W) or None.
        Returns: image (h, w, 3), label (h, w) or None, padded (h, w) bool."""
        image, label = random_rescale(image, label, self.scale_range, rng)
        if self.crop_size is None:
            padded = np.zeros(image.shape[:2], dtype=bool)
        else:
            image, label, padded = random_crop_with_pad(
                image,
                label,
                self.crop_size,
                rng,
                image_pad=IMAGE_PAD_VALUE,
                label_pad=self.ignore_label,
            )
        if rng.random() < self.flip_prob:
            image, padded = image[:, ::-1], padded[:, ::-1]
            label = None if label is None else label[:, ::-1]
        return image, label, padded


class LabeledMapper:
    """Labelled training stream: ``{"image": (3,h,w) uint8, "sem_seg": (h,w) long,
    "padding_mask": (h,w) bool (True = padding), "file_name", "height", "width"}``; padded
    label pixels are ``ignore_label``."""

    @configurable
    def __init__(
        self,
        *,
        scale_range: Sequence[float],
        crop_size: Optional[Sequence[int]],
        flip_prob: float,
        ignore_label: int = IGNORE_LABEL,
    ):
        self.geometry = _Geometry(
            scale_range=scale_range,
            crop_size=crop_size,
            flip_prob=flip_prob,
            ignore_label=ignore_label,
        )

    @classmethod
    def from_config(cls, cfg, is_train: bool = True) -> Dict[str, Any]:
        return _geometry_from_cfg(cfg, is_train)

    def __call__(
        self, dataset_dict: Dict[str, Any], rng: Optional[np.random.Generator] = None
    ) -> Dict[str, Any]:
        if "sem_seg_file_name" not in dataset_dict:
            raise ValueError(
                f"labelled sample {dataset_dict.get('file_name')} has no 'sem_seg_file_name'"
            )
        rng = np.random.default_rng() if rng is None else rng
        dataset_dict = dict(dataset_dict)
        image = read_rgb(dataset_dict["file_name"])
        check_record_size(dataset_dict, image)
        label = _read_matching_label(dataset_dict, image)
        image, label, padded = self.geometry(image, label, rng)
        return {
            "image": _image_to_tensor(image),
            "sem_seg": torch.from_numpy(label.astype(np.int64)),
            # Not derivable from the label: 255 also marks the dataset's own ignore pixels.
            "padding_mask": torch.from_numpy(np.ascontiguousarray(padded)),
            "file_name": dataset_dict["file_name"],
            "height": dataset_dict["height"],
            "width": dataset_dict["width"],
        }


class UnlabeledMapper:
    """Unlabelled training stream (UniMatch's views).

    Returns ``{"image_weak", "image_strong1", "image_strong2": (3,h,w) uint8,
    "cutmix_box1", "cutmix_box2": (h,w) bool (True = paste the partner's pixel),
    "ignore_mask": (h,w) bool (True = padding, no pseudo-label), "file_name", "height",
    "width"}``. All views share one geometry; each strong view draws its own photometric
    changes and CutMix box.
    """

    @configurable
    def __init__(
        self,
        *,
        scale_range: Sequence[float],
        crop_size: Optional[Sequence[int]],
        flip_prob: float,
        color_jitter_prob: float,
        color_jitter: Sequence[float],
        grayscale_prob: float,
        blur_prob: float,
        blur_sigma: Sequence[float],
        cutmix_prob: float,
        cutmix_area: Sequence[float],
        cutmix_ratio: Sequence[float],
        ignore_label: int = IGNORE_LABEL,
    ):
        self.geometry = _Geometry(
            scale_range=scale_range,
            crop_size=crop_size,
            flip_prob=flip_prob,
            ignore_label=ignore_label,
        )
        if len(color_jitter) != 4:
            raise ValueError(
                "INPUT.STRONG.COLOR_JITTER must be [brightness, contrast, saturation, hue], "
                f"got {list(color_jitter)}"
            )
        for key, pair in (
            ("BLUR_SIGMA", blur_sigma),
            ("CUTMIX_AREA", cutmix_area),
            ("CUTMIX_RATIO", cutmix_ratio),
        ):
            if len(pair) != 2 or not 0 < pair[0] <= pair[1]:
                raise ValueError(f"INPUT.STRONG.{key} must be [min, max] > 0, got {list(pair)}")
        self.strong_kwargs = {
            "jitter_prob": float(color_jitter_prob),
            "jitter_strengths": tuple(float(s) for s in color_jitter),
            "grayscale_prob": float(grayscale_prob),
            "blur_prob": float(blur_prob),
            "blur_sigma": tuple(float(s) for s in blur_sigma),
        }
        self.cutmix_kwargs = {
            "prob": float(cutmix_prob),
            "area_range": tuple(float(s) for s in cutmix_area),
            "ratio_range": tuple(float(s) for s in cutmix_ratio),
        }

    @classmethod
    def from_config(cls, cfg, is_train: bool = True) -> Dict[str, Any]:
        return {
            **_geometry_from_cfg(cfg, is_train),
            "color_jitter_prob": cfg.INPUT.STRONG.COLOR_JITTER_PROB,
            "color_jitter": tuple(cfg.INPUT.STRONG.COLOR_JITTER),
            "grayscale_prob": cfg.INPUT.STRONG.GRAYSCALE_PROB,
            "blur_prob": cfg.INPUT.STRONG.BLUR_PROB,
            "blur_sigma": tuple(cfg.INPUT.STRONG.BLUR_SIGMA),
            "cutmix_prob": cfg.INPUT.STRONG.CUTMIX_PROB,
            "cutmix_area": tuple(cfg.INPUT.STRONG.CUTMIX_AREA),
            "cutmix_ratio": tuple(cfg.INPUT.STRONG.CUTMIX_RATIO),
        }

    def __call__(
        self, dataset_dict: Dict[str, Any], rng: Optional[np.random.Generator] = None
    ) -> Dict[str, Any]:
        rng = np.random.default_rng() if rng is None else rng
        # Only these fields are ever looked at: a label path in the dict is never touched.
        meta = {k: dataset_dict[k] for k in ("file_name", "height", "width") if k in dataset_dict}
        image = read_rgb(meta["file_name"])
        check_record_size(meta, image)
        image, _, padded = self.geometry(image, None, rng)
        height, width = image.shape[:2]
        out = {"image_weak": _image_to_tensor(image)}
        for view in (1, 2):
            strong = strong_view(image, rng, **self.strong_kwargs)
            out[f"image_strong{view}"] = _image_to_tensor(strong)
            out[f"cutmix_box{view}"] = sample_cutmix_box(height, width, rng, **self.cutmix_kwargs)
        out["ignore_mask"] = torch.from_numpy(np.ascontiguousarray(padded))
        out.update(meta)
        return out


class InferenceMapper:
    """Evaluation: ``{"image": (3,H,W) uint8, "sem_seg": (H,W) long (only when the dict
    has a label), "file_name", "height", "width"}`` — no resizing; the model's sliding
    window handles any size."""

    @configurable
    def __init__(self):
        pass

    @classmethod
    def from_config(cls, cfg, is_train: bool = False) -> Dict[str, Any]:
        if is_train:
            raise ValueError("InferenceMapper is for evaluation; use LabeledMapper for training")
        _check_format(cfg.INPUT.FORMAT)
        return {}

    def __call__(self, dataset_dict: Dict[str, Any]) -> Dict[str, Any]:
        dataset_dict = dict(dataset_dict)
        image = read_rgb(dataset_dict["file_name"])
        check_record_size(dataset_dict, image)
        out = {
            "image": _image_to_tensor(image),
            "file_name": dataset_dict["file_name"],
            "height": dataset_dict["height"],
            "width": dataset_dict["width"],
        }
        if "sem_seg_file_name" in dataset_dict:
            label = _read_matching_label(dataset_dict, image)
            out["sem_seg"] = torch.from_numpy(label.astype(np.int64))
        return out
