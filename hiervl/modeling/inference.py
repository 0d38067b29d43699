"""Mask2Former's semantic inference over the live (valid) queries.

Shape letters: B batch, Q queries, K classes, h×w mask size.

``S[k, x, y] = Σ_i softmax(c_i)[k] · sigmoid(M_i)[x, y]`` summed over valid queries i,
with the no-object column dropped; inactive text queries contribute nothing.
"""

import torch

__all__ = ["semantic_inference"]


def semantic_inference(
    pred_logits: torch.Tensor, pred_masks: torch.Tensor, query_valid: torch.Tensor
) -> torch.Tensor:
    """
    Args:
        pred_logits: (B, Q, K + 1) class logits, last column = no object.
        pred_masks: (B, Q, h, w) mask logits.
        query_valid: (B, Q) bool, False for queries to drop.

    Returns:
        (B, K, h, w) float32 class scores (not normalised over k; argmax gives the label).
    """
    if pred_logits.shape[:2] != pred_masks.shape[:2] or query_valid.shape != pred_logits.shape[:2]:
        raise ValueError(
            f"inconsistent shapes: logits {tuple(pred_logits.shape)}, masks "
            f"{tuple(pred_masks.shape)}, valid {tuple(query_valid.shape)}"
        )
    probs = pred_logits.float().softmax(-1)[..., :-1]
    probs = probs * query_valid[..., None].to(probs.dtype)
    return torch.einsum("bqk,bqhw->bkhw", probs, pred_masks.float().sigmoid())
