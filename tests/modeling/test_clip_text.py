"""CLIPTextEncoder (E_T + CoOp prompt) against open_clip's encode_text on a tiny random tower."""

import pytest
import torch
import torch.nn.functional as F

from hiervl.modeling.backbone import CLIPTextEncoder, build_clip, clean_class_name

TINY = dict(
    EMBED_DIM=24,
    IMAGE_SIZE=32,
    PATCH_SIZE=16,
    VISION_WIDTH=32,
    VISION_LAYERS=1,
    VISION_HEADS=4,
    TEXT_WIDTH=48,
    TEXT_LAYERS=2,
    TEXT_HEADS=4,
    CONTEXT_LENGTH=24,
)
TEMPLATE = "a photo of a {}."
# Names of different token lengths, so that the EOT positions differ within the batch.
NAMES = ["cat", "traffic_light", "potted plant/flower", "sky"]


def _model(seed=0):
    torch.manual_seed(seed)
    model, tokenizer = build_clip(model_name="custom", pretrained="", custom=TINY)
    with torch.no_grad():  # non-trivial LayerNorms and biases
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval(), tokenizer


def _encoder(prompt_length, names=NAMES, seed=0):
    model, tokenizer = _model(seed)
    encoder = CLIPTextEncoder(
        clip_model=model,
        tokenizer=tokenizer,
        prompt_length=prompt_length,
        template=TEMPLATE,
        class_names=names,
    )
    return encoder, model, tokenizer


def _open_clip_templates(model, tokenizer, names):
    sentences = [TEMPLATE.format(clean_class_name(n)) for n in names]
    with torch.no_grad():
        return F.normalize(model.encode_text(tokenizer(sentences)), dim=-1)


def test_clean_class_name():
    assert clean_class_name("traffic_light") == "traffic light"
    assert clean_class_name("tv/monitor") == "tv or monitor"
    assert clean_class_name("  potted__plant ") == "potted plant"


def test_template_initialised_prompt_reproduces_encode_text():
    """P = 4 = len("a photo of a"): the prompt starts as those word embeddings, so t_k must
    equal open_clip's embedding of the template sentence (checks insertion and EOT pooling)."""
    encoder, model, tokenizer = _encoder(prompt_length=4)
    want = _open_clip_templates(model, tokenizer, NAMES)
    got = encoder()
    assert got.shape == (4, 24)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(4))


def test_template_embeddings_match_and_are_cached():
    encoder, model, tokenizer = _encoder(prompt_length=8)
    calls = []
    original = encoder._encode
    encoder._encode = lambda *args: calls.append(1) or original(*args)
    first = encoder.template_embeddings()
    torch.testing.assert_close(
        first, _open_clip_templates(model, tokenizer, NAMES), rtol=1e-5, atol=1e-5
    )
    assert not first.requires_grad
    assert encoder.template_embeddings() is first and len(calls) == 1
    # A new vocabulary (open vocabulary) recomputes once, with the new K.
    encoder.set_vocabulary(["bus", "person"])
    second = encoder.template_embeddings()
    assert second.shape == (2, 24) and len(calls) == 2
    torch.testing.assert_close(
        second, _open_clip_templates(model, tokenizer, ["bus", "person"]), rtol=1e-5, atol=1e-5
    )
    assert encoder().shape == (2, 24) and encoder.num_classes == 2


def test_prompt_initialisation_right_aligns_template_words():
    encoder, model, tokenizer = _encoder(prompt_length=8)
    words = model.token_embedding.weight[tokenizer.encode("a photo of a")]
    assert torch.equal(encoder.prompt.detach()[4:], words)
    random_part = encoder.prompt.detach()[:4]
    assert 0.01 < random_part.std().item() < 0.04  # N(0, 0.02^2), 4 x 48 samples
    short, model, tokenizer = _encoder(prompt_length=2)
    assert torch.equal(
        short.prompt.detach(), model.token_embedding.weight[tokenizer.encode("of a")]
    )


def test_gradients_reach_only_the_prompt():
    encoder, _, _ = _encoder(prompt_length=8)
    encoder.train()
    (encoder() * torch.randn(4, 24)).sum().backward()
    assert encoder.prompt.grad is not None and encoder.prompt.grad.abs().sum() > 0
    others = [(n, p) for n, p in encoder.named_parameters() if n != "prompt"]
    assert others and all(p.grad is None and not p.requires_grad for _, p in others)


def test_class_order_permutes_rows():
    encoder, _, _ = _encoder(prompt_length=8)
    forward, template = encoder(), encoder.template_embeddings()
    encoder.set_vocabulary(NAMES[::-1])
    torch.testing.assert_close(encoder(), forward.flip(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        encoder.template_embeddings(), template.flip(0), rtol=1e-5, atol=1e-5
    )


def test_loading_weights_refreshes_the_template_cache():
    encoder, _, _ = _encoder(prompt_length=8, seed=0)
    other, _, _ = _encoder(prompt_length=8, seed=1)
    stale = encoder.template_embeddings().clone()
    encoder.load_state_dict(other.state_dict())
    torch.testing.assert_close(encoder.template_embeddings(), other.template_embeddings())
    assert not torch.allclose(encoder.template_embeddings(), stale)


def test_errors_are_clear():
    model, tokenizer = _model()
    kwargs = dict(clip_model=model, tokenizer=tokenizer, prompt_length=8)
    with pytest.raises(ValueError, match="exactly one"):
        CLIPTextEncoder(template="a photo", **kwargs)
    encoder = CLIPTextEncoder(template=TEMPLATE, **kwargs)
    with pytest.raises(ValueError, match="call set_vocabulary"):
        encoder()
    with pytest.raises(ValueError, match="at least one class"):
        encoder.set_vocabulary([])
    with pytest.raises(ValueError, match="#1 ' _ '"):
        encoder.set_vocabulary(["cat", " _ "])
    # One text query for two classes would split its pixels arbitrarily.
    with pytest.raises(ValueError, match="#0 'circle' and #2 'Circle ' are the same text query"):
        encoder.set_vocabulary(["circle", "square", "Circle "])
    assert encoder.class_names == ()  # a refused vocabulary changes nothing
    long_name = " ".join(["word"] * 20)
    with pytest.raises(ValueError, match="longer than the CLIP context length 24"):
        encoder.set_vocabulary(["cat", long_name])
