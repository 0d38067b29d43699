"""Supervised losses of HierVL on labelled images (Mask2Former's set criterion + L_rel, L_qt).

Shape letters: B batch, Q queries, K classes, C CLIP width, n ground-truth masks of one
image, N matched (query, mask) pairs over the batch, h×w predicted mask size, H×W
ground-truth size, P sampled points.

Per prediction set (the final one and, with deep supervision, every ``aux_outputs``
entry; each is matched separately):

- ``loss_sup_ce``: cross-entropy over K + 1 logits of the **valid** queries only
  (inactive text queries produce no loss at all); target = the matched mask's class,
  else no object; weighted mean with weight NO_OBJECT_WEIGHT on the no-object class.
- ``loss_sup_mask`` / ``loss_sup_dice``: sigmoid BCE and dice of each matched pair on
  TRAIN_NUM_POINTS points (uncertainty-biased: OVERSAMPLE_RATIO,
  IMPORTANCE_SAMPLE_RATIO), summed over pairs and divided by the number of matched pairs
  (averaged over workers under torch.distributed, at least 1).

Once, on the final prediction:

- ``loss_sup_rel``: BCE of HSQG's relevance against class presence, mean over the
  (image, class) entries of images that have at least one labelled pixel class.
- ``loss_sup_qt``: ``||Φ(q_i) − t_{κ_i}||²`` over the matched queries (κ_i = the class
  of the mask query i is matched to), divided by the same matched-pair count as the mask
  losses. The paper writes a sum; dividing by the number of pairs keeps the term's scale
  independent of batch size and class count, so QT_WEIGHT transfers between datasets.

A NaN/Inf in the predictions the losses read (valid queries) raises
:class:`~hiervl.modeling.nonfinite.NonFiniteError` naming them, before any matching.

Every returned value is already multiplied by its weight. Ground-truth pixels labelled
``ignore`` belong to no mask, so they count as background for every mask (as in
Mask2Former); target masks must cover the same extent as the (padded) network input.
"""

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from hiervl.modeling.matcher import QueryMatcher
from hiervl.modeling.nonfinite import raise_if_nonfinite
from hiervl.modeling.point_sampling import point_sample, uncertain_point_coords

__all__ = ["SetCriterion", "semantic_to_targets", "sigmoid_bce_loss", "dice_loss"]


def semantic_to_targets(
    sem_seg: torch.Tensor, *, ignore_label: int = 255, num_classes: Optional[int] = None
) -> dict:
    """Per-class targets from a semantic label map.

    Args:
        sem_seg: (H, W) integer label map; ``ignore_label`` pixels belong to no mask.
        ignore_label: the ignore value (255 for every HierVL dataset).
        num_classes: K; labels >= K raise a ValueError (None = no check).

    Returns:
        ``{"labels": (n,) long ascending, "masks": (n, H, W) bool}``, one mask per class
        present; n = 0 for an all-ignore map.
    """
    if sem_seg.dim() != 2:
        raise ValueError(f"sem_seg must be (H, W), got {tuple(sem_seg.shape)}")
    sem_seg = sem_seg.long()
    classes = sem_seg.unique()
    classes = classes[classes != ignore_label]
    if classes.numel() and (classes.min() < 0 or (num_classes and classes.max() >= num_classes)):
        raise ValueError(
            f"label map has classes {classes.tolist()} outside [0, {num_classes}) "
            f"(ignore_label={ignore_label})"
        )
    return {"labels": classes, "masks": sem_seg[None] == classes[:, None, None]}


def sigmoid_bce_loss(logits: torch.Tensor, targets: torch.Tensor, normalizer: float):
    """Σ_i mean_p BCE(logits[i, p], targets[i, p]) / normalizer; logits, targets (N, P)."""
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return loss.mean(1).sum() / normalizer


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, normalizer: float):
    """Σ_i [1 − (2 Σ_p σ·y + 1) / (Σ_p σ + Σ_p y + 1)] / normalizer; logits, targets (N, P)."""
    probs = logits.sigmoid()
    numerator = 2 * (probs * targets).sum(-1)
    denominator = probs.sum(-1) + targets.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / normalizer


