"""The silent-consistency warning: when it fires, what it says, when it resets, and that
the trainer registers it (before the writers) only where the loss can be silent."""

import logging
from types import SimpleNamespace

import pytest
from detectron2.engine import hooks
from detectron2.utils.events import EventStorage
from tiny_training import tiny_cfg

from hiervl.engine.hooks import SilentConsistencyWarning
from hiervl.engine.trainer import silent_consistency_hook

LOGGER = "hiervl.engine.hooks"


def _run(fractions, *, patience, caplog):
    """Feed the hook one confident fraction per iteration (None = no unlabelled batch)."""
    hook = SilentConsistencyWarning(conf_threshold=0.8, patience=patience)
    objective = SimpleNamespace(confident_fraction=None)
    hook.trainer = SimpleNamespace(iter=0, model=SimpleNamespace(objective=objective))
    with EventStorage() as storage, caplog.at_level(logging.INFO, logger=LOGGER):
        hook.trainer.storage = storage
        for iteration, fraction in enumerate(fractions):
            hook.trainer.iter = iteration
            storage.iter = iteration
            objective.confident_fraction = fraction
            hook.after_step()
        hook.after_train()
        key = "unsup_confident_fraction"
        logged = storage.history(key).values() if key in storage.histories() else []
    return [(r.levelname, r.getMessage()) for r in caplog.records if r.name == LOGGER], logged


def test_warns_once_per_silent_stretch_and_says_since_when(caplog):
    fractions = [0.2, 0.0, 0.0, 0.0, 0.0, 0.0, 0.1, 0.0, 0.0]
    records, logged = _run(fractions, patience=3, caplog=caplog)
    assert [v for v, _ in logged] == fractions  # logged every iteration
    assert records == [
        (
            "WARNING",
            "loss_unsup_*: no pixel above SSL.CONF_THRESHOLD=0.8 for the last 3 iterations "
            "(since iteration 1): the unlabelled images do not contribute; lower the "
            "threshold or train longer",
        ),
        ("INFO", "loss_unsup_*: 10.00% of the pixels pass SSL.CONF_THRESHOLD=0.8 again at "
                 "iteration 6"),
        # The second stretch (iterations 7-8) is shorter than the patience: no warning,
        # but the summary counts every silent iteration.
        ("WARNING", "loss_unsup_*: no pixel passed SSL.CONF_THRESHOLD=0.8 in 7 of 9 "
                    "iterations (78%): the consistency loss was 0 there"),
    ]  # fmt: skip


def test_quiet_when_pseudo_labels_pass_or_there_is_no_unlabelled_stream(caplog):
    records, logged = _run([0.5, 0.0, 0.3, 0.0, 0.4, 1.0], patience=2, caplog=caplog)
    assert records == [] and len(logged) == 6
    records, logged = _run([None] * 5, patience=1, caplog=caplog)
    assert records == [] and len(logged) == 0


def test_trainer_registers_it_before_the_writers(tmp_path):
    cfg = tiny_cfg(tmp_path, "SOLVER.MAX_ITER", 50)
    hook = silent_consistency_hook(cfg)
    assert hook.patience == 5 and hook.conf_threshold == cfg.MODEL.HIERVL.SSL.CONF_THRESHOLD
    hook = silent_consistency_hook(tiny_cfg(tmp_path, "MODEL.HIERVL.SSL.SILENT_WARNING_ITERS", 7))
    assert hook.patience == 7
    assert silent_consistency_hook(tiny_cfg(tmp_path, "MODEL.HIERVL.SSL.ENABLED", False)) is None
    pixelavg = tiny_cfg(tmp_path, "MODEL.HIERVL.SSL.CONSISTENCY_MODE", "pixelavg")
    assert silent_consistency_hook(pixelavg) is None
    with pytest.raises(ValueError, match="SSL.SILENT_WARNING_ITERS must be >= 0"):
        silent_consistency_hook(tiny_cfg(tmp_path, "MODEL.HIERVL.SSL.SILENT_WARNING_ITERS", -1))

    from hiervl.engine.trainer import HierVLTrainer

    trainer = HierVLTrainer(cfg)
    kinds = [type(h) for h in trainer._hooks]
    assert SilentConsistencyWarning in kinds
    assert kinds.index(SilentConsistencyWarning) < kinds.index(hooks.PeriodicWriter)
