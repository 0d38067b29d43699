"""One training iteration: the named two-stream batch in, one optimizer step out.

Compared with detectron2's ``SimpleTrainer.run_step`` this step
- seeds torch's RNG from (seed, iteration, rank), so the model's own randomness
  (point sampling, class blanking, dropout) is the same after ``--resume``;
- runs the forward under ``torch.autocast`` when AMP is on (bf16 or fp16; fp16 uses a
  gradient scaler, CUDA only);
- guards against NaN/Inf (:class:`NonFiniteGuard`): non-finite predictions (reported by the
  criterion before matching) and loss terms (checked *before* backward) stop training with
  their names and the iteration (``SOLVER.NONFINITE_ACTION = "stop"``), or skip the
  iteration (``"skip"``) without touching the weights, the optimizer state or the LR
  schedule (:attr:`SemiSupervisedStep.step_skipped` tells the LR hook), until more than
  ``SOLVER.NONFINITE_MAX_SKIPS`` iterations in a row were skipped.
The model receives the batch with ``iteration`` and ``max_iter`` set, for the losses
whose weight follows the schedule (MaskCLIP guidance).
With ``SOLVER.MICRO_BATCHES`` = n > 1 the batch is split into n equal micro-batches, each
forwarded and backpropagated with its loss divided by n, then one optimizer step is taken
(gradient accumulation, ``_run_accumulated``); a non-finite micro-batch skips (or stops)
the whole iteration, as without micro-batches.
"""

import logging
import time
from contextlib import nullcontext
from typing import Any, Dict, List, Optional

import torch
from detectron2.engine import SimpleTrainer
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage

from hiervl.modeling.nonfinite import NonFiniteError

logger = logging.getLogger(__name__)

_PRECISIONS = {"bfloat16": torch.bfloat16, "float16": torch.float16}


# Non-finite quantities named in a message (the first ones computed).
_LISTED = 3
_ADVICE = (
    "Lower SOLVER.BASE_LR, enable SOLVER.CLIP_GRADIENTS, check the data, or set "
    "SOLVER.NONFINITE_ACTION skip."
)


class NonFiniteLossError(FloatingPointError):
    """Training stopped on a NaN/Inf prediction or loss term (the message names it)."""


class NonFiniteGuard:
    """The NaN/Inf policy of the training step (``SOLVER.NONFINITE_ACTION``).

    Args:
        action: "stop" raises :class:`NonFiniteLossError` at the first non-finite
            iteration; "skip" skips it (logged, counted in the ``skipped_steps`` metric).
        max_skips: with "skip", the most iterations in a row that may be skipped; the next
            non-finite one stops training with the same error (SOLVER.NONFINITE_MAX_SKIPS).
    """

    def __init__(self, *, action: str, max_skips: int):
        if action not in ("stop", "skip"):
            raise ValueError(f"SOLVER.NONFINITE_ACTION must be 'stop' or 'skip', got {action!r}")
        if isinstance(max_skips, bool) or not isinstance(max_skips, int) or max_skips < 0:
            raise ValueError(f"SOLVER.NONFINITE_MAX_SKIPS must be an int >= 0, got {max_skips!r}")
        self.action = action
        self.max_skips = max_skips
        self.skipped = 0
        self.consecutive = 0
        self._first = -1  # the first iteration of the current run of skipped ones

    @staticmethod
    def agree(bad_local: List[str]) -> List[str]:
        """The non-finite names of every rank (all ranks call it; first-seen order)."""
        return list(dict.fromkeys(n for names in comm.all_gather(bad_local) for n in names))

    def finite(self) -> None:
        """The iteration was finite: a later skip starts a new run."""
        self.consecutive = 0

    def nonfinite(self, iteration: int, message: str) -> None:
        """Raise (stop, or too many skips in a row), or log and count a skipped iteration.

        ``message`` names the non-finite quantities of ``iteration``."""
        if self.action == "stop":
            raise NonFiniteLossError(f"{message}. {_ADVICE}")
        if self.consecutive >= self.max_skips:
            raise NonFiniteLossError(
                f"{message}, after {self.consecutive} skipped iterations in a row since "
                f"iteration {self._first} (SOLVER.NONFINITE_MAX_SKIPS {self.max_skips}). "
                f"{_ADVICE}"
            )
        self.skipped += 1
        self.consecutive += 1
        if self.consecutive == 1:
            self._first = iteration
        logger.warning(
            "%s; iteration skipped (weights, optimizer and LR schedule unchanged; %d in a row, "
            "%d in all, at most %d in a row)",
            message,
            self.consecutive,
            self.skipped,
            self.max_skips,
        )
        get_event_storage().put_scalar("skipped_steps", self.skipped)

    def state_dict(self) -> Dict[str, Any]:
        return {"skipped": self.skipped, "consecutive": self.consecutive, "first": self._first}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.skipped = int(state.get("skipped", 0))
        self.consecutive = int(state.get("consecutive", 0))
        self._first = int(state.get("first", -1))


