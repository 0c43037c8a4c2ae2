"""The typed job spec: YAML file plus ``--section.key value`` overrides (jsonargparse)."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from batch_classify.core.secrets import MARKER, redact_config, redact_text
from batch_classify.core.storage import StoreMistake, check_options, check_scheme

SourceKind = Literal["auto", "imagefolder", "images", "file_list", "webdataset", "parquet", "hf"]


class ConfigError(ValueError):
    """A job spec that cannot run; the message names the key and the fix."""


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


def _check_store(url: str, options: dict[str, Any] | None, key: str, options_key: str) -> None:
    """An unknown scheme, or an option the store's client does not take, refused now (one line)."""
    try:
        check_scheme(url, key)
        check_options(url, options, options_key)
    except StoreMistake as error:
        raise ConfigError(str(error)) from None


OVERRIDABLE = ("precision", "preprocess", "channels_last", "fold_batchnorm", "compile")
"""runtime keys a model of a list may set for itself."""


@dataclass
class ModelConfig:
    """Which classifier to run."""

    name: str | list[str] = ""
    """Hub id or local folder of a checkpoint that AutoModelForImageClassification loads, or
    of a CLIP-family one (CLIPModel, SiglipModel, ...) with model.classes. A list runs several
    models on one decode of each image, each into <output.dir>/<folder name of the model>/."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) to load (one model only)."""
    trust_remote_code: bool = False
    """Run code shipped with the checkpoint. Off unless you trust its source."""
    classes: list[str] | str | None = None
    """Zero-shot labels for CLIP-family checkpoints: a list of class names, a text file of
    them (one per line), or 'imagenet-1k' (the 1000 OpenAI prompt names, scored by index)."""
    templates: list[str] | str | None = None
    """Zero-shot prompts, '{}' standing for the class name: one template, a list, a text file
    (one per line) or 'openai-imagenet' (the 80 OpenAI templates). Default 'a photo of a {}.'."""
    overrides: dict[str, dict[str, Any]] | None = None
    """Per-model runtime settings for a list of models, keyed by the model's name as given:
    e.g. {google/efficientnet-b7: {precision: bf16}}. Keys: precision, preprocess,
    channels_last, fold_batchnorm, compile."""

    @property
    def names(self) -> list[str]:
        """The model(s) to run, as a list."""
        return [self.name] if isinstance(self.name, str) else list(self.name)

    def __post_init__(self) -> None:
        if isinstance(self.name, list) and len(self.name) == 1:
            self.name = self.name[0]  # a list of one is one model, with the single-model layout
        _require(bool(self.name) and all(self.names), "model.name",
                 "is required (a hub id or a local folder, or a list of them)")
        _require(len(set(self.names)) == len(self.names), "model.name", "names a model twice")
        _require(self.revision is None or len(self.names) == 1, "model.revision",
                 "applies to one model; pin each model of a list by its commit in a local folder")
        for name, settings in (self.overrides or {}).items():
            _require(name in self.names, "model.overrides", f"{name!r} is not one of model.name")
            unknown = set(settings) - set(OVERRIDABLE)
            _require("batch_size" not in unknown, f"model.overrides.{name}.batch_size",
                     "one decoded batch feeds every model, so runtime.batch_size is shared; a model "
                     "that runs out of device memory splits its batches on its own")
            _require(not unknown, f"model.overrides.{name}",
                     f"unknown key(s) {sorted(unknown)}; allowed: {', '.join(OVERRIDABLE)}")


