"""Split tool: published lists (file:// and loopback http), checksums, import, seeded
generation, unlabelled = train minus labelled (never overlapping), CLI."""

import dataclasses
import functools
import hashlib
import http.server
import json
import logging
import os
import pathlib
import threading

import numpy as np
import pytest
from dataset_trees import touch, write_image, write_label
from detectron2.data import DatasetCatalog

from hiervl.data import split_files, splits
from hiervl.data.datasets import register_all

REPO = pathlib.Path(__file__).resolve().parents[2]
SHARED = pathlib.Path(os.environ.get("HIERVL_SHARED_SPLITS", REPO.parent / "shared" / "splits"))
needs_shared = pytest.mark.skipif(
    not SHARED.is_dir(), reason=f"published split lists not found at {SHARED}"
)
EXPECTED_COUNTS = {
    "voc": [92, 183, 366, 732, 1464],
    "coco": [232, 463, 925, 1849, 3697],
    "ade20k": [158, 316, 632, 1263, 2526],
    "cityscapes": [100, 186, 372, 744, 1488],
}
VOC_TRAIN_AUG = 10582


def _images_of(path):
    return split_files.read_list(str(path))


def make_train_set(root, key):
    """Train set on disk (empty files suffice for listing): for VOC the train_aug list of
    10,582 ids (published 92 labelled + its unlabelled complement), otherwise the union of
    the published labelled lists plus a few extra images. Returns the train image paths."""
    published = [SHARED / splits.PUBLISHED[(key, n)].path for n in EXPECTED_COUNTS[key]]
    if key == "voc":
        ids = [os.path.basename(p)[:-4] for p in _images_of(published[0])]
        ids += [os.path.basename(p)[:-4] for p in _images_of(SHARED / "pascal/92/unlabeled.txt")]
        lists = os.path.join(root, "VOCdevkit", "VOC2012", "ImageSets", "Segmentation")
        os.makedirs(lists)
        with open(os.path.join(lists, "train_aug.txt"), "w") as f:
            f.write("\n".join(ids) + "\n")
        return [f"JPEGImages/{i}.jpg" for i in ids]
    images = sorted({image for p in published for image in _images_of(p)})
    extra = {
        "coco": [f"train2017/9{i:011d}.jpg" for i in range(7)],
        "ade20k": [f"images/training/ADE_train_9{i:07d}.jpg" for i in range(7)],
        "cityscapes": [f"leftImg8bit/train/zz/zz_{i:06d}_000019_leftImg8bit.png" for i in range(7)],
    }[key]
    droot = os.path.join(root, {"coco": "coco", "ade20k": "ADEChallengeData2016",
                                "cityscapes": "cityscapes"}[key])  # fmt: skip
    for image in images + extra:
        touch(os.path.join(droot, image))
    if key == "ade20k":
        os.makedirs(os.path.join(droot, "annotations_detectron2", "training"))
    return images + extra


@needs_shared
@pytest.mark.parametrize("key", sorted(EXPECTED_COUNTS))
def test_published_lists_from_file_url(tmp_path, key):
    root = str(tmp_path)
    train = make_train_set(root, key)
    if key == "voc":
        assert len(train) == VOC_TRAIN_AUG
    for n in EXPECTED_COUNTS[key]:
        directory = splits.fetch(key, n, root, base_url=SHARED.as_uri())
        labeled = split_files.read_list(os.path.join(directory, "labeled.txt"))
        unlabeled = split_files.read_list(os.path.join(directory, "unlabeled.txt"))
        assert len(labeled) == n and len(set(labeled)) == n
        assert len(unlabeled) == len(train) - n
        assert not set(labeled) & set(unlabeled)
        assert set(labeled) | set(unlabeled) == set(train)
        source = split_files.read_source(directory)
        assert source["kind"] == "published" and source["url"].startswith("file://")
        with open(os.path.join(directory, "labeled.txt"), "rb") as f:  # kept byte for byte
            assert hashlib.sha256(f.read()).hexdigest() == splits.PUBLISHED[(key, n)].sha256


