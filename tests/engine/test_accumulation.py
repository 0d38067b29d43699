"""Gradient accumulation (SOLVER.MICRO_BATCHES): one optimizer step per batch, and for
loss terms that do not depend on how the batch is cut (means over images, batch-free
terms) the very gradient of the whole batch."""

import pytest
import torch
from detectron2.utils.events import EventStorage
from tiny_training import run_training, tiny_cfg

from hiervl.engine.step import SemiSupervisedStep


class _PerImageModel(torch.nn.Module):
    """Losses of the three kinds the objective has, on a named batch of (3,) vectors."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(3, generator=gen, dtype=torch.float64))
        self.v = torch.nn.Parameter(torch.randn(3, generator=gen, dtype=torch.float64))

    def forward(self, data):
        def stack(key):
            return torch.stack([d["x"] for d in data[key]])

        lab, unl, mix = stack("labeled"), stack("unlabeled"), stack("unlabeled_mix")
        return {
            # a mean over images (most terms: per-pixel losses of same-size crops)
            "loss_sup_mean": ((lab @ self.w) ** 2).mean(),
            "loss_unsup_mean": torch.tanh(unl @ self.w + mix @ self.v).mean(),
            # independent of the images (L_prompt)
            "loss_vl_prompt": (self.w**2).sum() + self.v.abs().sum(),
        }


def _batch(labeled=4, unlabeled=4):
    gen = torch.Generator().manual_seed(1)

    def items(n):
        return [{"x": torch.randn(3, generator=gen, dtype=torch.float64)} for _ in range(n)]

    return {"labeled": items(labeled), "unlabeled": items(unlabeled),
            "unlabeled_mix": items(unlabeled)}  # fmt: skip


def _step(micro_batches, batch=None):
    model = _PerImageModel()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    loader = [batch or _batch()] * 2
    step = SemiSupervisedStep(
        model, loader, optimizer, max_iter=2, seed=0, micro_batches=micro_batches
    )
    with EventStorage(0) as storage:
        step.run_step()
        values = {k: storage.history(k).latest() for k in ("loss_sup_mean", "total_loss")}
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    params = {k: p.detach().clone() for k, p in model.named_parameters()}
    return grads, params, values, optimizer


@pytest.mark.parametrize("micro_batches", [2, 4])
def test_accumulated_step_equals_the_whole_batch(micro_batches):
    grads, params, values, _ = _step(1)
    grads_n, params_n, values_n, optimizer = _step(micro_batches)
    for name in grads:
        torch.testing.assert_close(grads_n[name], grads[name], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(params_n[name], params[name], rtol=1e-12, atol=1e-12)
    for key in values:  # logged losses are the whole batch's, not the last part's
        assert values_n[key] == pytest.approx(values[key], rel=1e-12)
    assert {float(s["step"]) for s in optimizer.state_dict()["state"].values()} == {1.0}


def test_micro_batches_must_divide_every_stream():
    with pytest.raises(ValueError, match=r"SOLVER.MICRO_BATCHES=2 does not divide the 3 "):
        _step(2, batch=_batch(labeled=4, unlabeled=3))
    with pytest.raises(ValueError, match="SOLVER.MICRO_BATCHES must be an int >= 1"):
        _step(0)


def test_tiny_training_with_two_micro_batches(tmp_path):
    cfg = tiny_cfg(tmp_path, "SOLVER.MAX_ITER", 1, "SOLVER.MICRO_BATCHES", 2)
    trainer, _ = run_training(cfg)
    assert trainer._trainer.micro_batches == 2
    steps = {float(s["step"]) for s in trainer.optimizer.state_dict()["state"].values()}
    assert steps == {1.0}
    history = trainer.storage.histories()
    assert any(k.startswith("loss_unsup_") for k in history)
    assert all(torch.isfinite(torch.tensor(h.latest())) for h in history.values())
