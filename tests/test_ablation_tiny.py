"""benchmarks/ablation_tiny.py: every row's overrides are valid keys of the quickstart config,
and a table of finished runs is reused and summarised by hand-checkable numbers (the
training runs themselves are a benchmark, outside CI)."""

import json
import os
import sys
from pathlib import Path

import pytest

from hiervl.config_loader import load_config

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import ablation_tiny  # noqa: E402  (benchmarks/ is not a package)


@pytest.mark.parametrize("row", sorted(ablation_tiny.ROWS))
def test_each_row_overrides_existing_keys_to_other_values(row):
    base = load_config(ablation_tiny.DEFAULT_CONFIG, [])
    opts = ablation_tiny.ROWS[row]
    cfg = load_config(ablation_tiny.DEFAULT_CONFIG, opts)  # unknown keys / types raise
    for key in opts[0::2]:
        node_base, node = base, cfg
        for part in key.split("."):
            node_base, node = node_base[part], node[part]
        # An ablation that changes nothing would print a row identical to "full".
        assert node != node_base or row == "full", (row, key, node)


def _finish(run_dir, miou):
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.json").write_text(json.dumps({"val": {"sem_seg": {"mIoU": miou}}}))


def test_finished_runs_are_reused_and_tabulated(tmp_path, capsys):
    values = {"full": [40.0, 44.0], "ssl_off": [30.0, 31.0]}
    for row, mious in values.items():
        for seed, miou in zip((0, 1), mious):
            _finish(tmp_path / row / f"seed{seed}", miou)
    table = ablation_tiny.main(
        ["--clip", "", "--rows", "full", "ssl_off", "--seeds", "0", "1", "--output", str(tmp_path)]
    )
    assert table == values
    out = capsys.readouterr().out
    assert "4 runs, 4 reused, 0 to train" in out
    # full: mean 42, std sqrt(8) = 2.83; ssl_off: mean 30.5, std 0.71, 30.5 - 42 = -11.50.
    assert " 42.00 ± 2.83 | 40.00, 44.00 |" in out
    assert " 30.50 ± 0.71 | 30.00, 31.00 | -11.50" in out
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["rows"] == values and saved["seeds"] == [0, 1]


def test_a_results_file_of_two_datasets_is_refused(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"a": {"sem_seg": {}}, "b": {"sem_seg": {}}}))
    with pytest.raises(ValueError, match="expected the results of one dataset"):
        ablation_tiny.read_miou(str(run))
    assert ablation_tiny.read_miou(str(tmp_path / "absent")) is None


def test_run_command_puts_the_row_last_and_its_own_output_dir():
    cmd = ablation_tiny.run_command("c.yaml", "/o/r", ["SEED", "1", "A.B", "x"])
    assert cmd[1] == os.path.join(str(REPO), "train_net.py")
    assert cmd[2:] == ["--config-file", "c.yaml", "SEED", "1", "A.B", "x", "OUTPUT_DIR", "/o/r"]


def test_an_inference_only_row_evaluates_its_source_rows_final_model():
    assert ablation_tiny.EVAL_ONLY_ROWS == {"prune_test": "full"}
    cmd = ablation_tiny.run_command("c.yaml", "/o/p", ["TEST.PRUNE_CLASSES", "True"], "/o/f.pth")
    assert cmd[2:] == [
        "--config-file", "c.yaml", "--eval-only", "TEST.PRUNE_CLASSES", "True",
        "MODEL.WEIGHTS", "/o/f.pth", "OUTPUT_DIR", "/o/p",
    ]  # fmt: skip


def test_an_inference_only_row_without_its_source_model_names_it(tmp_path):
    with pytest.raises(RuntimeError, match="evaluates .*model_final.pth, which does not exist"):
        ablation_tiny._train("c.yaml", str(tmp_path / "p"), [], str(tmp_path / "model_final.pth"))


def test_iters_come_before_the_overrides_so_that_an_override_still_wins():
    args = ablation_tiny._parse(["--iters", "50", "--", "SOLVER.MAX_ITER", "7"])
    assert args.opts == [
        "SOLVER.MAX_ITER", "50", "SOLVER.CHECKPOINT_PERIOD", "50", "SOLVER.MAX_ITER", "7",
    ]  # fmt: skip
    assert ablation_tiny._parse(["--iters", "0"]).opts == []
    assert ablation_tiny._parse([]).opts[:2] == ["SOLVER.MAX_ITER", "300"]
    with pytest.raises(SystemExit):
        ablation_tiny._parse(["--iters", "-1"])