class SetCriterion(nn.Module):
    """Mask2Former-style supervised criterion for the dual-query decoder (see module doc)."""

    def __init__(
        self,
        *,
        matcher: QueryMatcher,
        class_weight: float,
        mask_weight: float,
        dice_weight: float,
        no_object_weight: float,
        deep_supervision: bool,
        num_points: int,
        oversample_ratio: float,
        importance_sample_ratio: float,
        rel_weight: float,
        qt_weight: float,
    ):
        """
        Args:
            matcher: the query matcher (built with the same class/mask/dice weights).
            class_weight, mask_weight, dice_weight: LOSS.CLASS/MASK/DICE_WEIGHT.
            no_object_weight: CE weight of the no-object class (LOSS.NO_OBJECT_WEIGHT).
            deep_supervision: also supervise ``aux_outputs`` (LOSS.DEEP_SUPERVISION).
            num_points, oversample_ratio, importance_sample_ratio: point sampling of the
                mask losses (LOSS.TRAIN_NUM_POINTS, OVERSAMPLE_RATIO, IMPORTANCE_SAMPLE_RATIO).
            rel_weight: weight of L_rel (LOSS.REL_WEIGHT).
            qt_weight: weight of L_qt (LOSS.QT_WEIGHT).
        """
        super().__init__()
        if num_points < 1:
            raise ValueError(f"LOSS.TRAIN_NUM_POINTS must be >= 1, got {num_points}")
        # > 0: with 0, an image whose valid queries are all unmatched has no CE weight at all.
        if not no_object_weight > 0:
            raise ValueError(f"LOSS.NO_OBJECT_WEIGHT must be > 0, got {no_object_weight}")
        self.matcher = matcher
        self.class_weight = class_weight
        self.mask_weight = mask_weight
        self.dice_weight = dice_weight
        self.no_object_weight = no_object_weight
        self.deep_supervision = deep_supervision
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.rel_weight = rel_weight
        self.qt_weight = qt_weight

    def forward(
        self,
        outputs: dict,
        targets: list,
        *,
        relevance: Optional[torch.Tensor] = None,
        text_clip: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ) -> dict:
        """
        Args:
            outputs: the decoder's dict: ``pred_logits`` (B, Q, K + 1), ``pred_masks``
                (B, Q, h, w), ``query_proj`` (B, Q, C), ``query_valid`` (B, Q),
                ``query_class`` (Q,), ``aux_outputs`` (list of dicts with the first three).
            targets: B dicts ``{"labels": (n,) long, "masks": (n, H, W) bool}`` (see
                ``semantic_to_targets``); every image passed here is labelled.
            relevance: (B, K) HSQG relevance in [0, 1]; None = L_rel off (returned as 0).
            text_clip: (K, C) class text embeddings t for L_qt (HierVL passes the frozen
                template embeddings t^CLIP); None = L_qt off (returned as 0).
            generator: optional RNG for the matcher's and the losses' random points.

        Returns:
            already-weighted scalar losses: ``loss_sup_ce``, ``loss_sup_mask``,
            ``loss_sup_dice``, the same with suffix ``_{i}`` for ``aux_outputs[i]`` when
            deep supervision is on, ``loss_sup_rel`` and ``loss_sup_qt``.
        """
        # float32 whatever the surrounding autocast: the point sums and the matching
        # costs lose too much in half precision.
        with torch.autocast(device_type=outputs["pred_logits"].device.type, enabled=False):
            return self._losses(outputs, targets, relevance, text_clip, generator)

    def _losses(self, outputs, targets, relevance, text_clip, generator):
        valid = outputs["query_valid"]
        # NaN/Inf predictions (diverged weights) are reported by name before the matcher,
        # whose costs they would poison.
        raise_if_nonfinite(self._matched_predictions(outputs), "prediction", valid=valid)
        indices = self.matcher(outputs, targets, generator=generator)
        normalizer = self._num_matched(indices, outputs["pred_logits"].device)

        # Every prediction set reads the same target masks: convert them to float once.
        device = outputs["pred_masks"].device
        target_maps = [t["masks"].to(device=device, dtype=torch.float32) for t in targets]
        losses = self._set_losses(
            outputs, targets, target_maps, indices, valid, normalizer, generator, ""
        )
        if self.deep_supervision:
            for i, aux in enumerate(outputs.get("aux_outputs", [])):
                aux = dict(aux, query_valid=valid, query_class=outputs["query_class"])
                aux_indices = self.matcher(aux, targets, generator=generator)
                losses.update(
                    self._set_losses(
                        aux, targets, target_maps, aux_indices, valid, normalizer, generator, i
                    )
                )
        losses["loss_sup_rel"] = self.rel_weight * self._relevance_loss(
            relevance, targets, outputs["pred_logits"]
        )
        losses["loss_sup_qt"] = self.qt_weight * self._query_text_loss(
            outputs, targets, indices, text_clip, normalizer
        )
        return losses

    def _matched_predictions(self, outputs: dict) -> list:
        """(name, tensor) of every prediction the losses read, in decoder-layer order."""
        sets = []
        if self.deep_supervision:
            aux_sets = enumerate(outputs.get("aux_outputs", []))
            sets += [(f"aux_outputs[{i}].", aux) for i, aux in aux_sets]
        sets.append(("", outputs))
        return [(p + k, out[k]) for p, out in sets for k in ("pred_logits", "pred_masks")]

    @staticmethod
    def _num_matched(indices: list, device) -> float:
        """Matched pairs in the batch, averaged over workers, at least 1."""
        count = torch.tensor(
            float(sum(len(q) for q, _ in indices)), device=device, dtype=torch.float32
        )
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(count)
            count = count / dist.get_world_size()
        return max(count.item(), 1.0)

    def _set_losses(
        self, pred, targets, target_maps, indices, valid, normalizer, generator, suffix
    ):
        logits, masks = pred["pred_logits"].float(), pred["pred_masks"]
        batch_idx, query_idx, labels, target_idx = _gather_matches(indices, targets, masks)
        assert bool(valid[batch_idx, query_idx].all()), "an invalid query was matched"

        num_classes = logits.shape[-1] - 1
        classes = torch.full(logits.shape[:2], num_classes, dtype=torch.long, device=logits.device)
        classes[batch_idx, query_idx] = labels
        weight = logits.new_ones(num_classes + 1)
        weight[-1] = self.no_object_weight
        if valid.any():
            ce = F.cross_entropy(logits[valid], classes[valid], weight=weight)
        else:
            ce = logits.sum() * 0

        if query_idx.numel() == 0:
            # Keep the graph connected (DDP) while contributing nothing.
            mask_bce = dice = masks.sum() * 0
        else:
            src = masks[batch_idx, query_idx][:, None].float()  # (N, 1, h, w)
            coords = uncertain_point_coords(
                src.detach(),
                num_points=self.num_points,
                oversample_ratio=self.oversample_ratio,
                importance_sample_ratio=self.importance_sample_ratio,
                generator=generator,
            )
            point_logits = point_sample(src, coords)[:, 0]
            with torch.no_grad():
                point_labels = _sample_targets(target_maps, target_idx, batch_idx, coords)
            mask_bce = sigmoid_bce_loss(point_logits, point_labels, normalizer)
            dice = dice_loss(point_logits, point_labels, normalizer)

        tag = "" if suffix == "" else f"_{suffix}"
        return {
            f"loss_sup_ce{tag}": self.class_weight * ce,
            f"loss_sup_mask{tag}": self.mask_weight * mask_bce,
            f"loss_sup_dice{tag}": self.dice_weight * dice,
        }

    @staticmethod
    def _relevance_loss(relevance, targets, like):
        if relevance is None:
            return like.new_zeros(())
        relevance = relevance.float()
        presence = torch.zeros_like(relevance)
        has_labels = torch.zeros(relevance.shape[0], dtype=torch.bool, device=relevance.device)
        for i, target in enumerate(targets):
            presence[i, target["labels"].to(relevance.device)] = 1.0
            has_labels[i] = target["labels"].numel() > 0
        # An all-ignore image says nothing about which classes are present.
        if not has_labels.any():
            return relevance.sum() * 0
        return F.binary_cross_entropy(relevance[has_labels], presence[has_labels])

    @staticmethod
    def _query_text_loss(outputs, targets, indices, text_clip, normalizer):
        proj = outputs["query_proj"]
        if text_clip is None:
            return proj.new_zeros(())
        batch_idx, query_idx, labels, _ = _gather_matches(indices, targets, proj)
        if query_idx.numel() == 0:
            return proj.sum() * 0
        text = F.normalize(text_clip.float(), dim=-1)[labels]  # (N, C)
        diff = proj[batch_idx, query_idx].float() - text
        return diff.pow(2).sum() / normalizer


