"""Pretrain a small CLIP on the synthetic dataset's captions (DESIGN §7).

No pretrained CLIP can be downloaded on the project's machines, so ``make quickstart``
makes one: open_clip's ``CLIP`` with the towers of ``MODEL.HIERVL.CLIP.CUSTOM`` (exactly
the architecture the config builds), trained with open_clip's ``ClipLoss`` on
image-caption pairs of the hard synthetic variant. Each image's caption is redrawn every
time it is used (random templates, word order, colours and counts; see
:func:`hiervl.data.datasets.synthetic_hard.caption`). The images come from the
generator's ``pretrain`` seed words, so none of them is a train or val image of the
quickstart; the zero-shot check uses another ``pretrain_heldout`` range.

The result is cached under ``<output-dir>/<settings hash>/``: ``clip.pt`` (a plain state
dict of tensors in open_clip's key format: ``MODEL.HIERVL.CLIP.PRETRAINED <path>`` loads
it), ``pretrain.json`` (settings, loss curve, time) and ``zero_shot.json`` (the check of
:mod:`hiervl.tools.zero_shot`, for the pretrained and the random-init towers). Calling it
again with the same settings reuses the folder.

    python -m hiervl.tools.pretrain_clip [--config-file configs/tiny/hiervl_quickstart.yaml]
        [--output-dir output/clip_pretrain] [--steps N] [--batch-size N] [--images N]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from open_clip.loss import ClipLoss
from open_clip.model import CLIP
from open_clip.tokenizer import SimpleTokenizer

from hiervl.data.datasets.synthetic import (
    CLASSES,
    GENERATOR_VERSION,
    HARD,
    generator_digest,
    render_scene,
)
from hiervl.data.datasets.synthetic_hard import Scene, caption
from hiervl.modeling.backbone.clip_loader import CUSTOM_KEYS, custom_clip_config
from hiervl.tools.zero_shot import normalize_images, zero_shot_report

__all__ = ["PretrainSettings", "clip_sizes", "ensure_pretrained", "pretrain", "render_pairs"]

logger = logging.getLogger("hiervl.tools.pretrain_clip")

DEFAULT_CONFIG = "configs/tiny/hiervl_quickstart.yaml"
CHECKPOINT = "clip.pt"
# Bump when the training code changes what a given set of settings produces.
PRETRAIN_VERSION = 1
_LOG_PERIOD = 25


@dataclasses.dataclass(frozen=True)
class PretrainSettings:
    """Everything the pretrained weights depend on besides the architecture."""

    # 800 x 48 pairs over 4000 images: the zero-shot figures of 800 x 64 over 6000 (presence
    # AUC 0.763, MaskCLIP mIoU 14.6 vs 14.5) in 3/4 of the compute, within the 3 min
    # (benchmarks/RESULTS.md); 500 steps lost the dense alignment (MaskCLIP mIoU 6.6). Those
    # figures are for generator v2; on v3 the same settings give AUC 0.912, MaskCLIP 26.1.
    steps: int = 800
    batch_size: int = 48
    num_images: int = 4000
    heldout_images: int = 500
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup_fraction: float = 0.1
    seed: int = 0
    data_seed: int = HARD["seed"]

    def __post_init__(self):
        for name in ("steps", "batch_size", "num_images", "heldout_images"):
            if getattr(self, name) <= 0:
                raise ValueError(
                    f"pretrain_clip: {name} must be positive, got {getattr(self, name)}"
                )
        if self.batch_size > self.num_images:
            raise ValueError(
                f"pretrain_clip: batch_size {self.batch_size} exceeds num_images {self.num_images}"
            )


def clip_sizes(cfg) -> Dict[str, int]:
    """The CUSTOM tower sizes of a config (lower-case keys); ``ValueError`` unless the
    config builds a "custom" CLIP (only those can be pretrained here)."""
    clip = cfg.MODEL.HIERVL.CLIP
    if clip.MODEL_NAME != "custom":
        raise ValueError(
            f"pretrain_clip needs MODEL.HIERVL.CLIP.MODEL_NAME 'custom', got {clip.MODEL_NAME!r}"
        )
    return {key: int(clip.CUSTOM[key.upper()]) for key in CUSTOM_KEYS}


def render_pairs(
    split: str, count: int, size: int, seed: int
) -> Tuple[np.ndarray, np.ndarray, List[Scene]]:
    """(N, S, S, 3) uint8 images, (N, S, S) labels and the scenes of ``count`` images of a
    pretraining split of the hard variant."""
    images = np.empty((count, size, size, 3), np.uint8)
    labels = np.empty((count, size, size), np.uint8)
    scenes = []
    for index in range(count):
        images[index], labels[index], scene = render_scene(seed, split, index, size)
        scenes.append(scene)
    return images, labels, scenes


def _presence(scenes: Sequence[Scene]) -> np.ndarray:
    """(N, K) bool: the classes each image shows; background in every image."""
    present = np.zeros((len(scenes), len(CLASSES)), bool)
    present[:, 0] = True
    for i, scene in enumerate(scenes):
        present[i, list(scene.classes)] = True
    return present


def _param_groups(model: torch.nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    # open_clip's training recipe: no decay on gains, biases, norms and the logit scale.
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        exclude = param.ndim < 2 or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if exclude else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _lr_factor(step: int, settings: PretrainSettings) -> float:
    """Linear warm-up, then cosine decay to 0 (open_clip's cosine schedule)."""
    warmup = max(1, int(settings.warmup_fraction * settings.steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, settings.steps - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress))


def build_model(sizes: Dict[str, int], seed: int) -> Tuple[CLIP, SimpleTokenizer]:
    """Random-init open_clip CLIP of ``sizes`` (seeded) and its tokenizer."""
    config = custom_clip_config(sizes)
    torch.manual_seed(seed)
    return CLIP(**config), SimpleTokenizer(context_length=config["text_cfg"].context_length)


def pretrain(
    model: CLIP,
    tokenizer: SimpleTokenizer,
    images: np.ndarray,
    scenes: Sequence[Scene],
    settings: PretrainSettings,
) -> List[float]:
    """Contrastive image-caption training of ``model`` in place; returns the loss per step.

    Each step draws ``batch_size`` distinct images, a fresh caption for each, and flips
    half the images horizontally (a flip changes no caption).
    """
    rng = np.random.default_rng([settings.seed, 1])
    optimizer = torch.optim.AdamW(
        _param_groups(model, settings.weight_decay), lr=settings.lr, betas=(0.9, 0.98), eps=1e-6
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, settings))
    loss_fn = ClipLoss()
    model.train()
    losses: List[float] = []
    start = time.perf_counter()
    for step in range(settings.steps):
        index = rng.choice(len(images), size=settings.batch_size, replace=False)
        batch = images[index]
        flip = rng.random(len(index)) < 0.5
        batch[flip] = batch[flip, :, ::-1]
        texts = tokenizer([caption(scenes[i], rng) for i in index])
        image_features, text_features, logit_scale = model(normalize_images(batch), texts)
        loss = loss_fn(image_features, text_features, logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        with torch.no_grad():  # as open_clip: the temperature never exceeds 100
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(float(loss))
        if (step + 1) % _LOG_PERIOD == 0 or step + 1 == settings.steps:
            elapsed = time.perf_counter() - start
            eta = elapsed / (step + 1) * (settings.steps - step - 1)
            logger.info(
                "pretrain_clip step %d/%d  loss %.3f  lr %.2e  %.0f pairs/s  eta %.0f s",
                step + 1, settings.steps, float(np.mean(losses[-_LOG_PERIOD:])),
                scheduler.get_last_lr()[0], (step + 1) * settings.batch_size / elapsed, eta,
            )  # fmt: skip
    model.eval()
    return losses


def settings_key(sizes: Dict[str, int], settings: PretrainSettings) -> str:
    """Hash of everything the checkpoint depends on (the cache folder's name)."""
    spec = {
        "pretrain_version": PRETRAIN_VERSION,
        "generator_version": GENERATOR_VERSION,
        "generator_digest": generator_digest(),
        "sizes": sizes,
        "settings": dataclasses.asdict(settings),
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _zero_shot(cfg, model, tokenizer, heldout) -> Dict[str, float]:
    h = cfg.MODEL.HIERVL
    images, labels, scenes = heldout
    return zero_shot_report(
        model,
        tokenizer,
        images,
        labels,
        _presence(scenes),
        class_names=CLASSES,
        template=h.CLIP.TEMPLATE,
        logit_scale=h.SSL.MASKCLIP_LOGIT_SCALE,
        certainty=h.SSL.MASKCLIP_CERTAINTY,
    )


def ensure_pretrained(
    cfg, output_dir: str, settings: Optional[PretrainSettings] = None
) -> Tuple[str, Dict[str, Any]]:
    """The pretrained checkpoint for ``cfg``'s CUSTOM towers and ``settings``: reused from
    ``output_dir/<hash>/`` when there, else trained, checked and written atomically.

    Returns:
        (checkpoint path, record): the record holds "settings", "seconds", "losses",
        "zero_shot" {"random_init": ..., "pretrained": ...} and "reused".
    """
    settings = settings or PretrainSettings()
    sizes = clip_sizes(cfg)
    folder = os.path.join(output_dir, settings_key(sizes, settings))
    path = os.path.join(folder, CHECKPOINT)
    record_path = os.path.join(folder, "pretrain.json")
    if os.path.isfile(path) and os.path.isfile(record_path):
        with open(record_path) as f:
            record = json.load(f)
        logger.info("Reusing the pretrained CLIP %s", path)
        return path, {**record, "reused": True}

    start = time.perf_counter()
    size = sizes["image_size"]
    logger.info(
        "Pretraining CLIP: %d steps x %d pairs over %d synthetic images (%d px)",
        settings.steps, settings.batch_size, settings.num_images, size,
    )  # fmt: skip
    images, _, scenes = render_pairs("pretrain", settings.num_images, size, settings.data_seed)
    heldout = render_pairs("pretrain_heldout", settings.heldout_images, size, settings.data_seed)
    model, tokenizer = build_model(sizes, settings.seed)
    random_init = _zero_shot(cfg, model, tokenizer, heldout)
    train_start, train_cpu = time.perf_counter(), time.process_time()
    losses = pretrain(model, tokenizer, images, scenes, settings)
    train_seconds = time.perf_counter() - train_start
    train_cpu = time.process_time() - train_cpu
    record = {
        "settings": dataclasses.asdict(settings),
        "sizes": sizes,
        "losses": losses,
        "train_seconds": round(train_seconds, 1),
        # CPU seconds (all threads): the work, unlike the wall time, barely depends on how
        # busy the machine is.
        "train_cpu_seconds": round(train_cpu, 1),
        "pairs_per_second": round(settings.steps * settings.batch_size / train_seconds, 1),
        "zero_shot": {
            "random_init": random_init,
            "pretrained": _zero_shot(cfg, model, tokenizer, heldout),
        },
        "threads": torch.get_num_threads(),
    }
    record["seconds"] = round(time.perf_counter() - start, 1)
    os.makedirs(output_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".clip-", dir=output_dir)
    try:
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()},
                   os.path.join(staging, CHECKPOINT))  # fmt: skip
        with open(os.path.join(staging, "pretrain.json"), "w") as f:
            json.dump(record, f, indent=1, allow_nan=True)
        if os.path.isdir(folder):  # an incomplete earlier attempt
            shutil.rmtree(folder)
        os.rename(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path, {**record, "reused": False}


def format_report(path: str, record: Dict[str, Any]) -> str:
    """The printed table: zero-shot figures of the random-init and pretrained towers."""
    s = record["settings"]
    random_init, pretrained = record["zero_shot"]["random_init"], record["zero_shot"]["pretrained"]
    rows = [(f"presence AUC, {name}", f"auc-{name}", 1.0) for name in CLASSES[1:]]
    rows += [("presence AUC, mean", "auc_mean", 1.0)]
    rows += [("MaskCLIP dense mIoU (%)", "maskclip_mIoU", 1.0)]
    rows += [(f"MaskCLIP IoU, {name} (%)", f"maskclip-IoU-{name}", 1.0) for name in CLASSES]
    rows += [
        ("MaskCLIP pixel accuracy (%)", "maskclip_pixel_acc", 1.0),
        ("pixels certain enough for guidance (%)", "maskclip_certain_share", 1.0),
        ("accuracy of those pixels (%)", "maskclip_certain_acc", 1.0),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [
        f"CLIP pretraining: {s['steps']} steps x {s['batch_size']} pairs over "
        f"{s['num_images']} images, {record['train_seconds']:.0f} s training "
        f"({record['pairs_per_second']:.0f} pairs/s, {record['threads']} threads, "
        f"{record['train_cpu_seconds']:.0f} CPU-s), "
        f"{record['seconds']:.0f} s in all" + (" (reused)" if record.get("reused") else ""),
        f"  loss {record['losses'][0]:.3f} -> {np.mean(record['losses'][-_LOG_PERIOD:]):.3f}",
        f"zero-shot on {s['heldout_images']} held-out images  {'':<{max(0, width - 36)}}"
        "random init   pretrained",
    ]
    for title, key, _ in rows:
        lines.append(f"  {title:<{width}} : {random_init[key]:11.3f}   {pretrained[key]:10.3f}")
    lines.append(f"checkpoint: {path}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> Tuple[str, Dict[str, Any]]:
    from detectron2.utils.logger import setup_logger

    from hiervl.engine.launcher import setup_cfg

    defaults = PretrainSettings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", default=DEFAULT_CONFIG)
    parser.add_argument("--output-dir", default="output/clip_pretrain")
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--images", type=int, default=defaults.num_images)
    parser.add_argument("--heldout", type=int, default=defaults.heldout_images)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides")
    args = parser.parse_args(argv)
    setup_logger(name="hiervl")
    cfg = setup_cfg(args.config_file, args.opts)
    settings = dataclasses.replace(
        defaults,
        steps=args.steps,
        batch_size=args.batch_size,
        num_images=args.images,
        heldout_images=args.heldout,
        lr=args.lr,
        seed=args.seed,
    )
    path, record = ensure_pretrained(cfg, args.output_dir, settings)
    print("\n" + format_report(path, record))
    return path, record


if __name__ == "__main__":
    main()
