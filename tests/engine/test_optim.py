"""Optimizer groups of the real model (LR multipliers, weight decay, frozen towers) and
the warm-up + poly schedule, checked by hand."""

import pytest
import torch
from tiny_training import tiny_cfg
from torch import nn

from hiervl.engine.optim import build_lr_scheduler, build_optimizer
from hiervl.engine.trainer import HierVLTrainer

BASE_LR, BACKBONE_MULT, HEAD_MULT = 1e-3, 0.25, 3.0
# Three distinct values, so every parameter's group is identified by its decay.
WEIGHT_DECAY, WEIGHT_DECAY_NORM, WEIGHT_DECAY_EMBED = 0.05, 0.02, 0.03
MAX_ITER, POWER = 20, 0.9


def _cfg(tmp_path, *opts):
    return tiny_cfg(
        tmp_path,
        "SOLVER.BASE_LR", BASE_LR,
        "SOLVER.BACKBONE_MULTIPLIER", BACKBONE_MULT,
        "SOLVER.HEAD_MULTIPLIER", HEAD_MULT,
        "SOLVER.WEIGHT_DECAY", WEIGHT_DECAY,
        "SOLVER.WEIGHT_DECAY_NORM", WEIGHT_DECAY_NORM,
        "SOLVER.WEIGHT_DECAY_EMBED", WEIGHT_DECAY_EMBED,
        "SOLVER.MAX_ITER", MAX_ITER,
        "SOLVER.POLY_LR_POWER", POWER,
        *opts,
    )  # fmt: skip


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    torch.manual_seed(0)
    return HierVLTrainer.build_model(_cfg(tmp_path_factory.mktemp("optim")))


def expected_multiplier(name: str) -> float:
    """The paper's recipe (DESIGN §5), written out independently of optim.py."""
    if name.startswith("model.backbone.visual."):  # fine-tuned CLIP image encoder
        return BACKBONE_MULT
    new_components = (
        "model.hsqg.",
        "model.pixel_decoder.cmsam_layers.",
        "model.decoder.",  # dual-query decoder incl. the mask head
        "model.text_encoder.prompt",
        "objective.prompt_projector.",
    )
    if name.startswith(new_components):
        return HEAD_MULT
    if name.startswith(("model.backbone.pyramid.", "model.pixel_decoder.")):
        return 1.0
    raise AssertionError(f"trainable parameter {name} is in no group of the recipe")


# Mask2Former's recipe (DESIGN §5): no decay on embeddings, written out by full name.
EMBEDDINGS = {
    "model.backbone.visual.positional_embedding",
    "model.backbone.visual.class_embedding",
    "model.pixel_decoder.level_embed",
    "model.decoder.memory_level_embed.weight",
    "model.decoder.text_level_embed.weight",
    "model.decoder.visual_feat.weight",
    "model.decoder.visual_pos.weight",
    "model.text_encoder.prompt",
    "model.decoder.mask_head.void_embed",
    "model.decoder.mask_head.logit_scale",
    "model.hsqg.logit_scale",
    "model.hsqg.logit_bias",
}


def expected_decay(name: str, norm: bool) -> float:
    if norm:
        return WEIGHT_DECAY_NORM
    return WEIGHT_DECAY_EMBED if name in EMBEDDINGS else WEIGHT_DECAY


def test_lr_multipliers_weight_decay_and_frozen_towers(model, tmp_path):
    optimizer = build_optimizer(_cfg(tmp_path), model)
    group_of = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            assert id(p) not in group_of, "a parameter is in two groups"
            group_of[id(p)] = group
    norm_params = {
        id(p)
        for m in model.modules()
        if isinstance(m, (nn.LayerNorm, nn.GroupNorm))
        for p in m.parameters(recurse=False)
    }
    seen = set()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert id(p) not in group_of, f"frozen {name} is in the optimizer"
            continue
        group = group_of[id(p)]
        assert group["lr"] == pytest.approx(BASE_LR * expected_multiplier(name)), name
        assert group["weight_decay"] == expected_decay(name, id(p) in norm_params), name
        seen.add(name.split(".")[1] + "." + name.split(".")[2])
    assert len(group_of) == sum(p.requires_grad for p in model.parameters())
    # Every component is there, and the frozen towers are frozen.
    for component in (
        "backbone.visual",
        "backbone.pyramid",
        "hsqg.level_mlps",
        "decoder.mask_head",
    ):
        assert component in seen
    assert "text_encoder.prompt" in seen and "prompt_projector.layers" in seen
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(
        n.startswith(("model.frozen_encoder.", "model.text_encoder.")) for n in frozen
    )
    assert any(n.startswith("model.text_encoder.transformer.") for n in frozen)
    assert isinstance(optimizer, torch.optim.AdamW)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert EMBEDDINGS <= trainable, EMBEDDINGS - trainable


