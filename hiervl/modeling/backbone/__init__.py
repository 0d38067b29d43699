"""open_clip towers of HierVL (plain PyTorch, no detectron2): see ``clip.py``."""

from .clip import CLIPTowers, build_clip_towers
from .clip_loader import CUSTOM_KEYS, build_clip, custom_clip_config, load_clip_checkpoint
from .frozen_encoder import FrozenCLIPImageEncoder, FrozenImageFeatures
from .image_encoder import PYRAMID_NAMES, PYRAMID_STRIDES, CLIPImageBackbone
from .text_encoder import CLIPTextEncoder, clean_class_name

__all__ = [
    "CLIPImageBackbone",
    "CLIPTextEncoder",
    "CLIPTowers",
    "CUSTOM_KEYS",
    "FrozenCLIPImageEncoder",
    "FrozenImageFeatures",
    "PYRAMID_NAMES",
    "PYRAMID_STRIDES",
    "build_clip",
    "build_clip_towers",
    "clean_class_name",
    "custom_clip_config",
    "load_clip_checkpoint",
]
