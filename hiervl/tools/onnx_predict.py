"""Segment images with an exported HierVL file: onnxruntime, numpy, PIL and OpenCV only.

    python -m hiervl.tools.onnx_predict --model model.onnx --input photo.jpg imgs/*.png \
        --output overlays/ --save-masks masks/ [--confidence-threshold 0.5]

No torch and no detectron2 is imported (tests/tools/test_export.py checks it). Writes
what the demo (``demo/demo.py``) writes, with its own code: overlays drawn by
:class:`~hiervl.demo.visualizer.SemanticVisualizer` with the dataset's colours stored in
the file (``--output``, a file for one input or a folder, the same names), and label maps
by :class:`~hiervl.demo.label_maps.LabelMapWriter` (``--save-masks DIR``, one
single-channel PNG per input at its size, value = class index, the stored ignore value
(255) where ``--confidence-threshold`` leaves the pixel unlabelled; ``--save-overlays``
adds ``<name>_overlay.jpg`` beside each).

Inference follows the PyTorch demo (``hiervl/demo/predictor.py``) with the torch-free
pieces it shares (``hiervl/demo/scaling.py``): the input is resized to the test scale stored
in the file (the config's INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST: shorter side to the first,
longer side at most the second, area averaging when shrinking, bilinear when enlarging;
``--min-size-test`` / ``--max-size-test`` override it, 0 = the input's own resolution;
files exported before the keys existed are run without resizing), segmented there, and
its class probabilities are upsampled bilinearly (as ``F.interpolate``, band by band) to
take labels and confidence at every input pixel. At the test scale, the evaluator's
sliding window (``hiervl/evaluation/sliding_window.py``) with the exported window: windows
every ``stride`` pixels (the last one flush with the border), overlapping scores averaged.
The graph has one fixed size, so an image with a side shorter than the window is first
enlarged (bilinear, aspect kept) until the window fits, and its scores are resized back;
the PyTorch demo would see such an image at its own size instead. Images are read by the
project's reader (``hiervl.data.image_io``, EXIF orientation applied).

Shape letters: K classes, H×W an image, h×w the test scale, wh×ww the window.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np
import onnxruntime as ort
import tqdm

from hiervl.data.image_io import read_image
from hiervl.demo.label_maps import LabelMapWriter
from hiervl.demo.runner import DemoFailure, expand_inputs, image_output_paths
from hiervl.demo.scaling import (
    bilinear_taps,
    check_test_scale,
    inference_size,
    resize_image,
    upsampled_labels_numpy,
)
from hiervl.demo.visualizer import UNLABELED, DatasetPalette, SemanticVisualizer
from hiervl.tools.onnx_metadata import INPUT_NAME, PREFIX, DeployMetadata

logger = logging.getLogger("hiervl.tools.onnx_predict")

__all__ = ["OnnxSegmenter", "bilinear_matrix", "probabilities", "window_starts"]

# HierVLModel.semantic_probs' floor of the per-pixel score sum.
PROB_EPS = 1e-6


def window_starts(length: int, crop: int, stride: int) -> List[int]:
    """Window offsets along one axis of ``length`` >= ``crop`` pixels, as the evaluator's."""
    if length <= crop:
        return [0]
    starts = list(range(0, length - crop, stride))
    starts.append(length - crop)
    return starts


def bilinear_matrix(src: int, dst: int) -> np.ndarray:
    """(dst, src) float32 matrix of ``F.interpolate(mode="bilinear", align_corners=False)``
    along one axis (:func:`~hiervl.demo.scaling.bilinear_taps` as a matrix)."""
    low, high, frac = bilinear_taps(dst, src)
    matrix = np.zeros((dst, src), dtype=np.float32)
    np.add.at(matrix, (np.arange(dst), low), 1.0 - frac)
    np.add.at(matrix, (np.arange(dst), high), frac)
    return matrix


