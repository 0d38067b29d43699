"""What ``train_net.py`` runs in every process: config setup, then train or evaluate."""

import logging
import os
import sys

import torch
from detectron2.engine import default_setup, launch
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from hiervl.config_loader import load_config
from hiervl.data.datasets import register_all
from hiervl.data.datasets.custom import drop_absent_val, register_custom_from_cfg
from hiervl.engine.checkpoint import HierVLCheckpointer
from hiervl.engine.trainer import HierVLTrainer
from hiervl.model_builder import check_clip_weights

logger = logging.getLogger(__name__)


def setup_cfg(config_file: str, opts=None, *, args=None):
    """Build the frozen config (defaults → file → ``opts``, through the one config loader
    :func:`hiervl.config_loader.load_config`) and register the datasets."""
    cfg = load_config(config_file, opts)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logger.warning(
            "MODEL.DEVICE is %r but no GPU is visible: running on the CPU", cfg.MODEL.DEVICE
        )
        cfg.MODEL.DEVICE = "cpu"
    register_all()
    register_custom_from_cfg(cfg)
    no_val = drop_absent_val(cfg)
    cfg.freeze()
    if args is not None:
        # Before the log fills with the config: an offline PRETRAINED tag fails in one line.
        check_clip_weights(cfg)
        default_setup(cfg, args)
        # default_setup configures the "detectron2" and "fvcore" loggers only: without this
        # the project's own INFO messages (data streams, resume, skipped steps) are lost.
        setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="hiervl")
    if no_val:
        logger.info(no_val)
    return cfg


def share_cpu_threads() -> int:
    """Split the CPU cores between the processes of this machine; returns the threads used.

    Each CPU process would otherwise start one intra-op thread per core: with N processes
    per machine the cores are oversubscribed N times over and Gloo training slows down
    several-fold. ``OMP_NUM_THREADS``, when set, is left to rule.
    """
    local = comm.get_local_size()
    if local > 1 and "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        torch.set_num_threads(max(1, (cores or 1) // local))
    return torch.get_num_threads()


def main(args):
    """Entry point of one process (see ``train_net.py``)."""
    cfg = setup_cfg(args.config_file, args.opts, args=args)
    if cfg.MODEL.DEVICE == "cpu":
        share_cpu_threads()
    if args.eval_only:
        model = HierVLTrainer.build_model(cfg)
        checkpointer = HierVLCheckpointer(model, save_dir=cfg.OUTPUT_DIR)
        path, what = cfg.MODEL.WEIGHTS, "MODEL.WEIGHTS checkpoint"
        if args.resume and checkpointer.has_checkpoint():
            path, what = checkpointer.get_checkpoint_file(), "resume checkpoint"
        if not path:
            raise ValueError(
                "--eval-only needs the weights to evaluate: set MODEL.WEIGHTS to a checkpoint "
                f"file, or pass --resume with a checkpoint in OUTPUT_DIR ({cfg.OUTPUT_DIR!r})"
            )
        checkpointer.load(path, what=what)
        results = HierVLTrainer.test(cfg, model)
        comm.synchronize()
        return results
    trainer = HierVLTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def run(args) -> int:
    """``train_net.py``: check the config in this process first, then start the processes.

    A config mistake is then one line on stderr (exit status 1) before any worker starts.
    With one process, a user error raised later (``ValueError``: a checkpoint, an image,
    a dataset) and a non-finite loss also end with their one-line message, after the
    trainer's log.
    """
    try:
        load_config(args.config_file, args.opts)
        launch(
            main,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(args,),
        )
    except (ValueError, FloatingPointError) as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 1
    return 0
