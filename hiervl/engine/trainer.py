"""HierVL's detectron2 trainer: two-stream data, paper optimizer, atomic checkpoints.

Structure follows detectron2's ``DefaultTrainer`` (hooks for LR schedule, checkpoints,
periodic evaluation and writers); what differs:
- the data loader yields named two-stream batches (``hiervl.data.loader``) and is rebuilt
  at the resumed iteration so ``--resume`` sees exactly the batches it would have seen;
- the inner step is :class:`SemiSupervisedStep` (AMP on CPU too, NaN/Inf guard on the
  predictions and every loss term; a skipped iteration leaves the LR schedule alone);
- checkpoints are written atomically and loaded strictly (:class:`HierVLCheckpointer`);
- evaluation results are also written to ``OUTPUT_DIR/metrics.json``; the per-iteration
  event stream goes to ``OUTPUT_DIR/events.json``.
"""

import json
import logging
import math
import os
import weakref

from detectron2.engine import DefaultTrainer, TrainerBase, create_ddp_model, hooks
from detectron2.evaluation import DatasetEvaluators
from detectron2.utils import comm
from detectron2.utils.events import CommonMetricPrinter, JSONWriter, TensorboardXWriter

import hiervl.meta_arch  # noqa: F401  (registers the HierVL meta-architecture)
from hiervl.data.loader import build_test_loader, build_two_stream_train_loader
from hiervl.engine.checkpoint import HierVLCheckpointer, atomic_write_text
from hiervl.engine.hooks import SilentConsistencyWarning
from hiervl.engine.optim import build_lr_scheduler, build_optimizer
from hiervl.engine.step import SemiSupervisedStep
from hiervl.evaluation.evaluator import HierVLSemSegEvaluator

logger = logging.getLogger(__name__)


class MetricPrinter(CommonMetricPrinter):
    """detectron2's console printer, safe to call twice at one iteration.

    Until the iteration timer has samples (3 iterations after the start), the printer
    estimates the ETA by dividing by the iterations since its last write. When training
    stops with an exception after the writers ran for an iteration (e.g. raised by a hook
    registered after them), ``PeriodicWriter.after_train`` writes that iteration again and
    the ZeroDivisionError, raised in a ``finally`` block, replaces the real exception.
    """

    def _get_eta(self, storage):
        if self._last_write is not None and self._last_write[0] == storage.iter:
            return None
        return super()._get_eta(storage)


class LRScheduler(hooks.LRScheduler):
    """detectron2's LR hook, leaving the schedule alone after a skipped iteration.

    A NaN/Inf iteration skipped by the step (``SOLVER.NONFINITE_ACTION skip``) made no
    optimizer step, so the schedule does not advance either: the next step uses the LR the
    skipped one would have used. Same class name as detectron2's hook, so checkpoints keep
    its state under the same key.
    """

    def after_step(self):
        if getattr(self.trainer._trainer, "step_skipped", False):
            return
        super().after_step()


