#!/usr/bin/env python
"""Train or evaluate HierVL.

    python train_net.py --config-file configs/coco/hiervl_232.yaml
    python train_net.py --config-file configs/coco/hiervl_232.yaml --num-gpus 8
    python train_net.py --config-file configs/coco/hiervl_232.yaml --resume
    python train_net.py --config-file configs/coco/hiervl_232.yaml --eval-only \
        MODEL.WEIGHTS output/coco/hiervl_232/model_final.pth

``--num-gpus N`` starts N processes per machine (NCCL on GPUs, Gloo on CPU);
``--num-machines``, ``--machine-rank`` and ``--dist-url`` span several machines.
"""

from detectron2.engine import default_argument_parser, launch

from hiervl.engine.launcher import main

if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
