"""benchmarks/quickstart_seeds.py: finished seeds are reused (no training here) and the
table's gains, means and spreads are the hand-computed ones."""

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import quickstart_seeds  # noqa: E402  (benchmarks/ is not a package)


def _write_seed(root: Path, seed: int, semi: float, sup: float, machine=None) -> None:
    metrics = {
        "semi_supervised": {"mIoU": semi},
        "labeled_only": {"mIoU": sup},
        "majority_class": {"mIoU": 11.45},
        "seed": seed,
        "iterations": 800,
        "labeled_dataset": "synthetic_hard_train_labeled_8",
        "val_dataset": "synthetic_hard_val",
        "clip": {"pretrained_here": True, "reused": True, "seconds": 0.0},
        "seconds": 600.0,
    }
    if machine:
        metrics["machine"] = machine
    (root / f"seed{seed}").mkdir(parents=True)
    (root / f"seed{seed}" / "metrics.json").write_text(json.dumps(metrics))


def test_finished_seeds_are_reused_and_summarised(tmp_path, capsys):
    machine = {"torch": "9.9", "cpu_capability": "AVX2"}
    _write_seed(tmp_path, 0, semi=46.0, sup=40.0, machine=machine)
    _write_seed(tmp_path, 1, semi=50.0, sup=52.0)
    results = quickstart_seeds.main(["--seeds", "0", "1", "--output", str(tmp_path)])
    assert sorted(results) == [0, 1] and all(r["reused"] for r in results.values())
    out = capsys.readouterr().out
    assert "machine: torch 9.9, CPU kernels AVX2" in out
    assert "| 0 | 46.00 | 40.00 | +6.00 | 11.45 | 10.0 (earlier run) | reused |" in out
    assert "| 1 | 50.00 | 52.00 | -2.00 |" in out
    # Means 48 and 46; gains +6 and -2: mean +2, sample std sqrt(32) = 5.66.
    assert "| mean ± std | 48.00 ± 2.83 | 46.00 ± 8.49 | +2.00 ± 5.66 |" in out
    assert "semi-supervised ahead in 1 of 2 seeds; gain min -2.00, max +6.00, mean +2.00" in out
