"""One training iteration: the named two-stream batch in, one optimizer step out.

Compared with detectron2's ``SimpleTrainer.run_step`` this step
- seeds torch's RNG from (seed, iteration, rank), so the model's own randomness
  (point sampling, class blanking, dropout) is the same after ``--resume``;
- runs the forward under ``torch.autocast`` when AMP is on (bf16 or fp16; fp16 uses a
  gradient scaler, CUDA only);
- checks every loss term for NaN/Inf *before* backward and stops with the term's name
  (``SOLVER.NONFINITE_ACTION = "stop"``) or skips the step (``"skip"``).
The model receives the batch with ``iteration`` and ``max_iter`` set, for the losses
whose weight follows the schedule (MaskCLIP guidance).
With ``SOLVER.MICRO_BATCHES`` = n > 1 the batch is split into n equal micro-batches, each
forwarded and backpropagated with its loss divided by n, then one optimizer step is taken
(gradient accumulation, ``_run_accumulated``).
"""

import logging
import time
from contextlib import nullcontext

import torch
from detectron2.engine import SimpleTrainer
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage

logger = logging.getLogger(__name__)

_PRECISIONS = {"bfloat16": torch.bfloat16, "float16": torch.float16}


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or Inf."""


class SemiSupervisedStep(SimpleTrainer):
    """``SimpleTrainer`` with per-iteration seeding, AMP on CPU/GPU and per-term NaN checks.

    Args:
        model, data_loader, optimizer: as in ``SimpleTrainer``.
        max_iter: total iterations (for scheduled loss weights).
        seed: base seed of the per-iteration RNG.
        amp_precision: None (fp32), "bfloat16" or "float16".
        nonfinite_action: "stop" or "skip".
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
        if nonfinite_action not in ("stop", "skip"):
            raise ValueError(
                f"SOLVER.NONFINITE_ACTION must be 'stop' or 'skip', got {nonfinite_action!r}"
            )
        if amp_precision is not None and amp_precision not in _PRECISIONS:
            raise ValueError(
                f"SOLVER.AMP.PRECISION must be one of {sorted(_PRECISIONS)}, got {amp_precision!r}"
            )
        self.max_iter = max_iter
        self.seed = seed
        self.amp_dtype = _PRECISIONS.get(amp_precision)
        self.nonfinite_action = nonfinite_action
        device = next(iter(model.parameters())).device.type
        self.device_type = device
        use_scaler = self.amp_dtype == torch.float16
        if use_scaler and device != "cuda":
            raise ValueError("SOLVER.AMP.PRECISION 'float16' needs a GPU; use 'bfloat16' on CPU")
        self.grad_scaler = torch.cuda.amp.GradScaler() if use_scaler else None
        self.skipped_steps = 0

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
            return self._run_accumulated(data, data_time)

        with torch.autocast(
            device_type=self.device_type,
            dtype=self.amp_dtype or torch.float32,
            enabled=self.amp_dtype is not None,
        ):
            loss_dict = self.model(data)
        losses = sum(loss_dict.values())
        if not self._all_finite(loss_dict):
            return

        self.optimizer.zero_grad()
        if self.grad_scaler is not None:
            self.grad_scaler.scale(losses).backward()
        else:
            losses.backward()
        self.after_backward()
        self._write_metrics(loss_dict, data_time)
        if self.grad_scaler is not None:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            self.optimizer.step()

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

    def _run_accumulated(self, data, data_time: float) -> None:
        """Forward + backward of each micro-batch (loss / n), one optimizer step. A
        non-finite term in any part skips the whole step (or stops), as without parts.
        Under DDP the gradients are all-reduced once, after the last part."""
        n = self.micro_batches
        totals = {}
        self.optimizer.zero_grad()
        for i, part in enumerate(self._split(data)):
            defer_sync = i < n - 1 and hasattr(self.model, "no_sync")
            with self.model.no_sync() if defer_sync else nullcontext():
                with torch.autocast(
                    device_type=self.device_type,
                    dtype=self.amp_dtype or torch.float32,
                    enabled=self.amp_dtype is not None,
                ):
                    loss_dict = self.model(part)
                if not self._all_finite(loss_dict):
                    self.optimizer.zero_grad()  # drop what the earlier parts accumulated
                    return
                losses = sum(loss_dict.values()) / n
                if self.grad_scaler is not None:
                    self.grad_scaler.scale(losses).backward()
                else:
                    losses.backward()
            for k, v in loss_dict.items():
                totals[k] = totals.get(k, 0) + v.detach() / n
        self.after_backward()
        self._write_metrics(totals, data_time)
        if self.grad_scaler is not None:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            self.optimizer.step()

    def _all_finite(self, loss_dict) -> bool:
        """True when every term is finite on every rank; else stop or skip (all ranks agree)."""
        bad_local = sorted(k for k, v in loss_dict.items() if not torch.isfinite(v).all())
        bad = sorted({k for names in comm.all_gather(bad_local) for k in names})
        if not bad:
            return True
        values = {k: float(loss_dict[k].detach()) for k in bad if k in loss_dict}
        message = (
            f"non-finite loss at iteration {self.iter}: {', '.join(bad)} "
            f"(values on this rank: {values})"
        )
        if self.nonfinite_action == "stop":
            raise NonFiniteLossError(
                message + ". Lower SOLVER.BASE_LR, enable SOLVER.CLIP_GRADIENTS, check the data, "
                "or set SOLVER.NONFINITE_ACTION skip."
            )
        self.skipped_steps += 1
        logger.warning(message + f"; step skipped ({self.skipped_steps} so far)")
        get_event_storage().put_scalar("skipped_steps", self.skipped_steps)
        return False

    def state_dict(self):
        ret = super().state_dict()
        if self.grad_scaler is not None:
            ret["grad_scaler"] = self.grad_scaler.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if self.grad_scaler is not None and "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])
