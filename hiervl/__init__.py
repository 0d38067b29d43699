"""HierVL: semi-supervised semantic segmentation with CLIP text queries.

Importing ``hiervl`` is cheap and never fails because of a missing compiled op;
detectron2-dependent pieces (config, meta-architecture, trainer) are imported
from their own modules.
"""

__version__ = "0.1.0"
