"""CutMix between an unlabelled batch and its partner batch (pure torch).

UniMatch's recipe: inside each image's box, the strong view shows the partner image's
strong view, and the pseudo-label, its confidence and its ignore flag come from the
partner's weak-view prediction. The same box must drive both, or the student is trained
on pixels whose target belongs to another image.

Shape letters: B batch, H, W crop height/width. A box is (B, H, W) bool (or 0/1), True
where the partner's pixel is used (``cutmix_box1``/``cutmix_box2`` of the unlabelled
mapper, stacked).
"""

from typing import Tuple

import torch


def _as_bool_box(box: torch.Tensor, shape: torch.Size, name: str) -> torch.Tensor:
    if box.dim() != 3 or tuple(box.shape) != (shape[0], shape[-2], shape[-1]):
        raise ValueError(
            f"CutMix box has shape {tuple(box.shape)}; {name} needs (B, H, W) = "
            f"{(shape[0], shape[-2], shape[-1])}"
        )
    return box.bool()


def mix_images(strong: torch.Tensor, partner: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """Paste the partner's pixels inside the box.

    Args:
        strong: (B, 3, H, W) strong views (any dtype).
        partner: (B, 3, H, W) the partner batch's strong views, same dtype/device.
        box: (B, H, W) bool, True = take the partner pixel.
    Returns:
        (B, 3, H, W) mixed images (a new tensor; inputs are not modified).
    """
    if strong.shape != partner.shape:
        raise ValueError(
            f"strong {tuple(strong.shape)} and partner {tuple(partner.shape)} "
            "batches must have the same shape"
        )
    box = _as_bool_box(box, strong.shape, "the images")
    return torch.where(box.unsqueeze(1), partner, strong)


def mix_pseudo_labels(
    label: torch.Tensor,
    conf: torch.Tensor,
    ignore: torch.Tensor,
    partner_label: torch.Tensor,
    partner_conf: torch.Tensor,
    partner_ignore: torch.Tensor,
    box: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mix weak-view pseudo-labels with the partner's using the box that mixed the images.

    Args:
        label, partner_label: (B, H, W) long pseudo-labels (argmax of the weak view).
        conf, partner_conf: (B, H, W) float confidences (max probability).
        ignore, partner_ignore: (B, H, W) ignore flags (e.g. the mappers' ``ignore_mask``,
            bool); any dtype, the partner's must match.
        box: (B, H, W) bool, True = take the partner's value.
    Returns:
        (label, conf, ignore) mixed, each (B, H, W) with its input's dtype.
    """
    for name, ours, theirs in (
        ("label", label, partner_label),
        ("conf", conf, partner_conf),
        ("ignore", ignore, partner_ignore),
    ):
        if ours.shape != label.shape or theirs.shape != label.shape:
            raise ValueError(
                f"{name} tensors must all be (B, H, W) = {tuple(label.shape)}, got "
                f"{tuple(ours.shape)} and {tuple(theirs.shape)}"
            )
    box = _as_bool_box(box, label.shape, "the pseudo-labels")
    return (
        torch.where(box, partner_label, label),
        torch.where(box, partner_conf, conf),
        torch.where(box, partner_ignore, ignore),
    )
