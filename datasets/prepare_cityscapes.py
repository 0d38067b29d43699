"""Prepare Cityscapes: create the ``*_gtFine_labelTrainIds.png`` files (19 classes).

    python datasets/prepare_cityscapes.py [--root DATASETS_ROOT] [--method auto] [--workers N]

Uses cityscapesscripts (``pip install cityscapesscripts``) to render trainIds from the
polygons when it is installed; otherwise (or with --method labelids) maps the shipped
``*_gtFine_labelIds.png`` through the official id -> trainId table.
"""

import argparse
import logging
import os

from hiervl.data.datasets import cityscapes, default_root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=None, help="default: $DETECTRON2_DATASETS or ./datasets")
    parser.add_argument(
        "--method", choices=["auto", "cityscapesscripts", "labelids"], default="auto"
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--overwrite", action="store_true", help="rewrite existing files")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    droot = cityscapes.BENCHMARK.dataset_root(args.root or default_root())
    counts = cityscapes.create_train_ids(
        droot, method=args.method, workers=args.workers, overwrite=args.overwrite
    )
    if counts["written"] < 0:
        print(f"cityscapesscripts wrote the trainId PNGs under {droot}/gtFine")
    else:
        print(
            f"{counts['written']} trainId PNGs written, {counts['kept']} kept under {droot}/gtFine"
        )


if __name__ == "__main__":
    main()
