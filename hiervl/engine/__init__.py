"""Training harness: detectron2 trainer, the semi-supervised step, checkpoints, setup."""
