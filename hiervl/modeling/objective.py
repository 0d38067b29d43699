"""HierVL's training objective: supervised + semi-supervised + vision-language terms.

One call computes every loss of one iteration (DESIGN §2-3) from a labelled batch and,
when semi-supervision is on, an unlabelled batch with its CutMix partner:

- ``loss_sup_*``: Mask2Former criterion on the labelled images (+ L_rel, L_qt);
- ``loss_unsup_s1/s2/fp``: UniMatch weak-to-strong consistency on the probability map
  P, weighted ``L_x + .25 L_s1 + .25 L_s2 + .5 L_fp`` (UniMatch's relative weights; its
  global ``/ 2`` is dropped so that the supervised terms weigh the same with and without
  the unlabelled stream, see ``ssl_losses.UNIMATCH_WEIGHTS``);
- ``loss_unsup_entropy``: entropy minimisation on the strong views' P;
- ``loss_unsup_maskclip_*``: SemiVL's MaskCLIP guidance on s1/s2/fp (CutMixed like the
  pseudo-labels), weight decaying linearly to 0 over training;
- ``loss_vl_prompt``: L_topo + L_anchor on the prompt embeddings;
- ``loss_vl_mask`` / ``loss_vl_pt``: masked consistency and pixel-text alignment on
  images with one class blanked.
Every returned value is already weighted; the total loss is their sum. After each call,
``confident_fraction`` holds the share of the weak views' valid pixels (the images' and
their CutMix partners') whose pseudo-label passed SSL.CONF_THRESHOLD (None without an
unlabelled batch or in ``pixelavg`` mode), for the hook that warns when the consistency
loss stays silent.

Shape letters: B images, K classes, H×W the (padded) crop, N ViT tokens, C CLIP width.
"""

from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Tuple

import torch
from torch import nn

from hiervl.data.cutmix import mix_images, mix_pseudo_labels
from hiervl.modeling.criterion import semantic_to_targets
from hiervl.modeling.hiervl_model import HierVLModel
from hiervl.modeling.ssl_losses import (
    UNIMATCH_WEIGHTS,
    confident_fraction,
    consistency_loss,
    entropy_loss,
    maskclip_loss,
    maskclip_pseudo_labels,
    maskclip_weight,
    pseudo_labels,
)
from hiervl.modeling.vl_losses import (
    blank_random_class,
    masked_consistency_loss,
    pixel_text_alignment_loss,
    prompt_regularity_loss,
)

IGNORE = 255


class LabeledBatch(NamedTuple):
    """images: (B,3,H,W) normalised; labels: (B,H,W) long, 255 = ignore/padding;
    padding: (B,H,W) bool, True = padded pixel (None = none)."""

    images: torch.Tensor
    labels: torch.Tensor
    padding: Optional[torch.Tensor] = None


class UnlabeledBatch(NamedTuple):
    """Views of B unlabelled images and of their CutMix partners (all (B,3,H,W) normalised).

    box1/box2: (B,H,W) bool, True = take the partner's pixel. ignore/mix_ignore: (B,H,W)
    bool, True = padding.
    """

    weak: torch.Tensor
    strong1: torch.Tensor
    strong2: torch.Tensor
    box1: torch.Tensor
    box2: torch.Tensor
    ignore: torch.Tensor
    mix_weak: torch.Tensor
    mix_strong1: torch.Tensor
    mix_strong2: torch.Tensor
    mix_ignore: torch.Tensor


class _Pseudo(NamedTuple):
    """Teacher targets for one unlabelled batch: (B,H,W) each; maskclip None when off."""

    labels: torch.Tensor
    conf: torch.Tensor
    ignore: torch.Tensor
    maskclip: Optional[torch.Tensor]


