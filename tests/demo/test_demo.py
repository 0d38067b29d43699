"""The demo: predictor, visualiser, image/video/webcam loops and the ``demo/demo.py`` CLI.

The tiny config with an untrained model saved by the checkpointer: the tests check I/O,
shapes, error handling and the arithmetic of thresholds and overlays, not accuracy.
"""

import importlib.util
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("detectron2")
cv2 = pytest.importorskip("cv2")

from hiervl.demo import (  # noqa: E402
    UNLABELED,
    SegmentationDemo,
    SemanticPredictor,
    SemanticVisualizer,
    check_display,
    expand_inputs,
    format_relevance,
    legend_entries,
    parse_vocabulary,
    run_on_images,
    run_on_video,
    run_on_webcam,
    runner,
)
from hiervl.demo import predictor as predictor_module  # noqa: E402
from hiervl.demo.runner import image_output_paths, video_output_path  # noqa: E402
from hiervl.engine.checkpoint import HierVLCheckpointer  # noqa: E402
from hiervl.engine.launcher import setup_cfg  # noqa: E402
from hiervl.engine.trainer import HierVLTrainer  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, "configs", "tiny", "hiervl_tiny_16.yaml")
DEMO_SCRIPT = os.path.join(REPO, "demo", "demo.py")
TRAINED_CLASSES = ["background", "circle", "square", "triangle", "star", "stripes"]


