"""Prepare Pascal VOC 2012 (train_aug): check the tree and write the train_aug list.

    python datasets/prepare_voc.py [--root DATASETS_ROOT]

Expects ``<root>/VOCdevkit/VOC2012/{JPEGImages, SegmentationClassAug (or SegmentationClass),
ImageSets/Segmentation/val.txt}`` and writes ``ImageSets/Segmentation/train_aug.txt``
(every labelled image not in val: 10,582 with SegmentationClassAug). See datasets/README.md.
"""

import argparse
import logging

from hiervl.data.datasets import default_root, voc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=None, help="default: $DETECTRON2_DATASETS or ./datasets")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    droot = voc.BENCHMARK.dataset_root(args.root or default_root())
    path, count = voc.write_train_aug_list(droot)
    print(f"wrote {path}: {count} train_aug images (standard: {voc.TRAIN_AUG_SIZE})")


if __name__ == "__main__":
    main()