@needs_shared
def test_import_local_files(tmp_path, caplog):
    root = str(tmp_path)
    for key, counts in EXPECTED_COUNTS.items():
        for n in counts:
            path = SHARED / splits.PUBLISHED[(key, n)].path
            directory = splits.import_list(key, n, root, str(path))
            assert len(split_files.read_list(os.path.join(directory, "labeled.txt"))) == n
            assert split_files.read_source(directory)["matches_published"] is True
    # The ADE lists end without a newline: the last image is not lost.
    ade = (SHARED / "ade/1_128/labeled.txt").read_bytes()
    assert not ade.endswith(b"\n")
    last = ade.decode().splitlines()[-1].split()[0]
    labeled = split_files.read_list(os.path.join(root, "splits", "ade20k", "158", "labeled.txt"))
    assert labeled[-1] == last
    # Same images, other bytes: accepted, flagged as not the published file.
    edited = tmp_path / "edited.txt"
    edited.write_text(ade.decode() + "\n\n# my comment\n")
    directory = splits.import_list("ade20k", 158, root, str(edited))
    assert split_files.read_source(directory)["matches_published"] is False
    assert "not byte-identical" in caplog.text
    short = tmp_path / "short.txt"
    short.write_text("\n".join(ade.decode().splitlines()[:-1]))
    with pytest.raises(ValueError, match="lists 157 images, expected 158"):
        splits.import_list("ade20k", 158, root, str(short))


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def fake_published(tmp_path, monkeypatch):
    """A published voc/92 list with known bytes, served from a mirror folder."""
    mirror = tmp_path / "mirror"
    lines = [f"JPEGImages/2007_{i:06d}.jpg SegmentationClass/2007_{i:06d}.png" for i in range(92)]
    data = "\n".join(lines).encode()
    (mirror / "pascal" / "92").mkdir(parents=True)
    (mirror / "pascal" / "92" / "labeled.txt").write_bytes(data)
    entry = splits.Published(repo="o/r", commit="0" * 40, path="pascal/92/labeled.txt",
                             sha256=hashlib.sha256(data).hexdigest())  # fmt: skip
    monkeypatch.setitem(splits.PUBLISHED, ("voc", 92), entry)
    return mirror, data


def test_download_over_loopback_http(tmp_path, fake_published):
    mirror, data = fake_published
    handler = functools.partial(_QuietHandler, directory=str(mirror))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        directory = splits.fetch("voc", 92, str(tmp_path / "d"), base_url=base, timeout=10)
        with pytest.raises(splits.DownloadError, match=f"{base}/nowhere"):
            splits.download(f"{base}/nowhere", sha256="0" * 64, timeout=10)
    finally:
        server.shutdown()
        server.server_close()
    assert (pathlib.Path(directory) / "labeled.txt").read_bytes() == data
    assert json.loads((pathlib.Path(directory) / "source.json").read_text())["url"].startswith(base)
    # No VOC tree on disk: unlabeled.txt is left to the registration.
    assert not (pathlib.Path(directory) / "unlabeled.txt").exists()
    # A verified local copy is re-used without any network access.
    again = splits.fetch("voc", 92, str(tmp_path / "d"), base_url="http://127.0.0.1:9/none")
    assert again == directory


def test_checksum_mismatch_names_url_and_both_hashes(tmp_path, fake_published):
    mirror, data = fake_published
    (mirror / "pascal" / "92" / "labeled.txt").write_bytes(data + b"\nJPEGImages/x.jpg y.png")
    url = (mirror / "pascal" / "92" / "labeled.txt").as_uri()
    expected = splits.PUBLISHED[("voc", 92)].sha256
    actual = hashlib.sha256(data + b"\nJPEGImages/x.jpg y.png").hexdigest()
    with pytest.raises(ValueError) as info:
        splits.fetch("voc", 92, str(tmp_path / "d"), base_url=mirror.as_uri())
    assert url in str(info.value) and expected in str(info.value) and actual in str(info.value)
    assert not (tmp_path / "d" / "splits").exists()


def test_parse_list():
    text = "a.jpg a.png\n\n# comment\n  b.jpg  \nc.jpg c.png"  # no trailing newline
    assert split_files.parse_list(text, "x") == ["a.jpg", "b.jpg", "c.jpg"]
    with pytest.raises(ValueError, match="x:2: expected"):
        split_files.parse_list("a.jpg\na b c\n", "x")
    with pytest.raises(ValueError, match="x:3: image a.jpg is listed twice"):
        split_files.parse_list("a.jpg\nb.jpg\na.jpg a.png\n", "x")


