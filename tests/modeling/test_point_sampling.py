"""Point sampling: bilinear reads at normalised coordinates, uncertainty-biased draws."""

import pytest
import torch

from hiervl.modeling.point_sampling import point_sample, uncertain_point_coords


def test_point_sample_reads_pixel_centres_and_interpolates():
    maps = torch.arange(12.0).view(1, 1, 3, 4)  # value = 4*y + x
    # Pixel centre of (y=1, x=2) is ((2 + 0.5) / 4, (1 + 0.5) / 3) in (x, y).
    centre = torch.tensor([[[2.5 / 4, 1.5 / 3]]])
    assert point_sample(maps, centre).item() == pytest.approx(6.0)
    # Halfway between the centres of (1, 1) and (1, 2): their mean.
    mid = torch.tensor([[[2.0 / 4, 1.5 / 3]]])
    assert point_sample(maps, mid).item() == pytest.approx(5.5)


def test_point_sample_is_resolution_independent_for_constant_regions():
    left = torch.zeros(1, 1, 8, 8)
    left[..., :4] = 1.0
    coarse = left[..., ::2, ::2]  # same picture at half resolution
    # Includes points near the image edge (beyond the outermost pixel centres).
    coords = torch.tensor([[[0.1, 0.3], [0.9, 0.6], [0.2, 0.99], [0.01, 0.01]]])
    torch.testing.assert_close(point_sample(left, coords), point_sample(coarse, coords))
    torch.testing.assert_close(point_sample(left, coords)[0, 0], torch.tensor([1.0, 0, 1, 1]))


def test_point_sample_gradient_flows_to_the_map():
    maps = torch.randn(2, 3, 5, 5, requires_grad=True)
    point_sample(maps, torch.rand(2, 7, 2)).sum().backward()
    assert maps.grad.abs().sum() > 0


def test_uncertain_points_concentrate_on_the_uncertain_band():
    # Logits are 10 except in columns 8-9 where they are 0: interpolated logits are below
    # 10 for x in (7.5/16, 10.5/16), 3/16 of the image (~187 of the 1000 candidates).
    logits = torch.full((3, 1, 16, 16), 10.0)
    logits[..., 8:10] = 0.0
    g = torch.Generator().manual_seed(0)
    coords = uncertain_point_coords(
        logits, num_points=200, oversample_ratio=5.0, importance_sample_ratio=0.5, generator=g
    )
    assert coords.shape == (3, 200, 2)
    assert coords.min() >= 0 and coords.max() <= 1
    important, uniform = coords[:, :100, 0], coords[:, 100:, 0]
    band = (important > 7.5 / 16) & (important < 10.5 / 16)
    assert band.all()
    assert ((uniform > 7.5 / 16) & (uniform < 10.5 / 16)).float().mean() < 0.5


def test_uncertain_points_argument_checks():
    logits = torch.zeros(1, 1, 4, 4)
    with pytest.raises(ValueError, match="oversample_ratio"):
        uncertain_point_coords(
            logits, num_points=4, oversample_ratio=0.5, importance_sample_ratio=0.5
        )
    with pytest.raises(ValueError, match="importance_sample_ratio"):
        uncertain_point_coords(
            logits, num_points=4, oversample_ratio=2.0, importance_sample_ratio=1.5
        )
