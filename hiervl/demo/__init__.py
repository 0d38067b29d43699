"""Inference demo: a predictor for numpy images, a label-map visualiser, and the loops over
images, videos and a webcam that ``demo/demo.py`` wires to the command line."""

from hiervl.demo.label_maps import LabelMapWriter, ignore_value, label_map, vocabulary_metadata
from hiervl.demo.predictor import (
    UNLABELED,
    SemanticPrediction,
    SemanticPredictor,
    parse_vocabulary,
)
from hiervl.demo.runner import (
    WEBCAM_ADVICE,
    DemoFailure,
    SegmentationDemo,
    check_display,
    expand_inputs,
    format_relevance,
    run_on_images,
    run_on_video,
    run_on_webcam,
)
from hiervl.demo.visualizer import (
    DatasetPalette,
    SemanticVisualizer,
    class_colors,
    legend_entries,
)

__all__ = [
    "UNLABELED",
    "WEBCAM_ADVICE",
    "DatasetPalette",
    "DemoFailure",
    "LabelMapWriter",
    "SegmentationDemo",
    "SemanticPrediction",
    "SemanticPredictor",
    "SemanticVisualizer",
    "check_display",
    "class_colors",
    "expand_inputs",
    "format_relevance",
    "ignore_value",
    "label_map",
    "legend_entries",
    "parse_vocabulary",
    "run_on_images",
    "run_on_video",
    "run_on_webcam",
    "vocabulary_metadata",
]
