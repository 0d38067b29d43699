"""Detecting NaN/Inf model outputs before anything consumes them (plain PyTorch).

Diverged weights (e.g. a far too high learning rate) first show as non-finite
predictions; matching them would fail deep inside the matcher. The criterion checks its
inputs with :func:`raise_if_nonfinite` and raises :class:`NonFiniteError`, which the
training step turns into its stop/skip decision (``SOLVER.NONFINITE_ACTION``).

Under torch.distributed every rank learns whether *any* rank saw a non-finite value (one
all-reduce), so all ranks raise together and no rank is left waiting in a collective.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

__all__ = ["NonFiniteError", "raise_if_nonfinite"]


class NonFiniteError(FloatingPointError):
    """Non-finite values in named quantities.

    Attributes:
        kind: what they are ("prediction", "loss").
        names: the non-finite quantities on this rank, in the order they were computed
            (empty when only another rank saw one).
    """

    def __init__(self, kind: str, names: Sequence[str]):
        self.kind = kind
        self.names: List[str] = list(names)
        shown = ", ".join(self.names) if self.names else "(on another rank)"
        super().__init__(f"non-finite {kind}: {shown}")


def raise_if_nonfinite(
    named: Sequence[Tuple[str, torch.Tensor]], kind: str, *, valid: Optional[torch.Tensor] = None
) -> None:
    """Raise :class:`NonFiniteError` if a tensor of ``named`` has a NaN/Inf value here or,
    under torch.distributed, on any rank (all ranks must call it together).

    Args:
        named: (name, tensor) pairs, in the order the tensors were computed.
        kind: what they are, for the message ("prediction").
        valid: optional bool mask over the leading dims of every tensor (e.g. (B, Q) live
            queries): only those entries are checked (masked-out slots are never read).
    """
    if not named:
        return
    finite = torch.stack([_all_finite(t.detach(), valid) for _, t in named])
    bad = (~finite).to(torch.float32)
    anywhere = bad.max()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(anywhere, op=dist.ReduceOp.MAX)
    if anywhere.item() > 0:
        flags = bad.tolist()
        raise NonFiniteError(kind, [name for (name, _), flag in zip(named, flags) if flag])


def _all_finite(tensor: torch.Tensor, valid: Optional[torch.Tensor]) -> torch.Tensor:
    finite = torch.isfinite(tensor)
    if valid is None:
        return finite.all()
    per_entry = finite.flatten(valid.dim()).all(dim=-1) if finite.dim() > valid.dim() else finite
    return per_entry[valid].all()