@dataclass
class DataConfig:
    """Where the images come from."""

    path: str = ""
    """Folder, text file of paths, WebDataset tar(s) (a tar, a folder, a glob or a brace pattern
    such as /data/{00000..00999}.tar), Parquet file(s), save_to_disk folder or dataset name."""
    kind: SourceKind = "auto"
    """imagefolder (one subfolder per class), images (a folder searched recursively),
    file_list (a text file of paths), webdataset (tar shards), parquet (Parquet files with
    image bytes, read a row group at a time), hf (a Hugging Face dataset), or auto (detected)."""
    labels: str | None = None
    """CSV of filename,label (an ImageNet-1k index or a wnid), or Kaggle's LOC_val_solution.csv."""
    split: str | None = None
    """Split of a Hugging Face dataset with several (default: the only one, or 'validation')."""
    image_column: str | None = None
    """Image column of a dataset (default: the one column of Image type, or 'image')."""
    label_column: str | None = None
    """Label column of a dataset (default: 'label' where present; none means unlabelled)."""
    id_column: str | None = None
    """Column giving each row's id (default: the row index)."""
    label_key: str | None = None
    """WebDataset: the field of each sample's .json that holds its label (an ImageNet-1k index
    or wnid); default: the sample's .cls member, else unlabelled."""
    image_suffixes: list[str] | None = None
    """WebDataset: member suffixes that hold the image, first match wins (default: jpg, jpeg,
    png, webp and the other formats Pillow reads)."""
    class_subset: str | None = None
    """Score only these ImageNet-1k classes: 'imagenet-a', 'imagenet-r' (200 classes each) or
    a file of wnids or indices, one per line (as timm's --valid-labels)."""
    real_labels: str | None = None
    """ImageNet-ReaL labels (real.json as published) for a second score on ImageNet val."""
    storage_options: dict[str, Any] | None = None
    """Where data.path is a URL (s3://, gs://, az://, hf://, https://): options of the store's
    fsspec client, e.g. {endpoint_url: http://minio:9000} or {anon: true} or {requester_pays: true}
    or {profile: name} for S3, plus block_size (bytes per ranged GET, default 32 MiB),
    request_timeout_s and min_rate (each request must end within request_timeout_s, default
    60, plus its bytes at min_rate bytes per second, default 1 MiB/s; past that it is cancelled
    and retried as a timeout). Every read is pinned to the version listed (its ETag, version
    id or generation): an object replaced since listing stops its unit in one line.
    Credentials come from the store's usual environment variables and files, or from here (key,
    secret, token, client_kwargs.headers.Authorization ...): the section is saved with the outputs
    with every credential replaced by <redacted>, and an option the store does not take is refused."""

    def __post_init__(self) -> None:
        _require(bool(self.path), "data.path", "is required (a folder, file list or dataset)")
        block = (self.storage_options or {}).get("block_size")
        _require(block is None or (isinstance(block, int) and block >= 1 << 16), "data.storage_options",
                 "block_size is bytes per ranged read: an integer of at least 65536 (64 KiB)")
        _check_store(self.path, self.storage_options, "data.path", "data.storage_options")


@dataclass
class OutputConfig:
    """Where the predictions and metrics go."""

    dir: str = ""
    """Output folder: predictions/*.parquet, metrics.json, config.yaml, manifest.json; or a URL
    (s3://bucket/run): written into output.staging, each file committed there by one PUT."""
    storage_options: dict[str, Any] | None = None
    """Where output.dir is a URL: options of the store's fsspec client, as data.storage_options."""
    staging: str | None = None
    """Where output.dir is a URL: the local folder the job writes into first (default
    ~/.cache/batch-classify/outputs/<digest of the URL>); every rank must see it."""
    top_k: int = 5
    """How many classes each prediction row keeps."""
    unit_size: int = 0
    """Items per committed unit of work for listed inputs (0: from the item count, at most
    10,000 rounded up to whole batches, so 1e9 images make ~1e5 files). WebDataset units are
    whole tars; Parquet units whole row groups up to this many rows."""
    overwrite: bool = False
    """Start over in an output folder that holds another job's results."""
    embeddings: bool = False
    """Add an 'embedding' column: the vector that feeds the classifier head (for CLIP-family
    models the image embedding), float16, 2 bytes per dimension per row before compression."""
    normalize_embeddings: bool = False
    """L2-normalise the embeddings (cosine similarity is then a dot product)."""
    check_space: bool = True
    """Before a run, compare the estimated size of the pending output with the free space and
    quota of output.dir's filesystem: refuse to start (exit 74) where it cannot fit, warn where
    the margin is thin. false: warn only, and run."""

    def __post_init__(self) -> None:
        _require(bool(self.dir), "output.dir", "is required (a folder to write to)")
        _check_store(self.dir, self.storage_options, "output.dir", "output.storage_options")
        _require(self.top_k >= 1, "output.top_k", f"must be at least 1, got {self.top_k}")
        _require(self.unit_size >= 0, "output.unit_size", f"must be >= 0, got {self.unit_size}")


