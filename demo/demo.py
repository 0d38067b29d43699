#!/usr/bin/env python
"""HierVL demo on images, a video or a webcam (detectron2's demo conventions).

    python demo/demo.py --config-file configs/tiny/hiervl_quickstart.yaml \
        --input photo.jpg more/*.png --output out/ \
        --opts MODEL.WEIGHTS output/quickstart/semi_supervised/model_final.pth
    python demo/demo.py --config-file ... --video-input clip.mp4 --output clip_seg.mp4
    python demo/demo.py --config-file ... --webcam
    python demo/demo.py --config-file ... --input photo.jpg --output out.png \
        --vocabulary "cat,dog,sofa" --show-relevance
    python demo/demo.py --config-file ... --input unlabeled/images --save-masks pseudo/

Exit status 1 when any input could not be processed (each is reported by name).
"""

import argparse
import logging
import sys

from detectron2.utils.logger import setup_logger

from hiervl.demo import (
    WEBCAM_ADVICE,
    DatasetPalette,
    LabelMapWriter,
    SegmentationDemo,
    SemanticPredictor,
    SemanticVisualizer,
    check_display,
    expand_inputs,
    ignore_value,
    parse_vocabulary,
    run_on_images,
    run_on_video,
    run_on_webcam,
    vocabulary_metadata,
)
from hiervl.engine.launcher import setup_cfg

logger = logging.getLogger("hiervl.demo")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True, metavar="FILE", help="model config")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--input",
        nargs="+",
        help="image files, folders (all images below) or glob patterns ('imgs/*.jpg')",
    )
    source.add_argument("--video-input", metavar="FILE", help="a video file")
    source.add_argument("--webcam", action="store_true", help="live demo on camera 0 (Esc quits)")
    parser.add_argument(
        "--output",
        help="file (one input) or folder for the visualisations; "
        "without it results are shown in a window",
    )
    parser.add_argument(
        "--save-masks",
        metavar="DIR",
        help="write each prediction as a single-channel PNG label map (class index, 255 "
        "where unlabelled) with the input's size and name: masks a custom dataset loads",
    )
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
        "--vocabulary",
        help="segment these classes instead of the trained ones: 'cat,dog,sofa' or a .txt "
        "file with one name per line",
    )
    parser.add_argument(
        "--show-relevance",
        action="store_true",
        help="print each image's HSQG relevance score of every class, sorted",
    )
    parser.add_argument("--alpha", type=float, default=0.5, help="opacity of the colour overlay")
    parser.add_argument(
        "--opts",
        default=[],
        nargs=argparse.REMAINDER,
        help="config overrides as KEY VALUE pairs, e.g. MODEL.WEIGHTS model_final.pth",
    )
    return parser


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    setup_logger(name="fvcore")
    setup_logger(name="hiervl")
    try:
        # Before the model is loaded, so that a missing display fails at once.
        if args.webcam:
            if args.save_masks:
                raise ValueError("--save-masks needs --input or --video-input, not --webcam")
            check_display(WEBCAM_ADVICE)
        elif not args.output and not args.save_masks:
            check_display()
        if args.save_overlays and not args.save_masks:
            raise ValueError("--save-overlays writes beside the label maps: add --save-masks DIR")
        # `--vocabulary ""` is a mistake to report, not "keep the trained classes".
        vocabulary = parse_vocabulary(args.vocabulary) if args.vocabulary is not None else None
        cfg = setup_cfg(args.config_file, args.opts)
        if args.show_relevance and not cfg.MODEL.HIERVL.HSQG.ENABLED:
            raise ValueError(
                "--show-relevance prints HSQG's class relevance, but this config has "
                "MODEL.HIERVL.HSQG.ENABLED False (static text queries, no trained gate)"
            )
        predictor = SemanticPredictor(
            cfg, vocabulary=vocabulary, confidence_threshold=args.confidence_threshold
        )
        # The dataset's colours and ignore value (colours only while its classes are used).
        metadata = vocabulary_metadata(cfg)
        palette = DatasetPalette.from_metadata(metadata) if metadata is not None else None
        demo = SegmentationDemo(predictor, SemanticVisualizer(alpha=args.alpha, palette=palette))
        paths, failures = expand_inputs(args.input) if args.input else ([], [])
        masks = None
        if args.save_masks:
            masks = LabelMapWriter(
                args.save_masks,
                num_classes=len(predictor.class_names),
                ignore_label=ignore_value(metadata),
                overlays=args.save_overlays,
                inputs=paths,
            )
        if args.input:
            report = run_on_images(
                demo, paths, args.output, show_relevance=args.show_relevance, save_masks=masks
            )
            failures += report.failures
            for failure in failures:
                logger.error("FAILED %s: %s", failure.path, failure.message)
            logger.info("%d images written or shown, %d failed", len(report.results), len(failures))
            return 1 if failures else 0
        if args.show_relevance:
            logger.warning("--show-relevance applies to --input images only")
        if args.video_input:
            run_on_video(demo, args.video_input, args.output, save_masks=masks)
        else:
            run_on_webcam(demo)
    except ValueError as e:
        logger.error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
