"""E_T: the frozen CLIP text tower with a CoOp-style learnable prompt.

Learned class embeddings t_k come from the token sequence
``[SOS] p_1 .. p_P <class name><template suffix> [EOS]`` (e.g. "[SOS] p1..p8 cat . [EOS]"
for the template "a photo of a {}."): the P learnable context vectors replace the
template's words. The prompt is initialised from the word embeddings of the
template prefix ("a photo of a"), right-aligned next to the class name; positions
the prefix does not cover start as N(0, ``prompt_init_std``²). With P equal to the
prefix's token count, t_k starts exactly at the template embedding.

The frozen template embeddings t_k^CLIP ("a photo of a {}.") are cached and only
recomputed when the vocabulary (or the loaded weights) change.

Pooling takes the feature at the real [EOS] position of each sequence (after the
inserted context). Because the text transformer is causal, tokens after [EOS]
cannot change that feature, so sequences are only run up to the longest [EOS].

Shape letters: K classes in the vocabulary, P prompt length, L sequence length,
W_t text width, C CLIP embedding width.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import TextTransformer
from torch import nn

from hiervl.modeling.backbone.class_names import clean_class_name, validate_class_names

__all__ = ["CLIPTextEncoder", "clean_class_name"]


def _text_parts(model: nn.Module) -> Tuple[nn.Module, str]:
    """The module holding the text tower's pieces, and its pooling type."""
    tower = getattr(model, "text", None)
    if tower is None:  # open_clip.CLIP keeps the text pieces on the model itself
        return model, model.text_pool_type
    if not isinstance(tower, TextTransformer):
        raise ValueError(
            f"HierVL's prompt learner needs open_clip's TextTransformer, got {type(tower).__name__}"
        )
    if tower.cls_emb is not None:
        raise ValueError("text towers with a class embedding (CoCa) are not supported")
    return tower, tower.pool_type


