"""Dataset registrations: the four benchmarks, their semi-supervised splits, the synthetic
dataset, and custom folders.

Nothing is registered at import. ``register_all(root)`` is the one explicit call (the
launcher makes it); custom folders are registered from the config by
:func:`hiervl.data.datasets.custom.register_custom_from_cfg`.

Names (n = the labelled-image counts of DESIGN.md §4)::

    voc_train_aug  voc_val  voc_train_labeled_<n>  voc_train_unlabeled_<n>
    coco_train  coco_val  coco_train_{labeled,unlabeled}_<n>
    ade20k_train  ade20k_val  ade20k_train_{labeled,unlabeled}_<n>
    cityscapes_train  cityscapes_val  cityscapes_train_{labeled,unlabeled}_<n>
    synthetic_*  (see synthetic.py)
    <DATASETS.CUSTOM.NAME>_{train_labeled,train_unlabeled,val,train}  (custom.py; "custom_*"
        in configs/custom/)

Metadata of every part: ``stuff_classes``, ``stuff_colors`` (RGB, palettes.py),
``ignore_label`` (255), ``evaluator_type`` ("sem_seg"), ``dataset_root``, ``image_root``,
``sem_seg_root``; split parts add ``split_dir`` and ``labeled_count``.
"""

import os
from typing import Dict, List, Optional

from hiervl.data.datasets import ade20k, cityscapes, coco, voc
from hiervl.data.datasets.common import (
    Benchmark,
    DatasetNotFoundError,
    default_root,
    register_benchmark,
)
from hiervl.data.datasets.synthetic import register_synthetic

BENCHMARKS: Dict[str, Benchmark] = {
    b.key: b for b in (voc.BENCHMARK, coco.BENCHMARK, ade20k.BENCHMARK, cityscapes.BENCHMARK)
}

__all__ = ["BENCHMARKS", "Benchmark", "DatasetNotFoundError", "default_root", "register_all"]


def register_all(root: Optional[str] = None) -> List[str]:
    """Register every built-in dataset under ``root`` (default ``$DETECTRON2_DATASETS`` or
    ``./datasets``); returns the names. No file is read or written until a dataset is
    loaded. Calling it again (with the same or another root) replaces the registrations."""
    root = os.path.expanduser(root) if root else default_root()
    names: List[str] = []
    for bench in BENCHMARKS.values():
        names += register_benchmark(bench, root)
    names += register_synthetic(root)
    return names
