"""Fixtures shared by the tests of hiervl/data."""

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog


@pytest.fixture
def restore_catalog():
    """Put back the synthetic registrations (datasets and their metadata both) that existed
    before the test, so it leaves the global catalogs as it found them: a registration
    without metadata would break the next register_all, which removes both."""
    saved = {
        name: (DatasetCatalog[name], MetadataCatalog.get(name).as_dict())
        for name in list(DatasetCatalog.keys())
        if name.startswith("synthetic_")
    }
    yield
    for name in [n for n in DatasetCatalog.keys() if n.startswith("synthetic_")]:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    for name, (func, meta) in saved.items():
        DatasetCatalog.register(name, func)
        meta.pop("name", None)
        MetadataCatalog.get(name).set(**meta)
