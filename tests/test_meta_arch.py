"""The registered HierVL meta-architecture built from the tiny config: inference paths,
open vocabulary, checkpoint compatibility, the paper's Table 3 ablation switches, and
every shipped config file."""

import glob
import os

import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model

import hiervl.meta_arch  # noqa: F401  (registers HierVL)
from hiervl.config_loader import load_config
from hiervl.data.datasets import register_all
from hiervl.data.datasets.custom import register_custom_from_cfg
from hiervl.engine.checkpoint import HierVLCheckpointer
from hiervl.engine.launcher import setup_cfg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny", "hiervl_tiny_16.yaml")
SYNTHETIC = ["background", "circle", "square", "triangle", "star", "stripes"]
FAST = [
    "MODEL.HIERVL.DECODER.NUM_LAYERS", "2",
    "MODEL.HIERVL.LOSS.TRAIN_NUM_POINTS", "256",
    "MODEL.HIERVL.CLIP.CUSTOM.VISION_LAYERS", "2",
    "MODEL.HIERVL.CLIP.OUT_INDICES", "[1, 1, 2, 2]",
    "MODEL.HIERVL.PIXEL_DECODER.NUM_ENCODER_LAYERS", "1",
]  # fmt: skip
SIZE = 64


def _model(*opts, seed=0):
    cfg = setup_cfg(TINY, FAST + list(opts))
    torch.manual_seed(seed)
    return build_model(cfg)


def _image(height=SIZE, width=SIZE, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, height, width), generator=gen, dtype=torch.uint8)


