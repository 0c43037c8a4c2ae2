"""Embeddings: the vector that feeds the classifier head, caught in the same forward pass.

A forward pre-hook on the head sees its input whatever the architecture computes before it
(BEiT's mean-pooled tokens, MobileNet's and EfficientNet's pooled features, a timm model's
pre-logits), so one mechanism covers them all and costs no second pass. For a zero-shot
(CLIP-family) model the head is the image embedding itself.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch
from torch import nn

BYTES_PER_DIMENSION = 2
"""float16: a 768-dimensional embedding is 1,536 bytes per row before Parquet compression."""


class NoHead(ValueError):
    """The model has no classifier head this module knows how to find."""


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)  # torch.compile's wrapper


def head_module(model: nn.Module) -> nn.Module:
    """The module whose input is the embedding: a timm model's classifier, the zero-shot
    wrapper's image embedding, else the usual transformers head attribute."""
    model = _unwrap(model)
    timm_model = getattr(model, "timm_model", None)
    if timm_model is not None:
        return timm_model.get_classifier()
    for name in ("image_embedding", "classifier", "head", "fc"):
        module = getattr(model, name, None)
        if isinstance(module, nn.Module):
            return module
    raise NoHead(f"{type(model).__name__} has none of the attributes classifier, head or fc; "
                 "output.embeddings cannot find its classifier head")


class EmbeddingCapture:
    """Keeps the head's input of the latest forward pass (on the device)."""

    def __init__(self, model: nn.Module, normalize: bool):
        self.normalize = normalize
        self.value: torch.Tensor | None = None
        self.handle = head_module(model).register_forward_pre_hook(self._hook)

    def _hook(self, _module: nn.Module, inputs: tuple) -> None:
        self.value = inputs[0]

    def take(self, n: int) -> torch.Tensor:
        """The first ``n`` rows of the last pass, float16, (n, dim), L2-normalised on request."""
        if self.value is None:
            raise RuntimeError("the classifier head was not called in the forward pass")
        vectors = self.value.flatten(1)[:n].float()
        self.value = None
        if self.normalize:
            vectors = torch.nn.functional.normalize(vectors, dim=-1)
        return vectors.half()

    def remove(self) -> None:
        self.handle.remove()


def embedding_field(dim: int) -> pa.Field:
    return pa.field("embedding", pa.list_(pa.float16(), dim))


def embedding_array(vectors: list[np.ndarray | None], dim: int) -> pa.Array:
    """A fixed-size list column from one float16 vector (or None, for an error row) per row."""
    mask = np.array([v is None for v in vectors], dtype=bool)
    flat = np.zeros((len(vectors), dim), dtype=np.float16)
    for i, vector in enumerate(vectors):
        if vector is not None:
            flat[i] = vector
    values = pa.array(flat.reshape(-1), type=pa.float16())
    return pa.FixedSizeListArray.from_arrays(values, dim, mask=pa.array(mask) if mask.any() else None)