class CLIPTextEncoder(nn.Module):
    """Frozen text transformer + learnable prompt -> t_k (K, C) and t_k^CLIP (K, C)."""

    def __init__(
        self,
        *,
        clip_model: nn.Module,
        tokenizer: SimpleTokenizer,
        prompt_length: int,
        template: str,
        class_names: Sequence[str] = (),
        prompt_init_std: float = 0.02,
    ):
        """
        Args:
            clip_model: open_clip ``CLIP``/``CustomTextCLIP``; its text modules are taken
                over (not copied) and frozen.
            tokenizer: the model's open_clip ``SimpleTokenizer``.
            prompt_length: P learnable context vectors.
            template: frozen template with one "{}" for the class name.
            class_names: initial vocabulary (may be set later with :meth:`set_vocabulary`).
            prompt_init_std: std of the context vectors not covered by the template prefix.
        """
        super().__init__()
        if not isinstance(tokenizer, SimpleTokenizer):
            raise ValueError(
                f"CLIPTextEncoder needs open_clip's SimpleTokenizer, got {type(tokenizer).__name__}"
            )
        if template.count("{}") != 1:
            raise ValueError(f"TEMPLATE {template!r} must contain exactly one '{{}}'")
        if prompt_length < 1:
            raise ValueError(f"PROMPT_LENGTH must be >= 1, got {prompt_length}")
        parts, pool_type = _text_parts(clip_model)
        if pool_type not in ("argmax", "eos"):
            # Both pick the end-of-text token, which is what the prompt pooling reproduces.
            raise ValueError(f"text pooling {pool_type!r} is not supported (needs EOT pooling)")
        if not hasattr(parts.transformer, "batch_first"):
            raise ValueError("open_clip is too old: its text Transformer has no batch_first")
        self.token_embedding = parts.token_embedding
        self.positional_embedding = parts.positional_embedding
        self.transformer = parts.transformer
        self.ln_final = parts.ln_final
        self.text_projection = parts.text_projection
        self.register_buffer("attn_mask", parts.attn_mask, persistent=False)
        for module in (self.token_embedding, self.transformer, self.ln_final):
            module.requires_grad_(False)
        self.positional_embedding.requires_grad_(False)
        if self.text_projection is not None:
            self.text_projection.requires_grad_(False)

        self._tokenizer = tokenizer
        self.template = template
        self._suffix = template.split("{}")[1]
        self.prompt_length = int(prompt_length)
        self.context_length = int(self.positional_embedding.shape[0])
        self.width = int(self.positional_embedding.shape[1])
        self.prompt = nn.Parameter(self._initial_prompt(prompt_init_std))

        for name in ("_prompt_ids", "_prompt_eot", "_template_ids", "_template_eot"):
            self.register_buffer(name, torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer("_template_cache", torch.zeros(0), persistent=False)
        self._template_valid = False
        self.class_names: Tuple[str, ...] = ()
        if class_names:
            self.set_vocabulary(class_names)

    @property
    def embed_dim(self) -> int:
        """C, the CLIP embedding width of t_k."""
        if self.text_projection is None:
            return self.width
        if isinstance(self.text_projection, nn.Linear):
            return self.text_projection.out_features
        return int(self.text_projection.shape[1])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def _initial_prompt(self, init_std: float) -> torch.Tensor:
        """(P, W_t): template-prefix word embeddings, right-aligned, random elsewhere."""
        prompt = torch.randn(self.prompt_length, self.width) * init_std
        prefix = self.template.split("{}")[0].strip()
        prefix_ids = self._tokenizer.encode(prefix) if prefix else []
        keep = min(self.prompt_length, len(prefix_ids))
        if keep:
            words = self.token_embedding.weight.detach()[prefix_ids[len(prefix_ids) - keep :]]
            prompt[self.prompt_length - keep :] = words.to(prompt.dtype)
        return prompt

    def _sequences(self, bodies: List[List[int]], names: Sequence[str]) -> Tuple[torch.Tensor, ...]:
        """[SOS] body [EOS] per class, zero-padded -> ids (K, L) and EOT positions (K,)."""
        sot, eot = self._tokenizer.sot_token_id, self._tokenizer.eot_token_id
        sequences = [[sot, *body, eot] for body in bodies]
        for name, seq in zip(names, sequences):
            if len(seq) > self.context_length:
                raise ValueError(
                    f"class name {name!r} makes a {len(seq)}-token prompt, longer than the CLIP "
                    f"context length {self.context_length}"
                )
        # Causal attention: nothing after the last EOT can change any pooled feature.
        length = max(map(len, sequences)) if self.attn_mask is not None else self.context_length
        ids = torch.zeros(len(sequences), length, dtype=torch.long)
        for row, seq in enumerate(sequences):
            ids[row, : len(seq)] = torch.tensor(seq)
        eot_pos = torch.tensor([len(seq) - 1 for seq in sequences], dtype=torch.long)
        device = self.prompt.device
        return ids.to(device), eot_pos.to(device)

    def set_vocabulary(self, names: Sequence[str], *, source: str = "vocabulary") -> None:
        """Replace the class list (open vocabulary); t_k^CLIP is recomputed on next use.

        Args:
            names: K class names; underscores and slashes are turned into words. Every
                vocabulary passes :func:`validate_class_names` here: no empty list, no
                empty name, no two names that are one text query (``circle``/``Circle``).
            source: where the names come from, for the error message.
        """
        names = list(validate_class_names(names, source))
        cleaned = [clean_class_name(name) for name in names]
        encode = self._tokenizer.encode
        placeholder = [0] * self.prompt_length  # overwritten by the learnable prompt
        self._prompt_ids, self._prompt_eot = self._sequences(
            [placeholder + encode(name + self._suffix) for name in cleaned], names
        )
        self._template_ids, self._template_eot = self._sequences(
            [encode(self.template.format(name)) for name in cleaned], names
        )
        self.class_names = tuple(names)
        self._template_valid = False

    def _encode(self, x: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
        """Text transformer on token embeddings.

        Args:
            x: (K, L, W_t) token embeddings (prompt already inserted).
            eot: (K,) position of [EOS] in each sequence.
        Returns:
            (K, C) L2-normalised embeddings pooled at [EOS].
        """
        length = x.shape[1]
        x = x + self.positional_embedding[:length].to(x.dtype)
        mask = None if self.attn_mask is None else self.attn_mask[:length, :length].contiguous()
        x = self.transformer(x, attn_mask=mask)
        x = self.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), eot]
        if isinstance(self.text_projection, nn.Linear):
            x = self.text_projection(x)
        elif self.text_projection is not None:
            x = x @ self.text_projection
        return F.normalize(x, dim=-1)

    def _check_vocabulary(self) -> None:
        if not self.class_names:
            raise ValueError("CLIPTextEncoder has no vocabulary: call set_vocabulary(names) first")

    def forward(self) -> torch.Tensor:
        """Learned-prompt class embeddings t_k for the whole vocabulary in one batch.

        Returns:
            (K, C), L2-normalised; gradients reach only ``prompt``.
        """
        self._check_vocabulary()
        dtype = self.transformer.get_cast_dtype()
        tokens = self.token_embedding(self._prompt_ids).to(dtype)  # (K, L, W_t)
        context = self.prompt.to(dtype).unsqueeze(0).expand(tokens.shape[0], -1, -1)
        x = torch.cat([tokens[:, :1], context, tokens[:, 1 + self.prompt_length :]], dim=1)
        return self._encode(x, self._prompt_eot)

    def template_embeddings(self) -> torch.Tensor:
        """Frozen template class embeddings t_k^CLIP (cached, no gradient).

        Returns:
            (K, C), L2-normalised.
        """
        self._check_vocabulary()
        if not self._template_valid:
            with torch.no_grad():
                tokens = self.token_embedding(self._template_ids)
                tokens = tokens.to(self.transformer.get_cast_dtype())
                self._template_cache = self._encode(tokens, self._template_eot)
            self._template_valid = True
        return self._template_cache

    def train(self, mode: bool = True) -> CLIPTextEncoder:
        """The frozen tower stays in eval mode; only ``prompt`` learns."""
        return super().train(False)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        # New text weights invalidate the cached template embeddings.
        self._template_valid = False
        super()._load_from_state_dict(*args, **kwargs)
