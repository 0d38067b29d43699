"""NaN/Inf: diverged training stops naming the first non-finite quantity and the iteration,
or skips iterations without touching weights, optimizer or LR schedule.

Finding 4 of issue 10: with ``SOLVER.BASE_LR 1e6`` on the tiny config the matcher's assert
(``AssertionError: non-finite matching cost``) fired first, with ``stop`` and ``skip``
alike; the documented error naming the term never appeared.
"""

import pytest
import torch
from detectron2.engine import HookBase
from detectron2.utils.env import seed_all_rng
from robustness_helpers import TINY_CONFIG

from hiervl.checkpoint_io import check_plain, read_checkpoint
from hiervl.engine.launcher import setup_cfg
from hiervl.engine.step import NonFiniteGuard, NonFiniteLossError
from hiervl.engine.trainer import HierVLTrainer

# The tiny config at test sizes (as tests/engine/tiny_training.py), diverging at once.
OPTS = [
    "SOLVER.BASE_LR", 1e6,
    "SOLVER.IMS_PER_BATCH_LABELED", 1,
    "SOLVER.IMS_PER_BATCH_UNLABELED", 1,
    "TEST.EVAL_PERIOD", 0,
    "DATASETS.TEST", "()",
    "MODEL.HIERVL.LOSS.TRAIN_NUM_POINTS", 64,
    "MODEL.HIERVL.DECODER.NUM_LAYERS", 2,
    "INPUT.CROP.SIZE", "(64, 64)",
    "DATALOADER.NUM_WORKERS", 0,
]  # fmt: skip
PREDICTIONS = "aux_outputs[0].pred_logits, aux_outputs[0].pred_masks, aux_outputs[1].pred_logits"
DIVERGED = (
    f"{PREDICTIONS} and 3 more (the model's outputs, before any loss: the weights have "
    "probably diverged)"
)
ADVICE = (
    "Lower SOLVER.BASE_LR, enable SOLVER.CLIP_GRADIENTS, check the data, or set "
    "SOLVER.NONFINITE_ACTION skip."
)


class _Record(HookBase):
    """Per iteration: weights before/after, the LR used, the schedule's position."""

    def __init__(self):
        self.changed, self.lr, self.epoch = {}, {}, {}

    def before_step(self):
        self.before = [p.detach().clone() for p in self.trainer.model.parameters()]
        self.lr[self.trainer.iter] = self.trainer.optimizer.param_groups[0]["lr"]

    def after_step(self):
        after = list(self.trainer.model.parameters())
        self.changed[self.trainer.iter] = any(
            not torch.equal(a, b) for a, b in zip(self.before, after)
        )

    def after_train(self):
        self.epoch["end"] = self.trainer.scheduler.last_epoch


def _train(tmp_path, *opts):
    cfg = setup_cfg(str(TINY_CONFIG), [*OPTS, "OUTPUT_DIR", str(tmp_path), *opts])
    seed_all_rng(0)
    trainer = HierVLTrainer(cfg)
    record = _Record()
    trainer.register_hooks([record])
    trainer.resume_or_load(resume=False)
    return trainer, record


def test_finding4_diverged_weights_stop_naming_the_prediction(tmp_path, synthetic_root):
    trainer, record = _train(tmp_path, "SOLVER.MAX_ITER", 4)
    with pytest.raises(NonFiniteLossError) as err:  # not the matcher's AssertionError
        trainer.train()
    assert str(err.value) == f"non-finite prediction at iteration 1: {DIVERGED}. {ADVICE}"
    assert record.changed == {0: True}  # iteration 0 stepped (and diverged), 1 stopped


