"""Engine tests train the tiny config on the built-in synthetic dataset.

The dataset is generated once (a few seconds) under ``$DETECTRON2_DATASETS`` when set,
else under the repository's ``datasets/`` folder, the default root of a user's run.

The tests run torch on one thread: the tiny model's ops are too small to gain from a
second one, and on a machine shared with other jobs every multi-threaded op waits for a
descheduled thread (measured: the resume test 2.7 s on one thread, 53 s on two).
"""

import pytest


@pytest.fixture(scope="session", autouse=True)
def _engine_dataset(synthetic_root):
    """tests/conftest.py's ``synthetic_root``, for every engine test."""
    yield synthetic_root


@pytest.fixture(autouse=True)
def _engine_one_thread(one_torch_thread):
    """tests/conftest.py's ``one_torch_thread``, for every engine test."""
    yield
