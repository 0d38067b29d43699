"""detectron2's ``SemSegEvaluator`` reading masks the way training does.

The prediction of an image comes back at the record's (height, width), which is the image's
displayed size (EXIF orientation applied, :func:`hiervl.data.image_io.image_size`); masks
are never rotated. The evaluator reads each mask with :func:`hiervl.data.image_io.read_mask`
(a truncated or multi-channel mask is an error naming it) and checks that it has the
prediction's size, so a mask that does not fit its image is an error naming both files
instead of a confusion matrix of misaligned pixels (or a broadcasting error).
"""

from typing import Optional, Tuple

import numpy as np
from detectron2.evaluation import SemSegEvaluator

from hiervl.data.image_io import read_mask

__all__ = ["HierVLSemSegEvaluator"]


class HierVLSemSegEvaluator(SemSegEvaluator):
    """``SemSegEvaluator`` (mIoU, fwIoU, pixel accuracy, per-class IoU) with the project's
    mask reader and a size check per image."""

    def __init__(self, dataset_name: str, **kwargs):
        super().__init__(dataset_name, sem_seg_loading_fn=self._read_mask, **kwargs)
        self._current: Optional[Tuple[str, Tuple[int, int]]] = None

    def _read_mask(self, path: str, dtype=None) -> np.ndarray:
        mask = read_mask(path)
        assert self._current is not None, "masks are read from process() only"
        file_name, size = self._current
        if mask.shape != size:
            raise ValueError(
                f"evaluation: mask {path} is {mask.shape[1]}x{mask.shape[0]} but the "
                f"prediction for image {file_name} is {size[1]}x{size[0]} (width x height, "
                "EXIF orientation applied; masks are never rotated)"
            )
        return mask.astype(dtype) if dtype is not None else mask

    def process(self, inputs, outputs):
        for item, output in zip(inputs, outputs):
            self._current = (item["file_name"], tuple(output["sem_seg"].shape[-2:]))
            super().process([item], [output])
        self._current = None
