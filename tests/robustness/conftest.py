"""Fixtures of the robustness suite (helpers: ``robustness_helpers.py``)."""

import os

import pytest
import torch
from robustness_helpers import REPO


@pytest.fixture
def marker(tmp_path):
    """Path a payload would create; asserted absent at the end of the test."""
    path = tmp_path / "PAYLOAD_RAN"
    yield path
    assert not path.exists(), f"a payload ran: {path} was created"


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
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
