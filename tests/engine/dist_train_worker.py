"""Run by test_multiprocess.py: ``train_net.py``'s launch of the tiny config in N processes
(Gloo on CPU), each rank dumping what it ended with to ``--dump-dir/rank<r>.pth``.

    python tests/engine/dist_train_worker.py --num-gpus 2 --dist-url auto \
        --config-file configs/tiny/hiervl_tiny_16.yaml --dump-dir DIR [KEY VALUE ...]
"""

import os

import torch
from detectron2.engine import HookBase, default_argument_parser, launch
from detectron2.utils import comm
from tiny_training import run_training, unwrap, weights

from hiervl.engine.launcher import setup_cfg, share_cpu_threads


class _Initial(HookBase):
    def before_train(self):
        self.weights = weights(self.trainer.model)
        self.is_ddp = hasattr(self.trainer.model, "module")


def train_and_dump(args):
    # The same set-up as hiervl.engine.launcher.main, keeping the trainer for inspection.
    cfg = setup_cfg(args.config_file, args.opts, args=args)
    threads = share_cpu_threads()
    initial = _Initial()
    trainer, batches = run_training(cfg, hooks=[initial])
    dump = {
        "rank": comm.get_rank(),
        "world_size": comm.get_world_size(),
        "threads": threads,
        "is_ddp": initial.is_ddp,
        "initial": initial.weights,
        "final": weights(unwrap(trainer.model)),
        "batches": batches,
        "iterations": trainer.iter,
    }
    torch.save(dump, os.path.join(args.dump_dir, f"rank{comm.get_rank()}.pth"))


if __name__ == "__main__":
    parser = default_argument_parser()
    parser.add_argument("--dump-dir", required=True)
    args = parser.parse_args()
    launch(
        train_and_dump,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