class SemiSupervisedStep(SimpleTrainer):
    """``SimpleTrainer`` with per-iteration seeding, AMP on CPU/GPU, gradient accumulation
    and the NaN/Inf guard.

    Args:
        model, data_loader, optimizer: as in ``SimpleTrainer``.
        max_iter: total iterations (for scheduled loss weights).
        seed: base seed of the per-iteration RNG.
        amp_precision: None (fp32), "bfloat16" or "float16".
        nonfinite_action: "stop" or "skip" (see :class:`NonFiniteGuard`).
        nonfinite_max_skips: iterations in a row "skip" may skip.
        micro_batches: gradient-accumulation parts of each batch (1 = none).
    """

    def __init__(
        self,
        model,
        data_loader,
        optimizer,
        *,
        max_iter: int,
        seed: int,
        amp_precision=None,
        nonfinite_action: str = "stop",
        nonfinite_max_skips: int = 10,
        micro_batches: int = 1,
    ):
        super().__init__(model, data_loader, optimizer)
        if (
            not isinstance(micro_batches, int)
            or isinstance(micro_batches, bool)
            or micro_batches < 1
        ):
            raise ValueError(f"SOLVER.MICRO_BATCHES must be an int >= 1, got {micro_batches!r}")
        self.micro_batches = micro_batches
        self.guard = NonFiniteGuard(action=nonfinite_action, max_skips=nonfinite_max_skips)
        if amp_precision is not None and amp_precision not in _PRECISIONS:
            raise ValueError(
                f"SOLVER.AMP.PRECISION must be one of {sorted(_PRECISIONS)}, got {amp_precision!r}"
            )
        self.max_iter = max_iter
        self.seed = seed
        self.amp_dtype = _PRECISIONS.get(amp_precision)
        device = next(iter(model.parameters())).device.type
        self.device_type = device
        use_scaler = self.amp_dtype == torch.float16
        if use_scaler and device != "cuda":
            raise ValueError("SOLVER.AMP.PRECISION 'float16' needs a GPU; use 'bfloat16' on CPU")
        self.grad_scaler = torch.cuda.amp.GradScaler() if use_scaler else None
        # True after an iteration the guard skipped (the LR hook then leaves the schedule).
        self.step_skipped = False

    @property
    def skipped_steps(self) -> int:
        return self.guard.skipped

    def run_step(self):
        assert self.model.training, "[SemiSupervisedStep] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        # Seeded after fetching: the first ``next`` of a DataLoader draws its base seed
        # from the global RNG, and a resumed run makes that first call at another iteration.
        torch.manual_seed(self.seed + 1_000_003 * self.iter + comm.get_rank())
        if isinstance(data, dict):
            data = dict(data, iteration=self.iter, max_iter=self.max_iter)
        if self.micro_batches > 1:
            stepped = self._run_accumulated(data, data_time)
        else:
            stepped = self._run_single(data, data_time)
        self.step_skipped = not stepped
        if stepped:
            self.guard.finite()

    def _run_single(self, data, data_time: float) -> bool:
        """Forward, backward, optimizer step; False when the guard skipped the iteration."""
        loss_dict = self._forward(data)
        if loss_dict is None:
            return False
        losses = sum(loss_dict.values())
        self.optimizer.zero_grad()
        self._backward(losses)
        self.after_backward()
        self._write_metrics(loss_dict, data_time)
        self._optimizer_step()
        return True

    def _forward(self, data) -> Optional[Dict[str, torch.Tensor]]:
        """The loss dict of ``data``, or None when the guard skips the iteration (a
        non-finite prediction or loss term on any rank; all ranks agree)."""
        try:
            with torch.autocast(
                device_type=self.device_type,
                dtype=self.amp_dtype or torch.float32,
                enabled=self.amp_dtype is not None,
            ):
                loss_dict = self.model(data)
        except NonFiniteError as e:  # raised on every rank together (see the criterion)
            loss_dict, kind, bad_local = None, "prediction", e.names
        else:
            kind = "loss"
            bad_local = [k for k, v in loss_dict.items() if not torch.isfinite(v).all()]
        bad = self.guard.agree(bad_local)
        if not bad:
            return loss_dict
        self.guard.nonfinite(self.iter, self._describe(kind, bad, loss_dict))
        return None

    def _backward(self, losses: torch.Tensor) -> None:
        if self.grad_scaler is not None:
            self.grad_scaler.scale(losses).backward()
        else:
            losses.backward()

    def _optimizer_step(self) -> None:
        if self.grad_scaler is not None:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            self.optimizer.step()

    def _describe(self, kind: str, bad: List[str], loss_dict) -> str:
        names = ", ".join(bad[:_LISTED]) + (
            f" and {len(bad) - _LISTED} more" if len(bad) > _LISTED else ""
        )
        if kind == "prediction":
            return (
                f"non-finite prediction at iteration {self.iter}: {names} (the model's "
                "outputs, before any loss: the weights have probably diverged)"
            )
        values = {k: float(loss_dict[k].detach()) for k in bad[:_LISTED] if k in loss_dict}
        return f"non-finite loss at iteration {self.iter}: {names} (values on this rank: {values})"

    # ------------------------------------------------------------------ accumulation
    def _split(self, data):
        """The batch as ``micro_batches`` equal parts: each stream of a named batch (a
        plain list of labelled dicts, too) is cut into consecutive slices."""
        n = self.micro_batches

        def parts(items, key):
            if len(items) % n:
                raise ValueError(
                    f"SOLVER.MICRO_BATCHES={n} does not divide the {len(items)} {key} images "
                    "of a batch on this process (SOLVER.IMS_PER_BATCH_* / number of GPUs)"
                )
            size = len(items) // n
            return [items[i * size : (i + 1) * size] for i in range(n)]

        if not isinstance(data, dict):
            return parts(data, "labelled")
        streams = {
            k: parts(v, "unlabelled" if k.startswith("unlabeled") else "labelled")
            for k, v in data.items()
            if isinstance(v, list)
        }
        return [dict(data, **{k: v[i] for k, v in streams.items()}) for i in range(n)]

    def _run_accumulated(self, data, data_time: float) -> bool:
        """Forward + backward of each micro-batch (loss / n), one optimizer step. A
        non-finite prediction or term in any part skips the whole iteration (or stops), as
        without parts; False when skipped. Under DDP the gradients are all-reduced once,
        after the last part."""
        n = self.micro_batches
        totals = {}
        self.optimizer.zero_grad()
        for i, part in enumerate(self._split(data)):
            defer_sync = i < n - 1 and hasattr(self.model, "no_sync")
            with self.model.no_sync() if defer_sync else nullcontext():
                loss_dict = self._forward(part)
                if loss_dict is None:
                    self.optimizer.zero_grad()  # drop what the earlier parts accumulated
                    return False
                self._backward(sum(loss_dict.values()) / n)
            for k, v in loss_dict.items():
                totals[k] = totals.get(k, 0) + v.detach() / n
        self.after_backward()
        self._write_metrics(totals, data_time)
        self._optimizer_step()
        return True

    def state_dict(self):
        ret = super().state_dict()
        ret["nonfinite"] = self.guard.state_dict()
        if self.grad_scaler is not None:
            ret["grad_scaler"] = self.grad_scaler.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self.guard.load_state_dict(state_dict.get("nonfinite", {}))
        if self.grad_scaler is not None and "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])
