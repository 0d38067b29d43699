"""The demo on one large photo: time of each phase at the config's test scale.

A 6000x4000 photo at its own resolution is thousands of sliding windows for the tiny
configs' 128-pixel crops; the demo resizes it to ``INPUT.MIN_SIZE_TEST`` /
``MAX_SIZE_TEST`` first (hiervl/demo/resize.py). This script writes a synthetic photo (a
smooth background with discs and boxes, saved as a JPEG like a camera's), then runs the
demo's own pipeline on it in this process and prints, per phase, the seconds it took:
reading the JPEG, the prediction (resize, inference over the windows, labels upsampled to
the full size), drawing the overlay and writing it. The window counts are computed, not
run, for the full resolution (``MIN_SIZE_TEST 0``).

    python benchmarks/bench_demo_large.py \
        --weights output/quickstart/semi_supervised/model_final.pth
    python benchmarks/bench_demo_large.py --weights W --size 6000x4000 --config-file ...
"""

import argparse
import os
import tempfile
import time

import cv2
import numpy as np

from hiervl.demo import SegmentationDemo, SemanticPredictor, SemanticVisualizer
from hiervl.demo.resize import inference_size
from hiervl.demo.runner import read_image
from hiervl.engine.launcher import setup_cfg
from hiervl.evaluation.sliding_window import window_starts

DEFAULT_CONFIG = "configs/tiny/hiervl_quickstart.yaml"


def synthetic_photo(path: str, width: int, height: int, seed: int = 0) -> str:
    """A camera-like JPEG: smooth colours, a few discs and boxes, a little noise."""
    rng = np.random.default_rng(seed)
    small = rng.integers(40, 220, size=(8, 12, 3), dtype=np.uint8)
    image = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)
    for _ in range(12):
        centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        cv2.circle(image, centre, int(rng.integers(height // 20, height // 6)), colour, -1)
        corner = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        cv2.rectangle(image, corner, (corner[0] + width // 8, corner[1] + height // 8), colour, -1)
    noise = rng.normal(0, 4, size=image.shape)
    image = np.clip(image + noise, 0, 255).astype(np.uint8)
    cv2.imwrite(path, image, [cv2.IMWRITE_JPEG_QUALITY, 92])
    return path


def windows(height: int, width: int, crop: int, stride: int) -> int:
    win_h, win_w = min(crop, height), min(crop, width)
    return len(window_starts(height, win_h, stride)) * len(window_starts(width, win_w, stride))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", default=DEFAULT_CONFIG)
    parser.add_argument("--weights", default="", help="MODEL.WEIGHTS (empty: untrained)")
    parser.add_argument("--size", default="6000x4000", help="photo WIDTHxHEIGHT")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    cfg = setup_cfg(args.config_file, ["MODEL.WEIGHTS", args.weights])
    sw = cfg.TEST.SLIDING_WINDOW
    crop, stride = sw.CROP_SIZE, sw.STRIDE or max(sw.CROP_SIZE // 2, 1)
    scale = inference_size(
        height, width, min_size=cfg.INPUT.MIN_SIZE_TEST, max_size=cfg.INPUT.MAX_SIZE_TEST
    )
    demo = SegmentationDemo(SemanticPredictor(cfg), SemanticVisualizer(alpha=0.5))
    with tempfile.TemporaryDirectory() as folder:
        photo = synthetic_photo(os.path.join(folder, "photo.jpg"), width, height)
        megabytes = os.path.getsize(photo) / 1e6
        times = {}
        start = time.perf_counter()
        image = read_image(photo)
        times["read JPEG"] = time.perf_counter() - start
        start = time.perf_counter()
        prediction = demo.predictor(image, input_format="BGR", progress=True)
        times["predict (resize, windows, upsample)"] = time.perf_counter() - start
        start = time.perf_counter()
        overlay = demo.visualizer.draw(image, prediction.labels, prediction.class_names)
        cv2.imwrite(os.path.join(folder, "out.jpg"), overlay)
        times["draw + write"] = time.perf_counter() - start
    print(
        f"\n{width}x{height} photo ({megabytes:.1f} MB JPEG), {args.config_file}: test scale "
        f"{scale[1]}x{scale[0]} (INPUT.MIN_SIZE_TEST {cfg.INPUT.MIN_SIZE_TEST}, MAX_SIZE_TEST "
        f"{cfg.INPUT.MAX_SIZE_TEST}), {windows(*scale, crop, stride)} windows of {crop} "
        f"(at full resolution: {windows(height, width, crop, stride)})"
    )
    print("| phase | seconds |\n|---|---:|")
    for phase, seconds in times.items():
        print(f"| {phase} | {seconds:.2f} |")
    print(f"| total | {sum(times.values()):.2f} |")


if __name__ == "__main__":
    main()
