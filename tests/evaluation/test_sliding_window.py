import pytest
import torch

from hiervl.evaluation.sliding_window import sliding_window_inference, window_starts


def test_window_starts_cover_and_end_at_border():
    assert window_starts(10, 4, 2) == [0, 2, 4, 6]
    assert window_starts(11, 4, 3) == [0, 3, 6, 7]
    assert window_starts(4, 4, 2) == [0]
    assert window_starts(3, 4, 2) == [0]
    with pytest.raises(ValueError, match="stride"):
        window_starts(10, 4, 0)


@pytest.mark.parametrize("size", [(17, 23), (32, 32), (9, 40)])
def test_pixelwise_predictor_equals_whole_image(size):
    """A per-pixel predictor gives the same scores windowed or whole, for odd sizes too."""
    torch.manual_seed(0)
    weight = torch.randn(5, 3)
    predict = lambda x: torch.einsum("kc,bchw->bkhw", weight, x)  # noqa: E731
    images = torch.randn(2, 3, *size)
    out = sliding_window_inference(predict, images, crop=12, stride=6, num_classes=5)
    assert out.shape == (2, 5, *size)
    torch.testing.assert_close(out, predict(images))


def test_overlaps_are_averaged():
    """Each window predicts its own index; the result is the hand-computed mean."""
    calls = []

    def predict(x):
        calls.append(len(calls))
        return torch.full((x.shape[0], 1, *x.shape[-2:]), float(len(calls) - 1))

    images = torch.zeros(1, 3, 1, 6)  # window 1x4 (height < crop); windows at x = 0, 2
    out = sliding_window_inference(predict, images, crop=4, stride=2, num_classes=1)
    expected = torch.tensor([0.0, 0.0, 0.5, 0.5, 1.0, 1.0])
    torch.testing.assert_close(out[0, 0, 0], expected)


def test_window_covering_image_is_a_single_call():
    calls = []

    def predict(x):
        calls.append(x.shape)
        return x[:, :2]

    images = torch.randn(1, 3, 10, 7)
    out = sliding_window_inference(predict, images, crop=16, stride=8, num_classes=2)
    assert calls == [torch.Size([1, 3, 10, 7])]
    torch.testing.assert_close(out, images[:, :2])
