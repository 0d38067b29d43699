"""Point sampling on dense maps (PointRend-style), used by the matcher and the criterion.

Mask losses are evaluated on a few thousand points instead of every pixel: the
prediction (stride 4) and the ground truth (full resolution) are both read at the
same normalised coordinates, so neither has to be resized to the other.

Shape letters: N maps, C channels, H×W map size, P points.
Coordinates are normalised to [0, 1] as (x, y), with pixel centres at (i + 0.5) / W
(``align_corners=False`` convention), so a point reads the same physical location
in maps of any resolution.
"""

from typing import Callable, Optional

import torch
import torch.nn.functional as F

__all__ = ["point_sample", "uncertain_point_coords", "logit_uncertainty"]


def point_sample(maps: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinearly read ``maps`` at normalised coordinates.

    Args:
        maps: (N, C, H, W) float maps.
        coords: (N, P, 2) points in [0, 1], (x, y) order.

    Returns:
        (N, C, P) values. Points between the outermost pixel centres and the map's edge
        read the edge pixels (border padding): zero padding would pull a coarse
        prediction towards 0 in a band half a coarse pixel wide along every edge.
    """
    assert maps.dim() == 4, f"maps must be (N, C, H, W), got {tuple(maps.shape)}"
    assert coords.dim() == 3 and coords.shape[-1] == 2, (
        f"coords must be (N, P, 2), got {tuple(coords.shape)}"
    )
    # grid_sample wants [-1, 1] and a (N, Hout, Wout, 2) grid: use a 1×P grid.
    grid = (2.0 * coords - 1.0).unsqueeze(1).to(maps.dtype)
    return F.grid_sample(
        maps, grid, mode="bilinear", padding_mode="border", align_corners=False
    ).squeeze(2)


def logit_uncertainty(logits: torch.Tensor) -> torch.Tensor:
    """Uncertainty of a binary logit: highest where the logit is closest to 0.

    Args:
        logits: any shape.

    Returns:
        the same shape, ``-|logits|``.
    """
    return -logits.abs()


def uncertain_point_coords(
    logits: torch.Tensor,
    *,
    num_points: int,
    oversample_ratio: float,
    importance_sample_ratio: float,
    uncertainty_fn: Callable[[torch.Tensor], torch.Tensor] = logit_uncertainty,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Pick points biased towards uncertain locations of each map, plus uniform ones.

    Draw ``int(num_points * oversample_ratio)`` uniform candidates,
    keep the ``int(importance_sample_ratio * num_points)`` most uncertain of them, and
    fill the rest with fresh uniform points (so the loss still sees confident regions).

    Args:
        logits: (N, 1, H, W) mask logits (only used to rank candidates; no gradient).
        num_points: P, points returned per map.
        oversample_ratio: >= 1, candidate pool size relative to P.
        importance_sample_ratio: in [0, 1], fraction of P chosen by uncertainty.
        uncertainty_fn: maps (N, 1, P') sampled logits to (N, 1, P') scores, higher =
            more uncertain.
        generator: optional RNG for reproducible draws.

    Returns:
        (N, P, 2) coordinates in [0, 1].
    """
    if oversample_ratio < 1:
        raise ValueError(f"oversample_ratio must be >= 1, got {oversample_ratio}")
    if not 0 <= importance_sample_ratio <= 1:
        raise ValueError(
            f"importance_sample_ratio must be in [0, 1], got {importance_sample_ratio}"
        )
    assert logits.dim() == 4 and logits.shape[1] == 1, (
        f"logits must be (N, 1, H, W), got {tuple(logits.shape)}"
    )
    n = logits.shape[0]
    device = logits.device
    num_candidates = int(num_points * oversample_ratio)
    num_uncertain = int(importance_sample_ratio * num_points)
    num_uniform = num_points - num_uncertain

    with torch.no_grad():
        candidates = torch.rand(n, num_candidates, 2, device=device, generator=generator)
        scores = uncertainty_fn(point_sample(logits.float(), candidates))[:, 0]  # (N, P')
        top = scores.topk(num_uncertain, dim=1).indices  # (N, num_uncertain)
        chosen = torch.gather(candidates, 1, top.unsqueeze(-1).expand(-1, -1, 2))
        uniform = torch.rand(n, num_uniform, 2, device=device, generator=generator)
        return torch.cat([chosen, uniform], dim=1)
