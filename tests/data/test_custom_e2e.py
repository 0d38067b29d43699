"""Your own data end to end, as GETTING_STARTED's "Your own data in five minutes" does it:
the built-in synthetic data laid out as a user's folders (labelled images + masks,
unlabelled bare JPEGs in two nested sub-folders, val), the dataset check, a few
semi-supervised iterations of the tiny model, evaluation, label maps saved with
``--save-masks`` and loaded back as the masks of a custom dataset."""

import json
import os
import runpy

import numpy as np
import pytest
import torch
from dataset_trees import write_user_tree
from detectron2.data import DatasetCatalog
from detectron2.utils.env import seed_all_rng

from hiervl.data import check
from hiervl.data.datasets import custom
from hiervl.data.datasets.synthetic import CLASSES
from hiervl.data.image_io import image_size, read_mask
from hiervl.engine.launcher import setup_cfg
from hiervl.engine.trainer import HierVLTrainer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, "configs", "custom", "hiervl_custom_tiny.yaml")
DEMO = os.path.join(REPO, "demo", "demo.py")


@pytest.fixture(autouse=True)
def one_torch_thread():
    # See tests/engine/conftest.py: tiny ops gain nothing from a second, shared core.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_own_folders_check_train_evaluate_and_pseudo_label(tmp_path, capsys):
    root = write_user_tree(str(tmp_path / "mine"), labeled=6, unlabeled=8, val=3, size=48)
    out = str(tmp_path / "out")
    opts = [
        "DATASETS.CUSTOM.ROOT", root,
        "DATASETS.CUSTOM.CLASSES_FILE", os.path.join(root, "classes.txt"),
        "OUTPUT_DIR", out,
        "SOLVER.MAX_ITER", 3,
        "SOLVER.IMS_PER_BATCH_LABELED", 2,
        "SOLVER.IMS_PER_BATCH_UNLABELED", 2,
        "INPUT.CROP.SIZE", "(48, 48)",
        "TEST.SLIDING_WINDOW.CROP_SIZE", 48,
        "MODEL.HIERVL.LOSS.TRAIN_NUM_POINTS", 256,
        "MODEL.HIERVL.DECODER.NUM_LAYERS", 2,
        # Every pseudo-label counts, so the consistency terms of 3 untrained steps are > 0.
        "MODEL.HIERVL.SSL.CONF_THRESHOLD", 0.0,
    ]  # fmt: skip
    opts = [str(o) for o in opts]

    # 1. The check: every part valid, the table and the picture.
    assert check.main(["--config-file", CONFIG, *opts]) == 0
    report = capsys.readouterr().out
    assert "unlabelled  custom_train_unlabeled       8" in report and "problems: none" in report
    assert os.path.isfile(os.path.join(out, "check.png"))

    # 2. Semi-supervised training: both streams, from both unlabelled sub-folders.
    cfg = setup_cfg(CONFIG, opts)
    seed_all_rng(cfg.SEED)
    trainer = HierVLTrainer(cfg)
    trainer.resume_or_load(resume=False)
    seen = []
    loader = trainer._trainer.data_loader

    def recording():
        for batch in loader:
            seen.extend(d["file_name"] for d in batch["unlabeled"] + batch["unlabeled_mix"])
            yield batch

    trainer._trainer.data_loader = recording()
    trainer._trainer._data_loader_iter_obj = None
    trainer.train()
    assert {os.path.basename(os.path.dirname(p)) for p in seen} == {"phone", "camera"}
    for term in ("loss_unsup_s1", "loss_unsup_s2", "loss_unsup_fp"):
        values = [v for v, _ in trainer.storage.history(term).values()]
        assert len(values) == 3 and all(v > 0 for v in values), (term, values)

    # 3. Evaluation on the val part (the final evaluation of training).
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)["custom_val"]["sem_seg"]
    assert 0.0 <= metrics["mIoU"] <= 100.0 and 0.0 <= metrics["pACC"] <= 100.0

    # 4. Label maps of the unlabelled folder, with the input's sizes and names.
    pseudo = str(tmp_path / "pseudo")
    demo_main = runpy.run_path(DEMO, run_name="demo_cli")["main"]
    unlabeled = os.path.join(root, "unlabeled", "images")
    argv = ["--config-file", CONFIG, "--input", unlabeled, "--save-masks", pseudo]
    argv += ["--save-overlays", "--confidence-threshold", "0.25"]
    argv += ["--opts", *opts, "MODEL.WEIGHTS", os.path.join(out, "model_final.pth")]
    assert demo_main(argv) == 0
    images = sorted(
        os.path.relpath(os.path.join(d, n), unlabeled)
        for d, _, names in os.walk(unlabeled)
        for n in names
    )
    for name in images:
        mask = read_mask(os.path.join(pseudo, os.path.splitext(name)[0] + ".png"))
        assert mask.dtype == np.uint8 and mask.shape == image_size(os.path.join(unlabeled, name))
        assert set(np.unique(mask).tolist()) <= set(range(len(CLASSES))) | {255}
        assert os.path.isfile(os.path.join(pseudo, os.path.splitext(name)[0] + "_overlay.jpg"))

    # 5. ... which load back, unconverted, as the masks of a custom dataset's labelled part.
    reviewed = setup_cfg(
        CONFIG,
        opts
        + [
            "DATASETS.CUSTOM.NAME", "reviewed",
            "DATASETS.CUSTOM.LABELED.IMAGES", unlabeled,
            "DATASETS.CUSTOM.LABELED.MASKS", pseudo,
        ],
    )  # fmt: skip
    spec = custom.spec_from_cfg(reviewed)
    records = DatasetCatalog.get("reviewed_train_labeled")
    assert spec.labeled.masks == pseudo and len(records) == len(images)
    assert all(r["sem_seg_file_name"].startswith(pseudo) for r in records)
