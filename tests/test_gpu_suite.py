"""benchmarks/gpu_suite.py runs end to end on the CPU (tiny sizes, CUDA stages skipped with
their reason) without detectron2 or fvcore, and its stage runner keeps going past a stage
that hangs; its plain-torch model is the one configs/Base-HierVL.yaml describes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_suite  # noqa: E402  (benchmarks/ is not a package)
from plain_step import default_cfg  # noqa: E402


@pytest.mark.slow
def test_suite_runs_on_cpu_without_detectron2(tmp_path):
    command = [sys.executable, str(REPO / "benchmarks" / "gpu_suite.py"), "--out", str(tmp_path),
               "--device", "cpu", "--block-imports", "detectron2,fvcore"]  # fmt: skip
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stages = {s["name"]: s for s in json.loads((tmp_path / "gpu_suite.json").read_text())}
    assert list(stages) == list(gpu_suite.STAGES)
    assert stages["build"]["status"] == "skipped" and "no CUDA GPU" in stages["build"]["note"]
    assert stages["op_tests"]["status"] == "skipped"
    assert stages["op_tests"]["rows"][0]["skipped"] >= 9  # the CUDA tests were collected
    for name in ("op_timing", "train", "inference"):
        assert stages[name]["status"] == "ok", stages[name]
    train = stages["train"]["rows"]
    assert {(r["model"], r["checkpointing"]) for r in train} >= {
        ("hiervl", "off"), ("hiervl", "all"), ("m2f-equivalent", "off")}  # fmt: skip
    assert any(r["micro-batches"] == 2 for r in train)
    assert all(r["all finite"] and r["loss terms"] >= 20 for r in train)
    # Checkpointing does not change the losses (same seed, same batch).
    by_case = {(r["model"], r["precision"], r["checkpointing"]): r["total loss"] for r in train}
    assert by_case[("hiervl", "bf16", "off")] == by_case[("hiervl", "bf16", "all")]
    assert {r["precision"] for r in stages["inference"]["rows"]} == {"fp32", "bf16"}
    report = (tmp_path / "gpu_suite.md").read_text()
    assert "| train | ok |" in report and "## inference" in report


def test_a_hanging_stage_is_stopped_and_reported(tmp_path):
    script = "import json, time; print(json.dumps({'row': {'a': 1}}), flush=True); time.sleep(60)"
    result = gpu_suite.run_stage("hang", [sys.executable, "-c", script], 2.0, {})
    assert result.status == "timed out" and result.seconds < 30
    assert result.rows == [{"a": 1}]  # what it printed before the limit is kept
    failing = gpu_suite.run_stage(
        "fail", [sys.executable, "-c", "raise SystemExit('boom')"], 30, {}
    )
    assert failing.status == "failed" and "boom" in failing.note


def test_plain_model_config_is_base_hiervl():
    from hiervl.engine.launcher import setup_cfg

    expected = setup_cfg(
        str(REPO / "configs" / "Base-HierVL.yaml"), ["MODEL.HIERVL.CLIP.PRETRAINED", ""]
    )
    assert dict(default_cfg().MODEL.HIERVL) == dict(expected.MODEL.HIERVL)
