"""``hiervl.tools.export`` and ``hiervl.tools.onnx_predict`` end to end on the tiny config.

A tiny model (fewer decoder layers, so that tracing stays quick) is saved by the
checkpointer, exported through the command line, compared with eager PyTorch on the
synthetic generator's scenes, and run by the ONNX runner in a process where importing
torch or detectron2 raises: at the input's resolution its label maps must agree with the
eager sliding window, at the file's test scale (the config's INPUT.MIN_SIZE_TEST 128 /
MAX_SIZE_TEST 512) with the PyTorch demo's predictor.
"""

import contextlib
import io
import json
import logging
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

pytest.importorskip("detectron2")

from hiervl.data.datasets.synthetic import render_sample  # noqa: E402
from hiervl.data.image_io import read_image  # noqa: E402
from hiervl.demo.predictor import SemanticPredictor  # noqa: E402
from hiervl.engine.checkpoint import HierVLCheckpointer  # noqa: E402
from hiervl.engine.launcher import setup_cfg  # noqa: E402
from hiervl.engine.trainer import HierVLTrainer  # noqa: E402
from hiervl.evaluation.sliding_window import sliding_window_inference  # noqa: E402
from hiervl.modeling.hiervl_model import HierVLModel  # noqa: E402
from hiervl.tools import export, onnx_predict  # noqa: E402
from hiervl.tools.onnx_export import git_commit  # noqa: E402
from hiervl.tools.onnx_metadata import DeployMetadata  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, "configs", "tiny", "hiervl_tiny_16.yaml")
SMALL = [
    "MODEL.HIERVL.PIXEL_DECODER.NUM_ENCODER_LAYERS", "1",
    "MODEL.HIERVL.DECODER.NUM_LAYERS", "1",
]  # fmt: skip
WINDOW = 64
VOCABULARY = ["background", "circle", "square", "triangle", "star"]

# Runs hiervl.tools.onnx_predict with torch and detectron2 made unimportable.
BLOCKED_RUNNER = """
import importlib.abc, runpy, sys

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "detectron2", "torchvision", "open_clip"):
            raise ImportError(f"{name} is blocked: the ONNX runner must not import it")
        return None

sys.meta_path.insert(0, Blocker())
sys.argv = ["onnx_predict"] + sys.argv[1:]
runpy.run_module("hiervl.tools.onnx_predict", run_name="__main__")
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(cfg with MODEL.WEIGHTS, path of the .onnx, stdout of the export)."""
    folder = tmp_path_factory.mktemp("export")
    torch.manual_seed(7)  # not the seed the export builds with: the weights must load
    model = HierVLTrainer.build_model(setup_cfg(CONFIG, SMALL))
    HierVLCheckpointer(model, save_dir=str(folder)).save("model_final")
    weights = str(folder / "model_final.pth")
    path = str(folder / "tiny.onnx")
    argv = ["--config-file", CONFIG, *SMALL, "MODEL.WEIGHTS", weights, "--size", "64", "64"]
    argv += ["--vocabulary", ",".join(VOCABULARY), "--output", path, "--check-images", "2"]
    return setup_cfg(CONFIG, SMALL + ["MODEL.WEIGHTS", weights]), path, argv


