"""The classification recipes' steps: cross-entropy with torchmetrics accuracy, AdamW with warm-up + cosine.

A LightningModule mixes :class:`ClassifierSteps` in before ``L.LightningModule``, calls
``self._add_accuracy(num_classes)`` in ``__init__`` and saves ``lr``, ``weight_decay``, ``warmup_steps`` (and
optionally ``label_smoothing``, used in training only) as hyperparameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from recipes._optim import adamw_warmup_cosine


class ClassifierSteps:
    """Training / validation / test steps of a classifier ``self(*inputs) -> logits`` on ``(*inputs, y)``."""

    def _step(self, batch, stage: str, metric) -> torch.Tensor:
        *inputs, y = batch
        logits = self(*inputs)
        smoothing = self.hparams.get("label_smoothing", 0.0) if stage == "train" else 0.0
        loss = F.cross_entropy(logits, y, label_smoothing=smoothing)
        metric(logits, y)
        self.log(f"{stage}/loss", loss, prog_bar=True, on_step=stage == "train", on_epoch=True)
        self.log(f"{stage}/acc", metric, prog_bar=True, on_step=False, on_epoch=True)
        return loss

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train", self.train_acc)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "val", self.val_acc)

    def test_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "test", self.test_acc)

    def configure_optimizers(self):
        h = self.hparams
        return adamw_warmup_cosine(self, h.lr, h.weight_decay, h.warmup_steps)

    def _add_accuracy(self, num_classes: int) -> None:
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
