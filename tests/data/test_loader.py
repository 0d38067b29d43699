"""Two-stream loader: batch layout, determinism (seed, workers), resume, rank sharding,
epoch coverage, config errors, and no labels in the unlabelled streams."""

import itertools

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from hiervl.config import add_hiervl_config
from hiervl.data import image_io, mappers
from hiervl.data.loader import build_test_loader, build_two_stream_train_loader

LABELED, UNLABELED, VAL = "pipeline_test_labeled", "pipeline_test_unlabeled", "pipeline_test_val"
NUM_LABELED, NUM_UNLABELED = 6, 10


def _write_images(folder, prefix, count, with_labels):
    dicts = []
    for i in range(count):
        rng = np.random.default_rng([len(prefix), i])
        image = rng.integers(0, 256, size=(20, 20, 3)).astype(np.uint8)
        path = folder / f"{prefix}_{i}.png"
        Image.fromarray(image).save(path)
        record = {"file_name": str(path), "height": 20, "width": 20, "image_id": f"{prefix}{i}"}
        label_path = folder / f"{prefix}_{i}_label.png"
        if with_labels:
            Image.fromarray((image[..., 0] % 5).astype(np.uint8)).save(label_path)
        # Unlabelled dicts carry a label path that does not exist: opening it would fail.
        record["sem_seg_file_name"] = str(label_path)
        dicts.append(record)
    return dicts


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loader_data")
    parts = {
        LABELED: _write_images(folder, "l", NUM_LABELED, True),
        UNLABELED: _write_images(folder, "u", NUM_UNLABELED, False),
        VAL: _write_images(folder, "v", 3, True),
    }
    for name, dicts in parts.items():
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
        DatasetCatalog.register(name, lambda d=dicts: [dict(x) for x in d])
        MetadataCatalog.get(name).set(ignore_label=255, stuff_classes=list("abcde"))
    yield parts
    for name in parts:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def _cfg(**overrides):
    cfg = add_hiervl_config(get_cfg())
    cfg.INPUT.FORMAT = "RGB"
    cfg.INPUT.CROP.SIZE = (16, 16)
    cfg.DATASETS.TRAIN_LABELED = (LABELED,)
    cfg.DATASETS.TRAIN_UNLABELED = (UNLABELED,)
    cfg.SOLVER.IMS_PER_BATCH_LABELED = 2
    cfg.SOLVER.IMS_PER_BATCH_UNLABELED = 4
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.SEED = 7
    for key, value in overrides.items():
        node = cfg
        *path, last = key.split(".")
        for part in path:
            node = getattr(node, part)
        setattr(node, last, value)
    return cfg


def _take(cfg, count, start_iter=0, **kwargs):
    loader = build_two_stream_train_loader(cfg, start_iter, **kwargs)
    return list(itertools.islice(iter(loader), count))


def _assert_same(a, b):
    assert type(a) is type(b)
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_same(a[key], b[key])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    else:
        assert a == b


def _names(batch, stream):
    return [d["file_name"] for d in batch[stream]]


def test_batch_layout(registered):
    (batch,) = _take(_cfg(), 1)
    assert set(batch) == {"labeled", "unlabeled", "unlabeled_mix", "iteration"}
    assert batch["iteration"] == 0
    assert len(batch["labeled"]) == 2
    assert len(batch["unlabeled"]) == len(batch["unlabeled_mix"]) == 4
    labeled = batch["labeled"][0]
    assert labeled["image"].shape == (3, 16, 16) and labeled["sem_seg"].dtype == torch.long
    unlabeled = batch["unlabeled"][0]
    assert unlabeled["image_strong2"].dtype == torch.uint8
    assert unlabeled["cutmix_box1"].dtype == torch.bool


def test_same_seed_same_batches_different_seed_different(registered):
    a, b = _take(_cfg(), 3), _take(_cfg(), 3)
    _assert_same(a, b)
    c = _take(_cfg(SEED=8), 3)
    assert [_names(x, "unlabeled") for x in a] != [_names(x, "unlabeled") for x in c]


def test_worker_count_does_not_change_batches(registered):
    _assert_same(_take(_cfg(), 3), _take(_cfg(**{"DATALOADER.NUM_WORKERS": 2}), 3))


def test_start_iter_resumes_the_exact_sequence(registered, monkeypatch):
    full = _take(_cfg(), 5)
    _assert_same(full[3:], _take(_cfg(), 2, start_iter=3))
    # Skipping is arithmetic: resuming far ahead loads only the batch it yields.
    reads = []
    for name in ("read_image", "read_mask"):
        real = getattr(image_io, name)
        monkeypatch.setattr(
            image_io, name, lambda p, *a, real=real, **k: reads.append(p) or real(p, *a, **k)
        )
    (batch,) = _take(_cfg(), 1, start_iter=100_000)
    assert batch["iteration"] == 100_000
    # 2 labelled images + their 2 labels, 4 unlabelled + 4 partner images.
    assert len(reads) == 2 * 2 + 4 + 4


