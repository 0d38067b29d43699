"""The full HierVL model, a named two-stream batch and one training step in plain PyTorch.

No detectron2 and no fvcore: ``gpu_suite.py`` runs this on a bare GPU machine, and
``bench_memory.py`` measures the same step on the CPU. The model comes from
``hiervl.model_builder`` with the defaults of ``hiervl/config.py`` (the paper's ViT-B/16
model, which ``configs/Base-HierVL.yaml`` restates; ``tests/test_gpu_suite.py`` checks they
agree), randomly initialised, with Pascal VOC's 21 class names.

The batch has the shapes and kinds of values of the trainer's named batch after
``meta_arch.HierVL`` has stacked it: CLIP-normalised images, label maps of a few classes
per image with an ignored border, CutMix boxes and padding masks (see ``named_batch``).

Shape letters: B images per stream, H×W the crop, K classes.
"""

from __future__ import annotations

import time
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
RANDOM_INIT = {"MODEL.HIERVL.CLIP.PRETRAINED": ""}  # nothing is downloaded
CHECKPOINT_ALL = {
    "MODEL.HIERVL.CHECKPOINTING.IMAGE_ENCODER": True,
    "MODEL.HIERVL.CHECKPOINTING.PIXEL_DECODER": True,
    "MODEL.HIERVL.CHECKPOINTING.DECODER": True,
}
# The Mask2Former-equivalent ablation of benchmarks/bench_model.py.
M2F_EQUIVALENT = {
    "MODEL.HIERVL.HSQG.ENABLED": False,
    "MODEL.HIERVL.CMSAM.ENABLED": False,
    "MODEL.HIERVL.DECODER.TEXT_QUERIES": False,
    "MODEL.HIERVL.LOSS.QT_WEIGHT": 0.0,
}
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def default_cfg(overrides: Optional[Dict[str, object]] = None):
    """HierVL's config defaults (detectron2's CfgNode or the plain stand-in of
    ``hiervl.config``), with ``RANDOM_INIT`` and then ``overrides`` ({"A.B.C": value})."""
    from hiervl.config import CN, add_hiervl_config

    root = CN()
    for path in ("MODEL", "INPUT", "INPUT.CROP", "DATASETS", "SOLVER", "SOLVER.AMP", "TEST"):
        node = root
        *parents, last = path.split(".")
        for name in parents:
            node = getattr(node, name)
        setattr(node, last, CN())
    cfg = add_hiervl_config(root)
    for key, value in {**RANDOM_INIT, **(overrides or {})}.items():
        node = cfg
        *parents, last = key.split(".")
        for name in parents:
            node = getattr(node, name)
        if last not in node:
            raise ValueError(f"unknown config key {key!r}")
        setattr(node, last, value)
    return cfg


class Trainee(NamedTuple):
    model: torch.nn.Module  # HierVLModel
    objective: torch.nn.Module  # HierVLObjective
    optimizer: torch.optim.Optimizer