def small_counts(monkeypatch, counts):
    """ADE20K with tiny label counts, for trees of a few images."""
    bench = dataclasses.replace(splits.BENCHMARKS["ade20k"], label_counts=counts)
    monkeypatch.setitem(splits.BENCHMARKS, "ade20k", bench)


def make_small_ade(root, count=6):
    droot = os.path.join(root, "ADEChallengeData2016")
    for i in range(count):
        stem = f"ADE_train_{i:08d}"
        write_image(os.path.join(droot, "images", "training", stem + ".jpg"), seed=i)
        label = np.full((6, 8), i, dtype=np.uint8)
        write_label(os.path.join(droot, "annotations_detectron2", "training", stem + ".png"), label)
    return droot


def test_seeded_split_is_reproducible_and_marked(tmp_path, monkeypatch, caplog):
    small_counts(monkeypatch, (2, 3))
    roots = [str(tmp_path / name) for name in ("a", "b", "c")]
    for root in roots:
        make_small_ade(root)
    texts = []
    for root, seed in zip(roots, (7, 7, 8)):
        with caplog.at_level(logging.WARNING):
            directory = splits.generate("ade20k", 3, root, seed=seed)
        texts.append((pathlib.Path(directory) / "labeled.txt").read_text())
        assert split_files.read_source(directory) == {"kind": "seeded", "seed": seed, "count": 3}
        assert len(split_files.read_list(os.path.join(directory, "unlabeled.txt"))) == 3
    assert texts[0] == texts[1] and texts[0] != texts[2]
    assert "NOT the published split" in texts[0].splitlines()[1]
    assert "NOT the published one" in caplog.text
    caplog.clear()
    register_all(roots[0])
    with caplog.at_level(logging.WARNING):
        labeled = DatasetCatalog.get("ade20k_train_labeled_3")
    assert "seeded split, NOT the published one" in caplog.text
    unlabeled = DatasetCatalog.get("ade20k_train_unlabeled_3")
    assert len(labeled) == 3 and len(unlabeled) == 3
    assert not {r["image_id"] for r in labeled} & {r["image_id"] for r in unlabeled}
    assert all("sem_seg_file_name" not in r for r in unlabeled)


def test_overlap_and_foreign_images_are_errors(tmp_path, monkeypatch):
    small_counts(monkeypatch, (2,))
    root = str(tmp_path)
    make_small_ade(root)
    directory = splits.generate("ade20k", 2, root, seed=0)
    labeled = split_files.read_list(os.path.join(directory, "labeled.txt"))
    register_all(root)
    with open(os.path.join(directory, "unlabeled.txt"), "a") as f:
        f.write(labeled[0] + "\n")
    for kind in ("labeled", "unlabeled"):
        with pytest.raises(ValueError, match="both labelled and unlabelled"):
            DatasetCatalog.get(f"ade20k_train_{kind}_2")
    os.remove(os.path.join(directory, "unlabeled.txt"))
    with open(os.path.join(directory, "labeled.txt"), "w") as f:
        f.write("images/training/ADE_train_00000000.jpg\nimages/training/NOT_THERE.jpg\n")
    with pytest.raises(ValueError, match="not in the train set on disk: images/training/NOT_TH"):
        DatasetCatalog.get("ade20k_train_labeled_2")
    with pytest.raises(ValueError, match="both labelled and unlabelled"):
        split_files.write_split(directory, labeled_bytes=b"a.jpg\n", source={}, unlabeled=["a.jpg"])


def test_missing_split_list_names_the_command(tmp_path):
    make_small_ade(str(tmp_path))
    register_all(str(tmp_path))
    with pytest.raises(
        FileNotFoundError, match="python -m hiervl.data.splits fetch --datasets ade20k"
    ):
        DatasetCatalog.get("ade20k_train_labeled_158")


def test_cli(tmp_path, fake_published, capsys):
    mirror, _ = fake_published
    root = str(tmp_path / "d")
    splits.main(["fetch", "--datasets", "voc", "--counts", "92", "--root", root,
                 "--base-url", mirror.as_uri()])  # fmt: skip
    splits.main(["list", "--root", root])
    out = capsys.readouterr().out
    assert "voc" in out and "92" in out and "published" in out
    with pytest.raises(ValueError, match="unknown split voc/93"):
        splits.main(["fetch", "--datasets", "voc", "--counts", "93", "--root", root])