@dataclass
class RuntimeConfig:
    """How the job runs."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: the rank's GPU (CUDA or ROCm) when there is one, else the CPU."""
    batch_size: int | None = None
    """Images per forward pass on each rank (default: 16 on the CPU, where bigger batches
    fall out of cache; 64 on a GPU; lowered automatically on out-of-memory)."""
    num_workers: int | None = None
    """DataLoader workers per rank (default: from the cores available to the rank)."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Autocast precision of the forward pass."""
    preprocess: Literal["auto", "fast", "processor"] = "auto"
    """fast: workers decode, resize and crop to uint8, the device normalises; processor: the
    checkpoint's own image processor in the workers; auto: fast where it reproduces the
    processor (checked at start-up), else processor."""
    decode: Literal["cpu", "device"] = "cpu"
    """Where plain JPEGs are decoded. cpu: in the DataLoader workers. device: in batches on
    the rank's device (torchvision's nvJPEG on NVIDIA, rocJPEG on ROCm builds that have it),
    the workers only read and check the files; falls back to cpu, with a warning, where the
    device has no JPEG decoder (most ROCm wheels) or the input path is the processor's. Not
    yet measured on a GPU: compare with bench."""
    reduced_decode: Literal["auto", "off"] = "auto"
    """auto: the fast input path decodes an image at least twice the processor's resize
    target at a reduced size that still covers twice it (JPEGs at 1/2, 1/4 or 1/8 in libjpeg's
    DCT domain, other formats by an integer box reduce): a 12 MP photo costs a fraction of
    its full decode, while smaller images (ImageNet's) decode exactly as with off. off: every
    pixel decoded, for bit-exact comparisons with a full decode. Not used by runtime.decode
    device (JPEGs) or runtime.preprocess processor."""
    channels_last: bool | None = None
    """NHWC memory layout (default: on for convolutional networks)."""
    fold_batchnorm: bool = True
    """Fold BatchNorm into the preceding convolutions (checked against the unfolded logits)."""
    compile: bool = False
    """torch.compile the model (pays a compilation at start-up; cached by Inductor)."""
    keep_host_memory: bool = True
    """CPU ranks: glibc serves big tensors from its heap and keeps freed memory for reuse,
    instead of mapping and unmapping them on every batch (the process keeps its peak
    memory)."""
    max_image_pixels: int = 128_000_000
    """Images whose header claims more pixels are refused unopened (decompression bombs)."""
    max_image_bytes: int = 256 * 2**20
    """Bytes of one image file, WebDataset tar member or Parquet/dataset image cell (default
    256 MiB; a 50 MP camera JPEG is ~25 MB). A bigger one is an error row, known from its size
    before it is read (file size, tar header), so it is never read into memory."""
    max_aspect_ratio: float = 50.0
    """Longer side / shorter side of an image. Beyond it the image is an error row, checked
    from the header: resizing the shorter side of a 1x20000 strip to the model's input would
    make gigabytes. Phone and 360-degree panoramas are 2:1 to about 12:1."""
    max_decompressed_bytes: int = 16 * 2**30
    """Bytes a compressed tar (.tar.gz, .tgz; also bzip2, xz) may inflate to (default 16 GiB).
    Past it the rest of the tar is one error row (a gzip bomb stops instead of inflating for
    hours); its samples before that point are kept."""
    max_row_group_bytes: int = 4 * 2**30
    """Uncompressed bytes of the columns read from one Parquet row group, as its footer
    declares them (default 4 GiB). A bigger row group is one error row per row, unread."""
    read_retries: int = 3
    """Reads of an image that fail with a transient error (EIO, ESTALE, ETIMEDOUT, EAGAIN, a
    reset connection: a network mount's blip) are tried again this many times, 0.5, 1, 2, ...
    s apart, before the item becomes an error row marked transient."""
    retry_errors: Literal["none", "transient", "all"] = "none"
    """On a rerun, classify again the error rows of committed units: those marked transient, or
    all of them; each unit file holding one is rewritten whole (temporary file, then rename)."""
    max_error_fraction: float | None = None
    """Stop the job once more than this fraction of the items seen failed (default: never)."""
    timeout_s: int = 1800
    """Seconds a rank waits for the others before the job fails instead of hanging."""
    log_every_s: float = 10.0
    """Progress log interval when there is no terminal (Slurm, CI)."""

    def __post_init__(self) -> None:
        _require(self.batch_size is None or self.batch_size >= 1, "runtime.batch_size",
                 f"must be >= 1, got {self.batch_size}")
        _require(
            self.num_workers is None or self.num_workers >= 0,
            "runtime.num_workers",
            f"must be >= 0, got {self.num_workers}",
        )
        _require(not (self.decode == "device" and self.preprocess == "processor"),
                 "runtime.decode", "device decodes for the fast input path; runtime.preprocess "
                 "processor runs the checkpoint's processor on images decoded in the workers")
        _require(self.max_image_pixels >= 1, "runtime.max_image_pixels", "must be >= 1")
        for key in ("max_image_bytes", "max_decompressed_bytes", "max_row_group_bytes"):
            _require(getattr(self, key) >= 1, f"runtime.{key}", f"must be >= 1, got {getattr(self, key)}")
        _require(self.max_aspect_ratio >= 1, "runtime.max_aspect_ratio",
                 f"must be >= 1 (longer side / shorter side), got {self.max_aspect_ratio}")
        _require(
            self.max_error_fraction is None or 0.0 <= self.max_error_fraction < 1.0,
            "runtime.max_error_fraction",
            f"must be in [0, 1), got {self.max_error_fraction}",
        )
        _require(self.read_retries >= 0, "runtime.read_retries", f"must be >= 0, got {self.read_retries}")
        _require(self.timeout_s >= 1, "runtime.timeout_s", "must be >= 1")
        _require(self.log_every_s > 0, "runtime.log_every_s", "must be > 0")


