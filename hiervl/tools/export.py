"""Export a trained HierVL to ONNX: one fixed-size window, a fixed vocabulary.

    python -m hiervl.tools.export --config-file configs/voc/hiervl_92.yaml \
        MODEL.WEIGHTS output/voc/hiervl_92/model_final.pth \
        --vocabulary "background,aeroplane,..." --size 512 512 --output hiervl.onnx

The graph maps a CLIP-normalised window (1, 3, H, W) to the K semantic scores
(1, K, H, W) at the window's resolution, HSQG's gate included; the vocabulary's text
embeddings are computed once and stored as constants (see
``hiervl/modeling/static_window.py``; the file format in ``onnx_metadata.py``). The
window defaults to TEST.SLIDING_WINDOW.CROP_SIZE, the stride the runner slides it by to
TEST.SLIDING_WINDOW.STRIDE (0 = half the window); the demo's test scale
(INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST) is stored too, so the runner resizes inputs as the demo.

After writing, the file is checked: onnxruntime against the eager PyTorch model (compiled
MSDeformAttn kernel where built) on ``--check-images`` synthetic scenes; the command fails
(exit 1) when the scores differ by more than ``--max-delta`` or fewer than
``--min-agreement`` of the pixels get the same class.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import List, Optional, Sequence

import numpy as np
import torch
from detectron2.utils.env import seed_all_rng
from detectron2.utils.logger import setup_logger

from hiervl.demo.label_maps import ignore_value, vocabulary_metadata
from hiervl.demo.predictor import parse_vocabulary
from hiervl.demo.visualizer import DatasetPalette
from hiervl.engine.checkpoint import HierVLCheckpointer
from hiervl.engine.launcher import setup_cfg
from hiervl.engine.trainer import HierVLTrainer
from hiervl.modeling.static_window import StaticWindow
from hiervl.tools.onnx_export import export_onnx, git_commit, score_agreement
from hiervl.tools.onnx_metadata import INPUT_NAME, DeployMetadata

logger = logging.getLogger("hiervl.tools.export")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Issue 14's acceptance bounds for onnxruntime against eager PyTorch.
MAX_DELTA = 1e-3
MIN_AGREEMENT = 0.999


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True, metavar="FILE", help="model config")
    parser.add_argument("--output", required=True, metavar="FILE", help="the .onnx to write")
    parser.add_argument(
        "--vocabulary",
        help="class names baked into the file: 'cat,dog,sofa' or a .txt file with one name "
        "per line (default: the config's)",
    )
    parser.add_argument(
        "--size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        help="window size (default TEST.SLIDING_WINDOW.CROP_SIZE square)",
    )
    prune = parser.add_mutually_exclusive_group()
    prune.add_argument(
        "--prune-classes",
        dest="prune_classes",
        action="store_true",
        default=None,
        help="classes HSQG prunes score 0 (default: TEST.PRUNE_CLASSES where the config has it)",
    )
    prune.add_argument("--no-prune-classes", dest="prune_classes", action="store_false")
    parser.add_argument(
        "--check-images",
        type=int,
        default=2,
        help="synthetic scenes to compare onnxruntime with PyTorch on (0 = no check)",
    )
    parser.add_argument("--max-delta", type=float, default=MAX_DELTA)
    parser.add_argument("--min-agreement", type=float, default=MIN_AGREEMENT)
    parser.add_argument(
        "opts",
        nargs="*",
        default=[],
        help="config overrides as KEY VALUE pairs, e.g. MODEL.WEIGHTS model_final.pth",
    )
    return parser


def check_scenes(height: int, width: int, count: int) -> List[np.ndarray]:
    """``count`` (H,W,3) uint8 RGB scenes of the built-in synthetic generator (shapes on
    textured backgrounds), drawn at the larger side and cropped to H×W."""
    from hiervl.data.datasets.synthetic import render_sample

    side = max(height, width)
    return [render_sample(0, "val", i, side)[0][:height, :width] for i in range(count)]


def check_export(path: str, meta, window: StaticWindow, count: int) -> List[tuple]:
    """(max |Δscore|, argmax agreement) of onnxruntime vs eager PyTorch per scene.

    ``meta`` is the HierVL meta-architecture (its pixel normalisation); the eager side is
    ``predict_scores`` without the export mode, on the compiled kernel where built.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    mean, std = meta.pixel_mean.view(1, 3, 1, 1), meta.pixel_std.view(1, 3, 1, 1)
    text = meta.model.class_embeddings()
    results = []
    for scene in check_scenes(window.height, window.width, count):
        image = torch.from_numpy(scene.transpose(2, 0, 1).copy())[None].float()
        images = (image - mean) / std
        with torch.no_grad():
            eager = meta.model.predict_scores(images, text, prune_classes=window.prune_classes)
        (onnx_scores,) = session.run(None, {INPUT_NAME: images.numpy()})
        results.append(score_agreement(eager.numpy(), onnx_scores))
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = get_parser().parse_intermixed_args(argv)
    setup_logger(name="fvcore")
    setup_logger(name="hiervl")
    try:
        cfg = setup_cfg(args.config_file, args.opts)
        vocabulary = parse_vocabulary(args.vocabulary) if args.vocabulary else None
        crop = cfg.TEST.SLIDING_WINDOW.CROP_SIZE
        height, width = args.size if args.size else (crop, crop)
        if height < 1 or width < 1:
            raise ValueError(f"--size {height} {width}: the window sides must be positive")
        stride = cfg.TEST.SLIDING_WINDOW.STRIDE or max(min(height, width) // 2, 1)
        prune = args.prune_classes
        if prune is None:
            # TEST.PRUNE_CLASSES (issue 12) is honoured once the config has it.
            prune = bool(cfg.TEST.get("PRUNE_CLASSES", False))
        # Seeded: an untrained export (random init) is the same file every time, and the
        # same network as other tools build with seed 0 (benchmarks/bench_inference.py).
        seed_all_rng(0)
        meta = HierVLTrainer.build_model(cfg).eval()
        if cfg.MODEL.WEIGHTS:
            HierVLCheckpointer(meta).load(cfg.MODEL.WEIGHTS)
        else:
            logger.warning("MODEL.WEIGHTS is empty: exporting an untrained model")
        if vocabulary is not None:
            meta.set_vocabulary(vocabulary)
        window = StaticWindow(model=meta.model, height=height, width=width, prune_classes=prune)
        # The demo's colours and ignore value (the dataset's, while its classes are used).
        dataset = vocabulary_metadata(cfg)
        palette = DatasetPalette.from_metadata(dataset) if dataset is not None else None
        colors = palette.colors_for(window.class_names) if palette is not None else None
        metadata = DeployMetadata(
            class_names=tuple(window.class_names),
            input_size=(height, width),
            pixel_mean=tuple(float(v) for v in cfg.MODEL.PIXEL_MEAN),
            pixel_std=tuple(float(v) for v in cfg.MODEL.PIXEL_STD),
            window_stride=stride,
            prune_classes=prune,
            commit=git_commit(REPO),
            weights=cfg.MODEL.WEIGHTS,
            ignore_label=ignore_value(dataset),
            class_colors=None if colors is None else tuple(map(tuple, colors[:, ::-1].tolist())),
            # The demo's test scale: the runner resizes inputs as demo/demo.py does.
            min_size_test=cfg.INPUT.MIN_SIZE_TEST,
            max_size_test=cfg.INPUT.MAX_SIZE_TEST,
        )
        start = time.perf_counter()
        export_onnx(window, args.output, metadata)
        logger.info("exported in %.0f s", time.perf_counter() - start)
    except ValueError as e:
        logger.error("%s", e)
        return 1
    print(
        f"{args.output}: {len(metadata.class_names)} classes, window {height}x{width}, "
        f"prune_classes {prune}, test scale {metadata.min_size_test}/{metadata.max_size_test}, "
        f"commit {metadata.commit}"
    )
    if args.check_images <= 0:
        return 0
    results = check_export(args.output, meta, window, args.check_images)
    worst_delta = max(d for d, _ in results)
    worst_agree = min(a for _, a in results)
    ok = worst_delta <= args.max_delta and worst_agree >= args.min_agreement
    print(
        f"onnxruntime vs PyTorch on {len(results)} synthetic scenes: max |Δscore| "
        f"{worst_delta:.2e} (bound {args.max_delta:g}), argmax agreement "
        f"{100 * worst_agree:.3f}% (bound {100 * args.min_agreement:g}%): "
        f"{'ok' if ok else 'FAILED'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
