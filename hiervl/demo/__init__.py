"""Inference demo: a predictor for numpy images, a label-map visualiser, and the loops over
images, videos and a webcam that ``demo/demo.py`` wires to the command line.

Names are loaded from their modules on first use (PEP 562), so that importing the
torch-free parts (``hiervl.demo.visualizer``, ``label_maps``, ``runner``) does not import
the predictor's torch and detectron2.
"""

import importlib

_EXPORTS = {
    "label_maps": ("LabelMapWriter", "ignore_value", "label_map", "vocabulary_metadata"),
    "predictor": ("UNLABELED", "SemanticPrediction", "SemanticPredictor", "parse_vocabulary"),
    "runner": (
        "WEBCAM_ADVICE",
        "DemoFailure",
        "SegmentationDemo",
        "check_display",
        "expand_inputs",
        "format_relevance",
        "run_on_images",
        "run_on_video",
        "run_on_webcam",
    ),
    "visualizer": ("DatasetPalette", "SemanticVisualizer", "class_colors", "legend_entries"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name in _MODULE_OF:
        return getattr(importlib.import_module(f"hiervl.demo.{_MODULE_OF[name]}"), name)
    raise AttributeError(f"module 'hiervl.demo' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