@dataclass
class JobSpec:
    """One classification job."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def __post_init__(self) -> None:
        _require(not (len(self.model.names) > 1 and self.runtime.decode == "device"), "runtime.decode",
                 "device decoding is for one model; several models share the workers' decode")

    @property
    def models(self) -> list[str]:
        return self.model.names

    def for_model(self, name: str, output_dir: str) -> JobSpec:
        """The single-model spec of one model of a list: what a run of it alone would use."""
        overrides = (self.model.overrides or {}).get(name, {})
        model = dataclasses.replace(self.model, name=name, overrides=None)
        output = dataclasses.replace(self.output, dir=output_dir)
        runtime = dataclasses.replace(self.runtime, **overrides)
        return JobSpec(model, self.data, output, runtime)

    def to_dict(self) -> dict:
        """The spec as it is saved and shown (config.yaml, the manifest, unit footers, logs):
        credentials in storage options and URLs redacted (core/secrets.py)."""
        return redact_config(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


_SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "output": OutputConfig,
    "runtime": RuntimeConfig,
}


def build_parser(prog: str = "batch-classify run") -> ArgumentParser:
    """The command-line parser: ``--config FILE`` then ``--section.key value`` overrides."""
    parser = ArgumentParser(prog=prog, description=JobSpec.__doc__, exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML job spec")
    for section, cls in _SECTIONS.items():
        # Validation happens once, on the whole spec, so a missing key in the file can
        # be supplied on the command line.
        parser.add_class_arguments(cls, section, instantiate=False, sub_configs=True)
    return parser


def _to_spec(namespace: Namespace) -> JobSpec:
    values = namespace.as_dict()
    values.pop("config", None)
    return JobSpec(**{name: cls(**values[name]) for name, cls in _SECTIONS.items()})


def _without_values(message: str) -> str:
    """A parser's message without the storage options it quotes (they may hold credentials)."""
    if "storage_options" in message:
        message = re.sub(r"(Given value:).*", rf"\1 {MARKER}", message)
    return redact_text(message)


def parse_args(argv: list[str] | None = None, prog: str = "batch-classify run") -> JobSpec:
    """Parse a command line into a validated spec; raise ConfigError naming the bad key."""
    parser = build_parser(prog)
    try:
        namespace = parser.parse_args(argv)
    except Exception as error:  # jsonargparse raises its own ArgumentError types
        raise ConfigError(_without_values(str(error))) from None
    return _to_spec(namespace)


def load_spec(path: str | Path, overrides: list[str] | None = None) -> JobSpec:
    """Load a YAML spec with optional ``--section.key value`` overrides."""
    return parse_args(["--config", str(path), *(overrides or [])])
