"""Fixtures shared by several test folders (plain torch at import: the modern stack, which
has no detectron2, loads this file too).

- ``synthetic_root``: the built-in synthetic dataset, generated once (a few seconds) under
  ``$DETECTRON2_DATASETS`` when set, else under the repository's ``datasets/`` folder (the
  default root of a user's run), with ``$DETECTRON2_DATASETS`` pointing at it meanwhile.
- ``one_torch_thread``: torch on one thread. The tiny models' ops are too small to gain
  from a second one, and on a machine shared with other jobs every multi-threaded op waits
  for a descheduled thread (measured: the resume test 2.7 s on one thread, 53 s on two).

Neither is autouse here; tests/engine and tests/robustness turn them on for their files.
"""

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def synthetic_root():
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


@pytest.fixture
def one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
