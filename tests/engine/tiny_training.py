"""Shared helpers of the engine tests: the tiny config at test sizes, an in-process
training run that can be stopped part-way, and recorders of what the trainer saw."""

from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from detectron2.engine import HookBase
from detectron2.utils.env import seed_all_rng

from hiervl.engine.launcher import setup_cfg
from hiervl.engine.trainer import HierVLTrainer

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIG = str(REPO / "configs" / "tiny" / "hiervl_tiny_16.yaml")

# The tiny config at sizes where one semi-supervised iteration takes a fraction of a
# second on 2 CPU cores; every loss term stays on.
FAST_OPTS = [
    "SOLVER.IMS_PER_BATCH_LABELED", 2,
    "SOLVER.IMS_PER_BATCH_UNLABELED", 2,
    "TEST.EVAL_PERIOD", 0,
    "DATASETS.TEST", "()",
    "MODEL.HIERVL.LOSS.TRAIN_NUM_POINTS", 256,
    "MODEL.HIERVL.DECODER.NUM_LAYERS", 2,
    "INPUT.CROP.SIZE", "(64, 64)",
    "DATALOADER.NUM_WORKERS", 0,
]  # fmt: skip


def tiny_cfg(output_dir, *opts):
    """The frozen tiny config with FAST_OPTS, ``OUTPUT_DIR`` and the extra ``opts``."""
    return setup_cfg(TINY_CONFIG, [*FAST_OPTS, "OUTPUT_DIR", str(output_dir), *opts])


class StopTraining(Exception):
    """Raised by :class:`_StopAfter` to end a run part-way (like a killed job)."""


class _StopAfter(HookBase):
    def __init__(self, iteration: int):
        self.iteration = iteration

    def after_step(self):
        if self.trainer.iter == self.iteration:
            raise StopTraining(f"stopped after iteration {self.iteration}")


class _RecordingLoader:
    """Wraps the trainer's data loader and records each batch's iteration and images."""

    def __init__(self, loader, log: List[Dict[str, object]]):
        self.loader = loader
        self.log = log

    def __iter__(self):
        for batch in self.loader:
            self.log.append(
                {
                    "iteration": batch["iteration"],
                    "labeled": [d["file_name"] for d in batch["labeled"]],
                    "unlabeled": [d["file_name"] for d in batch["unlabeled"]],
                }
            )
            yield batch


def build_trainer(cfg, *, resume: bool = False, hooks: Sequence[HookBase] = ()):
    """What ``launcher.main`` does before ``train()``: seeded model init, then resume/load."""
    seed_all_rng(cfg.SEED)
    trainer = HierVLTrainer(cfg)
    trainer.register_hooks(list(hooks))
    trainer.resume_or_load(resume=resume)
    return trainer


def run_training(
    cfg,
    *,
    resume: bool = False,
    stop_after: Optional[int] = None,
    hooks: Sequence[HookBase] = (),
):
    """Train in this process; returns ``(trainer, batches)``.

    ``stop_after``: raise after that iteration's hooks ran (its checkpoint, if any, is
    written), as if the job had been killed. ``batches``: what the data loader delivered.
    """
    extra = list(hooks) + ([_StopAfter(stop_after)] if stop_after is not None else [])
    trainer = build_trainer(cfg, resume=resume, hooks=extra)
    batches: List[Dict[str, object]] = []
    step = trainer._trainer
    step.data_loader = _RecordingLoader(step.data_loader, batches)
    step._data_loader_iter_obj = None
    try:
        trainer.train()
    except StopTraining:
        assert stop_after is not None
    return trainer, batches


def loss_history(trainer, key: str = "total_loss") -> Dict[int, float]:
    """{iteration: value} of a logged scalar (the raw values, not the smoothed ones)."""
    return {it: value for value, it in trainer.storage.history(key).values()}


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def weights(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """A detached copy of the model's state_dict."""
    return {k: v.detach().clone() for k, v in unwrap(model).state_dict().items()}
