"""Optimizer and LR schedule of the paper's recipe (DESIGN §5).

AdamW with per-parameter learning-rate multipliers through detectron2's
``get_default_optimizer_params``: the fine-tuned image encoder learns at
``BACKBONE_MULTIPLIER`` × base LR, the paper's new components (HSQG, CMSAM, the
dual-query decoder with its mask head, the prompt) at ``HEAD_MULTIPLIER`` ×, the rest
of the pixel decoder at 1×. Frozen towers have ``requires_grad=False`` and are skipped.
The schedule is linear warm-up then polynomial decay (power ``POLY_LR_POWER``).
"""

import torch
from detectron2.solver import get_default_optimizer_params
from detectron2.solver.build import maybe_add_gradient_clipping
from detectron2.solver.lr_scheduler import LRMultiplier, WarmupParamScheduler
from fvcore.common.param_scheduler import PolynomialDecayParamScheduler

# Parameter-name prefixes (inside the meta-architecture) of each LR group.
BACKBONE_PREFIXES = ("model.backbone.",)
HEAD_PREFIXES = (
    "model.hsqg.",
    "model.pixel_decoder.cmsam",
    "model.decoder.",
    "model.text_encoder.",  # only the prompt context requires grad there
    "prompt_projector.",
)


def lr_factor(name: str, *, backbone_multiplier: float, head_multiplier: float) -> float:
    """LR multiplier of the parameter called ``name`` (a ``named_parameters`` key)."""
    if name.startswith(BACKBONE_PREFIXES):
        return backbone_multiplier
    if name.startswith(HEAD_PREFIXES):
        return head_multiplier
    return 1.0


def build_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW (or SGD) over the trainable parameters with the LR multipliers above."""
    solver = cfg.SOLVER

    def factor(name: str) -> float:
        return lr_factor(
            name,
            backbone_multiplier=solver.BACKBONE_MULTIPLIER,
            head_multiplier=solver.HEAD_MULTIPLIER,
        )

    params = get_default_optimizer_params(
        model,
        base_lr=solver.BASE_LR,
        weight_decay=solver.WEIGHT_DECAY,
        weight_decay_norm=solver.WEIGHT_DECAY_NORM,
        lr_factor_func=factor,
    )
    name = solver.OPTIMIZER.upper()
    if name == "ADAMW":
        optim_cls, kwargs = torch.optim.AdamW, {"lr": solver.BASE_LR}
    elif name == "SGD":
        optim_cls, kwargs = torch.optim.SGD, {"lr": solver.BASE_LR, "momentum": solver.MOMENTUM}
    else:
        raise ValueError(f"SOLVER.OPTIMIZER must be ADAMW or SGD, got {solver.OPTIMIZER!r}")
    return maybe_add_gradient_clipping(cfg, optim_cls)(params, **kwargs)


def build_lr_scheduler(cfg, optimizer: torch.optim.Optimizer):
    """Linear warm-up + poly decay over ``SOLVER.MAX_ITER`` iterations."""
    solver = cfg.SOLVER
    if solver.LR_SCHEDULER_NAME != "WarmupPolyLR":
        raise ValueError(
            f"SOLVER.LR_SCHEDULER_NAME must be 'WarmupPolyLR' for HierVL, "
            f"got {solver.LR_SCHEDULER_NAME!r}"
        )
    poly = PolynomialDecayParamScheduler(1.0, solver.POLY_LR_POWER)
    warmup = min(solver.WARMUP_ITERS / max(solver.MAX_ITER, 1), 1.0)
    sched = WarmupParamScheduler(poly, solver.WARMUP_FACTOR, warmup, solver.WARMUP_METHOD)
    return LRMultiplier(optimizer, multiplier=sched, max_iter=solver.MAX_ITER)
