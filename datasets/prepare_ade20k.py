"""Prepare ADE20K (ADEChallengeData2016): apply reduce_zero_label once, at prepare time.

    python datasets/prepare_ade20k.py [--root DATASETS_ROOT] [--workers N] [--overwrite]

Reads ``<root>/ADEChallengeData2016/annotations/{training,validation}/*.png`` (0 = other,
1..150) and writes ``annotations_detectron2/`` with 0 -> 255 (ignore) and k -> k-1, which
is what the registrations (and so the evaluator) read.
"""

import argparse
import logging
import os

from hiervl.data.datasets import ade20k, default_root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=None, help="default: $DETECTRON2_DATASETS or ./datasets")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--overwrite", action="store_true", help="rewrite existing labels")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    droot = ade20k.BENCHMARK.dataset_root(args.root or default_root())
    counts = ade20k.convert_annotations(droot, workers=args.workers, overwrite=args.overwrite)
    print(f"{counts['written']} labels written, {counts['kept']} kept -> "
          f"{os.path.join(droot, ade20k.LABEL_DIR)}")  # fmt: skip


if __name__ == "__main__":
    main()
