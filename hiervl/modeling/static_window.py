"""One fixed-size inference window of HierVL, vocabulary baked in: what ONNX export traces.

Shape letters: B images (1 for the export), K classes, H×W the window.

``StaticWindow(images) = HierVLModel.predict_scores(images, text, static_shapes=True)``
with the text embeddings of the chosen vocabulary computed once (the text tower and the
prompt are not part of the exported graph) and every size fixed:

- HSQG's gate and active set are computed as usual (``topk`` for the ``MIN_ACTIVE``
  top-up); classes it prunes keep their text queries, masked as keys in every attention
  and dropped from the scores, instead of being removed (``live_text_queries`` would
  make the number of queries depend on the image);
- the frozen encoder's resize of the window to CLIP's input size is two constant
  matrices (``antialiased_resize_matrix``);
- MSDeformAttn runs its ``grid_sample`` reference (``hiervl.ops.reference_kernel``):
  ONNX GridSample (opset 16) is a standard operator of every runtime, so the file needs
  no custom-op library, which a symbolic for the compiled kernel would (a custom domain
  that onnxruntime knows nothing about; users would have to build and register it).

The scores equal the eager model's (``tests/modeling/test_static_window.py``).
"""

from __future__ import annotations

from typing import List

import torch
from torch import nn

from hiervl.modeling.hiervl_model import HierVLModel

__all__ = ["StaticWindow"]


class StaticWindow(nn.Module):
    """images (B,3,H,W), CLIP-normalised → semantic scores S (B,K,H,W) of one window."""

    def __init__(self, *, model: HierVLModel, height: int, width: int, prune_classes: bool = False):
        """
        Args:
            model: the trained network with its vocabulary set (``set_vocabulary``); put in
                eval mode here.
            height, width: the window size the graph is built for (any positive size;
                sides that are not multiples of ``model.size_divisibility`` are padded
                inside, as ``predict_scores`` does).
            prune_classes: zero the scores of the classes HSQG pruned for the window
                (``predict_scores(prune_classes=True)``; TEST.PRUNE_CLASSES).
        """
        super().__init__()
        if height < 1 or width < 1:
            raise ValueError(f"window size must be positive, got {height}x{width}")
        self.model = model.eval()
        self.height, self.width = int(height), int(width)
        self.prune_classes = bool(prune_classes)
        with torch.no_grad():
            text, text_clip = model.class_embeddings()
        # Buffers: traced as constants of the graph (the vocabulary is fixed at export).
        self.register_buffer("text_embed", text.detach().clone(), persistent=False)
        self.register_buffer("text_clip", text_clip.detach().clone(), persistent=False)

    @property
    def class_names(self) -> List[str]:
        return self.model.class_names

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """
        Args:
            images: (B, 3, H, W) CLIP-normalised, exactly the window size.
        Returns:
            (B, K, H, W) float32 scores (Mask2Former's semantic inference; not normalised).
        """
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, self.height, self.width):
            raise ValueError(
                f"StaticWindow: expected images (B, 3, {self.height}, {self.width}), got "
                f"{tuple(images.shape)}"
            )
        return self.model.predict_scores(
            images,
            (self.text_embed, self.text_clip),
            static_shapes=True,
            prune_classes=self.prune_classes,
        )
