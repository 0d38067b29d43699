"""Semi-supervised training of the tiny model learns (issue 4): on the built-in data, with
every loss term on (labelled + unlabelled streams, consistency, entropy, MaskCLIP and the
vision-language terms), the total loss falls and the trained model beats both the untrained
one's mIoU on the held-out validation images and the majority-class baseline (measured:
loss 20.6 -> 9.3 over the first/last 15 iterations; mIoU 2.2 untrained, 13.8 majority,
24.9 trained; 23.2 with the other attention evaluation order of the tiny decoder)."""

import statistics

import pytest
from tiny_training import build_trainer, loss_history, tiny_cfg

from hiervl.engine.trainer import HierVLTrainer
from hiervl.quickstart import majority_baseline

pytestmark = pytest.mark.slow

# 400 iterations ended at 16.4-20.7 mIoU depending on float rounding alone (two exact
# attention evaluation orders): too close to the majority-class bar; 600 end at 23-25.
ITERATIONS = 600


def test_semi_supervised_training_lowers_the_loss_and_beats_the_untrained_model(tmp_path):
    cfg = tiny_cfg(
        tmp_path,
        "SOLVER.MAX_ITER", ITERATIONS,
        "SOLVER.CHECKPOINT_PERIOD", 10 * ITERATIONS,
        "DATASETS.TEST", "('synthetic_val',)",
        "MODEL.HIERVL.SSL.ENTROPY_ENABLED", True,  # every term on (off by default)
    )  # fmt: skip
    trainer = build_trainer(cfg)
    untrained = HierVLTrainer.test(cfg, trainer.model)["sem_seg"]["mIoU"]
    trainer.train()
    trained = HierVLTrainer.test(cfg, trainer.model)["sem_seg"]["mIoU"]

    terms = {k for k in trainer.storage.histories() if k.startswith("loss_")}
    assert {"loss_unsup_s1", "loss_unsup_s2", "loss_unsup_fp", "loss_unsup_entropy"} <= terms
    assert {"loss_vl_prompt", "loss_vl_mask", "loss_vl_pt"} <= terms
    history = loss_history(trainer)
    losses = [history[i] for i in sorted(history)]
    assert len(losses) == ITERATIONS
    first, last = statistics.mean(losses[:15]), statistics.mean(losses[-15:])
    assert last < 0.75 * first, (first, last)
    assert trained > untrained + 5.0, (untrained, trained)
    labeled, val = cfg.DATASETS.TRAIN_LABELED[0], cfg.DATASETS.TEST[0]
    majority = majority_baseline(labeled, val, num_classes=6)["mIoU"]
    assert trained > majority + 3.0, (majority, trained)
