"""Forward passes: pixel batches in, top-k classes and softmax scores out."""

from __future__ import annotations

import contextlib

import torch

from .labels import ModelLabels

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Predictor:
    """Run the model under inference_mode (and autocast) and keep the top k classes."""

    def __init__(self, model: torch.nn.Module, labels: ModelLabels, device: torch.device,
                 precision: str, top_k: int):
        self.model = model
        self.labels = labels
        self.device = device
        self.dtype = PRECISIONS[precision]
        self.k = min(top_k, len(labels.names))
        self._keep = torch.tensor(labels.keep, device=device)
        self._ids = torch.tensor(labels.ids, device=device)

    def _autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def __call__(self, pixel_values: torch.Tensor) -> tuple[list[list[int]], list[list[float]]]:
        with torch.inference_mode(), self._autocast():
            logits = self.model(pixel_values=pixel_values.to(self.device, non_blocking=True)).logits
        logits = logits.index_select(1, self._keep).float()
        # Rank by logits: softmax rounds near-equal logits to equal probabilities.
        positions = logits.topk(self.k, dim=-1).indices
        scores = logits.softmax(dim=-1).gather(1, positions)
        return self._ids[positions].cpu().tolist(), scores.cpu().tolist()