def _image(height, width, seed):
    """A BGR picture with a disc and a box on a noisy background."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    cv2.circle(image, (width // 3, height // 2), min(height, width) // 4, (0, 0, 255), -1)
    cv2.rectangle(image, (width // 2, 2), (width - 3, height // 2), (255, 0, 0), -1)
    return image


def _write_video(path, fourcc, frames, fps):
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*fourcc), fps, (width, height))
    assert writer.isOpened(), f"OpenCV cannot write {fourcc} here"
    for frame in frames:
        writer.write(frame)
    writer.release()


def _video_props(path):
    capture = cv2.VideoCapture(path)
    assert capture.isOpened(), path
    count = 0
    while capture.read()[0]:
        count += 1
    props = (
        count,
        int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)),
        int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)),
        capture.get(cv2.CAP_PROP_FPS),
    )
    capture.release()
    return props


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """An untrained tiny model saved the way training saves it."""
    cfg = setup_cfg(CONFIG, [])
    torch.manual_seed(0)
    model = HierVLTrainer.build_model(cfg)
    folder = tmp_path_factory.mktemp("weights")
    HierVLCheckpointer(model, save_dir=str(folder)).save("model_final")
    return str(folder / "model_final.pth")


@pytest.fixture(scope="module")
def cfg(weights):
    # At the input's own size (no test-scale resizing), so that the score maps compare
    # pixel for pixel with the input; resizing is tested separately.
    return setup_cfg(CONFIG, ["MODEL.WEIGHTS", weights, "INPUT.MIN_SIZE_TEST", 0])


@pytest.fixture(scope="module")
def demo(cfg):
    return SegmentationDemo(SemanticPredictor(cfg), SemanticVisualizer(alpha=0.5))


# ---------------------------------------------------------------- predictor


def test_predictor_loads_the_checkpoint(cfg, weights):
    torch.manual_seed(123)  # another initialisation than the saved model's
    predictor = SemanticPredictor(cfg)
    unloaded = HierVLTrainer.build_model(cfg).state_dict()
    saved = torch.load(weights, map_location="cpu")["model"]
    state = predictor.model.state_dict()
    assert not predictor.model.training
    assert state.keys() == saved.keys()
    assert all(torch.equal(state[k], v) for k, v in saved.items())
    assert not all(torch.equal(unloaded[k], v) for k, v in saved.items())
    assert predictor.class_names == TRAINED_CLASSES


def test_bgr_and_rgb_inputs_agree(demo):
    image = _image(40, 56, seed=1)
    from_bgr = demo.predictor(image, input_format="BGR")
    from_rgb = demo.predictor(np.ascontiguousarray(image[:, :, ::-1]), input_format="RGB")
    torch.testing.assert_close(from_bgr.scores, from_rgb.scores)
    with pytest.raises(ValueError, match="uint8"):
        demo.predictor(image.astype(np.float32))
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        demo.predictor(image[:, :, :2])


def test_probabilities_and_confidence_threshold(cfg):
    image = _image(48, 64, seed=2)
    full = SemanticPredictor(cfg)(image)
    k, h, w = full.scores.shape
    assert (k, h, w) == (len(TRAINED_CLASSES), 48, 64)
    # P = S / sum_k S, a distribution per pixel; labels = argmax P everywhere at threshold 0.
    torch.testing.assert_close(full.probs, full.scores / full.scores.sum(0, keepdim=True))
    torch.testing.assert_close(full.probs.sum(0), torch.ones(h, w))
    np.testing.assert_array_equal(full.labels, full.probs.argmax(0).numpy())
    np.testing.assert_allclose(full.confidence, full.probs.max(0).values.numpy())

    threshold = float(np.median(full.confidence))
    cut = SemanticPredictor(cfg, confidence_threshold=threshold)(image)
    hidden = full.confidence < threshold
    assert hidden.any() and (~hidden).any()
    assert (cut.labels[hidden] == UNLABELED).all()
    np.testing.assert_array_equal(cut.labels[~hidden], full.labels[~hidden])
    with pytest.raises(ValueError, match="confidence threshold"):
        SemanticPredictor(cfg, confidence_threshold=1.5)


def test_predictor_resizes_to_the_test_scale(weights):
    """Base-Tiny's INPUT.MIN_SIZE_TEST 128: a 48x64 image is seen at 128x171 (detectron2's
    rounding), and the labels come back at 48x64 from the upsampled probabilities."""
    predictor = SemanticPredictor(setup_cfg(CONFIG, ["MODEL.WEIGHTS", weights]))
    image = _image(48, 64, seed=5)
    seen = []
    inference = predictor.model.inference
    predictor.model.inference = lambda items, **kw: seen.append(items[0]) or inference(items, **kw)
    prediction = predictor(image)
    rgb = np.ascontiguousarray(image[:, :, ::-1])
    expected = cv2.resize(rgb, (171, 128), interpolation=cv2.INTER_LINEAR)
    assert torch.equal(seen[0]["image"], torch.from_numpy(expected.transpose(2, 0, 1).copy()))
    assert prediction.scores.shape == (len(TRAINED_CLASSES), 128, 171)
    assert prediction.labels.shape == prediction.confidence.shape == (48, 64)
    full = F.interpolate(prediction.probs[None], size=(48, 64), mode="bilinear")[0]
    np.testing.assert_array_equal(prediction.labels, full.argmax(0).numpy())
    np.testing.assert_allclose(prediction.confidence, full.max(0).values.numpy(), atol=1e-6)


class _FakeBar:
    bars = []

    def __init__(self, total, **kwargs):
        self.total, self.n, self.closed = total, 0, False
        _FakeBar.bars.append(self)

    def update(self, k):
        self.n += k

    def close(self):
        self.closed = True


def test_progress_bar_over_the_windows_of_a_large_image(cfg, monkeypatch):
    monkeypatch.setattr(predictor_module.tqdm, "tqdm", _FakeBar)
    _FakeBar.bars = []
    predictor = SemanticPredictor(cfg)  # INPUT.MIN_SIZE_TEST 0: the image at its own size
    # 200x300 with 128 windows at stride 64: 3 rows x 4 columns of windows.
    predictor(_image(200, 300, seed=6), progress=True)
    assert [(b.total, b.n, b.closed) for b in _FakeBar.bars] == [(12, 12, True)]
    predictor(_image(200, 300, seed=6))  # no bar unless asked (video frames)
    predictor(_image(100, 120, seed=6), progress=True)  # one window: nothing to show
    assert len(_FakeBar.bars) == 1


# ---------------------------------------------------------------- vocabulary


def test_parse_vocabulary(tmp_path):
    assert parse_vocabulary(" cat, dog ,sofa,") == ["cat", "dog", "sofa"]
    path = tmp_path / "names.txt"
    path.write_text("# my classes\ndining table\n\npotted plant, green\n")
    assert parse_vocabulary(str(path)) == ["dining table", "potted plant, green"]
    with pytest.raises(ValueError, match="missing.txt"):
        parse_vocabulary(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="--vocabulary ' , ': the vocabulary is empty"):
        parse_vocabulary(" , ")
    with pytest.raises(ValueError, match="#0 'cat' and #2 'cat' are the same text query"):
        parse_vocabulary("cat,dog,cat")
    cased = tmp_path / "cased.txt"
    cased.write_text("Cat\ncat \n")
    with pytest.raises(ValueError, match="#0 'Cat' and #1 'cat' are the same text query"):
        parse_vocabulary(str(cased))


def test_vocabulary_changes_the_class_list(cfg):
    image = _image(48, 64, seed=3)
    predictor = SemanticPredictor(cfg, vocabulary=["cat", "dog", "sofa"])
    prediction = predictor(image)
    assert predictor.class_names == ["cat", "dog", "sofa"]
    assert prediction.scores.shape == (3, 48, 64)
    assert set(np.unique(prediction.labels)) <= {0, 1, 2}
    legend = [e.name for e in legend_entries(prediction.labels, prediction.class_names)]
    assert legend and set(legend) <= {"cat", "dog", "sofa"}
    assert predictor.class_relevance(image).shape == (3,)

    # The classes are text queries: permuting the names permutes the scores.
    predictor.set_vocabulary(["sofa", "cat", "dog"])
    permuted = predictor(image)
    torch.testing.assert_close(permuted.scores, prediction.scores[[2, 0, 1]], atol=1e-5, rtol=1e-4)


def test_show_relevance_gives_one_sorted_score_per_class(demo, tmp_path):
    path = str(tmp_path / "a.png")
    cv2.imwrite(path, _image(48, 64, seed=4))
    report = run_on_images(demo, [path], str(tmp_path / "out"), show_relevance=True)
    relevance = report.results[0].relevance
    names = demo.predictor.class_names
    assert relevance.shape == (len(names),)
    assert ((relevance >= 0) & (relevance <= 1)).all()
    torch.testing.assert_close(relevance, demo.predictor.class_relevance(cv2.imread(path)))
    lines = format_relevance(names, relevance).splitlines()
    parsed = [re.match(r"^\s+(.+?)\s+([0-9.]+)$", line).groups() for line in lines]
    assert sorted(n for n, _ in parsed) == sorted(names)
    scores = [float(s) for _, s in parsed]
    assert scores == sorted(scores, reverse=True)
    assert scores[0] == pytest.approx(relevance.max().item(), abs=1e-3)


# ---------------------------------------------------------------- images


def test_images_are_written_with_their_sizes(demo, tmp_path):
    sizes = [(48, 64), (70, 50), (33, 45)]
    paths = []
    for i, (h, w) in enumerate(sizes):
        paths.append(str(tmp_path / f"img{i}.{'png' if i % 2 else 'jpg'}"))
        cv2.imwrite(paths[-1], _image(h, w, seed=i))
    found, failures = expand_inputs([str(tmp_path / "*.png"), str(tmp_path / "*.jpg")])
    assert sorted(found) == sorted(paths) and not failures
    out_dir = tmp_path / "out"
    report = run_on_images(demo, found, str(out_dir))
    assert not report.failures
    assert sorted(os.listdir(out_dir)) == sorted(os.path.basename(p) for p in paths)
    for result in report.results:
        written = cv2.imread(result.output)
        assert written.shape == cv2.imread(result.path).shape
        assert result.prediction.labels.shape == written.shape[:2]
    # One input and a file name: the file itself.
    single = tmp_path / "single" / "vis.png"
    report = run_on_images(demo, [paths[0]], str(single))
    assert cv2.imread(str(single)).shape == (48, 64, 3)


def test_corrupt_image_is_reported_and_the_rest_still_runs(demo, tmp_path):
    good = [str(tmp_path / "a.png"), str(tmp_path / "c.png")]
    for i, path in enumerate(good):
        cv2.imwrite(path, _image(40, 48, seed=i))
    corrupt = tmp_path / "b.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    missing = str(tmp_path / "missing.jpg")
    paths = [good[0], str(corrupt), missing, good[1]]
    report = run_on_images(demo, paths, str(tmp_path / "out"))
    assert [f.path for f in report.failures] == [str(corrupt), missing]
    assert "b.png" in report.failures[0].message and "not an image" in report.failures[0].message
    assert "missing.jpg" in report.failures[1].message
    assert sorted(os.listdir(tmp_path / "out")) == ["a.png", "c.png"]
    _, failures = expand_inputs([str(tmp_path / "*.tiff")])
    assert "matches no file" in failures[0].message


def test_output_paths(tmp_path):
    assert image_output_paths(["x/a.jpg"], "vis.png") == ["vis.png"]
    assert image_output_paths(["x/a.jpg", "y/a.jpg", "z/b.gif"], "out") == [
        os.path.join("out", "a.jpg"),
        os.path.join("out", "a_1.jpg"),
        os.path.join("out", "b.png"),
    ]
    with pytest.raises(ValueError, match="pass a folder"):
        image_output_paths(["a.jpg", "b.jpg"], "vis.png")
    with pytest.raises(ValueError, match="overwrite"):
        image_output_paths(["a.jpg"], "a.jpg")
    assert video_output_path("in/clip.avi", "out/") == os.path.join("out/", "clip.avi")
    assert video_output_path("in/clip.webm", str(tmp_path)) == str(tmp_path / "clip.mp4")
    with pytest.raises(ValueError, match="unsupported video format"):
        video_output_path("clip.avi", "clip_seg.gif")


# ---------------------------------------------------------------- video / webcam


@pytest.mark.parametrize(("fourcc", "suffix"), [("MJPG", ".avi"), ("mp4v", ".mp4")])
def test_video_keeps_frame_count_size_and_rate(demo, tmp_path, fourcc, suffix):
    frames = [_image(48, 64, seed=i) for i in range(5)]
    video = str(tmp_path / f"clip{suffix}")
    _write_video(video, fourcc, frames, fps=7)
    count = run_on_video(demo, video, str(tmp_path / "out"))
    assert count == 5
    assert _video_props(str(tmp_path / "out" / f"clip{suffix}")) == (5, 64, 48, 7.0)


def test_label_maps_of_video_frames_and_images_need_no_display(demo, tmp_path, monkeypatch):
    from hiervl.data.image_io import read_mask
    from hiervl.demo.label_maps import LabelMapWriter

    monkeypatch.setattr(runner, "check_display", lambda *a: pytest.fail("window opened"))
    monkeypatch.setattr(runner, "_show", lambda *a: pytest.fail("window opened"))
    frames = [_image(48, 64, seed=i) for i in range(2)]
    video = str(tmp_path / "clip.avi")
    _write_video(video, "MJPG", frames, fps=5)
    writer = LabelMapWriter(str(tmp_path / "maps"), num_classes=len(TRAINED_CLASSES))
    assert run_on_video(demo, video, None, save_masks=writer) == 2
    assert sorted(os.listdir(tmp_path / "maps" / "clip")) == ["000000.png", "000001.png"]
    assert read_mask(str(tmp_path / "maps" / "clip" / "000001.png")).shape == (48, 64)
    photo = str(tmp_path / "in" / "p.png")
    os.makedirs(os.path.dirname(photo))
    cv2.imwrite(photo, _image(30, 50, seed=9))
    writer = LabelMapWriter(str(tmp_path / "maps2"), num_classes=6, inputs=[photo])
    report = run_on_images(demo, [photo], None, save_masks=writer)
    mask = read_mask(str(tmp_path / "maps2" / "p.png"))
    np.testing.assert_array_equal(mask, report.results[0].prediction.labels)


def test_unreadable_video_gives_a_clear_error(demo, tmp_path):
    broken = tmp_path / "broken.mp4"
    broken.write_text("not a video")
    with pytest.raises(ValueError, match="broken.mp4"):
        run_on_video(demo, str(broken), str(tmp_path / "out"))
    with pytest.raises(ValueError, match="nothing.avi.*no such file"):
        run_on_video(demo, str(tmp_path / "nothing.avi"), str(tmp_path / "out"))
    assert not (tmp_path / "out" / "broken.mp4").exists()


class _FakeCapture:
    def __init__(self, frames):
        self.frames = list(frames)
        self.released = False

    def isOpened(self):  # noqa: N802 (OpenCV's name)
        return bool(self.frames)

    def read(self):
        return (True, self.frames.pop(0)) if self.frames else (False, None)

    def release(self):
        self.released = True


def test_webcam_loop_and_errors(demo, monkeypatch):
    monkeypatch.setattr(runner, "check_display", lambda advice: None)
    monkeypatch.setattr(runner, "_close_windows", lambda: None)
    keys = iter([0, runner.ESC_KEY])
    shown = []
    monkeypatch.setattr(runner, "_show", lambda image, wait: shown.append(image) or next(keys))
    camera = _FakeCapture([_image(48, 64, seed=i) for i in range(4)])
    assert run_on_webcam(demo, capture_factory=lambda index: camera) == 2
    assert camera.released and [s.shape for s in shown] == [(48, 64, 3)] * 2
    with pytest.raises(ValueError, match="cannot open the webcam"):
        run_on_webcam(demo, capture_factory=lambda index: _FakeCapture([]))


def test_no_display_asks_for_output(monkeypatch):
    monkeypatch.setattr(runner.sys, "platform", "linux")
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    with pytest.raises(ValueError, match="DISPLAY is not set.*pass --output"):
        check_display()
    with pytest.raises(ValueError, match="--webcam shows its results in a window"):
        run_on_webcam(None, capture_factory=lambda index: pytest.fail("camera opened"))


# ---------------------------------------------------------------- CLI


def _load_demo_script():
    spec = importlib.util.spec_from_file_location("hiervl_demo_script", DEMO_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_video_in_process(weights, tmp_path, monkeypatch):
    script = _load_demo_script()
    # detectron2's setup_logger would stop 'hiervl' logs from propagating for later tests.
    monkeypatch.setattr(script, "setup_logger", lambda **kwargs: None)
    video = str(tmp_path / "clip.avi")
    _write_video(video, "MJPG", [_image(48, 64, seed=i) for i in range(3)], fps=7)
    out = str(tmp_path / "seg.mp4")
    common = ["--config-file", CONFIG, "--vocabulary", "cat,dog"]
    argv = common + ["--video-input", video, "--output", out, "--opts", "MODEL.WEIGHTS", weights]
    assert script.main(argv) == 0
    assert _video_props(out) == (3, 64, 48, 7.0)
    broken = tmp_path / "broken.avi"
    broken.write_bytes(b"\x00" * 64)
    argv[argv.index(video)] = str(broken)
    assert script.main(argv) == 1
    # Without --output and without a display: a clear error before the model is built.
    monkeypatch.setattr(runner.sys, "platform", "linux")
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.setattr(script, "setup_cfg", lambda *a: pytest.fail("config loaded"))
    assert script.main(["--config-file", CONFIG, "--input", video]) == 1


def test_show_relevance_needs_hsqg(weights, tmp_path, monkeypatch, caplog):
    script = _load_demo_script()
    monkeypatch.setattr(script, "setup_logger", lambda **kwargs: None)
    monkeypatch.setattr(
        script, "SemanticPredictor", lambda *a, **k: pytest.fail("model built anyway")
    )
    path = str(tmp_path / "a.png")
    cv2.imwrite(path, _image(32, 32, seed=0))
    argv = ["--config-file", CONFIG, "--input", path, "--output", str(tmp_path / "o.png")]
    argv += ["--show-relevance", "--opts", "MODEL.HIERVL.HSQG.ENABLED", "False"]
    with caplog.at_level("ERROR"):
        assert script.main(argv) == 1
    assert "MODEL.HIERVL.HSQG.ENABLED False" in caplog.text


def test_cli_end_to_end(weights, tmp_path):
    """The real command line: a vocabulary file, relevance, a corrupt image, exit status."""
    for i, size in enumerate([(48, 64), (40, 56)]):
        cv2.imwrite(str(tmp_path / f"img{i}.png"), _image(*size, seed=i))
    (tmp_path / "img9.png").write_bytes(b"corrupt")
    vocabulary = tmp_path / "vocab.txt"
    vocabulary.write_text("cat\ndog\nsofa\n")
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        DEMO_SCRIPT,
        "--config-file",
        CONFIG,
        "--input",
        str(tmp_path / "img*.png"),
        "--output",
        str(out),
        "--vocabulary",
        str(vocabulary),
        "--show-relevance",
        "--opts",
        "MODEL.WEIGHTS",
        weights,
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 1, log
    assert re.search(r"img9\.png: not an image", log), log
    assert sorted(os.listdir(out)) == ["img0.png", "img1.png"]
    assert cv2.imread(str(out / "img0.png")).shape == (48, 64, 3)
    assert cv2.imread(str(out / "img1.png")).shape == (40, 56, 3)
    for name in ("cat", "dog", "sofa"):
        assert len(re.findall(rf"^\s+{name}\s+[0-9]\.[0-9]{{3}}$", log, re.MULTILINE)) == 2, log
    assert not re.search(r"^\s+circle\s+[0-9.]+$", log, re.MULTILINE)
