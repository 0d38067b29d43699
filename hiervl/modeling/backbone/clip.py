"""One call from the CLIP config keys to HierVL's three CLIP towers.

``build_clip_towers`` builds one open_clip model and splits it into:
- ``backbone``: E_I^θ, :class:`CLIPImageBackbone` (owns the fine-tuned image tower),
- ``frozen``: E_I^0, :class:`FrozenCLIPImageEncoder` (a deep copy of the same weights),
- ``text``: E_T, :class:`CLIPTextEncoder` (frozen text tower + learnable prompt).
All three share C = ``backbone.embed_dim`` = ``frozen.embed_dim`` = ``text.embed_dim``.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Optional, Sequence

from .clip_loader import build_clip
from .frozen_encoder import FrozenCLIPImageEncoder
from .image_encoder import CLIPImageBackbone
from .text_encoder import CLIPTextEncoder

__all__ = ["CLIPTowers", "build_clip_towers"]


class CLIPTowers(NamedTuple):
    backbone: CLIPImageBackbone
    frozen: FrozenCLIPImageEncoder
    text: CLIPTextEncoder


def build_clip_towers(
    *,
    model_name: str,
    pretrained: Optional[str],
    custom: Optional[Mapping[str, Any]],
    out_indices: Sequence[int],
    pyramid_channels: Sequence[int],
    prompt_length: int,
    template: str,
    class_names: Sequence[str] = (),
) -> CLIPTowers:
    """
    Args:
        model_name, pretrained, custom: MODEL.HIERVL.CLIP.{MODEL_NAME, PRETRAINED, CUSTOM}
            (see :func:`build_clip`).
        out_indices, pyramid_channels: MODEL.HIERVL.CLIP.{OUT_INDICES, PYRAMID_CHANNELS}.
        prompt_length, template: MODEL.HIERVL.CLIP.{PROMPT_LENGTH, TEMPLATE}.
        class_names: initial vocabulary of the text encoder (may be set later).
    Returns:
        :class:`CLIPTowers` (backbone, frozen, text).
    """
    model, tokenizer = build_clip(model_name=model_name, pretrained=pretrained, custom=custom)
    # Copy E_I^0 first: the backbone takes ownership of model.visual and will be fine-tuned.
    frozen = FrozenCLIPImageEncoder(visual=model.visual)
    backbone = CLIPImageBackbone(
        visual=model.visual, out_indices=out_indices, pyramid_channels=pyramid_channels
    )
    text = CLIPTextEncoder(
        clip_model=model,
        tokenizer=tokenizer,
        prompt_length=prompt_length,
        template=template,
        class_names=class_names,
    )
    assert backbone.embed_dim == text.embed_dim == frozen.embed_dim, (
        f"CLIP image/text embedding widths differ: {backbone.embed_dim} vs {text.embed_dim}"
    )
    return CLIPTowers(backbone=backbone, frozen=frozen, text=text)
