"""Prepare COCO 2017 for 81-class semantic segmentation: instance annotations -> class masks.

    python datasets/prepare_coco.py [--root DATASETS_ROOT] [--workers N] [--overwrite]

Reads ``<root>/coco/annotations/instances_{train,val}2017.json`` and writes
``<root>/coco/masks/<image id>.png`` (0 = background, 1..80 = things in category-id order;
smaller instances win overlaps — see hiervl/data/datasets/coco.py). Multi-process with a
progress bar; existing masks are kept unless --overwrite (so an interrupted run resumes).
"""

import argparse
import logging
import os

from hiervl.data.datasets import coco, default_root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=None, help="default: $DETECTRON2_DATASETS or ./datasets")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--parts", nargs="+", choices=sorted(coco.ANNOTATION_FILES),
                        default=["train", "val"])  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="rewrite existing masks")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    droot = coco.BENCHMARK.dataset_root(args.root or default_root())
    out_dir = os.path.join(droot, coco.MASK_DIR)
    for part in args.parts:
        counts = coco.convert_instances(
            os.path.join(droot, coco.ANNOTATION_FILES[part]), out_dir,
            workers=args.workers, overwrite=args.overwrite,
        )  # fmt: skip
        print(f"{part}: {counts['written']} masks written, {counts['kept']} kept -> {out_dir}")


if __name__ == "__main__":
    main()
