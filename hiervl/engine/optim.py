"""Optimizer and LR schedule of the paper's recipe (DESIGN §5).

AdamW with per-parameter learning-rate multipliers through detectron2's
``get_default_optimizer_params``: the fine-tuned CLIP image encoder learns at
``BACKBONE_MULTIPLIER`` × base LR, the paper's new components (HSQG, CMSAM, the
dual-query decoder with its mask head, the prompt and its projector Φ_p) at
``HEAD_MULTIPLIER`` ×, the rest (the backbone's feature pyramid, the pixel decoder's
deformable encoder and FPN) at 1×. Frozen towers have ``requires_grad=False`` and are skipped.
Weight decay follows Mask2Former: ``WEIGHT_DECAY`` on weights, ``WEIGHT_DECAY_NORM`` on
normalisation layers, ``WEIGHT_DECAY_EMBED`` on embeddings (both 0 by default): the
``nn.Embedding`` tables, the position embeddings, the prompt context vectors, the void
vector, and the learned scalars (HSQG's gate w, b and the classifier's log-scale). Decay
pulls a parameter towards 0, which is a meaningful prior for a weight matrix but not for
a position, a token, a temperature or a gate offset.
The schedule is linear warm-up then polynomial decay (power ``POLY_LR_POWER``).
Gradient clipping (SOLVER.CLIP_GRADIENTS) adds Mask2Former's "full_model" type (one norm
over all gradients) to detectron2's per-parameter "norm" and "value".
"""

import torch
from detectron2.solver import get_default_optimizer_params
from detectron2.solver.build import maybe_add_gradient_clipping, reduce_param_groups
from detectron2.solver.lr_scheduler import LRMultiplier, WarmupParamScheduler
from fvcore.common.param_scheduler import PolynomialDecayParamScheduler
from torch import nn

# Parameter-name prefixes (``HierVL.named_parameters()``: the network is ``model``, the
# losses' own parameters ``objective``) of each LR group. The backbone's simple feature
# pyramid is new (randomly initialised), so it learns at 1x like the pixel decoder.
BACKBONE_PREFIXES = ("model.backbone.visual.",)
HEAD_PREFIXES = (
    "model.hsqg.",
    "model.pixel_decoder.cmsam",
    "model.decoder.",  # includes the dynamic mask head
    "model.text_encoder.",  # only the prompt context requires grad there
    "objective.prompt_projector.",  # Φ_p of L_prompt
)

# Attribute names of the parameters that get WEIGHT_DECAY_EMBED (detectron2's ``overrides``
# match a parameter's own name, whatever module holds it).
EMBEDDING_PARAMETER_NAMES = (
    "positional_embedding",  # CLIP ViT position embeddings
    "class_embedding",  # CLIP ViT's CLS token
    "level_embed",  # the pixel decoder's level embeddings
    "prompt",  # CoOp context vectors of the text encoder
    "void_embed",  # the classifier's no-object vector
    "logit_scale",  # HSQG gate w; the classifier's log-temperature
    "logit_bias",  # HSQG gate b
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

    def factor(name: str) -> float:
        return lr_factor(
            name,
            backbone_multiplier=cfg.SOLVER.BACKBONE_MULTIPLIER,
            head_multiplier=cfg.SOLVER.HEAD_MULTIPLIER,
        )

    params = optimizer_param_groups(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        weight_decay_embed=cfg.SOLVER.WEIGHT_DECAY_EMBED,
        lr_factor_func=factor,
    )
    name = cfg.SOLVER.OPTIMIZER.upper()
    kwargs = {"lr": cfg.SOLVER.BASE_LR}
    if name == "ADAMW":
        optim_cls = torch.optim.AdamW
    elif name == "SGD":
        optim_cls, kwargs["momentum"] = torch.optim.SGD, cfg.SOLVER.MOMENTUM
    else:
        raise ValueError(f"SOLVER.OPTIMIZER must be ADAMW or SGD, got {cfg.SOLVER.OPTIMIZER!r}")
    return with_gradient_clipping(cfg, optim_cls)(params, **kwargs)


def optimizer_param_groups(
    model: nn.Module,
    *,
    base_lr: float,
    weight_decay: float,
    weight_decay_norm: float,
    weight_decay_embed: float,
    lr_factor_func,
) -> list:
    """detectron2's ``get_default_optimizer_params`` with the embedding decay on top.

    Embeddings named in ``EMBEDDING_PARAMETER_NAMES`` are reached by detectron2's name
    overrides; an ``nn.Embedding``'s table is called ``weight`` like every linear layer's,
    so those tables are found by module type and regrouped afterwards.
    """
    groups = get_default_optimizer_params(
        model,
        base_lr=base_lr,
        weight_decay=weight_decay,
        weight_decay_norm=weight_decay_norm,
        lr_factor_func=lr_factor_func,
        overrides={n: {"weight_decay": weight_decay_embed} for n in EMBEDDING_PARAMETER_NAMES},
    )
    tables = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    per_param = []
    for group in groups:
        hyper = {k: v for k, v in group.items() if k != "params"}
        for p in group["params"]:
            extra = {"weight_decay": weight_decay_embed} if id(p) in tables else {}
            per_param.append({**hyper, **extra, "params": [p]})
    return reduce_param_groups(per_param)


def with_gradient_clipping(cfg, optim_cls: type) -> type:
    """``optim_cls``, or a subclass clipping the gradients before every step.

    SOLVER.CLIP_GRADIENTS.CLIP_TYPE: "full_model" clips the norm of all gradients taken
    together (one vector over every parameter) to CLIP_VALUE, Mask2Former's choice;
    "norm" / "value" are detectron2's per-parameter clippers.
    """
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if not clip.ENABLED:
        return optim_cls
    if clip.CLIP_TYPE in ("norm", "value"):
        return maybe_add_gradient_clipping(cfg, optim_cls)
    if clip.CLIP_TYPE != "full_model":
        raise ValueError(
            "SOLVER.CLIP_GRADIENTS.CLIP_TYPE must be 'full_model', 'norm' or 'value', "
            f"got {clip.CLIP_TYPE!r}"
        )
    max_norm, norm_type = float(clip.CLIP_VALUE), float(clip.NORM_TYPE)

    class FullModelClipping(optim_cls):
        def step(self, closure=None):
            params = [p for group in self.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)
            return super().step(closure)

    FullModelClipping.__name__ = f"{optim_cls.__name__}WithFullModelClipping"
    return FullModelClipping


def build_lr_scheduler(cfg, optimizer: torch.optim.Optimizer):
    """Linear warm-up + poly decay over ``SOLVER.MAX_ITER`` iterations."""
    if cfg.SOLVER.LR_SCHEDULER_NAME != "WarmupPolyLR":
        raise ValueError(
            f"SOLVER.LR_SCHEDULER_NAME must be 'WarmupPolyLR' for HierVL, "
            f"got {cfg.SOLVER.LR_SCHEDULER_NAME!r}"
        )
    poly = PolynomialDecayParamScheduler(1.0, cfg.SOLVER.POLY_LR_POWER)
    warmup = min(cfg.SOLVER.WARMUP_ITERS / max(cfg.SOLVER.MAX_ITER, 1), 1.0)
    sched = WarmupParamScheduler(poly, cfg.SOLVER.WARMUP_FACTOR, warmup, cfg.SOLVER.WARMUP_METHOD)
    return LRMultiplier(optimizer, multiplier=sched, max_iter=cfg.SOLVER.MAX_ITER)
