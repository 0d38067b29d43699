"""The dataset check on real photos laid out as a user has them (``../shared/realdata``:
COCO images with person masks; not part of the repository, skipped when absent)."""

import os
import re

import pytest

from hiervl.data import check

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, "configs", "custom", "hiervl_custom_tiny.yaml")
# ../shared of the main checkout; a worktree under wt/<name> finds it one level higher.
CANDIDATES = [
    os.path.join(REPO, os.pardir, "shared", "realdata", "coco128_person"),
    os.path.join(REPO, os.pardir, os.pardir, "shared", "realdata", "coco128_person"),
]
ROOT = next((os.path.abspath(p) for p in CANDIDATES if os.path.isdir(p)), None)


@pytest.mark.skipif(
    ROOT is None, reason="real photos not found at ../shared/realdata/coco128_person"
)
def test_check_of_real_photos_in_the_user_layout(tmp_path, capsys):
    argv = [
        "--config-file", CONFIG,
        "DATASETS.CUSTOM.ROOT", ROOT,
        "DATASETS.CUSTOM.CLASSES_FILE", os.path.join(ROOT, "classes.txt"),
        "OUTPUT_DIR", str(tmp_path),
    ]  # fmt: skip
    status = check.main(argv)
    out = capsys.readouterr().out
    assert status == 0, out
    assert re.search(r"labelled\s+custom_train_labeled\s+12\s", out)
    assert re.search(r"unlabelled\s+custom_train_unlabeled\s+84\s", out)
    assert re.search(r"evaluation\s+custom_val\s+32\s", out)
    shares = [float(s) for s in re.findall(r"\s([\d.]+)%", out)]
    assert len(shares) == 3 and sum(shares) == pytest.approx(100.0, abs=0.02)
    assert os.path.getsize(tmp_path / "check.png") > 100_000
