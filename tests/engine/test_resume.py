"""``--resume``: N iterations straight == N/2, a stop (like a killed job), then resume to N.

Same final weights and the same logged losses at the resumed iterations, because the
checkpoint restores the iteration, the optimizer, the LR schedule, and the data stream
restarts at the resumed iteration (per-iteration seeding covers the model's own RNG).
"""

import copy
import os

import pytest
import torch
from detectron2.engine import HookBase
from tiny_training import loss_history, run_training, tiny_cfg, weights

N = 6
OPTS = ("SOLVER.MAX_ITER", N, "SOLVER.CHECKPOINT_PERIOD", N // 2)


class _Snapshots(HookBase):
    """Learning rates before every step; optimizer state and start iteration at train start."""

    def __init__(self):
        self.lrs = {}
        self.start = None

    def before_train(self):
        self.start = {
            "iter": self.trainer.iter,
            "optimizer": copy.deepcopy(self.trainer.optimizer.state_dict()),
            "scheduler_epoch": self.trainer.scheduler.last_epoch,
        }

    def before_step(self):
        self.lrs[self.trainer.iter] = [g["lr"] for g in self.trainer.optimizer.param_groups]


def _assert_same_optimizer_state(a, b):
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for key, state in a["state"].items():
        for name, value in state.items():
            torch.testing.assert_close(value, b["state"][key][name], rtol=0, atol=0)


@pytest.mark.slow
def test_resume_reproduces_straight_run(tmp_path):
    straight_snap, resumed_snap = _Snapshots(), _Snapshots()
    straight, straight_batches = run_training(
        tiny_cfg(tmp_path / "straight", *OPTS), hooks=[straight_snap]
    )

    cfg = tiny_cfg(tmp_path / "resumed", *OPTS)
    stopped, _ = run_training(cfg, stop_after=N // 2 - 1)
    out = tmp_path / "resumed"
    assert (out / "last_checkpoint").read_text() == f"model_{N // 2 - 1:07d}.pth"
    resumed, resumed_batches = run_training(cfg, resume=True, hooks=[resumed_snap])

    # Iteration, optimizer, schedule and data order are those of the interrupted run.
    assert resumed.start_iter == N // 2
    assert resumed_snap.start["iter"] == N // 2
    assert resumed_snap.start["scheduler_epoch"] == N // 2
    _assert_same_optimizer_state(resumed_snap.start["optimizer"], stopped.optimizer.state_dict())
    for it in range(N // 2, N):
        assert resumed_snap.lrs[it] == pytest.approx(straight_snap.lrs[it], rel=1e-12)
    assert [b["iteration"] for b in resumed_batches] == list(range(N // 2, N))
    assert resumed_batches == straight_batches[N // 2 :]

    # Same losses (every term) at the resumed iterations, same final weights.
    terms = [k for k in straight.storage.histories() if k.startswith(("loss_", "total_loss"))]
    assert "loss_unsup_s1" in terms and "loss_vl_pt" in terms
    for key in terms:
        expected = loss_history(straight, key)
        got = loss_history(resumed, key)
        assert sorted(got) == list(range(N // 2, N)), key
        for it, value in got.items():
            assert value == pytest.approx(expected[it], rel=1e-5, abs=1e-6), (key, it)
    final_straight, final_resumed = weights(straight.model), weights(resumed.model)
    assert final_straight.keys() == final_resumed.keys()
    for key, value in final_straight.items():
        torch.testing.assert_close(final_resumed[key], value, rtol=1e-5, atol=1e-6, msg=key)
    # The run did train: the interrupted run's weights differ from the final ones.
    changed = [k for k, v in weights(stopped.model).items() if not torch.equal(v, final_resumed[k])]
    assert any(k.startswith("model.decoder.") for k in changed)
    assert not [f for f in os.listdir(out) if f.startswith(".tmp-")]
