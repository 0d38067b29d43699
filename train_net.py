#!/usr/bin/env python
"""Train or evaluate HierVL.

    python train_net.py --config-file configs/coco/hiervl_232.yaml
    python train_net.py --config-file configs/coco/hiervl_232.yaml --num-gpus 8
    python train_net.py --config-file configs/coco/hiervl_232.yaml --resume
    python train_net.py --config-file configs/coco/hiervl_232.yaml --eval-only \
        MODEL.WEIGHTS output/coco/hiervl_232/model_final.pth

``--num-gpus N`` starts N processes per machine (NCCL on GPUs, Gloo on CPU);
``--num-machines``, ``--machine-rank`` and ``--dist-url`` span several machines.
``--check-data`` checks the datasets of the config instead of training (the same check
as ``python -m hiervl.data.check``; it writes ``OUTPUT_DIR/check.png``).
Exit status 1 (and a one-line ``ERROR: ...``) for a bad config, checkpoint or input.
"""

import sys

from detectron2.engine import default_argument_parser

from hiervl.data.check import check_and_report
from hiervl.engine.launcher import run

if __name__ == "__main__":
    parser = default_argument_parser()
    parser.add_argument(
        "--check-data",
        action="store_true",
        help="validate the config's datasets, print a summary, write check.png, and exit",
    )
    args = parser.parse_args()
    if args.check_data:
        sys.exit(check_and_report(args.config_file, args.opts, output=None))
    sys.exit(run(args))