def test_skip_leaves_weights_optimizer_and_schedule_then_stops(tmp_path, synthetic_root):
    trainer, record = _train(
        tmp_path,
        "SOLVER.MAX_ITER", 6,
        "SOLVER.NONFINITE_ACTION", "skip",
        "SOLVER.NONFINITE_MAX_SKIPS", 2,
        "SOLVER.CHECKPOINT_PERIOD", 2,
    )  # fmt: skip
    with pytest.raises(NonFiniteLossError) as err:
        trainer.train()
    assert str(err.value) == (
        f"non-finite prediction at iteration 3: {DIVERGED}, after 2 skipped iterations in a "
        f"row since iteration 1 (SOLVER.NONFINITE_MAX_SKIPS 2). {ADVICE}"
    )
    # Iterations 1 and 2 were skipped: no weight moved, AdamW made one step (iteration 0),
    # and the LR schedule stayed at its first step (the LR of iteration 1 again at 2, 3).
    assert record.changed == {0: True, 1: False, 2: False}
    steps = {float(s["step"]) for s in trainer.optimizer.state_dict()["state"].values()}
    assert steps == {1.0}
    assert record.lr[1] == record.lr[2] == record.lr[3] != record.lr[0]
    assert trainer.scheduler.last_epoch == 1
    assert trainer._trainer.skipped_steps == 2
    # The checkpoint written at iteration 1 (a skipped one) is plain data: it round-trips
    # through the one reader, skip counters included.
    saved = read_checkpoint(str(tmp_path / "model_0000001.pth"))
    check_plain(saved)
    assert saved["trainer"]["_trainer"]["nonfinite"] == {
        "skipped": 1, "consecutive": 1, "first": 1
    }  # fmt: skip
    assert saved["trainer"]["hooks"]["LRScheduler"]["last_epoch"] == 1


def test_guard_counts_runs_of_skips():
    guard = NonFiniteGuard(action="skip", max_skips=2)
    assert NonFiniteGuard.agree(["pred_masks"]) == ["pred_masks"]  # one process
    from detectron2.utils.events import EventStorage

    with EventStorage(0):
        guard.nonfinite(3, "non-finite loss at iteration 3: loss_a")
        guard.nonfinite(4, "non-finite loss at iteration 4: loss_a")
        guard.finite()  # a finite iteration ends the run
        guard.nonfinite(6, "non-finite loss at iteration 6: loss_b")
        guard.nonfinite(7, "non-finite loss at iteration 7: loss_b")
        with pytest.raises(NonFiniteLossError, match="since iteration 6 "):
            guard.nonfinite(8, "non-finite loss at iteration 8: loss_b")
    assert guard.skipped == 4
    with pytest.raises(NonFiniteLossError, match="^non-finite loss at iteration 0: x. Lower"):
        NonFiniteGuard(action="stop", max_skips=10).nonfinite(
            0, "non-finite loss at iteration 0: x"
        )
    with pytest.raises(ValueError, match="SOLVER.NONFINITE_MAX_SKIPS must be an int >= 0, got -1"):
        NonFiniteGuard(action="skip", max_skips=-1)
    with pytest.raises(ValueError, match="SOLVER.NONFINITE_ACTION must be 'stop' or 'skip'"):
        NonFiniteGuard(action="ignore", max_skips=1)


def test_skip_with_micro_batches_drops_the_whole_iteration(tmp_path, synthetic_root):
    """Gradient accumulation (SOLVER.MICRO_BATCHES 2): a non-finite micro-batch skips the
    iteration with nothing of its earlier micro-batches applied."""
    trainer, record = _train(
        tmp_path,
        "SOLVER.MAX_ITER", 4,
        "SOLVER.MICRO_BATCHES", 2,
        "SOLVER.IMS_PER_BATCH_LABELED", 2,
        "SOLVER.IMS_PER_BATCH_UNLABELED", 2,
        "SOLVER.NONFINITE_ACTION", "skip",
        "SOLVER.NONFINITE_MAX_SKIPS", 1,
    )  # fmt: skip
    with pytest.raises(NonFiniteLossError) as err:
        trainer.train()
    assert str(err.value).startswith(f"non-finite prediction at iteration 2: {PREDICTIONS}")
    assert "after 1 skipped iterations in a row since iteration 1" in str(err.value)
    assert record.changed == {0: True, 1: False}
    assert all(p.grad is None or not p.grad.abs().sum() for p in trainer.model.parameters())
    assert trainer.scheduler.last_epoch == 1
