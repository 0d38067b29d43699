"""What ``train_net.py`` runs in every process: config setup, then train or evaluate."""

import logging

import torch
from detectron2.config import get_cfg
from detectron2.engine import default_setup
from detectron2.utils import comm

from hiervl.config import add_hiervl_config
from hiervl.data.datasets import register_all
from hiervl.data.datasets.custom import register_custom_from_cfg
from hiervl.engine.checkpoint import HierVLCheckpointer
from hiervl.engine.trainer import HierVLTrainer

logger = logging.getLogger(__name__)


def setup_cfg(config_file: str, opts=None, *, args=None):
    """Build the frozen config (defaults → file → ``opts``) and register the datasets."""
    cfg = add_hiervl_config(get_cfg())
    if config_file:
        cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts or []))
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logger.warning(
            "MODEL.DEVICE is %r but no GPU is visible: running on the CPU", cfg.MODEL.DEVICE
        )
        cfg.MODEL.DEVICE = "cpu"
    register_all()
    register_custom_from_cfg(cfg)
    cfg.freeze()
    if args is not None:
        default_setup(cfg, args)
    return cfg


def main(args):
    """Entry point of one process (see ``train_net.py``)."""
    cfg = setup_cfg(args.config_file, args.opts, args=args)
    if args.eval_only:
        model = HierVLTrainer.build_model(cfg)
        HierVLCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        results = HierVLTrainer.test(cfg, model)
        comm.synchronize()
        return results
    trainer = HierVLTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()