def _gather_matches(indices, targets, like):
    """Flatten per-image matches: batch index, query index, label and the index of the
    matched mask within its image's targets (each (N,) long on ``like``'s device)."""
    device = like.device
    batch_idx = torch.cat([torch.full_like(q, i) for i, (q, _) in enumerate(indices)]).to(device)
    query_idx = torch.cat([q for q, _ in indices]).to(device)
    labels = torch.cat(
        [t["labels"].to(device)[j.to(device)] for t, (_, j) in zip(targets, indices)]
    ).long()
    target_idx = torch.cat([j for _, j in indices]).to(device=device, dtype=torch.long)
    return batch_idx, query_idx, labels, target_idx


def _sample_targets(target_maps, target_idx, batch_idx, coords):
    """Read the target mask of every matched pair at that pair's points.

    Args:
        target_maps: per image, its (n_b, H_b, W_b) float target masks.
        target_idx, batch_idx: (N,) the pair's mask index within its image, and its image.
        coords: (N, P, 2) the pair's points.
    Returns:
        (N, P) float.

    Several pairs can share a mask (the text queries of every hierarchy level are matched
    to their class's mask): per image, each mask is read once at the points of all its
    pairs (one ``grid_sample`` over the image's masks, pairs in slots 0..R-1 of their
    mask, unused slots padded), and no mask is copied per pair.
    """
    out = coords.new_zeros(coords.shape[:2])
    num_points = coords.shape[1]
    for i, maps in enumerate(target_maps):
        rows = (batch_idx == i).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        masks = target_idx[rows]
        # Slot of each pair among the pairs of its mask: its rank in a stable sort.
        order = torch.sort(masks, stable=True).indices
        counts = torch.bincount(masks, minlength=maps.shape[0])
        starts = counts.cumsum(0) - counts
        slot = torch.empty_like(masks)
        slot[order] = torch.arange(len(rows), device=masks.device) - starts[masks[order]]
        width = int(counts.max())
        grid = coords.new_zeros(maps.shape[0], width, num_points, 2)
        grid[masks, slot] = coords[rows]
        sampled = point_sample(
            maps.to(coords.device)[:, None], grid.view(maps.shape[0], width * num_points, 2)
        )  # (n_b, 1, width·P)
        out[rows] = sampled.view(maps.shape[0], width, num_points)[masks, slot]
    return out