def _resize(x: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """(C,H,W) float32 → (C,h',w') bilinear (the torch rule, see :func:`bilinear_matrix`)."""
    if tuple(x.shape[1:]) == tuple(size):
        return x
    rows = bilinear_matrix(x.shape[1], size[0])
    cols = bilinear_matrix(x.shape[2], size[1])
    return np.einsum("ih,chw,jw->cij", rows, x, cols, optimize=True).astype(np.float32)


def probabilities(scores: np.ndarray) -> np.ndarray:
    """(K,H,W) scores → per-pixel class distribution (``HierVLModel.semantic_probs``)."""
    scores = np.maximum(scores, 0.0)
    return scores / np.maximum(scores.sum(axis=0, keepdims=True), PROB_EPS)


@dataclass
class OnnxPrediction:
    """scores (K,h,w) float32 at the test scale; labels (H,W) int64 with ``UNLABELED`` and
    confidence (H,W) float32 at the input's size (as the demo's ``SemanticPrediction``)."""

    scores: np.ndarray
    labels: np.ndarray
    confidence: np.ndarray


class OnnxSegmenter:
    """An exported HierVL file and its metadata: RGB image → scores and labels."""

    def __init__(
        self,
        path: str,
        *,
        stride: int = 0,
        confidence_threshold: float = 0.0,
        threads: int = 0,
        min_size_test: Optional[int] = None,
        max_size_test: Optional[int] = None,
    ):
        """
        Args:
            path: the ``.onnx`` file written by ``hiervl.tools.export``.
            stride: sliding-window stride in pixels (0 = the file's ``window_stride``).
            confidence_threshold: in [0, 1); pixels whose top class probability is below
                it are ``UNLABELED`` (as the demo's ``--confidence-threshold``).
            threads: onnxruntime intra-op threads (0 = its default, one per core).
            min_size_test: the test scale's shorter side (None = the file's, 0 = no
                resizing).
            max_size_test: its longer-side limit (None = the file's).
        """
        if not os.path.isfile(path):
            raise ValueError(f"--model {path!r}: no such file")
        if not 0.0 <= confidence_threshold < 1.0:
            raise ValueError(
                f"confidence threshold must be in [0, 1), got {confidence_threshold} "
                "(it is compared with a per-pixel class probability)"
            )
        if stride < 0 or threads < 0:
            raise ValueError(f"stride ({stride}) and threads ({threads}) must be >= 0")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(
                path, sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as e:  # onnxruntime raises its own exception types
            raise ValueError(f"--model {path!r}: onnxruntime cannot load it ({e})") from None
        props = self.session.get_modelmeta().custom_metadata_map
        self.meta = DeployMetadata.from_props(props, path)
        if min_size_test is None and PREFIX + "min_size_test" not in props:
            logger.info("%s stores no test scale (an older export): no resizing", path)
        self.min_size = self.meta.min_size_test if min_size_test is None else min_size_test
        self.max_size = self.meta.max_size_test if max_size_test is None else max_size_test
        check_test_scale(self.min_size, self.max_size, "--min-size-test / --max-size-test")
        self.stride = stride or self.meta.window_stride
        self.confidence_threshold = float(confidence_threshold)
        self._mean = np.asarray(self.meta.pixel_mean, dtype=np.float32).reshape(3, 1, 1)
        self._std = np.asarray(self.meta.pixel_std, dtype=np.float32).reshape(3, 1, 1)

    @property
    def class_names(self) -> List[str]:
        return list(self.meta.class_names)

    def normalize(self, image: np.ndarray) -> np.ndarray:
        """(H,W,3) uint8 RGB → (3,H,W) float32 (x - mean) / std."""
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.dtype} {image.shape}")
        chw = image.transpose(2, 0, 1).astype(np.float32)
        return (chw - self._mean) / self._std

    def window(self, window: np.ndarray) -> np.ndarray:
        """One (3,wh,ww) normalised window → (K,wh,ww) scores."""
        (scores,) = self.session.run(None, {INPUT_NAME: window[None]})
        return scores[0]

    def scores(self, image: np.ndarray) -> np.ndarray:
        """(H,W,3) uint8 RGB → (K,H,W) float32 scores at that size (sliding window, see
        module doc; no test-scale resize)."""
        x = self.normalize(image)
        height, width = x.shape[1:]
        win_h, win_w = self.meta.input_size
        scale = max(win_h / height, win_w / width, 1.0)
        # Bilinear commutes with the per-channel normalisation: resizing after it is exact.
        x = _resize(x, (math.ceil(height * scale), math.ceil(width * scale)))
        total = np.zeros((len(self.class_names),) + x.shape[1:], dtype=np.float32)
        counts = np.zeros(x.shape[1:], dtype=np.float32)
        for top in window_starts(x.shape[1], win_h, self.stride):
            for left in window_starts(x.shape[2], win_w, self.stride):
                crop = np.ascontiguousarray(x[:, top : top + win_h, left : left + win_w])
                total[:, top : top + win_h, left : left + win_w] += self.window(crop)
                counts[top : top + win_h, left : left + win_w] += 1
        return _resize(total / counts, (height, width))

    def __call__(self, image: np.ndarray) -> OnnxPrediction:
        """(H,W,3) uint8 RGB → scores at the test scale, labels (``UNLABELED`` below the
        threshold) and confidence at the input's size."""
        size = inference_size(*image.shape[:2], min_size=self.min_size, max_size=self.max_size)
        scores = self.scores(resize_image(np.ascontiguousarray(image), size))
        labels, confidence = upsampled_labels_numpy(
            probabilities(scores),
            image.shape[:2],
            threshold=self.confidence_threshold,
            unlabeled=UNLABELED,
        )
        return OnnxPrediction(scores=scores, labels=labels, confidence=confidence)


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, metavar="FILE", help="exported .onnx file")
    parser.add_argument("--input", nargs="+", required=True, help="image files or glob patterns")
    parser.add_argument("--output", help="file (one input) or folder for the overlays")
    parser.add_argument("--save-masks", metavar="DIR", help="folder for the label-map PNGs")
    parser.add_argument(
        "--save-overlays",
        action="store_true",
        help="with --save-masks, also write <name>_overlay.jpg beside each label map",
    )
    parser.add_argument(
        "--confidence-threshold",
        type=float,
        default=0.0,
        help="pixels whose top class probability is below this are left unlabelled",
    )
    parser.add_argument(
        "--stride", type=int, default=0, help="sliding-window stride (0 = the file's)"
    )
    parser.add_argument(
        "--min-size-test",
        type=int,
        metavar="PX",
        help="resize the shorter side to this before segmenting, as the demo "
        "(default: the file's, the config's INPUT.MIN_SIZE_TEST; 0 = the input's own "
        "resolution); labels are written at the input's size either way",
    )
    parser.add_argument(
        "--max-size-test",
        type=int,
        metavar="PX",
        help="longer-side limit of that resize, >= --min-size-test (default: the file's, "
        "INPUT.MAX_SIZE_TEST)",
    )
    parser.add_argument("--alpha", type=float, default=0.5, help="opacity of the colour overlay")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0 = all)")
    return parser


