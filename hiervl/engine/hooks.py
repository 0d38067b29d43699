"""Training hooks of HierVL.

``SilentConsistencyWarning``: the weak-to-strong consistency loss (``pixel`` mode) only
counts pixels whose pseudo-label passes SSL.CONF_THRESHOLD. A model that never gets that
confident (many classes, a tiny model, a short schedule) trains with ``loss_unsup_*``
exactly 0, and the unlabelled images do nothing for it, while the run looks normal. This
hook logs the share of confident pixels every iteration (``unsup_confident_fraction``)
and warns once per silent stretch of ``patience`` iterations, and at the end of a
training that had such a stretch, with the share of silent iterations.
"""

import logging
from typing import Optional

from detectron2.engine import HookBase

logger = logging.getLogger(__name__)


class SilentConsistencyWarning(HookBase):
    """Warn when no pseudo-label passed the confidence threshold for ``patience`` iterations.

    Args:
        conf_threshold: SSL.CONF_THRESHOLD (for the message).
        patience: length of the silent stretch that triggers the warning, >= 1.
    """

    def __init__(self, *, conf_threshold: float, patience: int):
        assert patience >= 1, f"patience must be >= 1, got {patience}"
        self.conf_threshold = conf_threshold
        self.patience = patience
        self.silent_since: Optional[int] = None
        self.warned = False
        self.silent_iters = 0
        self.measured_iters = 0
        self.ever_warned = False

    def _objective(self):
        model = self.trainer.model
        model = getattr(model, "module", model)  # DistributedDataParallel
        return getattr(model, "objective", None)

    def after_step(self):
        objective = self._objective()
        fraction = None if objective is None else objective.confident_fraction
        if fraction is None:
            return
        iteration = self.trainer.iter
        self.trainer.storage.put_scalar("unsup_confident_fraction", fraction)
        self.measured_iters += 1
        if fraction > 0:
            if self.warned:
                logger.info(
                    "loss_unsup_*: %.2f%% of the pixels pass SSL.CONF_THRESHOLD=%g again at "
                    "iteration %d",
                    100 * fraction, self.conf_threshold, iteration,
                )  # fmt: skip
            self.silent_since, self.warned = None, False
            return
        self.silent_iters += 1
        if self.silent_since is None:
            self.silent_since = iteration
        stretch = iteration - self.silent_since + 1
        if not self.warned and stretch >= self.patience:
            logger.warning(
                "loss_unsup_*: no pixel above SSL.CONF_THRESHOLD=%g for the last %d iterations "
                "(since iteration %d): the unlabelled images do not contribute; lower the "
                "threshold or train longer",
                self.conf_threshold, stretch, self.silent_since,
            )  # fmt: skip
            self.warned = self.ever_warned = True

    def after_train(self):
        if self.ever_warned:
            logger.warning(
                "loss_unsup_*: no pixel passed SSL.CONF_THRESHOLD=%g in %d of %d iterations "
                "(%.0f%%): the consistency loss was 0 there",
                self.conf_threshold, self.silent_iters, self.measured_iters,
                100 * self.silent_iters / self.measured_iters,
            )  # fmt: skip
