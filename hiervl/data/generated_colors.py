"""Generated class colours (RGB) for any class list: golden-ratio hues.

Pure Python (no detectron2): the demo's visualiser, and through it the torch-free ONNX
runner, draw with these; ``hiervl.data.datasets.palettes`` gives them to custom datasets.
"""

import colorsys
from typing import List

__all__ = ["generated_palette"]

# Golden-ratio hue steps keep consecutive classes far apart on the colour wheel.
_GOLDEN_RATIO_CONJUGATE = 0.618033988749895
_SATURATION = 0.75
_VALUE = 0.95


def generated_palette(num_classes: int) -> List[List[int]]:
    """Deterministic distinct colours for any class list (custom datasets)."""
    palette = []
    for k in range(num_classes):
        hue = (k * _GOLDEN_RATIO_CONJUGATE) % 1.0
        r, g, b = colorsys.hsv_to_rgb(hue, _SATURATION, _VALUE)
        palette.append([round(r * 255), round(g * 255), round(b * 255)])
    return palette
