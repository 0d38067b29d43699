"""Query ↔ ground-truth assignment for the dual-query decoder.

Shape letters: B batch, Q queries (L·K' text queries level-major, K' ≤ K of the classes,
then M visual ones), K classes, n ground-truth masks of one image (one per present
class), h×w predicted mask size, H×W ground-truth size, P sampled points.

- Text queries have a **fixed** assignment: the valid (active) text query of class k, at
  every level, is matched to the ground-truth mask of class k when k is present; it is
  unmatched (→ no object) otherwise.
- Visual queries are **Hungarian-matched** (scipy ``linear_sum_assignment``) to all
  ground-truth masks with Mask2Former's cost: ``w_class · (−p(class)) + w_mask ·
  BCE + w_dice · dice``, the mask terms evaluated on P uniformly random points shared
  by every (query, mask) pair.

The random points are drawn once per call and shared by all images of the batch, so
matching a batch gives exactly what matching each image alone gives with the same RNG
state.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from hiervl.modeling.point_sampling import point_sample

__all__ = ["QueryMatcher", "pairwise_sigmoid_bce", "pairwise_dice"]


def pairwise_sigmoid_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy of every prediction against every target.

    Args:
        logits: (N, P) mask logits at P points.
        targets: (T, P) target values in [0, 1] at the same points.

    Returns:
        (N, T) cost, entry (i, j) = mean_p BCE(logits[i, p], targets[j, p]).
    """
    # BCE(x, y) = y·softplus(−x) + (1 − y)·softplus(x): linear in y, hence two matmuls.
    pos = F.softplus(-logits)
    neg = F.softplus(logits)
    return (pos @ targets.T + neg @ (1 - targets).T) / logits.shape[1]


def pairwise_dice(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Dice loss (with +1 smoothing) of every prediction against every target.

    Args:
        logits: (N, P) mask logits; targets: (T, P) values in [0, 1].

    Returns:
        (N, T) cost, ``1 − (2·Σ σ(x)·y + 1) / (Σ σ(x) + Σ y + 1)``.
    """
    probs = logits.sigmoid()
    numerator = 2 * probs @ targets.T
    denominator = probs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


class QueryMatcher(nn.Module):
    """Fixed assignment for text queries + Hungarian matching for visual queries."""

    def __init__(self, *, cost_class: float, cost_mask: float, cost_dice: float, num_points: int):
        """
        Args:
            cost_class, cost_mask, cost_dice: cost weights (the criterion passes its loss
                weights LOSS.CLASS_WEIGHT / MASK_WEIGHT / DICE_WEIGHT, as Mask2Former does).
            num_points: P, random points for the mask costs (LOSS.TRAIN_NUM_POINTS).
        """
        super().__init__()
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("matcher costs are all 0: set LOSS.CLASS/MASK/DICE_WEIGHT")
        if num_points < 1:
            raise ValueError(f"LOSS.TRAIN_NUM_POINTS must be >= 1, got {num_points}")
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.num_points = num_points

    @torch.no_grad()
    def forward(
        self,
        outputs: dict,
        targets: list,
        *,
        generator: Optional[torch.Generator] = None,
    ) -> list:
        """
        Args:
            outputs: ``pred_logits`` (B, Q, K + 1), ``pred_masks`` (B, Q, h, w),
                ``query_valid`` (B, Q) bool, ``query_class`` (Q,) long (−1 = visual).
            targets: B dicts with ``labels`` (n,) long, distinct, in [0, K) and ``masks``
                (n, H, W) bool/float.
            generator: optional RNG for the shared random points.

        Returns:
            B tuples ``(query_idx, target_idx)`` of equal-length (m,) long CPU tensors:
            the text matches (ascending query index) then the visual ones.
        """
        logits, masks = outputs["pred_logits"], outputs["pred_masks"]
        valid, query_class = outputs["query_valid"], outputs["query_class"]
        b, _, num_classes = logits.shape
        num_classes -= 1  # the no-object column
        if len(targets) != b:
            raise ValueError(f"{len(targets)} targets for a batch of {b} predictions")
        coords = torch.rand(1, self.num_points, 2, device=masks.device, generator=generator)

        text = (query_class >= 0).nonzero().squeeze(1)
        visual = (query_class < 0).nonzero().squeeze(1)
        indices = []
        for i, target in enumerate(targets):
            labels = target["labels"].to(logits.device)
            _check_labels(labels, num_classes, image=i)
            text_q, text_t = self._fixed(labels, text, query_class, valid[i], num_classes)
            vis_q, vis_t = self._hungarian(
                logits[i, visual], masks[i, visual], labels, target["masks"], coords
            )
            indices.append(
                (
                    torch.cat([text_q.cpu(), visual.cpu()[vis_q]]),
                    torch.cat([text_t.cpu(), vis_t]),
                )
            )
        return indices

    @staticmethod
    def _fixed(labels, text, query_class, valid, num_classes):
        """Text query of class k ↔ the target of class k, for valid queries only."""
        lookup = labels.new_full((num_classes,), -1)  # class -> target index
        lookup[labels] = torch.arange(labels.numel(), device=labels.device)
        target = lookup[query_class[text]]
        keep = valid[text] & (target >= 0)
        return text[keep], target[keep]

    def _hungarian(self, logits, masks, labels, target_masks, coords):
        """Match M visual queries (logits (M, K + 1), masks (M, h, w)) to n targets."""
        m, n = logits.shape[0], labels.numel()
        empty = torch.zeros(0, dtype=torch.long)
        if m == 0 or n == 0:
            return empty, empty
        # float32 even under autocast: the costs are sums over many points.
        with torch.autocast(device_type=masks.device.type, enabled=False):
            cost_class = -logits.float().softmax(-1)[:, labels]  # (M, n)
            pred = point_sample(masks[:, None].float(), coords.expand(m, -1, -1))[:, 0]
            gt = target_masks.to(device=masks.device, dtype=torch.float32)[:, None]
            gt = point_sample(gt, coords.expand(n, -1, -1))[:, 0]
            cost = (
                self.cost_class * cost_class
                + self.cost_mask * pairwise_sigmoid_bce(pred, gt)
                + self.cost_dice * pairwise_dice(pred, gt)
            ).cpu()
        assert torch.isfinite(cost).all(), "non-finite matching cost (NaN/Inf predictions?)"
        rows, cols = linear_sum_assignment(cost.numpy())
        return torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)


def _check_labels(labels: torch.Tensor, num_classes: int, *, image: int) -> None:
    if labels.numel() == 0:
        return
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"target {image} has labels {labels.tolist()} outside [0, {num_classes}): "
            "the dataset's classes and the vocabulary disagree"
        )
    assert labels.unique().numel() == labels.numel(), (
        f"target {image} repeats a class ({labels.tolist()}); expected one mask per class"
    )