class HierVLObjective(nn.Module):
    """All loss terms of one iteration (see module docstring)."""

    def __init__(
        self,
        *,
        criterion: nn.Module,
        semi_supervised: bool,
        consistency_weight: float,
        conf_threshold: float,
        consistency_mode: str,
        entropy_weight: float,
        maskclip_weight: float,
        maskclip_certainty: float,
        maskclip_logit_scale: float,
        prompt_projector: Optional[nn.Module],
        prompt_weight: float,
        anchor_lambda: float,
        anchor_repulsion: str,
        mask_weight: float,
        mask_on_unlabeled: bool,
        pt_weight: float,
        pt_temperature: float,
    ):
        """
        Args:
            criterion: the supervised ``SetCriterion``.
            semi_supervised: use the unlabelled stream (SSL.ENABLED).
            consistency_weight: scale of the UniMatch terms (SSL.CONSISTENCY_WEIGHT).
            conf_threshold, consistency_mode: SSL.CONF_THRESHOLD / CONSISTENCY_MODE.
            entropy_weight: λ_ent; 0 = off.
            maskclip_weight: initial MaskCLIP weight (decays to 0); 0 = off.
            maskclip_certainty, maskclip_logit_scale: SSL.MASKCLIP_CERTAINTY / LOGIT_SCALE.
            prompt_projector: Φ_p of L_anchor (None = L_prompt off).
            prompt_weight, anchor_lambda: VL.PROMPT_WEIGHT / VL.ANCHOR_LAMBDA.
            anchor_repulsion: VL.ANCHOR_REPULSION, "mean" or "sum" over j != k.
            mask_weight, pt_weight: weights of L_mask / L_pt; 0 = off.
            mask_on_unlabeled: also blank confidently pseudo-labelled classes of the weak
                unlabelled view for L_mask / L_pt.
            pt_temperature: τ of L_pt.
        """
        super().__init__()
        if prompt_weight > 0 and prompt_projector is None:
            raise ValueError("VL.PROMPT_WEIGHT > 0 needs the prompt projector Φ_p")
        self.criterion = criterion
        self._semi_supervised = semi_supervised
        self.consistency_weight = consistency_weight
        self.conf_threshold = conf_threshold
        self.consistency_mode = consistency_mode
        self.entropy_weight = entropy_weight
        self.maskclip_weight = maskclip_weight
        self.maskclip_certainty = maskclip_certainty
        self.maskclip_logit_scale = maskclip_logit_scale
        self.prompt_projector = prompt_projector
        self.prompt_weight = prompt_weight
        self.anchor_lambda = anchor_lambda
        self.anchor_repulsion = anchor_repulsion
        self.mask_weight = mask_weight
        self.mask_on_unlabeled = mask_on_unlabeled
        self.pt_weight = pt_weight
        self.pt_temperature = pt_temperature
        self.confident_fraction: Optional[float] = None

    @property
    def semi_supervised(self) -> bool:
        return self._semi_supervised

    def forward(
        self,
        model: HierVLModel,
        labeled: LabeledBatch,
        unlabeled: Optional[UnlabeledBatch],
        *,
        iteration: int = 0,
        max_iter: int = 1,
    ) -> Dict[str, torch.Tensor]:
        """Weighted, prefixed losses of one iteration (``loss_sup_*``, ``loss_unsup_*``,
        ``loss_vl_*``). ``iteration``/``max_iter`` drive the MaskCLIP weight decay."""
        text = model.class_embeddings()
        losses, frozen = self.supervised_losses(model, labeled, text)
        pseudo = None
        self.confident_fraction = None
        if unlabeled is not None:
            if not self.semi_supervised:
                raise ValueError("an unlabelled batch was given but SSL.ENABLED is False")
            pseudo = self.teacher_targets(model, unlabeled, text)
            if self.consistency_mode == "pixel":
                # Own and partner weak views: every pseudo-label a consistency term reads.
                self.confident_fraction = confident_fraction(
                    torch.cat([p.conf for p in pseudo]),
                    torch.cat([p.ignore for p in pseudo]),
                    conf_threshold=self.conf_threshold,
                )
            losses.update(
                self.unsupervised_losses(model, unlabeled, pseudo, text, iteration, max_iter)
            )
        if self.prompt_weight > 0:
            losses["loss_vl_prompt"] = self.prompt_weight * prompt_regularity_loss(
                text[0],
                text[1],
                self.prompt_projector,
                repulsion=self.anchor_lambda,
                reduction=self.anchor_repulsion,
            )
        if self.mask_weight > 0 or self.pt_weight > 0:
            losses.update(self.masked_losses(model, labeled, frozen, unlabeled, pseudo, text))
        return losses

    # ------------------------------------------------------------------ supervised
    def supervised_losses(
        self, model: HierVLModel, labeled: LabeledBatch, text: Tuple[torch.Tensor, torch.Tensor]
    ):
        """Criterion losses of the labelled batch, and E_I^0's features of its images."""
        num_classes = text[0].shape[0]
        targets = [semantic_to_targets(lab, num_classes=num_classes) for lab in labeled.labels]
        presence = torch.zeros(
            len(targets), num_classes, dtype=torch.bool, device=labeled.labels.device
        )
        for i, tgt in enumerate(targets):
            presence[i, tgt["labels"]] = True
        needs_frozen = self.mask_weight > 0 or self.pt_weight > 0  # masked_losses reads it
        out = model(
            labeled.images,
            presence=presence,
            text=text,
            with_frozen=needs_frozen,
            padding=labeled.padding,
        )
        losses = self.criterion(out, targets, relevance=out["relevance"], text_clip=text[1])
        return losses, out["frozen"]

    # ------------------------------------------------------------------ unsupervised
    @torch.no_grad()
    def teacher_targets(
        self, model: HierVLModel, batch: UnlabeledBatch, text: Tuple[torch.Tensor, torch.Tensor]
    ) -> Tuple[_Pseudo, _Pseudo]:
        """Pseudo-labels (and MaskCLIP labels) of the weak views and of the partners' weak
        views, from the model in eval mode without gradients."""
        was_training = model.training
        model.eval()
        try:
            images = torch.cat([batch.weak, batch.mix_weak])
            padding = torch.cat([batch.ignore, batch.mix_ignore])
            detached = (text[0].detach(), text[1].detach())
            out = model(
                images, text=detached, with_frozen=self.maskclip_weight > 0, padding=padding
            )
            probs = model.semantic_probs(model.semantic_scores(out, images.shape[-2:]))
        finally:
            model.train(was_training)
        labels, conf = pseudo_labels(probs)
        ignore = torch.cat([batch.ignore, batch.mix_ignore])
        mclip = None
        if self.maskclip_weight > 0:
            mclip = maskclip_pseudo_labels(
                out["frozen"].dense_clip,
                text[1],
                output_size=tuple(images.shape[-2:]),
                logit_scale=self.maskclip_logit_scale,
                certainty_threshold=self.maskclip_certainty,
                ignore=ignore,
            )
        b = batch.weak.shape[0]

        def split(x, part):
            return None if x is None else x[:b] if part == 0 else x[b:]

        return tuple(
            _Pseudo(split(labels, p), split(conf, p), split(ignore, p), split(mclip, p))
            for p in (0, 1)
        )

    def unsupervised_losses(
        self,
        model: HierVLModel,
        batch: UnlabeledBatch,
        pseudo: Tuple[_Pseudo, _Pseudo],
        text: Tuple[torch.Tensor, torch.Tensor],
        iteration: int,
        max_iter: int,
    ) -> Dict[str, torch.Tensor]:
        """Weak-to-strong consistency, entropy and MaskCLIP terms (student forward passes)."""
        own, partner = pseudo
        size = tuple(batch.weak.shape[-2:])
        b = batch.weak.shape[0]
        strong = torch.cat(
            [
                mix_images(batch.strong1, batch.mix_strong1, batch.box1),
                mix_images(batch.strong2, batch.mix_strong2, batch.box2),
            ]
        )
        # A mixed view's padding: the partner's inside the box, the image's outside.
        padding_s = torch.cat(
            [
                torch.where(batch.box1, batch.mix_ignore, batch.ignore),
                torch.where(batch.box2, batch.mix_ignore, batch.ignore),
            ]
        )
        out_s = model(strong, text=text, padding=padding_s)
        probs_s = model.semantic_probs(model.semantic_scores(out_s, size))
        out_fp = model(batch.weak, perturb_features=True, text=text, padding=batch.ignore)
        probs_fp = model.semantic_probs(model.semantic_scores(out_fp, size))
        views = {"s1": (probs_s[:b], batch.box1), "s2": (probs_s[b:], batch.box2)}
        targets = {}
        for name, (_, box) in views.items():
            labels, conf, ignore = mix_pseudo_labels(
                own.labels, own.conf, own.ignore, partner.labels, partner.conf,
                partner.ignore, box,
            )  # fmt: skip
            mclip = None
            if own.maskclip is not None:
                mclip = torch.where(box, partner.maskclip, own.maskclip)
            targets[name] = (labels, conf, ignore, mclip)
        targets["fp"] = (own.labels, own.conf, own.ignore, own.maskclip)
        probs = {"s1": probs_s[:b], "s2": probs_s[b:], "fp": probs_fp}

        losses = {}
        mclip_w = 0.0
        if self.maskclip_weight > 0:
            mclip_w = maskclip_weight(iteration, max_iter, start=self.maskclip_weight)
        for name in ("s1", "s2", "fp"):
            labels, conf, ignore, mclip = targets[name]
            weight = UNIMATCH_WEIGHTS[name]
            losses[f"loss_unsup_{name}"] = (
                self.consistency_weight
                * weight
                * consistency_loss(
                    probs[name],
                    labels,
                    conf,
                    ignore,
                    conf_threshold=self.conf_threshold,
                    mode=self.consistency_mode,
                )
            )
            if mclip is not None:
                # SemiVL: λ · 0.25 / 0.25 / 0.5 next to a halved L_x, i.e. twice the
                # consistency terms' view weights relative to L_x.
                losses[f"loss_unsup_maskclip_{name}"] = (
                    mclip_w * 2 * weight * maskclip_loss(probs[name], mclip)
                )
        if self.entropy_weight > 0:
            ignore_s = torch.cat([targets["s1"][2], targets["s2"][2]])
            losses["loss_unsup_entropy"] = self.entropy_weight * entropy_loss(probs_s, ignore_s)
        return losses

    # ------------------------------------------------------------------ vision-language
    def masked_losses(
        self,
        model: HierVLModel,
        labeled: LabeledBatch,
        frozen,
        unlabeled: Optional[UnlabeledBatch],
        pseudo: Optional[Tuple[_Pseudo, _Pseudo]],
        text: Tuple[torch.Tensor, torch.Tensor],
    ) -> Dict[str, torch.Tensor]:
        """L_mask and L_pt on images with one (pseudo-)labelled class blanked."""
        images, labels, x_ref = labeled.images, labeled.labels, frozen.dense_tokens
        if self.mask_on_unlabeled and unlabeled is not None and pseudo is not None:
            own = pseudo[0]
            confident = (own.conf >= self.conf_threshold) & ~own.ignore
            pseudo_labels_u = torch.where(
                confident, own.labels, torch.full_like(own.labels, IGNORE)
            )
            with torch.no_grad():
                x_ref_u = model.frozen_encoder(unlabeled.weak).dense_tokens
            images = torch.cat([images, unlabeled.weak])
            labels = torch.cat([labels, pseudo_labels_u])
            x_ref = torch.cat([x_ref, x_ref_u])
        blanked = blank_random_class(images, labels, patch_size=model.backbone.patch_size)
        x_mask = model.backbone.forward_tokens(blanked.images)
        losses = {}
        if self.mask_weight > 0:
            losses["loss_vl_mask"] = self.mask_weight * masked_consistency_loss(
                x_mask, x_ref, blanked.token_mask
            )
        if self.pt_weight > 0:
            losses["loss_vl_pt"] = self.pt_weight * pixel_text_alignment_loss(
                model.backbone.to_clip_space(x_mask),
                text[1],
                blanked.token_mask,
                blanked.token_labels,
                temperature=self.pt_temperature,
            )
        return losses