def test_streams_are_independent_permutations(registered):
    batches = _take(_cfg(), 5)
    unlabeled = [n for b in batches for n in _names(b, "unlabeled")]
    partner = [n for b in batches for n in _names(b, "unlabeled_mix")]
    # 5 iterations x 4 = two epochs of 10 unlabelled images: each epoch is a permutation.
    assert (
        sorted(unlabeled[:10])
        == sorted(partner[:10])
        == sorted(registered[UNLABELED][i]["file_name"] for i in range(10))
    )
    assert sorted(unlabeled[10:]) == sorted(unlabeled[:10])
    assert unlabeled != partner, "the CutMix partner stream has its own order"
    assert unlabeled[:10] != unlabeled[10:], "each epoch is reshuffled"
    labeled = [n for b in batches[:3] for n in _names(b, "labeled")]
    assert sorted(labeled) == sorted(d["file_name"] for d in registered[LABELED])


def test_two_ranks_split_the_global_batch(registered):
    single = _take(_cfg(), 5)
    ranks = [_take(_cfg(), 5, rank=r, world_size=2) for r in range(2)]
    for t in range(5):
        for stream in ("labeled", "unlabeled", "unlabeled_mix"):
            r0, r1 = ranks[0][t][stream], ranks[1][t][stream]
            assert len(r0) == len(r1) == len(single[t][stream]) // 2
            # Rank 0 then rank 1 is the one-process batch, augmentations included.
            _assert_same(r0 + r1, single[t][stream])
    # Within one epoch of the labelled set (3 iterations x 2) the ranks are disjoint.
    seen = [{n for b in ranks[r][:3] for n in _names(b, "labeled")} for r in range(2)]
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == NUM_LABELED


def test_unlabeled_streams_never_read_labels(registered, monkeypatch):
    unlabeled_labels = {d["sem_seg_file_name"] for d in registered[UNLABELED]}
    real = mappers.read_label

    def guarded(path):
        assert path not in unlabeled_labels, f"unlabelled label opened: {path}"
        return real(path)

    monkeypatch.setattr(mappers, "read_label", guarded)
    # Using the labelled set as unlabelled data too: its labels must be dropped there.
    cfg = _cfg(**{"DATASETS.TRAIN_UNLABELED": (UNLABELED, LABELED)})
    for batch in _take(cfg, 3):
        for stream in ("unlabeled", "unlabeled_mix"):
            for sample in batch[stream]:
                assert "sem_seg" not in sample and "sem_seg_file_name" not in sample


def test_supervised_only_has_empty_unlabeled_streams(registered):
    cfg = _cfg(**{"MODEL.HIERVL.SSL.ENABLED": False, "DATASETS.TRAIN_UNLABELED": ()})
    (batch,) = _take(cfg, 1)
    assert batch["unlabeled"] == [] and batch["unlabeled_mix"] == [] and len(batch["labeled"]) == 2


def test_config_errors(registered):
    with pytest.raises(ValueError, match="DATASETS.TRAIN_LABELED.*'nope'"):
        build_two_stream_train_loader(_cfg(**{"DATASETS.TRAIN_LABELED": ("nope",)}))
    with pytest.raises(ValueError, match="DATASETS.TRAIN_UNLABELED is empty"):
        build_two_stream_train_loader(_cfg(**{"DATASETS.TRAIN_UNLABELED": ()}))
    with pytest.raises(ValueError, match="SOLVER.IMS_PER_BATCH_UNLABELED = 4.*world size 3"):
        build_two_stream_train_loader(
            _cfg(**{"SOLVER.IMS_PER_BATCH_LABELED": 3}), rank=0, world_size=3
        )
    with pytest.raises(ValueError, match="has no 'sem_seg_file_name'"):
        DatasetCatalog.register("pipeline_test_nolabels", lambda: [{"file_name": "x.png"}])
        try:
            build_two_stream_train_loader(
                _cfg(**{"DATASETS.TRAIN_LABELED": ("pipeline_test_nolabels",)})
            )
        finally:
            DatasetCatalog.remove("pipeline_test_nolabels")


def test_test_loader_yields_each_image_once_with_labels(registered):
    loader = build_test_loader(_cfg(), VAL)
    items = [x for batch in loader for x in batch]
    assert [x["file_name"] for x in items] == [d["file_name"] for d in registered[VAL]]
    assert all(x["image"].shape == (3, 20, 20) and "sem_seg" in x for x in items)
    with pytest.raises(ValueError, match="'missing_val'"):
        build_test_loader(_cfg(), "missing_val")
