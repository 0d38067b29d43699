"""Validation of image (+ mask) files before training, with the statistics the dataset
check prints.

Every image is decoded completely by the project's one reader
(:func:`hiervl.data.image_io.read_image`, EXIF orientation applied), so a truncated or
corrupt file is found here, by name, and not an hour into training; its oriented size is
what its mask (:func:`~hiervl.data.image_io.read_mask`, never rotated) must match. Masks
must hold class ids ``0..K-1`` or the ignore value.

Files are read on a thread pool (decoding releases the GIL) with a progress bar and ETA
for large parts.
"""

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from tqdm import tqdm

from hiervl.data.image_io import ImageReadError, orientation, read_image, read_mask

logger = logging.getLogger(__name__)

IGNORE_LABEL = 255
# Files are decoded concurrently; more threads than this only add memory.
_MAX_THREADS = 8
# Parts with fewer files than this are validated without a progress bar.
_PROGRESS_MIN_FILES = 64
# Problems listed in one error message before "...".
MAX_LISTED_PROBLEMS = 20


@dataclass(frozen=True)
class Sample:
    """One image of a part and its mask (None for unlabelled images).

    Attributes:
        image: path of the image file.
        mask: path of its single-channel class-id PNG, or None.
        id: the record's ``image_id`` (the path below the part's folder, no extension).
    """

    image: str
    mask: Optional[str]
    id: str


@dataclass
class SampleResult:
    """What reading one sample found.

    Attributes:
        height, width: the oriented image size (0 when the image is unreadable).
        values, counts: the mask's distinct values and their pixel counts (empty without
            a readable mask of the right size).
        problems: one line per problem, each naming its file(s).
    """

    sample: Sample
    height: int = 0
    width: int = 0
    values: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    counts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    problems: List[str] = field(default_factory=list)


@dataclass
class PartReport:
    """Validation of one dataset part.

    Attributes:
        name: the registered dataset name (``custom_train_labeled``).
        source: where its images come from (a folder), for the table.
        labelled: whether its samples carry masks.
        results: one per sample, in order.
        problems: listing problems (missing folders, masks without images) followed by
            every sample's problems.
    """

    name: str
    source: str
    labelled: bool
    results: List[SampleResult] = field(default_factory=list)
    problems: List[str] = field(default_factory=list)

    def sizes(self) -> List[Tuple[int, int]]:
        """(height, width) of every readable image."""
        return [(r.height, r.width) for r in self.results if r.height > 0]

    def pixel_counts(self, num_classes: int, ignore_label: int = IGNORE_LABEL) -> np.ndarray:
        """(K + 1,) int64 pixels per class, the last entry the ignore pixels."""
        totals = np.zeros(num_classes + 1, np.int64)
        for r in self.results:
            for value, count in zip(r.values.tolist(), r.counts.tolist()):
                if value < num_classes:
                    totals[value] += count
                elif value == ignore_label:
                    totals[num_classes] += count
        return totals

    def image_counts(self, num_classes: int) -> np.ndarray:
        """(K,) int64 number of masks in which each class occurs."""
        totals = np.zeros(num_classes, np.int64)
        for r in self.results:
            present = r.values[r.values < num_classes]
            totals[present] += 1
        return totals


def _mismatch(sample: Sample, height: int, width: int, mask: np.ndarray) -> str:
    """The size-mismatch problem, naming both files; says when only EXIF explains it."""
    message = (
        f"image {sample.image} is {width}x{height} (width x height, as displayed) but its "
        f"mask {sample.mask} is {mask.shape[1]}x{mask.shape[0]}"
    )
    with Image.open(sample.image) as image:
        turn = orientation(image)
    if turn != 1 and (mask.shape[1], mask.shape[0]) == (height, width):
        message += (
            f"; the mask matches the image as stored, before its EXIF orientation {turn}: "
            "draw masks on the image as it is displayed"
        )
    return message


def validate_sample(
    sample: Sample,
    *,
    num_classes: int,
    class_source: str,
    ignore_label: int = IGNORE_LABEL,
) -> SampleResult:
    """Read ``sample`` completely and report what is wrong with it.

    Args:
        num_classes: K; mask values must be < K or ``ignore_label``.
        class_source: where the class list comes from (named in the class-count problem).
    """
    result = SampleResult(sample)
    try:
        height, width = read_image(sample.image).shape[:2]
    except ImageReadError as e:
        result.problems.append(str(e))
        return result
    result.height, result.width = height, width
    if sample.mask is None:
        return result
    try:
        mask = read_mask(sample.mask)
    except ImageReadError as e:
        result.problems.append(str(e))
        return result
    if mask.shape != (height, width):
        result.problems.append(_mismatch(sample, height, width, mask))
        return result
    values, counts = np.unique(mask, return_counts=True)
    bad = values[(values >= num_classes) & (values != ignore_label)]
    if bad.size:
        result.problems.append(
            f"mask {sample.mask} has values {bad.tolist()[:10]} but {class_source} lists "
            f"K={num_classes} classes (values 0..{num_classes - 1}, {ignore_label} = ignore)"
        )
    result.values, result.counts = values.astype(np.int64), counts.astype(np.int64)
    return result


def validate_samples(
    samples: Sequence[Sample],
    *,
    num_classes: int,
    class_source: str,
    ignore_label: int = IGNORE_LABEL,
    cache: Optional[Dict[Sample, SampleResult]] = None,
    desc: str = "validating",
) -> List[SampleResult]:
    """:func:`validate_sample` for every sample, concurrently; results in input order.

    ``cache`` (sample -> result) skips samples already read (parts that share images).
    """
    cache = {} if cache is None else cache
    todo = [s for s in dict.fromkeys(samples) if s not in cache]

    def one(sample: Sample) -> SampleResult:
        return validate_sample(
            sample, num_classes=num_classes, class_source=class_source, ignore_label=ignore_label
        )

    if todo:
        threads = max(1, min(_MAX_THREADS, os.cpu_count() or 1, len(todo)))
        bar = tqdm(
            total=len(todo),
            desc=desc,
            unit="img",
            dynamic_ncols=True,
            disable=len(todo) < _PROGRESS_MIN_FILES,
        )
        try:
            with ThreadPoolExecutor(threads) as pool:
                for result in pool.map(one, todo):
                    cache[result.sample] = result
                    bar.update()
        finally:
            bar.close()
    return [cache[s] for s in samples]


def problems_error(what: str, problems: Sequence[str], hint: str = "") -> ValueError:
    """One ValueError listing the first problems (each names its file)."""
    shown = "\n  ".join(problems[:MAX_LISTED_PROBLEMS])
    more = (
        f"\n  ... ({len(problems)} problems in all)" if len(problems) > MAX_LISTED_PROBLEMS else ""
    )
    return ValueError(f"{what}: {len(problems)} problem(s)\n  {shown}{more}{hint}")
