"""Helpers of the robustness suite: files that would run code if loaded carelessly.

Every payload here creates a marker file when it runs; each test asserts the marker does
not exist afterwards (nothing ran) and that the files it handed in are unchanged.
"""

import hashlib
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIG = REPO / "configs" / "tiny" / "hiervl_tiny_16.yaml"


class Payload:
    """Unpickling this calls ``open(marker, "w")``: creating the marker proves code ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def marker(tmp_path):
    """Path a payload would create; asserted absent at the end of the test."""
    path = tmp_path / "PAYLOAD_RAN"
    yield path
    assert not path.exists(), f"a payload ran: {path} was created"


def digest(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def snapshot(folder) -> dict:
    """{relative path: sha256} of every file under ``folder`` (to prove nothing changed)."""
    folder = Path(folder)
    return {
        str(p.relative_to(folder)): digest(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


@pytest.fixture(scope="session")
def synthetic_root():
    """The built-in synthetic dataset (generated once, a few seconds), as the engine
    tests use it."""
    from hiervl.data.datasets.synthetic import ensure_generated

    root = os.path.abspath(os.environ.get("DETECTRON2_DATASETS", str(REPO / "datasets")))
    ensure_generated(root)
    previous = os.environ.get("DETECTRON2_DATASETS")
    os.environ["DETECTRON2_DATASETS"] = root
    yield root
    if previous is None:
        del os.environ["DETECTRON2_DATASETS"]
    else:
        os.environ["DETECTRON2_DATASETS"] = previous


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The tiny models gain nothing from a second thread on a shared machine (see
    tests/engine/conftest.py)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
