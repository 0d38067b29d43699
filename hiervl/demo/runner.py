"""The demo's loops over images, a video file and a webcam (``demo/demo.py`` wires them).

A file that cannot be read is reported with its name and skipped; the caller turns the
returned failures into a non-zero exit code. Frames are BGR throughout (OpenCV's order).

Importing this module needs no torch (the predictor is only a type here): the ONNX
runner (``hiervl.tools.onnx_predict``) shares its input and output-path rules.
"""

from __future__ import annotations

import glob
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import tqdm

from hiervl.data import image_io
from hiervl.demo.label_maps import LabelMapWriter
from hiervl.demo.visualizer import SemanticVisualizer

if TYPE_CHECKING:
    import torch

    from hiervl.demo.predictor import SemanticPrediction, SemanticPredictor

logger = logging.getLogger(__name__)

__all__ = [
    "DemoFailure",
    "ImageResult",
    "ImagesReport",
    "SegmentationDemo",
    "check_display",
    "expand_inputs",
    "format_relevance",
    "image_output_paths",
    "read_image",
    "run_on_images",
    "run_on_video",
    "run_on_webcam",
]

WINDOW_NAME = "HierVL"
ESC_KEY = 27
# Codec per output container; these are the ones OpenCV's bundled FFmpeg can encode.
VIDEO_CODECS = {".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".avi": "MJPG", ".mkv": "XVID"}
DEFAULT_VIDEO_SUFFIX = ".mp4"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
DEFAULT_IMAGE_SUFFIX = ".png"


@dataclass
class DemoFailure:
    """An input that could not be processed, and why."""

    path: str
    message: str


@dataclass
class ImageResult:
    """What the demo computed for one image (``output`` is None when shown in a window)."""

    path: str
    output: Optional[str]
    prediction: SemanticPrediction
    relevance: Optional[torch.Tensor] = None


@dataclass
class ImagesReport:
    results: List[ImageResult] = field(default_factory=list)
    failures: List[DemoFailure] = field(default_factory=list)


class SegmentationDemo:
    """Predictor + visualiser: BGR frame → (prediction, BGR overlay of the same size)."""

    def __init__(self, predictor: SemanticPredictor, visualizer: SemanticVisualizer):
        self.predictor = predictor
        self.visualizer = visualizer

    def __call__(
        self, image: np.ndarray, *, progress: bool = False
    ) -> Tuple[SemanticPrediction, np.ndarray]:
        """``progress``: a bar over the sliding windows of a large image (single images;
        video frames go by too fast for one)."""
        prediction = self.predictor(image, input_format="BGR", progress=progress)
        overlay = self.visualizer.draw(image, prediction.labels, prediction.class_names)
        return prediction, overlay


def format_relevance(class_names: Sequence[str], relevance: torch.Tensor) -> str:
    """One ``name  score`` line per class, most relevant first."""
    if len(class_names) != relevance.numel():
        raise ValueError(f"{relevance.numel()} relevance scores for {len(class_names)} classes")
    import torch

    order = torch.argsort(relevance, descending=True).tolist()
    width = max(len(name) for name in class_names)
    return "\n".join(f"  {class_names[k]:<{width}}  {relevance[k].item():.3f}" for k in order)


def _images_below(folder: str) -> List[str]:
    """Image files below ``folder`` (nested sub-folders too), sorted."""
    found = []
    for directory, subdirs, files in os.walk(folder):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        found += [
            os.path.join(directory, name)
            for name in sorted(files)
            if name.lower().endswith(IMAGE_SUFFIXES) and not name.startswith(".")
        ]
    return found


def expand_inputs(patterns: Sequence[str]) -> Tuple[List[str], List[DemoFailure]]:
    """Files named or matched by glob ``patterns``, and the images below named folders (in
    order); patterns and folders matching nothing fail."""
    paths, failures = [], []
    for pattern in patterns:
        pattern = os.path.expanduser(pattern)
        if os.path.isdir(pattern):
            images = _images_below(pattern)
            if not images:
                failures.append(DemoFailure(pattern, "the folder holds no image"))
            paths += images
        elif glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                failures.append(DemoFailure(pattern, "the pattern matches no file"))
            paths += matches
        else:
            paths.append(pattern)
    return paths, failures


def read_image(path: str) -> np.ndarray:
    """(H,W,3) uint8 BGR, EXIF orientation applied (the project's one image reader,
    :func:`hiervl.data.image_io.read_image`, as in training and evaluation). A missing,
    corrupt or truncated file is a ValueError naming ``path`` (cv2.imread would return
    the decoded half of a truncated JPEG)."""
    return image_io.read_image(path, format="BGR")


def _is_folder(output: str) -> bool:
    """An existing folder, a path ending in a separator, or a name without a suffix."""
    if os.path.isdir(output) or output.endswith(("/", os.sep)):
        return True
    return not os.path.splitext(output)[1]


def image_output_paths(paths: Sequence[str], output: str) -> List[str]:
    """Where each input's visualisation goes: ``output`` itself when it is a file name and
    there is one input, else ``output/<input name>`` (names made unique, suffix kept when
    OpenCV can write it)."""
    if not _is_folder(output):
        if len(paths) != 1:
            raise ValueError(
                f"--output {output!r} is a file name but {len(paths)} inputs were given: "
                "pass a folder"
            )
        out = [output]
    else:
        out = _names_in_folder(paths, output)
    for path, destination in zip(paths, out):
        if os.path.abspath(destination) == os.path.abspath(path):
            raise ValueError(f"--output {output!r} would overwrite the input image {path!r}")
    return out


def _names_in_folder(paths: Sequence[str], output: str) -> List[str]:
    taken, out = set(), []
    for path in paths:
        stem, suffix = os.path.splitext(os.path.basename(path))
        suffix = suffix if suffix.lower() in IMAGE_SUFFIXES else DEFAULT_IMAGE_SUFFIX
        name, n = stem + suffix, 1
        while name in taken:
            name, n = f"{stem}_{n}{suffix}", n + 1
        taken.add(name)
        out.append(os.path.join(output, name))
    return out


OUTPUT_ADVICE = "pass --output FILE_OR_FOLDER"
WEBCAM_ADVICE = "--webcam shows its results in a window: run it where a display is available"


def check_display(advice: str = OUTPUT_ADVICE) -> None:
    """Raise ValueError (ending with ``advice``) unless OpenCV can open a window here."""
    if sys.platform.startswith("linux") and not (
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    ):
        raise ValueError(f"no display to show the results on (DISPLAY is not set): {advice}")
    try:
        cv2.namedWindow(WINDOW_NAME, cv2.WINDOW_NORMAL)
    except cv2.error as e:
        raise ValueError(
            "OpenCV cannot open a window (opencv-python-headless has no GUI; install "
            f"opencv-python to show results): {advice}"
        ) from e


def _show(image: np.ndarray, wait_ms: int) -> int:
    """Show ``image`` in the demo window; the key pressed within ``wait_ms`` (0 = wait)."""
    cv2.imshow(WINDOW_NAME, image)
    return cv2.waitKey(wait_ms) & 0xFF


def _close_windows() -> None:
    cv2.destroyAllWindows()


def run_on_images(
    demo: SegmentationDemo,
    paths: Sequence[str],
    output: Optional[str],
    *,
    show_relevance: bool = False,
    save_masks: Optional[LabelMapWriter] = None,
) -> ImagesReport:
    """Segment every image; write to ``output`` (file or folder) or show in a window (not
    when only label maps are saved: ``save_masks``)."""
    show = not output and save_masks is None
    if show:
        check_display()
    report = ImagesReport()
    destinations = image_output_paths(paths, output) if output else [None] * len(paths)
    if output and _is_folder(output):
        os.makedirs(output, exist_ok=True)
    for path, destination in zip(tqdm.tqdm(paths, desc="images", unit="img"), destinations):
        start = time.perf_counter()
        try:
            image = read_image(path)
            prediction, overlay = demo(image, progress=True)
            if destination is not None:
                folder = os.path.dirname(destination)
                if folder:
                    os.makedirs(folder, exist_ok=True)
                if not cv2.imwrite(destination, overlay):
                    raise ValueError(f"cannot write {destination!r}")
            if save_masks is not None:
                save_masks.write(path, prediction.labels, image.shape[:2], overlay)
        except (ValueError, cv2.error) as e:
            logger.error("%s: %s", path, e)
            report.failures.append(DemoFailure(path, str(e)))
            continue
        result = ImageResult(path, destination, prediction)
        present = [prediction.class_names[k] for k in np.unique(prediction.labels) if k >= 0]
        logger.info(
            "%s: %d classes (%s) in %.2fs%s",
            path,
            len(present),
            ", ".join(present),
            time.perf_counter() - start,
            f" -> {destination}" if destination else "",
        )
        if show_relevance:
            result.relevance = demo.predictor.class_relevance(image, input_format="BGR")
            logger.info(
                "HSQG class relevance of %s:\n%s",
                path,
                format_relevance(prediction.class_names, result.relevance),
            )
        report.results.append(result)
        if show and _show(overlay, 0) == ESC_KEY:
            break
    return report


def _frames(capture: cv2.VideoCapture) -> Iterator[np.ndarray]:
    while True:
        ok, frame = capture.read()
        if not ok:
            return
        yield frame


def video_output_path(video: str, output: str) -> str:
    """``output`` when it names a video file, else ``output/<video name>.<suffix>``."""
    if _is_folder(output):
        stem, suffix = os.path.splitext(os.path.basename(video))
        suffix = suffix if suffix.lower() in VIDEO_CODECS else DEFAULT_VIDEO_SUFFIX
        return os.path.join(output, stem + suffix)
    suffix = os.path.splitext(output)[1].lower()
    if suffix not in VIDEO_CODECS:
        raise ValueError(
            f"--output {output!r}: unsupported video format {suffix!r}, use one of "
            f"{sorted(VIDEO_CODECS)}"
        )
    return output


def run_on_video(
    demo: SegmentationDemo,
    video: str,
    output: Optional[str],
    *,
    save_masks: Optional[LabelMapWriter] = None,
) -> int:
    """Overlay every frame of ``video``; write a video with the same frame rate and size
    (or show it, unless only label maps are saved: ``save_masks``, one per frame). Returns
    the number of frames processed; ValueError naming the file when it cannot be opened,
    decoded or written."""
    if not os.path.isfile(video):
        raise ValueError(f"cannot read video {video!r}: no such file")
    destination = video_output_path(video, output) if output else None
    if destination is not None and os.path.abspath(destination) == os.path.abspath(video):
        raise ValueError(f"--output {output!r} would overwrite the input video {video!r}")
    show = destination is None and save_masks is None
    if show:
        check_display()
    capture = cv2.VideoCapture(video)
    if not capture.isOpened():
        raise ValueError(f"cannot read video {video!r}: OpenCV cannot open it (corrupt or codec?)")
    width = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH))
    height = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
    fps = capture.get(cv2.CAP_PROP_FPS)
    total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    if not fps or not math.isfinite(fps) or fps <= 0:
        capture.release()
        raise ValueError(f"cannot read video {video!r}: it reports no frame rate")
    writer = None
    if destination is not None:
        os.makedirs(os.path.dirname(destination) or ".", exist_ok=True)
        codec = VIDEO_CODECS[os.path.splitext(destination)[1].lower()]
        writer = cv2.VideoWriter(destination, cv2.VideoWriter_fourcc(*codec), fps, (width, height))
        if not writer.isOpened():
            capture.release()
            raise ValueError(f"cannot write video {destination!r} with codec {codec}")
    count = 0
    try:
        progress = tqdm.tqdm(_frames(capture), total=total or None, desc=video, unit="frame")
        for frame in progress:
            if frame.shape[:2] != (height, width):
                raise ValueError(
                    f"cannot read video {video!r}: frame {count} is {frame.shape[1]}x"
                    f"{frame.shape[0]}, the video announces {width}x{height}"
                )
            prediction, overlay = demo(frame)
            if save_masks is not None:
                save_masks.write_frame(video, count, prediction.labels, overlay)
            count += 1
            if writer is not None:
                writer.write(overlay)
            elif show and _show(overlay, 1) == ESC_KEY:
                break
    finally:
        capture.release()
        if writer is not None:
            writer.release()
    if count == 0:
        if destination and os.path.exists(destination):
            os.remove(destination)
        raise ValueError(f"cannot read video {video!r}: no frame could be decoded")
    if total and count < total and writer is not None:
        logger.warning("%s: decoded %d of the %d frames it announces", video, count, total)
    logger.info(
        "%s: %d frames at %.2f fps, %dx%d%s",
        video,
        count,
        fps,
        width,
        height,
        f" -> {destination}" if destination else "",
    )
    return count


def run_on_webcam(
    demo: SegmentationDemo,
    *,
    camera: int = 0,
    capture_factory: Callable[[int], cv2.VideoCapture] = cv2.VideoCapture,
) -> int:
    """Live overlay in a window until Esc; returns the number of frames shown."""
    check_display(WEBCAM_ADVICE)
    capture = capture_factory(camera)
    if not capture.isOpened():
        raise ValueError(f"cannot open the webcam (camera {camera}): is one connected?")
    count = 0
    try:
        for frame in _frames(capture):
            _, overlay = demo(frame)
            count += 1
            if _show(overlay, 1) == ESC_KEY:
                break
    finally:
        capture.release()
        _close_windows()
    if count == 0:
        raise ValueError(f"the webcam (camera {camera}) delivered no frame")
    return count
