"""Load a classifier (or a CLIP-family model with a label set) and its image processor
through transformers' Auto classes."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from batch_classify.core.config import ModelConfig, RuntimeConfig
from batch_classify.core.errors import UserError
from batch_classify.core.labels import ModelLabels, model_labels
from batch_classify.models.embeddings import EmbeddingCapture, NoHead
from batch_classify.models.optimize import optimise
from batch_classify.models.zero_shot import (
    ZeroShotClassifier,
    ZeroShotError,
    encode_classes,
    is_zero_shot,
    resolve_classes,
    resolve_templates,
    uses_sigmoid,
    zero_shot_identity,
    zero_shot_labels,
)
from batch_classify.pipeline.device_decode import decode_on_device
from batch_classify.pipeline.preprocess import InputPath, choose_input_path, synthetic_images

log = logging.getLogger(__name__)

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pth", "*.pt")


class ModelLoadError(UserError, RuntimeError):
    """The checkpoint could not be loaded; the message says which and why."""


class ProcessorTransform:
    """The checkpoint's own image processor applied to one image (picklable for workers)."""

    def __init__(self, processor: Any):
        self.processor = processor

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]


@dataclass
class LoadedModel:
    model: torch.nn.Module
    processor: Any
    labels: ModelLabels
    identity: dict[str, Any]

    @property
    def transform(self) -> ProcessorTransform:
        return ProcessorTransform(self.processor)


def _weights_folder(cfg: ModelConfig, commit: str | None) -> Path | None:
    if Path(cfg.name).is_dir():
        return Path(cfg.name)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(cfg.name, revision=commit or cfg.revision,
                                      local_files_only=True))
    except Exception:  # not cached as a snapshot: identity falls back to the commit hash
        return None


def weights_sha256(folder: Path | None) -> str | None:
    """One hash over the checkpoint's weight files (names and bytes), or None."""
    if folder is None:
        return None
    files = sorted({p for pattern in WEIGHT_PATTERNS for p in folder.glob(pattern)})
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def _load_error(cfg: ModelConfig, error: Exception) -> ModelLoadError:
    path = Path(cfg.name).expanduser()
    looks_local = cfg.name.startswith(("/", ".", "~")) or (
        len(path.parts) > 1 and Path(path.parts[0]).is_dir())
    if looks_local and not path.exists():
        reason = f"no folder {path} exists"
    else:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return ModelLoadError(f"model.name {cfg.name!r}: could not load it ({reason}). Give a local checkpoint "
                          "folder, or a hub id that is cached or reachable.")


def model_name(cfg: ModelConfig) -> str:
    """What the model is called in the manifest: a local folder's absolute path, else the hub id."""
    return str(Path(cfg.name).expanduser().resolve()) if Path(cfg.name).expanduser().is_dir() else cfg.name