def test_one_step_without_gradients_is_the_decay_alone(model, tmp_path):
    """AdamW with zero gradients moves nothing but the decoupled decay:
    p <- p (1 - lr · wd), so each parameter's factor shows the decay it really got.
    With the defaults (embedding and norm decay 0) embeddings and norms keep their values."""
    cfg = _cfg(tmp_path, "SOLVER.WEIGHT_DECAY_NORM", 0.0, "SOLVER.WEIGHT_DECAY_EMBED", 0.0)
    optimizer = build_optimizer(cfg, model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    norm_params = {
        id(p)
        for m in model.modules()
        if isinstance(m, (nn.LayerNorm, nn.GroupNorm))
        for p in m.parameters(recurse=False)
    }
    try:
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = torch.zeros_like(p)
        optimizer.step()
        for name, p in model.named_parameters():
            if name not in before:
                continue
            decayed = id(p) not in norm_params and name not in EMBEDDINGS
            lr = BASE_LR * expected_multiplier(name)
            factor = 1.0 - lr * WEIGHT_DECAY if decayed else 1.0
            torch.testing.assert_close(p.detach(), before[name] * factor, msg=name)
    finally:
        with torch.no_grad():  # the module-scoped model is shared with the other tests
            for name, p in model.named_parameters():
                if name in before:
                    p.copy_(before[name])


def _lrs_per_iteration(cfg, model):
    """The LR of every group at iterations 0..MAX_ITER-1, as the LR hook applies them."""
    optimizer = build_optimizer(cfg, model)
    initial = [g["lr"] for g in optimizer.param_groups]
    scheduler = build_lr_scheduler(cfg, optimizer)
    lrs = []
    for _ in range(MAX_ITER):
        lrs.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()  # no gradients: only keeps the scheduler's order check quiet
        scheduler.step()
    return initial, lrs


def test_poly_schedule_by_hand(model, tmp_path):
    initial, lrs = _lrs_per_iteration(_cfg(tmp_path, "SOLVER.WARMUP_ITERS", 0), model)
    assert {round(lr / BASE_LR, 6) for lr in initial} == {BACKBONE_MULT, 1.0, HEAD_MULT}
    for i, row in enumerate(lrs):
        poly = (1 - i / MAX_ITER) ** POWER
        assert row == pytest.approx([lr0 * poly for lr0 in initial], rel=1e-9), i


def test_linear_warmup_then_poly(model, tmp_path):
    warmup, factor = 4, 0.1
    cfg = _cfg(
        tmp_path,
        "SOLVER.WARMUP_ITERS", warmup,
        "SOLVER.WARMUP_FACTOR", factor,
        "SOLVER.WARMUP_METHOD", "linear",
    )  # fmt: skip
    initial, lrs = _lrs_per_iteration(cfg, model)
    for i, row in enumerate(lrs):
        if i < warmup:  # linear from factor x base to the poly value at the end of warm-up
            end = (1 - warmup / MAX_ITER) ** POWER
            scale = factor + (end - factor) * i / warmup
        else:
            scale = (1 - i / MAX_ITER) ** POWER
        assert row == pytest.approx([lr0 * scale for lr0 in initial], rel=1e-9), i


def test_unknown_optimizer_and_scheduler_are_value_errors(model, tmp_path):
    with pytest.raises(ValueError, match="SOLVER.OPTIMIZER must be ADAMW or SGD, got 'ADAM'"):
        build_optimizer(_cfg(tmp_path, "SOLVER.OPTIMIZER", "ADAM"), model)
    optimizer = build_optimizer(_cfg(tmp_path), model)
    with pytest.raises(ValueError, match="WarmupPolyLR"):
        build_lr_scheduler(_cfg(tmp_path, "SOLVER.LR_SCHEDULER_NAME", "WarmupCosineLR"), optimizer)


def _grads_step(cfg, module):
    """One optimizer step on fixed gradients; returns the parameter update, flattened."""
    optimizer = build_optimizer(cfg, module)
    before = torch.cat([p.detach().flatten().clone() for p in module.parameters()])
    for i, p in enumerate(module.parameters()):
        p.grad = torch.full_like(p, float(i + 1))
    optimizer.step()
    return torch.cat([p.detach().flatten() for p in module.parameters()]) - before


def test_full_model_gradient_clipping(tmp_path):
    """SGD with LR 1: the update is minus the clipped gradient, whose global norm is
    CLIP_VALUE (gradients scaled together, directions kept)."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    grads = torch.cat(
        [torch.full_like(p, float(i + 1)).flatten() for i, p in enumerate(module.parameters())]
    )
    plain = (
        "SOLVER.OPTIMIZER", "SGD", "SOLVER.MOMENTUM", 0.0, "SOLVER.BASE_LR", 1.0,
        "SOLVER.WEIGHT_DECAY", 0.0, "SOLVER.WEIGHT_DECAY_NORM", 0.0,
    )  # fmt: skip
    clip = ("SOLVER.CLIP_GRADIENTS.ENABLED", True, "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", 0.5)
    update = _grads_step(
        tiny_cfg(tmp_path, *plain, *clip, "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "full_model"), module
    )
    torch.testing.assert_close(update, -grads * 0.5 / grads.norm(), rtol=1e-5, atol=1e-7)
    # detectron2's per-parameter "value" clipping caps every entry instead.
    update = _grads_step(
        tiny_cfg(tmp_path, *plain, *clip, "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "value"), module
    )
    torch.testing.assert_close(update, torch.full_like(grads, -0.5))
    with pytest.raises(ValueError, match="CLIP_TYPE must be 'full_model', 'norm' or 'value'"):
        build_optimizer(
            tiny_cfg(tmp_path, *clip, "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "global"), module
        )
