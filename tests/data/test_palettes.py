"""Dataset colours: the official palettes in every benchmark's metadata, generated colours
for custom datasets."""

import pytest
from detectron2.data import MetadataCatalog

from hiervl.data.datasets import BENCHMARKS, register_all
from hiervl.data.datasets.palettes import (
    ADE20K,
    CITYSCAPES,
    COCO,
    VOC,
    generated_palette,
    voc_palette,
)


def test_voc_colour_map_against_the_devkit_colours():
    # Values of the PASCAL VOC devkit's SegmentationClass PNG palette.
    assert VOC[0] == [0, 0, 0] and VOC[1] == [128, 0, 0] and VOC[2] == [0, 128, 0]
    assert VOC[3] == [128, 128, 0] and VOC[4] == [0, 0, 128] and VOC[8] == [64, 0, 0]
    assert VOC[15] == [192, 128, 128]  # person
    assert VOC[20] == [0, 64, 128]  # tv monitor
    assert voc_palette(256)[255] == [224, 224, 192]  # the devkit's "void" outline colour
    assert len({tuple(c) for c in voc_palette(256)}) == 256


def test_cityscapes_and_ade20k_known_entries():
    assert CITYSCAPES[0] == [128, 64, 128] and CITYSCAPES[10] == [70, 130, 180]  # road, sky
    assert CITYSCAPES[11] == [220, 20, 60] and CITYSCAPES[18] == [119, 11, 32]  # person, bicycle
    assert ADE20K[0] == [120, 120, 120] and ADE20K[2] == [6, 230, 230]  # wall, sky
    assert ADE20K[12] == [150, 5, 61] and ADE20K[149] == [92, 0, 255]  # person, flag
    assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in ADE20K + COCO)
    assert COCO[0] == [0, 0, 0] and COCO[1] == [220, 20, 60]  # background, person


@pytest.mark.parametrize("key", sorted(BENCHMARKS))
def test_every_benchmark_part_carries_its_palette(tmp_path, key):
    names = register_all(str(tmp_path))
    expected = {"voc": VOC, "coco": COCO, "ade20k": ADE20K, "cityscapes": CITYSCAPES}[key]
    parts = [n for n in names if n.startswith(key)]
    assert parts
    for name in parts:
        meta = MetadataCatalog.get(name)
        assert meta.stuff_colors == expected and len(meta.stuff_colors) == len(meta.stuff_classes)


def test_generated_colours_are_distinct():
    colors = generated_palette(40)
    assert len({tuple(c) for c in colors}) == 40 and generated_palette(3) == colors[:3]