def describe_model(cfg: ModelConfig) -> tuple[ModelLabels, dict[str, Any]]:
    """The label space and identity of a checkpoint from its config and weight files alone,
    without loading the weights (a finished job's rerun needs no more)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(cfg.name, revision=cfg.revision,
                                            trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as error:
        raise _load_error(cfg, error) from error
    zero_shot = None
    if is_zero_shot(config):
        classes, templates = resolve_classes(cfg.classes, cfg.name), resolve_templates(cfg.templates)
        labels = zero_shot_labels(classes, cfg.classes == "imagenet-1k")
        zero_shot = zero_shot_identity(classes, templates, uses_sigmoid(config))
    else:
        labels = model_labels(dict(config.id2label or {}), config.num_labels)
    commit = getattr(config, "_commit_hash", None)
    identity = {
        "name": model_name(cfg),
        "revision": commit or cfg.revision,
        "architecture": (getattr(config, "architectures", None) or [type(config).__name__])[0],
        "num_labels": len(labels.names) if zero_shot else config.num_labels,
        "weights_sha256": weights_sha256(_weights_folder(cfg, commit)),
        "label_space": labels.note,
        "imagenet_ids": labels.imagenet,
    }
    if zero_shot:
        identity["zero_shot"] = zero_shot
    return labels, identity


def _processor_backend(name: str, kwargs: dict[str, Any]) -> dict[str, str]:
    """``backend=`` for the image processor where the checkpoint's type has no torchvision
    processor (timm models): transformers would ask for torchvision and log its fallback to
    PIL on every rank. Empty (transformers' own choice) wherever the types are not known."""
    try:
        from transformers import AutoConfig
        from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES

        backends = IMAGE_PROCESSOR_MAPPING_NAMES.get(AutoConfig.from_pretrained(name, **kwargs).model_type)
    except Exception:  # an older transformers, or a config it cannot read: it decides, and says why
        return {}
    if not isinstance(backends, dict) or "torchvision" in backends:
        return {}
    available = [backend for backend, processor in backends.items() if processor]
    return {"backend": available[0]} if available else {}


def load_model(cfg: ModelConfig, device: torch.device,
               described: tuple[ModelLabels, dict[str, Any]] | None = None) -> LoadedModel:
    """Model (eval mode, on ``device``), processor, label space and identity (``described``:
    what ``describe_model`` already returned, so the weights are not hashed twice)."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    labels, identity = described if described is not None else describe_model(cfg)
    if "zero_shot" in identity:
        return _load_zero_shot(cfg, device, labels, identity)
    kwargs = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}
    try:
        backend = _processor_backend(cfg.name, kwargs)
        processor = AutoImageProcessor.from_pretrained(cfg.name, **kwargs, **backend)
        model = AutoModelForImageClassification.from_pretrained(cfg.name, **kwargs)
    except (OSError, ValueError) as error:
        raise _load_error(cfg, error) from error
    model.eval().to(device)
    return LoadedModel(model, processor, labels, identity)


def _load_zero_shot(cfg: ModelConfig, device: torch.device, labels: ModelLabels,
                    identity: dict[str, Any]) -> LoadedModel:
    """The dual encoder with its label set's text embeddings computed once, as a classifier."""
    from transformers import AutoImageProcessor, AutoModelForZeroShotImageClassification, AutoTokenizer

    kwargs = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}
    try:
        backend = _processor_backend(cfg.name, kwargs)
        processor = AutoImageProcessor.from_pretrained(cfg.name, **kwargs, **backend)
        tokenizer = AutoTokenizer.from_pretrained(cfg.name, **kwargs)
        model = AutoModelForZeroShotImageClassification.from_pretrained(cfg.name, **kwargs)
    except (OSError, ValueError) as error:
        raise _load_error(cfg, error) from error
    if not hasattr(model, "get_image_features") or not hasattr(model, "get_text_features"):
        raise ZeroShotError(f"model.name {cfg.name!r}: {type(model).__name__} has no "
                            "get_image_features/get_text_features; zero-shot needs a dual encoder")
    model.eval().to(device)
    classes = resolve_classes(cfg.classes, cfg.name)
    embeddings = encode_classes(model, tokenizer, classes, resolve_templates(cfg.templates), device)
    log.info("encoded %d classes x %d template(s) once", len(classes), identity["zero_shot"]["n_templates"])
    return LoadedModel(ZeroShotClassifier(model, embeddings).eval(), processor, labels, identity)


@dataclass
class Inference:
    """The model as the job runs it, and the input path that feeds it."""

    model: torch.nn.Module
    input_path: InputPath
    channels_last: bool
    notes: list[str]
    capture: EmbeddingCapture | None = None
    """Catches each pass's head input where output.embeddings asks for it."""
    embedding_dim: int | None = None

    @property
    def sigmoid(self) -> bool:
        """Scores are per-class sigmoids (SigLIP), not a softmax."""
        return bool(getattr(getattr(self.model, "_orig_mod", self.model), "sigmoid", False))

    def prepare(self, device: torch.device):
        """Worker batch -> model input on ``device``."""
        return self.input_path.device_side(device, self.channels_last)

    def describe(self) -> str:
        return "; ".join([f"{self.input_path.name} input path ({self.input_path.note})", *self.notes])


def prepare_inference(loaded: LoadedModel, runtime: RuntimeConfig, device: torch.device,
                      embeddings: bool = False, normalize: bool = False) -> Inference:
    """Choose the input path and apply the model rewrites that ``runtime`` asks for; with
    ``embeddings`` hook the classifier head so each pass also yields its input."""
    input_path = choose_input_path(loaded.processor, loaded.transform, runtime.preprocess,
                                   runtime.reduced_decode)
    if runtime.decode == "device":
        input_path = decode_on_device(input_path, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # batches have one shape: tune the kernels once
    example = loaded.transform(synthetic_images()[0]).unsqueeze(0).repeat(2, 1, 1, 1).to(device)
    optimised = optimise(loaded.model, example, runtime.fold_batchnorm, runtime.channels_last,
                         runtime.compile)
    loaded.model = optimised.model  # the unfolded copy would only hold device memory
    inference = Inference(optimised.model, input_path, optimised.channels_last, optimised.notes)
    if embeddings:
        try:
            # Registered before the first call, so a compiled model traces the hook too.
            inference.capture = EmbeddingCapture(optimised.model, normalize)
        except NoHead as error:
            raise ModelLoadError(str(error)) from None
        with torch.inference_mode():
            getattr(optimised.model, "_orig_mod", optimised.model)(pixel_values=example)
        inference.embedding_dim = int(inference.capture.take(len(example)).shape[1])
        inference.notes.append(f"embeddings of {inference.embedding_dim} dimensions"
                               + (", L2-normalised" if normalize else ""))
    return inference
