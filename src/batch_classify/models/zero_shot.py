"""Zero-shot classification with CLIP-family checkpoints: your own label set, encoded once.

The text side runs once per job: every prompt (class x template) is encoded, each class's
template embeddings are L2-normalised, averaged and renormalised (CLIP_benchmark, open_clip).
Each image batch is then one image-encoder pass and one matmul. Scores follow the model's
training objective: CLIP a softmax over ``logit_scale.exp() * cosine``, SigLIP an independent
sigmoid per class with ``logit_bias`` added.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import ImageClassifierOutput

from batch_classify.core.errors import UserError
from batch_classify.core.labels import ModelLabels

DEFAULT_TEMPLATE = "a photo of a {}."
TEXT_BATCH = 256
"""Prompts per text-encoder pass (80 templates x 1000 classes is 80,000 prompts)."""


class ZeroShotError(UserError, ValueError):
    """model.classes or model.templates cannot be used; the message says why."""


def is_zero_shot(config: Any) -> bool:
    """A dual-encoder (image and text tower) checkpoint config: CLIP, SigLIP, SigLIP2, ..."""
    return hasattr(config, "text_config") and hasattr(config, "vision_config")


def uses_sigmoid(config: Any) -> bool:
    """SigLIP-style checkpoints score each class with its own sigmoid."""
    return "siglip" in str(getattr(config, "model_type", "")).lower()


def _package_lines(name: str) -> list[str]:
    text = resources.files("batch_classify").joinpath(name).read_text()
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def _file_lines(value: str, key: str) -> list[str]:
    try:
        with open(value) as handle:
            return [line.strip() for line in handle if line.strip() and not line.startswith("#")]
    except OSError as error:
        raise ZeroShotError(f"{key} {value!r}: cannot read the file ({error.strerror})") from None


def resolve_classes(value: list[str] | str | None, model: str) -> list[str]:
    """``model.classes`` as a list of names (a list, a text file or 'imagenet-1k')."""
    if value is None:
        raise ZeroShotError(f"model.name {model!r} is a CLIP-family checkpoint (text and image towers): "
                            "give model.classes (a list, a text file of names, or imagenet-1k)")
    if isinstance(value, str):
        names = _package_lines("openai_imagenet_classes.txt") if value == "imagenet-1k" else \
            _file_lines(value, "model.classes")
    else:
        names = [str(name).strip() for name in value]
    if not names or not all(names):
        raise ZeroShotError("model.classes names no classes (or an empty one)")
    return names


def resolve_templates(value: list[str] | str | None) -> list[str]:
    """``model.templates`` as a list: one template, a list, a file, or 'openai-imagenet'."""
    if value is None:
        templates = [DEFAULT_TEMPLATE]
    elif isinstance(value, list):
        templates = [str(t) for t in value]
    elif value == "openai-imagenet":
        templates = _package_lines("openai_imagenet_templates.txt")
    elif "{}" in value:
        templates = [value]
    else:
        templates = _file_lines(value, "model.templates")
    bad = [t for t in templates if t.count("{}") != 1]
    if not templates or bad:
        raise ZeroShotError(f"model.templates: each template needs exactly one '{{}}' for the class "
                            f"name (got {bad[0] if bad else 'none'!r})")
    return templates


def zero_shot_labels(classes: list[str], from_imagenet: bool) -> ModelLabels:
    """The label space of a class list: ImageNet-1k indices for 'imagenet-1k' (repeated names
    such as 'missile' stay two classes, told apart by index), else the list's own order."""
    every = tuple(range(len(classes)))
    if from_imagenet:
        return ModelLabels(every, every, tuple(classes), True,
                           "zero-shot over the 1000 ImageNet-1k classes (OpenAI prompt names)")
    return ModelLabels(every, every, tuple(classes), False,
                       f"zero-shot over {len(classes)} classes of model.classes")


def zero_shot_identity(classes: list[str], templates: list[str], sigmoid: bool) -> dict[str, Any]:
    """What the manifest records: a different label set or prompt set is a different job."""
    def digest(values: list[str]) -> str:
        return hashlib.sha256(json.dumps(values).encode()).hexdigest()[:16]

    return {"n_classes": len(classes), "classes_sha256": digest(classes), "n_templates": len(templates),
            "templates_sha256": digest(templates), "scores": "sigmoid" if sigmoid else "softmax"}


def features(output: Any) -> torch.Tensor:
    """transformers 5's get_*_features return an output object (pooler_output); 4 a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def text_padding(model: nn.Module) -> dict[str, Any]:
    """SigLIP pools the last position: its text must be padded to the trained length, or
    accuracy collapses. CLIP pools at the end-of-text token: the longest prompt will do."""
    if uses_sigmoid(model.config):
        length = model.config.text_config.max_position_embeddings
        return {"padding": "max_length", "max_length": length, "truncation": True}
    return {"padding": True, "truncation": True}


@torch.inference_mode()
def encode_classes(model: nn.Module, tokenizer: Any, classes: list[str], templates: list[str],
                   device: torch.device) -> torch.Tensor:
    """(classes, dim) unit vectors: per class the normalised template embeddings, averaged and
    renormalised."""
    prompts = [template.format(name) for name in classes for template in templates]
    padding = text_padding(model)
    encoded = []
    for start in range(0, len(prompts), TEXT_BATCH):
        tokens = tokenizer(prompts[start:start + TEXT_BATCH], return_tensors="pt", **padding).to(device)
        # What the tokenizer returns is what the model expects (SigLIP's: no attention mask).
        kwargs = {key: tokens[key] for key in ("input_ids", "attention_mask") if key in tokens}
        encoded.append(features(model.get_text_features(**kwargs)).float())
    embeddings = torch.cat(encoded)
    embeddings = embeddings / embeddings.norm(dim=-1, keepdim=True)
    per_class = embeddings.view(len(classes), len(templates), -1).mean(dim=1)
    return per_class / per_class.norm(dim=-1, keepdim=True)


class ZeroShotClassifier(nn.Module):
    """A dual encoder as an image classifier: ``model(pixel_values=...).logits`` are the scaled
    cosine similarities to the class embeddings (plus SigLIP's bias)."""

    def __init__(self, model: nn.Module, class_embeddings: torch.Tensor):
        super().__init__()
        self.model = model
        self.config = model.config
        self.sigmoid = uses_sigmoid(model.config)
        self.register_buffer("class_embeddings", class_embeddings)
        self.image_embedding = nn.Identity()
        """The image embedding passes through here, so a hook on it sees what the head does."""

    def forward(self, pixel_values: torch.Tensor) -> ImageClassifierOutput:
        image = self.image_embedding(features(self.model.get_image_features(pixel_values=pixel_values)))
        image = image.float()
        image = image / image.norm(dim=-1, keepdim=True)
        logits = image @ self.class_embeddings.T * self.model.logit_scale.exp().float()
        if self.sigmoid:
            logits = logits + self.model.logit_bias.float()
        return ImageClassifierOutput(logits=logits)