def _labeled(seed=0):
    """Two labelled dicts with patch-aligned blocks of classes 0-2 and an ignored stripe."""
    gen = torch.Generator().manual_seed(seed)
    items = []
    for i in range(2):
        cells = torch.randint(0, 3, (SIZE // 16, SIZE // 16), generator=gen)
        sem_seg = cells.repeat_interleave(16, 0).repeat_interleave(16, 1)
        sem_seg[-2:] = 255
        items.append({"image": _image(seed=seed + i), "sem_seg": sem_seg})
    return items


def _unlabeled(seed=10):
    box = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    box[8:40, 16:48] = True
    return [
        {
            "image_weak": _image(seed=seed + i),
            "image_strong1": _image(seed=seed + i + 100),
            "image_strong2": _image(seed=seed + i + 200),
            "cutmix_box1": box,
            "cutmix_box2": box.t().contiguous(),
            "ignore_mask": torch.zeros(SIZE, SIZE, dtype=torch.bool),
        }
        for i in range(2)
    ]


def _infer(model, image, **extra):
    model.eval()
    with torch.no_grad():
        return model([dict({"image": image}, **extra)])[0]["sem_seg"]


def _two_stream(labeled=None, unlabeled=None):
    """A named semi-supervised batch: labelled, unlabelled and CutMix-partner streams."""
    return {
        "labeled": _labeled() if labeled is None else labeled,
        "unlabeled": _unlabeled() if unlabeled is None else unlabeled,
        "unlabeled_mix": _unlabeled(seed=20),
        "iteration": 0,
        "max_iter": 10,
    }


def _train_step(model, batch):
    model.train()
    model.zero_grad()
    losses = model(batch)
    for name, value in losses.items():
        assert torch.isfinite(value), name
    sum(losses.values()).backward()
    return losses


@pytest.fixture(scope="module")
def model():
    return _model()


# ---------------------------------------------------------------- inference


def test_sliding_window_equals_whole_image_when_the_window_is_the_image(model):
    image = _image(seed=3)
    model.sliding_window = False
    whole = _infer(model, image)
    model.sliding_window, model.window_crop, model.window_stride = True, SIZE, SIZE // 2
    try:
        sliding = _infer(model, image)
    finally:
        model.sliding_window = False
    assert whole.shape == (len(SYNTHETIC), SIZE, SIZE)
    assert torch.equal(sliding, whole)


@pytest.mark.parametrize("height,width", [(64, 64), (45, 67)])
def test_sliding_window_equals_whole_image_when_the_window_covers_it(model, height, width):
    image = _image(height, width, seed=4)
    model.sliding_window = False
    whole = _infer(model, image)
    model.sliding_window, model.window_crop, model.window_stride = True, 96, 48
    try:
        sliding = _infer(model, image)
    finally:
        model.sliding_window = False
    torch.testing.assert_close(sliding, whole, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sliding", [False, True])
@pytest.mark.parametrize("height,width", [(67, 45), (45, 101)])
def test_output_has_the_input_size_for_odd_sizes(model, sliding, height, width):
    model.sliding_window, model.window_crop, model.window_stride = sliding, 32, 16
    try:
        scores = _infer(model, _image(height, width, seed=5))
        # "height"/"width" (the original size before the mapper's resize) win.
        resized = _infer(model, _image(height, width, seed=5), height=2 * height, width=width)
    finally:
        model.sliding_window = False
    assert scores.shape == (len(SYNTHETIC), height, width)
    assert resized.shape == (len(SYNTHETIC), 2 * height, width)
    assert torch.isfinite(scores).all() and (scores >= 0).all()


def test_sliding_window_averages_several_windows(model, monkeypatch):
    """Crop 32 / stride 16 on a 64×45 image: 3 rows × 2 columns of windows."""
    calls = []
    predict = model.model.predict_scores

    def spy(images, text=None, **kwargs):
        calls.append(tuple(images.shape[-2:]))
        return predict(images, text, **kwargs)

    monkeypatch.setattr(model.model, "predict_scores", spy)
    model.sliding_window, model.window_crop, model.window_stride = True, 32, 16
    try:
        _infer(model, _image(64, 45, seed=6))
    finally:
        model.sliding_window = False
    assert calls == [(32, 32)] * 6


# ---------------------------------------------------------------- open vocabulary


def test_set_vocabulary_changes_k_without_retraining(tmp_path):
    model = _model()
    image = _image(seed=7)
    before = _infer(model, image)
    weights = {k: v.clone() for k, v in model.state_dict().items()}

    model.set_vocabulary(["cat", "dog", "traffic light"])
    assert _infer(model, image).shape == (3, SIZE, SIZE)
    model.set_vocabulary(SYNTHETIC)
    torch.testing.assert_close(_infer(model, image), before)
    for name, value in model.state_dict().items():
        assert torch.equal(value, weights[name]), name


def test_config_vocabulary_loads_the_same_weights(tmp_path):
    """A model trained on the synthetic classes, rebuilt with TEST.VOCABULARY, loads the
    checkpoint strictly and predicts exactly as before once given the same names."""
    trained = _model(seed=1)
    HierVLCheckpointer(trained, save_dir=str(tmp_path)).save("model_final")
    image = _image(seed=8)
    expected = _infer(trained, image)

    other = _model("TEST.VOCABULARY", "['cat', 'dog', 'car']", seed=2)
    assert other.model.class_names == ["cat", "dog", "car"]
    HierVLCheckpointer(other).load(str(tmp_path / "model_final.pth"))
    assert _infer(other, image).shape == (3, SIZE, SIZE)
    other.set_vocabulary(SYNTHETIC)
    torch.testing.assert_close(_infer(other, image), expected)


# ---------------------------------------------------------------- checkpoints


@pytest.mark.parametrize(
    "opts,named",
    [
        (["MODEL.HIERVL.DECODER.NUM_VISUAL_QUERIES", "4"], "visual_feat"),
        (["MODEL.HIERVL.HSQG.NUM_LEVELS", "1"], "level_mlps"),
        (["MODEL.HIERVL.CMSAM.ENABLED", "False"], "cmsam"),
    ],
)
def test_checkpoint_of_another_architecture_is_a_clear_error(tmp_path, opts, named):
    HierVLCheckpointer(_model(), save_dir=str(tmp_path)).save("model_final")
    path = str(tmp_path / "model_final.pth")
    with pytest.raises(ValueError, match="does not fit this model's architecture") as err:
        HierVLCheckpointer(_model(*opts)).load(path)
    assert path in str(err.value) and named in str(err.value)


def test_missing_checkpoint_is_a_clear_error(tmp_path, model):
    missing = str(tmp_path / "nothing.pth")
    with pytest.raises(ValueError) as err:
        HierVLCheckpointer(model).load(missing)
    assert str(err.value) == f"cannot read MODEL.WEIGHTS checkpoint {missing}: no such file"


# ---------------------------------------------------------------- training batches


def test_supervised_and_two_stream_batches(model):
    labeled = _labeled()
    losses = _train_step(model, labeled)
    assert losses and all(k.startswith(("loss_sup_", "loss_vl_")) for k in losses)
    batch = _two_stream(labeled)
    losses = _train_step(model, batch)
    assert {"loss_unsup_s1", "loss_unsup_s2", "loss_unsup_fp"} <= set(losses)


def test_images_of_different_sizes_are_padded_and_the_padding_reaches_the_decoder(
    model, monkeypatch
):
    """INPUT.CROP.ENABLED False: images of a batch differ in size. They are padded to the
    largest (rounded up to the patch grid) like detectron2's ImageList, labels with 255,
    and the padding maps (the mapper's crop padding, then the batch's) reach the pixel
    decoder in every pass: labelled, teacher (weak + partner), strong views, fp view."""
    labeled = _labeled()
    labeled[0] = {"image": _image(48, 40, seed=1), "sem_seg": labeled[0]["sem_seg"][:48, :40]}
    crop_padding = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    crop_padding[:, 56:] = True  # the mapper padded this crop's last 8 columns
    labeled[1] = dict(labeled[1], padding_mask=crop_padding)
    batch = model._labeled_batch(labeled)
    assert batch.images.shape == (2, 3, SIZE, SIZE)
    assert (batch.labels[0, 48:] == 255).all() and (batch.labels[0, :, 40:] == 255).all()
    assert torch.equal(batch.labels[0, :48, :40], labeled[0]["sem_seg"])
    expected = torch.ones(2, SIZE, SIZE, dtype=torch.bool)
    expected[0, :48, :40] = False
    expected[1] = crop_padding
    assert torch.equal(batch.padding, expected)
    assert (batch.images[0, :, 48:] == 0).all()  # normalised 0 = CLIP's mean colour

    unlabeled = _unlabeled()
    small = {k: v[..., :40, :56].contiguous() for k, v in unlabeled[1].items()}
    unlabeled[1] = small
    seen = []
    decoder_forward = model.model.pixel_decoder.forward

    def spy(features, queries, active, padding=None):
        seen.append(None if padding is None else padding.clone())
        return decoder_forward(features, queries, active, padding)

    monkeypatch.setattr(model.model.pixel_decoder, "forward", spy)
    two_stream = _two_stream(labeled, unlabeled)
    _train_step(model, two_stream)
    labelled_pass, teacher, strong, fp = seen
    assert torch.equal(labelled_pass, expected)
    own = torch.zeros(2, SIZE, SIZE, dtype=torch.bool)
    own[1] = True
    own[1, :40, :56] = False
    assert torch.equal(teacher, torch.cat([own, torch.zeros_like(own)]))  # partners: full size
    assert torch.equal(fp, own)
    box1 = torch.stack([unlabeled[0]["cutmix_box1"], torch.zeros(SIZE, SIZE, dtype=torch.bool)])
    box1[1, :40, :56] = small["cutmix_box1"]
    # Inside the CutMix box the pixels are the (unpadded) partner's.
    assert torch.equal(strong[:2], own & ~box1)


def _gradients(model, batch):
    torch.manual_seed(0)  # the labelled pass draws the same random points in both runs
    _train_step(model, batch)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_a_silent_unlabelled_stream_adds_nothing_to_the_labelled_gradient():
    """With no confident pseudo-label (CONF_THRESHOLD above 1) and the terms that act on
    unlabelled images regardless (entropy, MaskCLIP guidance) off, the unlabelled stream
    must not change the update: no batch statistics, no gate, no loss normalisation may
    leak it into the labelled terms. The gradient must be the labelled-only gradient
    (L_prompt, which is deterministic, stays on; L_mask/L_pt draw random classes after the
    unlabelled passes, so they are off). Entropy on: the gradient must differ."""
    silent = [
        "MODEL.HIERVL.SSL.CONF_THRESHOLD", "1.01",
        "MODEL.HIERVL.SSL.MASKCLIP_ENABLED", "False",
        "MODEL.HIERVL.VL.MASK_ENABLED", "False",
        "MODEL.HIERVL.VL.PT_ENABLED", "False",
    ]  # fmt: skip
    labeled = _labeled()
    two_stream = _two_stream(labeled)
    grads = {}
    for entropy in (False, True):
        model = _model(*silent, "MODEL.HIERVL.SSL.ENTROPY_ENABLED", str(entropy))
        grads[entropy] = (_gradients(model, labeled), _gradients(model, two_stream))
    labelled_only, semi = grads[False]
    assert set(semi) == set(labelled_only)
    for name, g in labelled_only.items():
        torch.testing.assert_close(semi[name], g, rtol=1e-4, atol=1e-7, msg=name)
    labelled_only, semi = grads[True]
    assert not all(
        torch.allclose(semi[n], g, rtol=1e-4, atol=1e-7) for n, g in labelled_only.items()
    )


def test_consistency_mode_from_the_config_reaches_the_loss():
    """SSL.CONSISTENCY_MODE is wired: with no pseudo-label above CONF_THRESHOLD the
    pixelwise terms are exactly 0, while the confidence-weighted mode (``pixelavg``, the
    quickstart's) has no threshold and learns from every pixel."""
    batch = _two_stream()
    values = {}
    for mode in ("pixel", "pixelavg"):
        model = _model(
            "MODEL.HIERVL.SSL.CONF_THRESHOLD", "1.01",
            "MODEL.HIERVL.SSL.CONSISTENCY_MODE", mode,
        )  # fmt: skip
        assert model.objective.consistency_mode == mode
        losses = _train_step(model, batch)
        values[mode] = [float(losses[f"loss_unsup_{v}"]) for v in ("s1", "s2", "fp")]
    assert values["pixel"] == [0.0, 0.0, 0.0]
    assert all(v > 0 for v in values["pixelavg"])


def test_ssl_off_ignores_the_unlabelled_stream():
    model = _model("MODEL.HIERVL.SSL.ENABLED", "False")
    batch = {"labeled": _labeled(), "unlabeled": _unlabeled(), "unlabeled_mix": _unlabeled(20)}
    losses = _train_step(model, batch)
    assert losses and not any(k.startswith("loss_unsup_") for k in losses)


# ---------------------------------------------------------------- Table 3 ablations


def _normalized(model, items):
    images = torch.stack([d["image"] for d in items]).float()
    return (images - model.pixel_mean) / model.pixel_std


def _forward(model, image_seed=0):
    """Training-mode network output for two labelled images (presence from their labels)."""
    items = _labeled(image_seed)
    images = _normalized(model, items)
    presence = torch.zeros(2, len(SYNTHETIC), dtype=torch.bool)
    for i, d in enumerate(items):
        labels = d["sem_seg"].unique()
        presence[i, labels[labels != 255]] = True
    model.train()
    return model.model(images, presence=presence), presence


def _num_params(model):
    return sum(p.numel() for p in model.parameters())


def test_full_model_reference_shapes(model):
    out, presence = _forward(model)
    k, levels, visual = len(SYNTHETIC), 3, 8
    # Text queries exist for the classes some image keeps (here: its ground truth).
    live = presence.any(0).nonzero().squeeze(1).tolist()
    assert len(live) < k
    assert out["pred_logits"].shape == (2, levels * len(live) + visual, k + 1)
    assert out["query_class"].tolist() == live * levels + [-1] * visual
    # GT gate on labelled images: exactly the present classes are active.
    assert torch.equal(out["active"], presence)
    assert torch.equal(out["gate"], presence.float())


def test_ablation_hsqg_off_gives_static_queries(model):
    ablated = _model("MODEL.HIERVL.HSQG.ENABLED", "False")
    assert _num_params(ablated) == _num_params(model)  # same weights, no gating
    out, presence = _forward(ablated)
    assert not presence.all()
    assert out["active"].all() and bool((out["gate"] == 1).all())
    assert out["query_valid"].all()
    hsqg = ablated.model.hsqg
    t = ablated.model.class_embeddings()[0]
    v = torch.randn(2, t.shape[1])
    queries = hsqg(t, v, presence).queries
    assert torch.equal(queries[0], queries[1]), "queries must not depend on the image"
    losses = _train_step(ablated, _labeled())
    assert losses["loss_sup_rel"] == 0
    assert hsqg.level_mlps[0][0].weight.grad.abs().sum() > 0


def test_ablation_cmsam_off_leaves_text_queries_unaligned(model):
    ablated = _model("MODEL.HIERVL.CMSAM.ENABLED", "False")
    assert _num_params(ablated) < _num_params(model)
    assert len(ablated.model.pixel_decoder.cmsam_layers) == 0
    net = ablated.model
    images = _normalized(ablated, _labeled())
    with torch.no_grad():
        t = net.class_embeddings()[0]
        gen = net.hsqg(t, net.frozen_encoder(images).global_embed)
        pix = net.pixel_decoder(net.backbone(images), gen.queries, gen.active)
        full = model.model
        full_pix = full.pixel_decoder(full.backbone(images), gen.queries, gen.active)
    assert torch.equal(pix.text_queries, gen.queries)
    assert not torch.allclose(full_pix.text_queries, gen.queries)
    _train_step(ablated, _labeled())


def test_ablation_without_visual_queries(model):
    ablated = _model("MODEL.HIERVL.DECODER.NUM_VISUAL_QUERIES", "0")
    assert _num_params(ablated) < _num_params(model)
    out, presence = _forward(ablated)
    k, live = len(SYNTHETIC), int(presence.any(0).sum())
    assert out["pred_logits"].shape == (2, 3 * live, k + 1)
    assert bool((out["query_class"] >= 0).all())
    _train_step(ablated, _labeled())


def test_mask2former_equivalent_visual_queries_only(model):
    """HSQG off + CMSAM off + no text queries: the query set of Mask2Former (the baseline
    of benchmarks/bench_model.py); E_I^0 does not run unless a loss reads it."""
    ablated = _model(
        "MODEL.HIERVL.DECODER.TEXT_QUERIES", "False",
        "MODEL.HIERVL.HSQG.ENABLED", "False",
        "MODEL.HIERVL.CMSAM.ENABLED", "False",
    )  # fmt: skip
    out, _ = _forward(ablated)
    k = len(SYNTHETIC)
    assert out["pred_logits"].shape == (2, 8, k + 1)
    assert bool((out["query_class"] == -1).all()) and out["frozen"] is None
    losses = _train_step(ablated, _labeled())
    assert losses["loss_sup_rel"] == 0 and losses["loss_sup_mask"] > 0


def test_ablation_without_level_hierarchy(model):
    ablated = _model("MODEL.HIERVL.HSQG.NUM_LEVELS", "1")
    assert _num_params(ablated) < _num_params(model)
    assert len(ablated.model.hsqg.level_mlps) == 1
    out, presence = _forward(ablated)
    k, live = len(SYNTHETIC), presence.any(0).nonzero().squeeze(1)
    assert out["pred_logits"].shape == (2, len(live) + 8, k + 1)
    assert torch.equal(out["query_class"][: len(live)], live)
    _train_step(ablated, _labeled())


# ---------------------------------------------------------------- shipped configs

CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True))


def test_configs_are_found():
    assert len(CONFIGS) >= 25


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, REPO))
def test_config_loads_and_names_registered_datasets(path, tmp_path):
    cfg = load_config(path)  # the loader every entry point uses
    assert cfg.MODEL.META_ARCHITECTURE == "HierVL"
    registered = set(register_all(str(tmp_path)))
    if cfg.DATASETS.CUSTOM.NAME:
        cfg.DATASETS.CUSTOM.ROOT = str(tmp_path)
        cfg.DATASETS.CUSTOM.CLASSES = ["background", "cell"]
        registered |= set(register_custom_from_cfg(cfg))
    names = (
        list(cfg.DATASETS.TRAIN_LABELED)
        + list(cfg.DATASETS.TRAIN_UNLABELED)
        + list(cfg.DATASETS.TRAIN)
        + list(cfg.DATASETS.TEST)
    )
    missing = [n for n in names if n not in registered]
    assert not missing, f"{path} names unregistered datasets {missing}"
    assert set(names) <= set(DatasetCatalog.list())

    stem = os.path.splitext(os.path.basename(path))[0]
    if stem.startswith("hiervl_") and stem.split("_")[-1].isdigit():
        # A split config trains on the split its file name promises.
        count = stem.split("_")[-1]
        assert len(cfg.DATASETS.TRAIN_LABELED) == 1
        assert cfg.DATASETS.TRAIN_LABELED[0].endswith(f"_train_labeled_{count}")
        unlabeled = cfg.DATASETS.TRAIN_LABELED[0].replace("_labeled_", "_unlabeled_")
        assert cfg.DATASETS.TRAIN_UNLABELED == (unlabeled,)
