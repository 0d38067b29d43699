"""HierVL's network and losses as plain PyTorch modules (no detectron2 import here)."""
