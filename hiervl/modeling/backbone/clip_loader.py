"""Build an open_clip CLIP model (+ tokenizer) from a name or explicit sizes, and load weights.

``MODEL.HIERVL.CLIP.MODEL_NAME`` is an open_clip architecture ("ViT-B-16", also
"hf-hub:..." / "local-dir:..." schemas) or "custom", in which case the towers are
built from ``MODEL.HIERVL.CLIP.CUSTOM`` (keys of :data:`CUSTOM_KEYS`, any case).
``MODEL.HIERVL.CLIP.PRETRAINED`` is an open_clip pretrained tag ("openai"), a path
to a local checkpoint (a state dict, optionally under "state_dict" and/or with a
"module." prefix, or ``.safetensors``), read by :func:`hiervl.checkpoint_io.read_checkpoint`
(weights only: OpenAI's TorchScript ``ViT-B-16.pt`` holds code and is refused; save its
``state_dict()`` once, see INSTALL.md, and use the "-quickgelu" architecture for OpenAI
weights given as a file), or "" for random initialisation. Every failure to get the
requested weights is a ``ValueError`` naming the tag or path.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Mapping, Optional, Tuple

import open_clip
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from open_clip.tokenizer import SimpleTokenizer
from torch import nn

from hiervl.checkpoint_io import read_checkpoint

from .clip_download import require_tag_weights

__all__ = ["CUSTOM_KEYS", "build_clip", "custom_clip_config", "load_clip_checkpoint"]

logger = logging.getLogger(__name__)

# Sizes of a "custom" architecture (MODEL.HIERVL.CLIP.CUSTOM.*, lower-cased).
CUSTOM_KEYS = (
    "embed_dim",
    "image_size",
    "patch_size",
    "vision_width",
    "vision_layers",
    "vision_heads",
    "text_width",
    "text_layers",
    "text_heads",
    "context_length",
)
_SCHEMAS = ("hf-hub:", "local-dir:")
# Non-parameter entries of OpenAI's TorchScript checkpoints (kept by their state_dict()).
_JIT_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")
# Entries stored as scalars by some checkpoints and as (1,) by others.
_RESHAPEABLE_KEYS = ("logit_scale", "logit_bias")
_MAX_LISTED = 5


def custom_clip_config(custom: Mapping[str, Any]) -> Dict[str, Any]:
    """open_clip ``CLIP`` constructor arguments from explicit tower sizes.

    Args:
        custom: the :data:`CUSTOM_KEYS` (case-insensitive), e.g. ``dict(cfg...CLIP.CUSTOM)``.
    Returns:
        {"embed_dim", "vision_cfg": CLIPVisionCfg, "text_cfg": CLIPTextCfg}.
    """
    sizes = {str(key).lower(): value for key, value in custom.items()}
    missing = [key for key in CUSTOM_KEYS if key not in sizes]
    unknown = sorted(set(sizes) - set(CUSTOM_KEYS))
    if missing or unknown:
        raise ValueError(
            f"MODEL.HIERVL.CLIP.CUSTOM: missing keys {missing}, unknown keys {unknown} "
            f"(expected {list(CUSTOM_KEYS)})"
        )
    for key in CUSTOM_KEYS:
        value = sizes[key]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(
                f"MODEL.HIERVL.CLIP.CUSTOM.{key.upper()} must be a positive int, got {value!r}"
            )
    for tower in ("vision", "text"):
        width, heads = sizes[f"{tower}_width"], sizes[f"{tower}_heads"]
        if width % heads:
            raise ValueError(
                f"MODEL.HIERVL.CLIP.CUSTOM: {tower.upper()}_WIDTH {width} is not divisible by "
                f"{tower.upper()}_HEADS {heads}"
            )
    if sizes["image_size"] % sizes["patch_size"]:
        raise ValueError(
            f"MODEL.HIERVL.CLIP.CUSTOM: IMAGE_SIZE {sizes['image_size']} is not divisible by "
            f"PATCH_SIZE {sizes['patch_size']}"
        )
    vision = CLIPVisionCfg(
        layers=sizes["vision_layers"],
        width=sizes["vision_width"],
        head_width=sizes["vision_width"] // sizes["vision_heads"],
        patch_size=sizes["patch_size"],
        image_size=sizes["image_size"],
    )
    text = CLIPTextCfg(
        context_length=sizes["context_length"],
        width=sizes["text_width"],
        heads=sizes["text_heads"],
        layers=sizes["text_layers"],
    )
    return {"embed_dim": sizes["embed_dim"], "vision_cfg": vision, "text_cfg": text}


def _read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """Tensors of a checkpoint file (the one safe reader); ``ValueError`` naming ``path``."""
    state = read_checkpoint(path, what="CLIP checkpoint")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if (
        not isinstance(state, dict)
        or not state
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())
    ):
        raise ValueError(f"CLIP checkpoint {path!r} does not hold a state dict of tensors")
    # A TorchScript model's state_dict() (OpenAI's files, converted) carries these too.
    state = {k: v for k, v in state.items() if k not in _JIT_EXTRA_KEYS}
    if all(key.startswith("module.") for key in state):  # saved from DataParallel/DDP
        state = {key[len("module.") :]: value for key, value in state.items()}
    return state


def _listed(items: List[str]) -> str:
    more = f" ... (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
    return ", ".join(items[:_MAX_LISTED]) + more


def load_clip_checkpoint(model: nn.Module, path: str, *, architecture: str) -> None:
    """Load a local checkpoint into ``model``, strictly.

    Raises ``ValueError`` naming ``path`` when the file is missing or unreadable, or
    when its keys or shapes do not match ``architecture`` (missing/unexpected keys
    and shape mismatches are listed).
    """
    if not os.path.isfile(path):
        raise ValueError(f"CLIP checkpoint {path!r} (MODEL.HIERVL.CLIP.PRETRAINED) does not exist")
    state = _read_state_dict(path)
    expected = model.state_dict()
    for key in _RESHAPEABLE_KEYS:
        if key in state and key in expected and state[key].numel() == expected[key].numel():
            state[key] = state[key].reshape(expected[key].shape)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{key}: checkpoint {tuple(state[key].shape)} vs model {tuple(value.shape)}"
        for key, value in expected.items()
        if key in state and state[key].shape != value.shape
    ]
    if missing or unexpected or mismatched:
        problems = []
        if mismatched:
            problems.append(f"shape mismatches [{_listed(mismatched)}]")
        if missing:
            problems.append(f"missing keys [{_listed(missing)}]")
        if unexpected:
            problems.append(f"unexpected keys [{_listed(unexpected)}]")
        raise ValueError(
            f"CLIP checkpoint {path!r} does not match the architecture {architecture!r}: "
            + "; ".join(problems)
        )
    model.load_state_dict(state, strict=True)
    logger.info("Loaded CLIP weights for %s from %s", architecture, path)


def _checkpoint_path(model_name: str, pretrained: str, tags: List[str]) -> str:
    """``pretrained`` as a local file path, checked before anything is built."""
    if not os.path.isfile(pretrained):
        known = (
            f"an open_clip tag of {model_name!r} ({tags}) nor " if model_name != "custom" else ""
        )
        raise ValueError(
            f"MODEL.HIERVL.CLIP.PRETRAINED {pretrained!r} is neither {known}an existing "
            "checkpoint file"
        )
    return pretrained


def _create(model_name: str, tag: Optional[str], quick_gelu: bool) -> nn.Module:
    try:
        return open_clip.create_model(model_name, pretrained=tag, force_quick_gelu=quick_gelu)
    except (RuntimeError, OSError, ValueError) as err:
        raise ValueError(
            f"cannot build open_clip {model_name!r} with pretrained weights {tag!r}: {err}"
        ) from err


def _build_named(model_name: str, pretrained: str) -> Tuple[nn.Module, Optional[str]]:
    """A named open_clip model (tag weights already loaded) and the local checkpoint to load."""
    if model_name.startswith(_SCHEMAS):
        if pretrained:
            raise ValueError(
                f"MODEL.HIERVL.CLIP.PRETRAINED must be empty for {model_name!r}: its weights "
                "come from that location"
            )
        return _create(model_name, None, quick_gelu=False), None
    if model_name not in open_clip.list_models():
        raise ValueError(
            f"MODEL.HIERVL.CLIP.MODEL_NAME {model_name!r} is neither an open_clip architecture "
            "(open_clip.list_models()) nor 'custom'"
        )
    if not pretrained:
        return _create(model_name, None, quick_gelu=False), None
    tag = open_clip.get_pretrained_cfg(model_name, pretrained)
    if tag:
        # Offline, open_clip would fail after long download retries: say so at once.
        require_tag_weights(model_name, pretrained)
        # open_clip only warns when a QuickGELU-trained tag (OpenAI's) meets a GELU config.
        return _create(model_name, pretrained, quick_gelu=bool(tag.get("quick_gelu"))), None
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    path = _checkpoint_path(model_name, pretrained, tags)
    return _create(model_name, None, quick_gelu=False), path


def build_clip(
    *, model_name: str, pretrained: Optional[str], custom: Optional[Mapping[str, Any]] = None
) -> Tuple[nn.Module, SimpleTokenizer]:
    """Build an open_clip model and its tokenizer.

    Args:
        model_name: open_clip architecture name (or "hf-hub:"/"local-dir:" schema), or
            "custom" to build from ``custom``.
        pretrained: open_clip tag, local checkpoint path, or "" / None for random init.
        custom: tower sizes for ``model_name == "custom"`` (see :func:`custom_clip_config`).
    Returns:
        (model, tokenizer): an open_clip ``CLIP`` in fp32 on the CPU, and its tokenizer.
    """
    pretrained = (pretrained or "").strip()
    checkpoint: Optional[str] = None
    if model_name == "custom":
        if custom is None:
            raise ValueError('MODEL.HIERVL.CLIP.MODEL_NAME "custom" needs MODEL.HIERVL.CLIP.CUSTOM')
        config = custom_clip_config(custom)
        if pretrained:
            checkpoint = _checkpoint_path(model_name, pretrained, [])
        model = CLIP(**config)
        tokenizer = SimpleTokenizer(context_length=config["text_cfg"].context_length)
    else:
        model, checkpoint = _build_named(model_name, pretrained)
        tokenizer = open_clip.get_tokenizer(model_name)
    if checkpoint is not None:
        load_clip_checkpoint(model, checkpoint, architecture=model_name)
    elif not pretrained:
        logger.warning(
            "CLIP %s is randomly initialised (MODEL.HIERVL.CLIP.PRETRAINED is empty)", model_name
        )
    return model, tokenizer
