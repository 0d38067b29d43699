"""Two processes on the CPU (Gloo, detectron2 ``launch`` as in ``train_net.py --num-gpus 2``):
the ranks see disjoint data and end with identical weights, with every loss term on and
in supervised-only training (where some parameters get no gradient)."""

import os
import subprocess
import sys

import pytest
import torch
from tiny_training import FAST_OPTS, REPO, TINY_CONFIG

WORKER = os.path.join(os.path.dirname(__file__), "dist_train_worker.py")
ITERS = 3
SUPERVISED_ONLY = [
    "MODEL.HIERVL.SSL.ENABLED", False,
    "MODEL.HIERVL.VL.PROMPT_ENABLED", False,
    "MODEL.HIERVL.VL.MASK_ENABLED", False,
    "MODEL.HIERVL.VL.PT_ENABLED", False,
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["semi", "supervised"])
def test_two_process_gloo_training_keeps_ranks_identical(tmp_path, synthetic_root, mode):
    opts = [*FAST_OPTS, "SOLVER.MAX_ITER", ITERS, "OUTPUT_DIR", tmp_path / "out"]
    opts += SUPERVISED_ONLY if mode == "supervised" else []
    command = [
        sys.executable, WORKER,
        "--num-gpus", "2",
        "--dist-url", "auto",
        "--config-file", TINY_CONFIG,
        "--dump-dir", str(tmp_path),
        *[str(o) for o in opts],
    ]  # fmt: skip
    env = dict(os.environ, DETECTRON2_DATASETS=synthetic_root, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    ranks = [torch.load(tmp_path / f"rank{r}.pth", map_location="cpu") for r in (0, 1)]
    for r, dump in enumerate(ranks):
        assert (dump["rank"], dump["world_size"], dump["is_ddp"]) == (r, 2, True)
        assert dump["iterations"] == ITERS
        if "OMP_NUM_THREADS" not in os.environ:  # the cores are split between the ranks
            cores = len(os.sched_getaffinity(0))
            assert dump["threads"] == max(1, cores // 2)

    # Each rank trained on its own half of every global batch (2 + 2 images)...
    for b0, b1 in zip(ranks[0]["batches"], ranks[1]["batches"]):
        assert b0["iteration"] == b1["iteration"]
        assert len(b0["labeled"]) == len(b1["labeled"]) == 1
        assert b0["labeled"] != b1["labeled"]
        if mode == "semi":
            assert len(b0["unlabeled"]) == len(b1["unlabeled"]) == 1
            assert b0["unlabeled"] != b1["unlabeled"]
        else:
            assert b0["unlabeled"] == b1["unlabeled"] == []
    # ...and the all-reduced gradients kept the weights identical, and moving.
    final0, final1 = ranks[0]["final"], ranks[1]["final"]
    assert final0.keys() == final1.keys()
    for key in final0:
        assert torch.equal(final0[key], final1[key]), key
    moved = [k for k in final0 if not torch.equal(final0[k], ranks[0]["initial"][k])]
    assert any(k.startswith("model.decoder.") for k in moved)
    assert any(k.startswith("model.backbone.visual.") for k in moved)
    assert (tmp_path / "out" / "model_final.pth").is_file()  # rank 0 saved it
