"""The semi-supervised step: non-finite losses stop training naming the term, or skip the
step without touching the weights; bf16 autocast runs on the CPU."""

import pytest
import torch
from detectron2.engine import HookBase
from detectron2.utils.events import get_event_storage
from tiny_training import loss_history, run_training, tiny_cfg, unwrap, weights

import hiervl.modeling.objective as objective_module
from hiervl.engine.step import NonFiniteLossError

BAD_ITER = 1


@pytest.fixture
def nan_pt_loss(monkeypatch):
    """L_pt becomes NaN at iteration BAD_ITER (every other term stays finite)."""
    real = objective_module.pixel_text_alignment_loss

    def poisoned(*args, **kwargs):
        loss = real(*args, **kwargs)
        return loss * float("nan") if get_event_storage().iter == BAD_ITER else loss

    monkeypatch.setattr(objective_module, "pixel_text_alignment_loss", poisoned)


class _WeightsAround(HookBase):
    """Model weights before and after every step."""

    def __init__(self):
        self.before, self.after = {}, {}

    def before_step(self):
        self.before[self.trainer.iter] = weights(self.trainer.model)

    def after_step(self):
        self.after[self.trainer.iter] = weights(self.trainer.model)


def _changed(a, b):
    return [k for k in a if not torch.equal(a[k], b[k])]


def test_nonfinite_loss_stops_naming_the_term(tmp_path, nan_pt_loss):
    cfg = tiny_cfg(tmp_path, "SOLVER.MAX_ITER", 3, "SOLVER.NONFINITE_ACTION", "stop")
    with pytest.raises(NonFiniteLossError) as err:
        run_training(cfg)
    message = str(err.value)
    assert f"non-finite loss at iteration {BAD_ITER}: loss_vl_pt " in message
    assert "loss_vl_mask" not in message and "loss_sup_ce" not in message
    assert "NONFINITE_ACTION skip" in message


def test_nonfinite_loss_skips_the_step(tmp_path, nan_pt_loss):
    cfg = tiny_cfg(tmp_path, "SOLVER.MAX_ITER", 3, "SOLVER.NONFINITE_ACTION", "skip")
    snapshots = _WeightsAround()
    trainer, _ = run_training(cfg, hooks=[snapshots])

    assert trainer.iter == 3  # finished
    assert trainer._trainer.skipped_steps == 1
    assert trainer.storage.history("skipped_steps").latest() == 1
    assert _changed(snapshots.before[BAD_ITER], snapshots.after[BAD_ITER]) == []
    for it in (0, 2):  # the steps around it trained
        assert len(_changed(snapshots.before[it], snapshots.after[it])) > 10
    # No metrics of the skipped step, and AdamW's step count is 2 (not 3).
    assert sorted(loss_history(trainer)) == [0, 2]
    steps = {float(s["step"]) for s in trainer.optimizer.state_dict()["state"].values()}
    assert steps == {2.0}


@pytest.mark.slow
def test_bf16_autocast_step_on_cpu(tmp_path):
    cfg = tiny_cfg(
        tmp_path,
        "SOLVER.MAX_ITER", 1,
        "SOLVER.AMP.ENABLED", True,
        "SOLVER.AMP.PRECISION", "bfloat16",
        "SOLVER.IMS_PER_BATCH_LABELED", 1,
        "SOLVER.IMS_PER_BATCH_UNLABELED", 1,
    )  # fmt: skip
    dtypes = []

    class _Probe(HookBase):
        def before_train(self):
            head = unwrap(self.trainer.model).model.decoder.mask_head
            head.register_forward_hook(lambda m, i, out: dtypes.append(out[2].dtype))
            self.initial = weights(self.trainer.model)

    probe = _Probe()
    trainer, _ = run_training(cfg, hooks=[probe])
    assert trainer._trainer.amp_dtype == torch.bfloat16
    assert torch.bfloat16 in dtypes  # the forward ran under autocast
    losses = loss_history(trainer)
    assert list(losses) == [0] and torch.isfinite(torch.tensor(losses[0]))
    final = weights(trainer.model)
    assert all(v.dtype != torch.bfloat16 for v in final.values())  # fp32 master weights
    assert len(_changed(probe.initial, final)) > 10
