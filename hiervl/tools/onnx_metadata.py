"""What an exported HierVL ONNX file says about itself (its ``metadata_props``).

Written by ``hiervl.tools.export`` and read by ``hiervl.tools.onnx_predict``: everything
needed to run the file without the config or the training stack. No torch and no onnx,
so the runner and the exporter share one definition.

Keys (all strings; lists and sizes as JSON):

=========================  =============================================================
``hiervl.format``          version of this layout (``FORMAT_VERSION``)
``hiervl.class_names``     the K names, index k = score channel k
``hiervl.input_size``      [H, W] of the exported window
``hiervl.input_format``    channel order of the input before normalisation ("RGB")
``hiervl.pixel_mean``      per-channel mean of 0..255 pixels (input = (x - mean) / std)
``hiervl.pixel_std``       per-channel std
``hiervl.window_stride``   default sliding-window stride (pixels) for larger images
``hiervl.prune_classes``   "true" when HSQG-pruned classes score 0
``hiervl.commit``          the exporting commit (``git rev-parse HEAD``) or "unknown"
``hiervl.weights``         the checkpoint exported ("" for an untrained model)
``hiervl.ignore_label``    label-map value of unlabelled pixels (the dataset's, 255)
``hiervl.class_colors``    the dataset's colours (K RGB triples) when the vocabulary is its
                           class list, else null (the demo then generates colours)
``hiervl.min_size_test``   the demo's test scale (INPUT.MIN_SIZE_TEST): the runner resizes
                           the shorter side to it first; 0 = no resizing. Optional: absent
                           in files exported before it existed, read as 0
``hiervl.max_size_test``   the longer-side limit of that resize (INPUT.MAX_SIZE_TEST, >= the
                           shorter side when it is not 0). Optional, absent = 0
=========================  =============================================================

``FORMAT_VERSION`` changes only when a runner of the previous version would misread a new
file (a key changing meaning or becoming required). Optional keys whose absence means the
earlier behaviour keep it: the test scale was added that way (a version-1 runner that
predates it ignores the keys and runs the file at the input's resolution, as it always did;
a newer runner reads an older file the same way).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple

from hiervl.demo.scaling import check_test_scale

__all__ = ["FORMAT_VERSION", "INPUT_NAME", "OUTPUT_NAME", "DeployMetadata"]

FORMAT_VERSION = 1
PREFIX = "hiervl."
INPUT_NAME = "images"
OUTPUT_NAME = "scores"
REQUIRED = (
    "format",
    "class_names",
    "input_size",
    "input_format",
    "pixel_mean",
    "pixel_std",
    "window_stride",
    "prune_classes",
    "commit",
    "weights",
    "ignore_label",
    "class_colors",
)
# Optional keys and the value their absence means.
OPTIONAL = {"min_size_test": "0", "max_size_test": "0"}


@dataclass(frozen=True)
class DeployMetadata:
    """The decoded ``hiervl.*`` metadata of an exported file."""

    class_names: Tuple[str, ...]
    input_size: Tuple[int, int]
    pixel_mean: Tuple[float, float, float]
    pixel_std: Tuple[float, float, float]
    window_stride: int
    prune_classes: bool
    commit: str
    weights: str
    ignore_label: int = 255
    class_colors: Optional[Tuple[Tuple[int, int, int], ...]] = None
    input_format: str = "RGB"
    min_size_test: int = 0
    max_size_test: int = 0

    def __post_init__(self):
        height, width = self.input_size
        if not self.class_names:
            raise ValueError("metadata: class_names is empty")
        if height < 1 or width < 1 or self.window_stride < 1:
            raise ValueError(
                f"metadata: input_size {list(self.input_size)} and window_stride "
                f"{self.window_stride} must be positive"
            )
        if len(self.pixel_mean) != 3 or len(self.pixel_std) != 3 or min(self.pixel_std) <= 0:
            raise ValueError(
                f"metadata: pixel_mean {list(self.pixel_mean)} / pixel_std "
                f"{list(self.pixel_std)} must be 3 values each, std > 0"
            )
        if not 0 <= self.ignore_label <= 255:
            raise ValueError(f"metadata: ignore_label {self.ignore_label} is not 8-bit")
        if self.class_colors is not None and (
            len(self.class_colors) != len(self.class_names)
            or any(len(c) != 3 for c in self.class_colors)
        ):
            raise ValueError(f"metadata: class_colors must be {len(self.class_names)} RGB triples")
        if self.input_format != "RGB":
            raise ValueError(f"metadata: input_format {self.input_format!r} is not 'RGB'")
        check_test_scale(self.min_size_test, self.max_size_test, "metadata: min/max_size_test")

    def to_props(self) -> Dict[str, str]:
        """The ``metadata_props`` entries (key → string)."""
        values = {
            "format": str(FORMAT_VERSION),
            "class_names": json.dumps(list(self.class_names)),
            "input_size": json.dumps(list(self.input_size)),
            "input_format": self.input_format,
            "pixel_mean": json.dumps(list(self.pixel_mean)),
            "pixel_std": json.dumps(list(self.pixel_std)),
            "window_stride": str(self.window_stride),
            "prune_classes": "true" if self.prune_classes else "false",
            "commit": self.commit,
            "weights": self.weights,
            "ignore_label": str(self.ignore_label),
            "class_colors": json.dumps(
                None if self.class_colors is None else [list(c) for c in self.class_colors]
            ),
            "min_size_test": str(self.min_size_test),
            "max_size_test": str(self.max_size_test),
        }
        return {PREFIX + k: v for k, v in values.items()}

    @classmethod
    def from_props(cls, props: Mapping[str, str], source: str) -> DeployMetadata:
        """Decode ``metadata_props``; ValueError naming ``source`` (the file) when a key is
        missing or malformed (a file exported by another tool, or a newer layout)."""
        missing = [PREFIX + k for k in REQUIRED if PREFIX + k not in props]
        if missing:
            raise ValueError(
                f"{source}: not a HierVL export (metadata keys missing: {missing}); "
                "export it with `python -m hiervl.tools.export`"
            )
        version = props[PREFIX + "format"]
        if version != str(FORMAT_VERSION):
            raise ValueError(
                f"{source}: metadata format {version!r}, this runner reads {FORMAT_VERSION}"
            )
        try:
            names: List[str] = json.loads(props[PREFIX + "class_names"])
            size = json.loads(props[PREFIX + "input_size"])
            colors = json.loads(props[PREFIX + "class_colors"])
            test_scale = {k: int(props.get(PREFIX + k, v)) for k, v in OPTIONAL.items()}
            return cls(
                class_names=tuple(str(n) for n in names),
                input_size=(int(size[0]), int(size[1])),
                pixel_mean=tuple(float(v) for v in json.loads(props[PREFIX + "pixel_mean"])),
                pixel_std=tuple(float(v) for v in json.loads(props[PREFIX + "pixel_std"])),
                window_stride=int(props[PREFIX + "window_stride"]),
                prune_classes=props[PREFIX + "prune_classes"] == "true",
                commit=props[PREFIX + "commit"],
                weights=props[PREFIX + "weights"],
                ignore_label=int(props[PREFIX + "ignore_label"]),
                class_colors=None
                if colors is None
                else tuple(tuple(int(v) for v in c) for c in colors),
                input_format=props[PREFIX + "input_format"],
                **test_scale,
            )
        except (ValueError, TypeError, IndexError, json.JSONDecodeError) as e:
            raise ValueError(f"{source}: malformed HierVL metadata ({e})") from None
