"""Fixtures of the robustness suite (helpers: ``robustness_helpers.py``)."""

import pytest


@pytest.fixture
def marker(tmp_path):
    """Path a payload would create; asserted absent at the end of the test."""
    path = tmp_path / "PAYLOAD_RAN"
    yield path
    assert not path.exists(), f"a payload ran: {path} was created"


@pytest.fixture(autouse=True)
def _robustness_one_thread(one_torch_thread):
    """tests/conftest.py's ``one_torch_thread`` (and ``synthetic_root`` on request)."""
    yield
