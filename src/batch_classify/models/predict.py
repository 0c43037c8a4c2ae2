"""Forward passes: pixel batches in, top-k classes and softmax scores out."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from batch_classify.core.labels import ModelLabels
from batch_classify.models.embeddings import EmbeddingCapture

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
OutOfMemory = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def autocast(device: torch.device, precision: str):
    """Autocast to ``precision`` on ``device`` (a no-op context for fp32)."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class Pending:
    """Top-k of one batch, still on the device: ``result()`` waits for it and copies it back."""

    def __init__(self, ids: torch.Tensor | None, scores: torch.Tensor | None,
                 embeddings: torch.Tensor | None = None):
        self.ids = ids
        self.scores = scores
        self.embeddings = embeddings

    def result(self) -> tuple[list[list[int]], list[list[float]]]:
        if self.ids is None:
            return [], []
        return self.ids.cpu().tolist(), self.scores.cpu().tolist()

    def embedding_rows(self) -> list[np.ndarray]:
        """One float16 vector per decoded image (empty without embeddings)."""
        if self.embeddings is None:
            return []
        return list(self.embeddings.cpu().numpy())


@dataclass
class Scoring:
    """How a predictor runs and scores: precision, classes kept, padding for a compiled model,
    sigmoid scores (SigLIP) instead of a softmax, and the embedding capture where asked for."""

    precision: str = "fp32"
    top_k: int = 5
    pad_to: int | None = None
    sigmoid: bool = False
    capture: EmbeddingCapture | None = None


class Predictor:
    """Run the model under inference_mode (and autocast) and keep the top k classes.

    ``prepare`` moves a worker batch to the device (and normalises the fast path's uint8
    pixels there). Scores are a softmax over the kept classes, or with ``sigmoid`` (SigLIP)
    each class's own sigmoid. With ``capture`` each pass also keeps the head's input. A batch
    that runs out of device memory is split in halves and retried,
    and later batches keep the smaller size, so the job slows down instead of crashing.
    """

    def __init__(self, model: torch.nn.Module, labels: ModelLabels, device: torch.device,
                 prepare: Callable[[torch.Tensor], torch.Tensor], scoring: Scoring | None = None):
        scoring = scoring or Scoring()
        self.model = model
        self.sigmoid = scoring.sigmoid
        self.capture = scoring.capture
        self.labels = labels
        self.device = device
        self.precision = scoring.precision
        self.k = min(scoring.top_k, len(labels.names))
        self.prepare = prepare
        self.pad_to = scoring.pad_to
        """Pad shorter chunks to this many images (a compiled model then sees one shape)."""
        self.max_chunk: int | None = None
        self._keep = torch.tensor(labels.keep, device=device)
        self._ids = torch.tensor(labels.ids, device=device)

    def forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits over the kept classes, embeddings or None) for a worker batch, in chunks
        that fit the device."""
        chunks, vectors = [], []
        start = 0
        while start < len(batch):
            size = len(batch) - start if self.max_chunk is None else self.max_chunk
            try:
                with torch.inference_mode(), autocast(self.device, self.precision):
                    pixels = self.prepare(batch[start:start + size])
                    chunks.append(self._forward(pixels))
                    if self.capture is not None:
                        vectors.append(self.capture.take(len(pixels)))
            except OutOfMemory:
                if size == 1:
                    raise
                self.max_chunk = max(1, size // 2)
                self._release()
                log.warning("out of device memory at %d images per forward pass; continuing "
                            "with %d (set runtime.batch_size lower to avoid the retry)",
                            size, self.max_chunk)
                continue
            start += size
        logits = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
        embeddings = (vectors[0] if len(vectors) == 1 else torch.cat(vectors)) if vectors else None
        return logits.index_select(1, self._keep).float(), embeddings

    def _forward(self, pixels: torch.Tensor) -> torch.Tensor:
        n = len(pixels)
        target = self.pad_to
        if target and self.max_chunk:
            target = min(target, self.max_chunk)
        if target and n < target:
            layout = (torch.channels_last if pixels.dim() == 4
                      and pixels.is_contiguous(memory_format=torch.channels_last)
                      else torch.contiguous_format)
            padded = pixels.new_zeros((target, *pixels.shape[1:])).contiguous(memory_format=layout)
            padded[:n] = pixels
            pixels = padded
        return self.model(pixel_values=pixels).logits[:n]

    def _release(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def launch(self, batch: torch.Tensor | None) -> Pending:
        """Queue the batch on the device; collect with ``.result()`` after queueing the next."""
        if batch is None:
            return Pending(None, None)
        with torch.inference_mode():
            logits, embeddings = self.forward(batch)
            # Rank by logits: softmax rounds near-equal logits to equal probabilities.
            positions = logits.topk(self.k, dim=-1).indices
            scores = logits.sigmoid() if self.sigmoid else logits.softmax(dim=-1)
            return Pending(self._ids[positions], scores.gather(1, positions), embeddings)

    def __call__(self, batch: torch.Tensor | None) -> tuple[list[list[int]], list[list[float]]]:
        return self.launch(batch).result()
