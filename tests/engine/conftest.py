"""Engine tests train the tiny config on the built-in synthetic dataset.

The dataset is generated once (a few seconds) under ``$DETECTRON2_DATASETS`` when set,
else under the repository's ``datasets/`` folder, the default root of a user's run.

The tests run torch on one thread: the tiny model's ops are too small to gain from a
second one, and on a machine shared with other jobs every multi-threaded op waits for a
descheduled thread (measured: the resume test 2.7 s on one thread, 53 s on two).
"""

import os

import pytest
import torch
from tiny_training import REPO

from hiervl.data.datasets.synthetic import ensure_generated


@pytest.fixture(scope="session", autouse=True)
def synthetic_root():
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
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