@pytest.fixture(scope="module")
def export_report(exported):
    """(exit code, stdout) of the one export run."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = export.main(exported[2])
    return code, buffer.getvalue()


@pytest.fixture(scope="module")
def eager(exported):
    cfg = exported[0]
    meta = HierVLTrainer.build_model(cfg).eval()
    HierVLCheckpointer(meta).load(cfg.MODEL.WEIGHTS)
    meta.set_vocabulary(VOCABULARY)
    return meta


def test_export_writes_metadata_and_matches_pytorch(exported, export_report):
    cfg, path, _ = exported
    code, out = export_report
    assert code == 0, out
    # The command's own check: onnxruntime vs eager PyTorch on two synthetic scenes.
    assert "onnxruntime vs PyTorch on 2 synthetic scenes" in out and out.rstrip().endswith("ok")
    props = {p.key: p.value for p in onnx.load(path).metadata_props}
    meta = DeployMetadata.from_props(props, path)
    assert meta.class_names == tuple(VOCABULARY)
    assert meta.input_size == (WINDOW, WINDOW) and meta.window_stride == WINDOW // 2
    assert list(meta.pixel_mean) == list(cfg.MODEL.PIXEL_MEAN)
    assert list(meta.pixel_std) == list(cfg.MODEL.PIXEL_STD)
    assert meta.weights == cfg.MODEL.WEIGHTS and not meta.prune_classes
    # Another vocabulary than the dataset's: no dataset colours, its ignore value.
    assert meta.class_colors is None and meta.ignore_label == 255
    assert meta.commit == git_commit(REPO) and meta.commit != ""
    # The demo's test scale, from the config.
    assert (meta.min_size_test, meta.max_size_test) == (128, 512)
    assert (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST) == (128, 512)
    assert json.loads(props["hiervl.class_names"]) == VOCABULARY


def _eager_labels(meta, path, threshold):
    """Label map of the eager model with the runner's window: (H,W) uint8, 255 below the
    confidence threshold."""
    image = torch.from_numpy(read_image(path).transpose(2, 0, 1).copy()).float()[None]
    images = (image - meta.pixel_mean) / meta.pixel_std
    text = meta.model.class_embeddings()
    with torch.no_grad():
        scores = sliding_window_inference(
            lambda x: meta.model.predict_scores(x, text),
            images,
            crop=WINDOW,
            stride=WINDOW // 2,
            num_classes=len(VOCABULARY),
        )
    probs = HierVLModel.semantic_probs(scores)[0]
    confidence, labels = probs.max(dim=0)
    labels[confidence < threshold] = 255
    return labels.numpy().astype(np.uint8), confidence


def _write_inputs(folder):
    """Two synthetic scenes larger than the window, one smaller, one with an EXIF
    rotation (displayed 112x80 from a stored 80x112)."""
    paths = []
    for i, (h, w) in enumerate([(96, 80), (112, 128)]):
        image = render_sample(0, "val", i, 128)[0][:h, :w]
        paths.append(str(folder / f"scene{i}.png"))
        Image.fromarray(image).save(paths[-1])
    small = str(folder / "small.png")
    Image.fromarray(render_sample(0, "val", 3, 48)[0][:40]).save(small)
    rotated = str(folder / "rotated.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    Image.fromarray(render_sample(0, "val", 4, 112)[0][:80]).save(rotated, exif=exif, quality=95)
    return paths, small, rotated


def test_runner_without_torch_writes_the_demos_label_maps(exported, export_report, eager, tmp_path):
    _, model_path, _ = exported
    assert export_report[0] == 0
    big, small, rotated = _write_inputs(tmp_path)
    threshold = float(np.median(_eager_labels(eager, big[0], 0.0)[1].numpy()))
    masks, overlays = tmp_path / "masks", tmp_path / "overlays"
    command = [sys.executable, "-c", BLOCKED_RUNNER, "--model", model_path, "--input"]
    command += [*big, small, rotated, "--output", str(overlays), "--save-masks", str(masks)]
    command += ["--save-overlays"]
    command += ["--confidence-threshold", str(threshold)]
    command += ["--min-size-test", "0"]  # the input's own resolution, as the eager reference
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4 images segmented, 0 failed" in proc.stdout

    for path in big:
        stem = os.path.splitext(os.path.basename(path))[0]
        mask = np.asarray(Image.open(masks / f"{stem}.png"))
        expected, _ = _eager_labels(eager, path, threshold)
        assert mask.dtype == np.uint8 and mask.shape == expected.shape
        assert set(np.unique(mask)) <= set(range(len(VOCABULARY))) | {255}
        assert 0 < (mask == 255).mean() < 1, "the threshold should leave some pixels unlabelled"
        assert (mask == expected).mean() >= 0.999
        overlay = read_image(str(overlays / os.path.basename(path)))
        assert overlay.shape == read_image(path).shape
        beside = read_image(str(masks / f"{stem}_overlay.jpg"))  # the demo's --save-overlays
        assert beside.shape == overlay.shape
    # Smaller than the window: enlarged inside, the mask at the input's own size.
    assert np.asarray(Image.open(masks / "small.png")).shape == (40, 48)
    # EXIF orientation applied as the project's reader does: displayed size 112 x 80.
    assert np.asarray(Image.open(masks / "rotated.png")).shape == (112, 80)
    assert read_image(str(overlays / "rotated.jpg")).shape == (112, 80, 3)


def test_runner_and_export_report_bad_input(exported, export_report, tmp_path):
    _, model_path, argv = exported
    base = [sys.executable, "-m", "hiervl.tools.onnx_predict", "--model"]
    missing = subprocess.run(
        base + [model_path, "--input", str(tmp_path / "nope.png"), "--save-masks", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 1 and "nope.png" in missing.stderr
    # An ONNX file that is no HierVL export is refused by name.
    foreign = tmp_path / "foreign.onnx"
    model = onnx.load(model_path)
    del model.metadata_props[:]
    onnx.save(model, str(foreign))
    refused = subprocess.run(
        base + [str(foreign), "--input", model_path, "--save-masks", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert refused.returncode == 1 and "not a HierVL export" in refused.stderr
    assert str(foreign) in refused.stderr
    bad_size = list(argv)
    bad_size[bad_size.index("--size") + 1] = "0"
    bad_size[bad_size.index("--output") + 1] = str(tmp_path / "bad.onnx")
    assert export.main(bad_size) == 1
    assert not (tmp_path / "bad.onnx").exists()


def _large_scene(path, height, width):
    """A synthetic scene enlarged (nearest: sharp class borders) to height × width."""
    scene = render_sample(0, "val", 5, 128)[0]
    Image.fromarray(scene).resize((width, height), Image.NEAREST).save(path)
    return str(path)


def test_runner_resizes_like_the_demo(exported, export_report, tmp_path):
    cfg, model_path, _ = exported
    assert export_report[0] == 0
    photo = _large_scene(tmp_path / "photo.png", 480, 720)  # seen at 128 x 192
    # The demo with the exported window (64, stride 32) at the same test scale.
    demo_cfg = cfg.clone()
    demo_cfg.defrost()
    demo_cfg.TEST.SLIDING_WINDOW.CROP_SIZE = WINDOW
    demo = SemanticPredictor(demo_cfg, vocabulary=VOCABULARY)(read_image(photo), input_format="RGB")
    threshold = float(np.median(demo.confidence)) + 1e-4
    expected = np.where(demo.confidence < threshold, 255, demo.labels).astype(np.uint8)
    assert tuple(demo.scores.shape[1:]) == (128, 192)

    masks = tmp_path / "masks"
    command = [sys.executable, "-c", BLOCKED_RUNNER, "--model", model_path, "--input", photo]
    command += ["--save-masks", str(masks), "--confidence-threshold", str(threshold)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "test scale 128/512" in proc.stderr
    mask = np.asarray(Image.open(masks / "photo.png"))
    assert mask.shape == (480, 720)
    # The random-init model gives one class almost everywhere: the threshold makes the map.
    assert 0.2 < (mask == 255).mean() < 0.8
    assert (mask == expected).mean() >= 0.999
    # In process: the upsampled confidence itself, at every pixel of the input.
    ours = onnx_predict.OnnxSegmenter(model_path)(read_image(photo))
    assert ours.scores.shape == tuple(demo.scores.shape)
    np.testing.assert_allclose(ours.confidence, demo.confidence, rtol=0, atol=1e-4)


def test_runner_reads_old_files_and_checks_the_override(exported, export_report, tmp_path, caplog):
    _, model_path, _ = exported
    assert export_report[0] == 0
    # A file exported before the test scale was stored: run at the input's resolution.
    old = tmp_path / "old.onnx"
    model = onnx.load(model_path)
    kept = [p for p in model.metadata_props if not p.key.endswith("_size_test")]
    assert len(kept) == len(model.metadata_props) - 2
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    onnx.save(model, str(old))
    image = render_sample(0, "val", 1, 160)[0][:96, :160]
    old_run = onnx_predict.OnnxSegmenter(str(old))(image)
    assert (old_run.scores.shape[1:], old_run.labels.shape) == ((96, 160), (96, 160))
    # The same result as the new file with the override 0 (no resizing) ...
    same = onnx_predict.OnnxSegmenter(model_path, min_size_test=0)(image)
    np.testing.assert_array_equal(old_run.labels, same.labels)
    np.testing.assert_array_equal(old_run.confidence, same.confidence)
    # ... and another than the new file at its test scale (128 x 213, then upsampled).
    resized = onnx_predict.OnnxSegmenter(model_path)(image)
    assert resized.scores.shape[1:] == (128, 213) and resized.labels.shape == (96, 160)
    assert np.abs(resized.confidence - old_run.confidence).max() > 1e-3

    source = str(tmp_path / "in.png")
    Image.fromarray(image).save(source)
    base = ["--model", model_path, "--input", source, "--save-masks", str(tmp_path / "m")]
    for override in (["--min-size-test", "-1"], ["--min-size-test", "600"]):
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="hiervl.tools.onnx_predict"):
            assert onnx_predict.main(base + override) == 1
        (record,) = caplog.records
        message = record.getMessage()
        assert "--min-size-test / --max-size-test" in message and "\n" not in message
        assert override[1] in message  # the value (600 > the file's MAX_SIZE_TEST 512)
    assert not (tmp_path / "m").exists()
