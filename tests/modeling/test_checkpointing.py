"""Activation checkpointing (MODEL.HIERVL.CHECKPOINTING.*) changes memory, not math: the
same losses and the same gradients for every parameter, with dropout on (non-reentrant
checkpoints restore the RNG state for the recomputation). Plain torch."""

import torch
from tiny_hiervl import build_model, build_objective, labeled_batch, unlabeled_batch


def _losses_and_grads(checkpointing: bool, dtype: torch.dtype):
    """Weighted losses and parameter gradients of one semi-supervised step."""
    model = build_model(checkpointing=checkpointing, dropout=0.2).to(dtype).train()
    objective = build_objective().to(dtype)
    labeled = labeled_batch(1)
    unlabeled = unlabeled_batch(1)
    labeled = labeled._replace(images=labeled.images.to(dtype))
    unlabeled = unlabeled._replace(
        **{k: getattr(unlabeled, k).to(dtype) for k in ("weak", "strong1", "strong2")},
        **{k: getattr(unlabeled, k).to(dtype) for k in ("mix_weak", "mix_strong1", "mix_strong2")},
    )
    torch.manual_seed(7)  # point sampling, class blanking, dropout: same draws in both runs
    losses = objective(model, labeled, unlabeled, iteration=3, max_iter=10)
    sum(losses.values()).backward()
    params = list(model.named_parameters()) + list(objective.named_parameters())
    grads = {name: p.grad.clone() for name, p in params if p.grad is not None}
    return {k: v.detach() for k, v in losses.items()}, grads


def test_checkpointing_is_on_where_asked():
    model = build_model(checkpointing=True)
    assert model.backbone.visual.transformer.grad_checkpointing
    assert model.pixel_decoder.checkpointing and model.decoder.checkpointing
    assert not model.frozen_encoder.visual.transformer.grad_checkpointing  # no grad there


def test_same_losses_and_gradients_with_and_without_checkpointing():
    losses, grads = _losses_and_grads(False, torch.float64)
    losses_ckpt, grads_ckpt = _losses_and_grads(True, torch.float64)
    assert losses.keys() == losses_ckpt.keys() and len(losses) > 20
    tol = 1e-12
    for key in losses:
        torch.testing.assert_close(losses_ckpt[key], losses[key], rtol=tol, atol=tol)
    assert grads.keys() == grads_ckpt.keys()
    # Every trainable part got a gradient, checkpointed parts included.
    for part in ("backbone.visual.transformer", "pixel_decoder.encoder_layers", "decoder.ffn"):
        assert any(k.startswith(part) and v.abs().sum() > 0 for k, v in grads.items()), part
    for key in grads:
        torch.testing.assert_close(grads_ckpt[key], grads[key], rtol=tol, atol=tol, msg=key)
