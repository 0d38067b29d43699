"""Predictions as label maps (``--save-masks``): values, sizes, names that mirror the
inputs, and maps that read back as masks."""

import os

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")

from hiervl.data.image_io import read_mask  # noqa: E402
from hiervl.demo.label_maps import LabelMapWriter, label_map  # noqa: E402
from hiervl.demo.predictor import UNLABELED  # noqa: E402


def test_values_are_class_indices_and_unlabelled_is_the_ignore_value():
    labels = np.array([[0, 1, UNLABELED], [4, UNLABELED, 2]])
    np.testing.assert_array_equal(
        label_map(labels, num_classes=5, ignore_label=255), [[0, 1, 255], [4, 255, 2]]
    )
    with pytest.raises(ValueError, match="labels outside 0..4"):
        label_map(np.array([[5]]), num_classes=5, ignore_label=255)


def test_names_mirror_the_inputs_below_their_common_folder(tmp_path):
    inputs = [
        str(tmp_path / "photos" / "a" / "x.jpg"),
        str(tmp_path / "photos" / "b" / "y.jpeg"),
        str(tmp_path / "photos" / "b" / "y.png"),  # same stem in the same folder
    ]
    out = tmp_path / "pseudo"
    writer = LabelMapWriter(str(out), num_classes=3, overlays=True, inputs=inputs)
    assert writer.path_for(inputs[0]) == str(out / "a" / "x.png")
    assert writer.path_for(inputs[1]) == str(out / "b" / "y.png")
    assert writer.path_for(inputs[2]) == str(out / "b" / "y_1.png")
    labels = np.zeros((5, 7), np.int64)
    labels[1:3, 2:6] = 2
    labels[4, :] = UNLABELED
    overlay = np.full((5, 7, 3), 9, np.uint8)
    path = writer.write(inputs[0], labels, (5, 7), overlay)
    mask = read_mask(path)
    assert mask.dtype == np.uint8 and mask.shape == (5, 7)
    np.testing.assert_array_equal(mask, np.where(labels == UNLABELED, 255, labels))
    assert os.path.isfile(str(out / "a" / "x_overlay.jpg"))
    # A prediction at another size is brought to the input's size (nearest neighbour).
    path = writer.write(inputs[1], np.ones((2, 3), np.int64), (4, 6))
    assert read_mask(path).shape == (4, 6) and set(np.unique(read_mask(path))) == {1}
    # Frames of a video.
    frame = writer.write_frame(str(tmp_path / "clip.mp4"), 12, labels)
    assert frame == str(out / "clip" / "000012.png")


def test_too_many_classes_for_8_bit_maps(tmp_path):
    with pytest.raises(ValueError, match="at most 255 classes, the vocabulary has 300"):
        LabelMapWriter(str(tmp_path), num_classes=300)


def test_a_folder_input_is_every_image_below_it(tmp_path):
    from hiervl.demo.runner import expand_inputs

    for name in ("b/2.jpg", "a/1.PNG", "a/notes.txt", ".hidden/3.jpg", "top.jpeg"):
        path = tmp_path / "photos" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    (tmp_path / "empty").mkdir()
    paths, failures = expand_inputs([str(tmp_path / "photos"), str(tmp_path / "empty")])
    below = [os.path.relpath(p, tmp_path / "photos") for p in paths]
    assert below == ["top.jpeg", "a/1.PNG", "b/2.jpg"]
    assert [f.path for f in failures] == [str(tmp_path / "empty")]