def build_trainee(cfg, device: str, class_names=VOC_CLASSES) -> Trainee:
    """Model, objective and AdamW (lr 1e-4, weight decay 0.01) on ``device``, train mode."""
    from hiervl.model_builder import build_hiervl_model, build_objective

    model = build_hiervl_model(cfg, list(class_names)).to(device).train()
    objective = build_objective(cfg, model.backbone.embed_dim).to(device).train()
    params = [p for m in (model, objective) for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    return Trainee(model, objective, optimizer)


def _labels(batch: int, size: int, num_classes: int, gen: torch.Generator) -> torch.Tensor:
    """(B,H,W) long: each image split into four quadrants of random classes, the bottom
    rows ignored (255) as padding would be."""
    labels = torch.empty(batch, size, size, dtype=torch.long)
    half = size // 2
    for i in range(batch):
        classes = torch.randint(0, num_classes, (4,), generator=gen).tolist()
        for q, k in enumerate(classes):
            rows, cols = (
                slice((q // 2) * half, (q // 2 + 1) * half),
                slice((q % 2) * half, (q % 2 + 1) * half),
            )
            labels[i, rows, cols] = k
    labels[:, -max(1, size // 32) :] = 255
    return labels


def _boxes(batch: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """(B,H,W) bool CutMix boxes, a random square of a quarter to half the side each."""
    boxes = torch.zeros(batch, size, size, dtype=torch.bool)
    for i in range(batch):
        side = int(torch.randint(size // 4, size // 2 + 1, (1,), generator=gen))
        top, left = (int(v) for v in torch.randint(0, size - side + 1, (2,), generator=gen))
        boxes[i, top : top + side, left : left + side] = True
    return boxes


def named_batch(
    labeled: int, unlabeled: int, size: int, num_classes: int, device: str, seed: int = 0
):
    """(LabeledBatch, UnlabeledBatch or None) of random CLIP-normalised images."""
    from hiervl.modeling.objective import LabeledBatch, UnlabeledBatch

    gen = torch.Generator().manual_seed(seed)

    def images(b):
        return torch.randn(b, 3, size, size, generator=gen).to(device)

    lab = LabeledBatch(images(labeled), _labels(labeled, size, num_classes, gen).to(device))
    if unlabeled == 0:
        return lab, None
    ignore = torch.zeros(unlabeled, size, size, dtype=torch.bool)
    ignore[:, -max(1, size // 32) :] = True
    unlab = UnlabeledBatch(
        weak=images(unlabeled),
        strong1=images(unlabeled),
        strong2=images(unlabeled),
        box1=_boxes(unlabeled, size, gen).to(device),
        box2=_boxes(unlabeled, size, gen).to(device),
        ignore=ignore.to(device),
        mix_weak=images(unlabeled),
        mix_strong1=images(unlabeled),
        mix_strong2=images(unlabeled),
        mix_ignore=ignore.clone().to(device),
    )
    return lab, unlab


def _chunks(batch, parts: int) -> List:
    """Split every tensor of a Labeled/UnlabeledBatch into ``parts`` equal micro-batches
    (a field that is None, e.g. LabeledBatch.padding, stays None in every part)."""
    if batch is None:
        return [None] * parts
    size = batch[0].shape[0]
    if size % parts:
        raise ValueError(f"a batch of {size} images cannot be split into {parts} micro-batches")
    pieces = [[None] * parts if t is None else t.chunk(parts) for t in batch]
    return [type(batch)(*(p[i] for p in pieces)) for i in range(parts)]


def train_step(
    trainee: Trainee,
    labeled,
    unlabeled,
    *,
    precision: str = "fp32",
    micro_batches: int = 1,
    iteration: int = 0,
    max_iter: int = 1,
) -> Dict[str, float]:
    """One optimizer step over the batch, as ``hiervl.engine.step`` takes it: forward under
    autocast, backward, AdamW. Without micro-batches the previous step's gradients are
    freed only after the forward (so they count in the peak, as in the trainer); with them,
    before the first part. Returns the loss values (the whole batch's)."""
    dtype = PRECISIONS[precision]
    device = labeled.images.device.type
    totals: Dict[str, float] = {}
    if micro_batches > 1:
        trainee.optimizer.zero_grad(set_to_none=True)
    for lab, unlab in zip(_chunks(labeled, micro_batches), _chunks(unlabeled, micro_batches)):
        with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
            losses = trainee.objective(
                trainee.model, lab, unlab, iteration=iteration, max_iter=max_iter
            )
        if micro_batches == 1:
            trainee.optimizer.zero_grad(set_to_none=True)
        (sum(losses.values()) / micro_batches).backward()
        for k, v in losses.items():
            totals[k] = totals.get(k, 0.0) + float(v.detach()) / micro_batches
    trainee.optimizer.step()
    return totals


def prime_optimizer(trainee: Trainee) -> None:
    """Allocate every gradient and the AdamW state (what a previous step leaves behind)
    without a real step: zero gradients, then one AdamW step on them."""
    for group in trainee.optimizer.param_groups:
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    trainee.optimizer.step()


def state_bytes(trainee: Trainee) -> Dict[str, int]:
    """Bytes of the weights (all, frozen towers included), gradients and AdamW state."""
    params = {id(p): p for m in (trainee.model, trainee.objective) for p in m.parameters()}
    buffers = [b for m in (trainee.model, trainee.objective) for b in m.buffers()]
    weights = sum(p.numel() * p.element_size() for p in params.values())
    weights += sum(b.numel() * b.element_size() for b in buffers)
    trainable = [p for g in trainee.optimizer.param_groups for p in g["params"]]
    grads = sum(p.numel() * p.element_size() for p in trainable)
    return {"weights": weights, "grads": grads, "adamw": 2 * grads}


@torch.no_grad()
def sliding_window_scores(model, images: torch.Tensor, crop: int, precision: str) -> torch.Tensor:
    """Semantic scores (B,K,H,W) by 50%-overlap sliding windows, as ``meta_arch`` infers."""
    from hiervl.evaluation.sliding_window import sliding_window_inference

    dtype = PRECISIONS[precision]
    text = model.class_embeddings()
    device = images.device.type
    with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
        return sliding_window_inference(
            lambda x: model.predict_scores(x, text),
            images,
            crop=crop,
            stride=crop // 2,
            num_classes=text[0].shape[0],
        )


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str) -> Tuple[float, object]:
    """(seconds, result) of ``fn()``, synchronised on CUDA."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result
