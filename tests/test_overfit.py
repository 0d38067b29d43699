"""The tiny HierVL overfits one labelled synthetic image with the supervised objective.

The model is trained once (module fixture) with the paper's optimizer recipe (AdamW,
backbone ×0.1, HierVL components ×4, poly LR) and SSL / VL terms off. Three checks:
the loss falls by > 90%; the network's own masks segment the image (mIoU > 0.9 with
Mask2Former's inference: mask logits upsampled to the image, then sigmoid and class
combination); and the meta-architecture's eval output does too.
"""

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling import build_model

import hiervl.meta_arch  # noqa: F401  (registers HierVL)
from hiervl.data.datasets.synthetic import CLASSES, render_sample
from hiervl.engine.launcher import setup_cfg
from hiervl.engine.optim import build_lr_scheduler, build_optimizer
from hiervl.modeling.inference import semantic_inference

pytestmark = pytest.mark.slow

TINY = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs/tiny/hiervl_tiny_16.yaml")
SIZE = 64
STEPS = 250
# Image 0 of the synthetic train split at 64×64: background, square, triangle and a small
# (89-pixel) striped patch; small objects make a loose mIoU bar impossible to fake.
IMAGE_INDEX = 0
OPTS = [
    "MODEL.HIERVL.SSL.ENABLED", "False",
    "MODEL.HIERVL.VL.PROMPT_ENABLED", "False",
    "MODEL.HIERVL.VL.MASK_ENABLED", "False",
    "MODEL.HIERVL.VL.PT_ENABLED", "False",
    "MODEL.HIERVL.DECODER.NUM_LAYERS", "2",
    "MODEL.HIERVL.LOSS.TRAIN_NUM_POINTS", "256",
    "TEST.SLIDING_WINDOW.ENABLED", "False",
    "SOLVER.BASE_LR", "0.0005",
    "SOLVER.MAX_ITER", str(STEPS),
]  # fmt: skip


def mean_iou(pred: torch.Tensor, gt: torch.Tensor) -> float:
    """Mean IoU over the classes in the prediction or the ground truth."""
    ious = []
    for c in torch.cat([pred.unique(), gt.unique()]).unique().tolist():
        union = ((pred == c) | (gt == c)).sum().item()
        ious.append(((pred == c) & (gt == c)).sum().item() / union)
    return float(np.mean(ious))


@pytest.fixture(scope="module")
def trained():
    cfg = setup_cfg(TINY, OPTS)
    torch.manual_seed(0)
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_lr_scheduler(cfg, optimizer)
    image, label = render_sample(0, "train", IMAGE_INDEX, SIZE)
    item = {
        "image": torch.from_numpy(image).permute(2, 0, 1).contiguous(),
        "sem_seg": torch.from_numpy(label.astype(np.int64)),
    }
    model.train()
    history = []
    for _ in range(STEPS):
        losses = model([item])
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        scheduler.step()
        history.append(total.item())
    model.eval()
    return model, item, losses, history


def test_overfit_loss_falls_by_90_percent(trained):
    _, _, losses, history = trained
    assert all(k.startswith("loss_sup_") for k in losses), sorted(losses)
    assert all(np.isfinite(history))
    final = np.mean(history[-10:])
    assert final < 0.1 * history[0], (history[0], final)


def test_overfit_network_masks_segment_the_image(trained):
    model, item, _, _ = trained
    gt = item["sem_seg"]
    image = ((item["image"].float() - model.pixel_mean) / model.pixel_std)[None]
    with torch.no_grad():
        out = model.model(image)
        masks = F.interpolate(
            out["pred_masks"], size=(SIZE, SIZE), mode="bilinear", align_corners=False
        )
        scores = semantic_inference(out["pred_logits"], masks, out["query_valid"])
    assert len(gt.unique()) == 4 and len(CLASSES) == 6
    # HSQG's own relevance (no ground truth at inference) keeps exactly the present classes.
    present = torch.zeros(len(CLASSES), dtype=torch.bool)
    present[gt.unique()] = True
    assert torch.equal(out["active"][0], present)
    assert mean_iou(scores.argmax(dim=1)[0], gt) > 0.9


def test_overfit_model_inference_segments_the_image(trained):
    model, item, _, _ = trained
    with torch.no_grad():
        scores = model([{"image": item["image"]}])[0]["sem_seg"]
    assert scores.shape == (len(CLASSES), SIZE, SIZE)
    assert mean_iou(scores.argmax(dim=0), item["sem_seg"]) > 0.9