class HierVLTrainer(DefaultTrainer):
    """Semi-supervised trainer (see module docstring)."""

    def __init__(self, cfg):
        TrainerBase.__init__(self)
        self.cfg = cfg
        if comm.is_main_process() and cfg.OUTPUT_DIR:
            # default_setup makes it in train_net.py; a trainer built directly must too
            # (the event writers open their files at construction).
            os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = wrap_ddp(model)
        self._trainer = SemiSupervisedStep(
            model,
            data_loader,
            optimizer,
            max_iter=self.max_iter,
            seed=max(cfg.SEED, 0),
            amp_precision=cfg.SOLVER.AMP.PRECISION if cfg.SOLVER.AMP.ENABLED else None,
            nonfinite_action=cfg.SOLVER.NONFINITE_ACTION,
            nonfinite_max_skips=cfg.SOLVER.NONFINITE_MAX_SKIPS,
            micro_batches=cfg.SOLVER.MICRO_BATCHES,
        )
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = HierVLCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.register_hooks(self.build_hooks())

    def resume_or_load(self, resume: bool = True):
        super().resume_or_load(resume=resume)
        if self.start_iter > 0:
            logger.info(f"Resuming at iteration {self.start_iter}: rebuilding the data stream")
            self._trainer.reset_data_loader(
                lambda: build_two_stream_train_loader(self.cfg, start_iter=self.start_iter)
            )

    def build_writers(self):
        return [
            MetricPrinter(self.max_iter),
            JSONWriter(os.path.join(self.cfg.OUTPUT_DIR, "events.json")),
            TensorboardXWriter(self.cfg.OUTPUT_DIR),
        ]

    def build_hooks(self):
        ret = super().build_hooks()
        # DefaultTrainer's periodic writer logs every 20 iterations; tiny runs want more.
        period = max(1, min(20, self.cfg.SOLVER.MAX_ITER // 10))
        for i, h in enumerate(ret):
            if isinstance(h, hooks.PeriodicWriter):
                ret[i] = hooks.PeriodicWriter(self.build_writers(), period=period)
            elif isinstance(h, hooks.LRScheduler):
                ret[i] = LRScheduler()
        silent = silent_consistency_hook(self.cfg)
        if silent is not None:
            # Before the writers, so its scalar is written with the iteration's losses.
            writers = [i for i, h in enumerate(ret) if isinstance(h, hooks.PeriodicWriter)]
            ret.insert(writers[0] if writers else len(ret), silent)
        return ret

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        return build_lr_scheduler(cfg, optimizer)

    @classmethod
    def build_train_loader(cls, cfg):
        return build_two_stream_train_loader(cfg, start_iter=0)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_test_loader(cfg, dataset_name)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        return DatasetEvaluators(
            [HierVLSemSegEvaluator(dataset_name, distributed=True, output_dir=output_folder)]
        )

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        results = super().test(cfg, model, evaluators)
        if comm.is_main_process() and results:
            write_metrics_json(cfg, results)
        return results


def silent_consistency_hook(cfg):
    """The hook warning about a silent consistency loss (None when it cannot be silent:
    supervised-only training, or the threshold-free ``pixelavg`` mode)."""
    ssl = cfg.MODEL.HIERVL.SSL
    if not ssl.ENABLED or ssl.CONSISTENCY_MODE != "pixel":
        return None
    if ssl.SILENT_WARNING_ITERS < 0:
        raise ValueError(
            f"MODEL.HIERVL.SSL.SILENT_WARNING_ITERS must be >= 0 (0 = a tenth of "
            f"SOLVER.MAX_ITER), got {ssl.SILENT_WARNING_ITERS}"
        )
    patience = ssl.SILENT_WARNING_ITERS or max(1, cfg.SOLVER.MAX_ITER // 10)
    return SilentConsistencyWarning(conf_threshold=ssl.CONF_THRESHOLD, patience=patience)


def wrap_ddp(model):
    """DistributedDataParallel over the processes (the model itself with one process).

    detectron2's ``create_ddp_model`` passes ``device_ids=[local_rank]``, which DDP
    rejects for CPU modules (Gloo runs): CPU models get ``device_ids=None``.
    ``find_unused_parameters``: every loss term can be switched off, and some parameters
    then get no gradient (e.g. without L_pt the image tower's ``ln_post``/``proj``, the
    CLIP-space head); DDP without the flag fails on the second iteration. The cost is one
    walk over the autograd graph per iteration.
    """
    device_ids = None
    if next(model.parameters()).device.type == "cuda":
        device_ids = [comm.get_local_rank()]
    return create_ddp_model(
        model, broadcast_buffers=False, device_ids=device_ids, find_unused_parameters=True
    )


def json_safe(value):
    """``value`` with NaN/Inf floats (detectron2's IoU of classes absent from the ground
    truth) replaced by None, so the file is strict JSON."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_metrics_json(cfg, results) -> str:
    """Write evaluation ``results`` (nested dict of floats) to ``OUTPUT_DIR/metrics.json``;
    metrics that are undefined (NaN) are written as ``null``."""
    path = os.path.join(cfg.OUTPUT_DIR, "metrics.json")
    if len(cfg.DATASETS.TEST) == 1 and "sem_seg" in results:
        results = {cfg.DATASETS.TEST[0]: results}
    text = json.dumps(json_safe(results), indent=2, sort_keys=True, allow_nan=False)
    atomic_write_text(text + "\n", path)
    logger.info(f"Evaluation results written to {path}")
    return path