def _segment_one(segmenter, visualizer, path, overlay_path, masks) -> OnnxPrediction:
    rgb = read_image(path, format="RGB")
    prediction = segmenter(rgb)
    overlay = None
    if overlay_path is not None or (masks is not None and masks.overlays):
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])
        overlay = visualizer.draw(bgr, prediction.labels, segmenter.class_names)
    if overlay_path is not None:
        folder = os.path.dirname(overlay_path)
        if folder:
            os.makedirs(folder, exist_ok=True)
        if not cv2.imwrite(overlay_path, overlay):
            raise ValueError(f"cannot write {overlay_path!r}")
    if masks is not None:
        masks.write(path, prediction.labels, rgb.shape[:2], overlay)
    return prediction


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s")
    try:
        if not args.output and not args.save_masks:
            raise ValueError("nothing to write: pass --output and/or --save-masks")
        if args.save_overlays and not args.save_masks:
            raise ValueError("--save-overlays writes beside the label maps: add --save-masks DIR")
        segmenter = OnnxSegmenter(
            args.model,
            stride=args.stride,
            confidence_threshold=args.confidence_threshold,
            threads=args.threads,
            min_size_test=args.min_size_test,
            max_size_test=args.max_size_test,
        )
        meta = segmenter.meta
        palette = None
        if meta.class_colors is not None:
            palette = DatasetPalette(meta.class_names, meta.class_colors)
        visualizer = SemanticVisualizer(alpha=args.alpha, palette=palette)
        paths, failures = expand_inputs(args.input)
        overlays = image_output_paths(paths, args.output) if args.output else [None] * len(paths)
        masks = None
        if args.save_masks:
            masks = LabelMapWriter(
                args.save_masks,
                num_classes=len(meta.class_names),
                ignore_label=meta.ignore_label,
                overlays=args.save_overlays,
                inputs=paths,
            )
    except ValueError as e:
        logger.error("%s", e)
        return 1
    logger.info(
        "%s: %d classes, test scale %d/%d, window %dx%d, stride %d, commit %s",
        args.model,
        len(meta.class_names),
        segmenter.min_size,
        segmenter.max_size,
        *meta.input_size,
        segmenter.stride,
        meta.commit,
    )
    done = 0
    for path, overlay in zip(tqdm.tqdm(paths, desc="images", unit="img"), overlays):
        start = time.perf_counter()
        try:
            prediction = _segment_one(segmenter, visualizer, path, overlay, masks)
        except (ValueError, cv2.error) as e:
            logger.error("%s: %s", path, e)
            failures.append(DemoFailure(path, str(e)))
            continue
        present = [segmenter.class_names[k] for k in np.unique(prediction.labels) if k >= 0]
        logger.info(
            "%s: %d classes (%s) in %.2fs",
            path,
            len(present),
            ", ".join(present),
            time.perf_counter() - start,
        )
        done += 1
    for failure in failures:
        logger.error("FAILED %s: %s", failure.path, failure.message)
    print(f"{done} images segmented, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
