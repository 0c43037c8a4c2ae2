"""The fast input path: workers hand over uint8 crops, the device casts and normalises them.

The checkpoint's own image processor is the reference. ``pixel_spec`` reads what it does
(resize, centre crop, rescale, normalise) from the processor; the workers then only decode,
resize and crop, in uint8 (torchvision's vectorised antialiased resize, about 4x faster than
Pillow's), and the float cast plus normalisation run on the device as one multiply-add.
``check_spec`` compares the two paths on synthetic images before a job uses the fast one,
so a processor whose behaviour the spec misreads falls back instead of changing answers.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode

from batch_classify.pipeline.decode import JPEG_SCALES, Cover, open_image, read_pixels, scaled_jpeg_decoder

log = logging.getLogger(__name__)

# Pillow's filters that torchvision reproduces on uint8 tensors (NEAREST_EXACT is Pillow's
# pixel-centre nearest neighbour; torchvision's NEAREST is not).
_TENSOR_MODES = {
    Image.Resampling.NEAREST: InterpolationMode.NEAREST_EXACT,
    Image.Resampling.BILINEAR: InterpolationMode.BILINEAR,
    Image.Resampling.BICUBIC: InterpolationMode.BICUBIC,
}
_FROM_TORCHVISION = {
    InterpolationMode.NEAREST: Image.Resampling.NEAREST,
    InterpolationMode.NEAREST_EXACT: Image.Resampling.NEAREST,
    InterpolationMode.BILINEAR: Image.Resampling.BILINEAR,
    InterpolationMode.BICUBIC: Image.Resampling.BICUBIC,
    InterpolationMode.LANCZOS: Image.Resampling.LANCZOS,
    InterpolationMode.BOX: Image.Resampling.BOX,
    InterpolationMode.HAMMING: Image.Resampling.HAMMING,
}


class UnsupportedProcessor(ValueError):
    """The processor does something the fast path does not reproduce; the message says what."""


@dataclass(frozen=True)
class PixelSpec:
    """What the processor does to one image, as data."""

    resize: str
    """'shortest' (the shorter edge to ``size[0]``, aspect kept) or 'exact' (to ``size``)."""
    size: tuple[int, ...]
    resample: int
    """A Pillow resampling filter."""
    crop: tuple[int, int] | None
    """Centre crop (height, width) after the resize, or None."""
    scale: tuple[float, float, float]
    shift: tuple[float, float, float]
    """Per channel: model input = uint8 pixel * scale + shift."""
    crop_floor: bool = False
    """Centre-crop offsets rounded down (transformers) instead of to nearest (torchvision)."""

    def describe(self) -> str:
        size = "x".join(map(str, self.size))
        crop = f", centre crop {self.crop[0]}x{self.crop[1]}" if self.crop else ""
        name = Image.Resampling(self.resample).name.lower()
        return f"resize {self.resize} {size} ({name}){crop}"


def _affine(rescale: float, offset: float, mean, std, extra_std=None) -> tuple[tuple, tuple]:
    """uint8 * scale + shift == ((x * rescale + offset) - mean) / std [/ extra_std]."""
    mean = np.asarray(mean if mean is not None else (0.0,) * 3, dtype=np.float64)
    std = np.asarray(std if std is not None else (1.0,) * 3, dtype=np.float64)
    scale = rescale / std
    shift = (offset - mean) / std
    if extra_std is not None:
        scale, shift = scale / np.asarray(extra_std), shift / np.asarray(extra_std)
    if scale.size == 1:
        scale, shift = np.repeat(scale, 3), np.repeat(shift, 3)
    return tuple(float(v) for v in scale), tuple(float(v) for v in shift)


def _size_value(size: Any, key: str) -> int | None:
    if size is None:
        return None
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return int(value) if value is not None else None


def _from_timm(processor: Any) -> PixelSpec:
    """TimmWrapperImageProcessor: timm's eval transform, a torchvision Compose on PIL images."""
    steps = list(getattr(processor.val_transforms, "transforms", []))
    names = [type(step).__name__ for step in steps]
    if names != ["Resize", "CenterCrop", "MaybeToTensor", "Normalize"] and \
            names != ["Resize", "CenterCrop", "ToTensor", "Normalize"]:
        raise UnsupportedProcessor(f"timm eval transform {names} (expected Resize, CenterCrop, "
                                   "ToTensor, Normalize)")
    resize, crop, _, normalize = steps
    if getattr(resize, "max_size", None) is not None:
        raise UnsupportedProcessor("timm Resize with max_size")
    size = resize.size
    if isinstance(size, int) or len(size) == 1:
        mode, size = "shortest", (int(size if isinstance(size, int) else size[0]),)
    else:
        mode, size = "exact", (int(size[0]), int(size[1]))
    crop_size = tuple(int(v) for v in crop.size)
    scale, shift = _affine(1 / 255, 0.0, normalize.mean, normalize.std)
    return PixelSpec(mode, size, int(_FROM_TORCHVISION[resize.interpolation]),
                     (crop_size[0], crop_size[-1]), scale, shift)


def _from_transformers(processor: Any) -> PixelSpec:
    """A transformers image processor with the standard resize/crop/rescale/normalise steps."""
    cls = type(processor).__name__
    if getattr(processor, "do_reduce_labels", False) or getattr(processor, "do_pad", False):
        raise UnsupportedProcessor(f"{cls} pads or reduces labels")
    if not getattr(processor, "do_resize", False):
        raise UnsupportedProcessor(f"{cls} does not resize (inputs of varying size cannot be batched)")
    size = processor.size
    shortest, height, width = (_size_value(size, k) for k in ("shortest_edge", "height", "width"))
    if _size_value(size, "longest_edge") is not None:
        raise UnsupportedProcessor(f"{cls} resizes with a longest_edge limit")
    crop = None
    if getattr(processor, "do_center_crop", False):
        crop_size = processor.crop_size
        crop = (_size_value(crop_size, "height"), _size_value(crop_size, "width"))
    if cls.startswith("ConvNext") and shortest is not None:
        # ConvNeXt: below 384 the shorter edge goes to size / crop_pct, then a centre crop.
        if shortest < 384:
            crop = (shortest, shortest)
            shortest = int(shortest / processor.crop_pct)
        else:
            height = width = shortest
            shortest = None
    if shortest is not None:
        mode, dims = "shortest", (shortest,)
    elif height is not None and width is not None:
        mode, dims = "exact", (height, width)
    else:
        raise UnsupportedProcessor(f"{cls} size {size!r}")
    rescale = float(processor.rescale_factor) if getattr(processor, "do_rescale", True) else 1.0
    offset = -1.0 if getattr(processor, "rescale_offset", False) else 0.0
    normalise = getattr(processor, "do_normalize", False)
    mean = processor.image_mean if normalise else None
    std = processor.image_std if normalise else None
    # EfficientNet's include_top divides by the std a second time.
    extra = processor.image_std if getattr(processor, "include_top", False) and normalise else None
    scale, shift = _affine(rescale, offset, mean, std, extra)
    resample = getattr(processor, "resample", Image.Resampling.BILINEAR)
    if isinstance(resample, InterpolationMode):
        resample = _FROM_TORCHVISION[resample]
    return PixelSpec(mode, dims, int(resample), crop, scale, shift, crop_floor=True)


def pixel_spec(processor: Any) -> PixelSpec:
    """Read the processor's steps; raise UnsupportedProcessor naming what is not understood."""
    if hasattr(processor, "val_transforms"):
        return _from_timm(processor)
    if hasattr(processor, "size") and hasattr(processor, "image_mean"):
        return _from_transformers(processor)
    raise UnsupportedProcessor(f"{type(processor).__name__} is not a known image processor")


def _output_size(spec: PixelSpec, height: int, width: int) -> tuple[int, int]:
    if spec.resize == "exact":
        return spec.size[0], spec.size[1]
    short = spec.size[0]
    if width <= height:
        return int(short * height / width), short
    return short, int(short * width / height)


def _centre_crop(pixels: torch.Tensor, crop: tuple[int, int], floor: bool) -> torch.Tensor:
    height, width = pixels.shape[-2:]
    if height < crop[0] or width < crop[1]:
        return F.center_crop(pixels, list(crop))  # pads with zeros, as both libraries do
    if floor:
        top, left = (height - crop[0]) // 2, (width - crop[1]) // 2
    else:
        top, left = int(round((height - crop[0]) / 2.0)), int(round((width - crop[1]) / 2.0))
    return pixels[..., top:top + crop[0], left:left + crop[1]]


REDUCTION_MARGIN = 2
"""A reduced decode keeps at least this many times the resize's output size, so the final
antialiased resize still averages several decoded pixels into each output pixel."""


def reduced_cover(spec: PixelSpec) -> Cover:
    """(width, height) a reduced decode keeps at least: twice the processor's resize target."""
    if spec.resize == "exact":
        return spec.size[1] * REDUCTION_MARGIN, spec.size[0] * REDUCTION_MARGIN
    side = spec.size[0] * REDUCTION_MARGIN
    return side, side


def describe_reduction(spec: PixelSpec) -> str:
    """Which images decode reduced, and at which scales (for the log and timing.json)."""
    width, height = reduced_cover(spec)
    if spec.resize == "exact":
        at = ", ".join(f"1/{s} from {width * s}x{height * s}" for s in reversed(JPEG_SCALES))
        need = f"at least {width}x{height}"
    else:
        at = ", ".join(f"1/{s} from a shorter side of {width * s} px" for s in reversed(JPEG_SCALES))
        need = f"a shorter side of at least {width} px"
    return (f"reduced decode: images kept at {need} (twice the resize target); JPEGs at {at} "
            f"(DCT scaling, {scaled_jpeg_decoder(spec.resample in _TENSOR_MODES)}), any format then "
            "box-reduced by the integer factor that still covers it; "
            "smaller images decode in full")


class FastTransform:
    """Worker side: RGB image -> uint8 tensor (H, W, 3), resized and cropped (picklable).

    The image is a PIL image or, where the resize filter exists in torchvision
    (``takes_tensor``), the uint8 (3, H, W) tensor of ``decode.read_pixels``. With ``reduce``
    the decoder decodes an image at least twice the resize target reduced (``reduced_cover``);
    a smaller image decodes, and so ends, exactly as without it.
    """

    def __init__(self, spec: PixelSpec, reduce: bool = False):
        self.spec = spec
        self.takes_tensor = spec.resample in _TENSOR_MODES
        self.reduce = reduce
        decoder = read_pixels if self.takes_tensor else open_image
        self.decoder = functools.partial(decoder, cover=reduced_cover(spec)) if reduce else decoder

    def __call__(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        spec = self.spec
        if isinstance(image, torch.Tensor):
            height, width = _output_size(spec, image.shape[1], image.shape[2])
            pixels = image
        else:
            height, width = _output_size(spec, image.height, image.width)
            if not self.takes_tensor:  # a filter only Pillow has
                image = image.resize((width, height), spec.resample)
            pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)
        if (height, width) != tuple(pixels.shape[1:]):
            mode = _TENSOR_MODES[spec.resample]
            pixels = F.resize(pixels, [height, width], interpolation=mode,
                              antialias=mode != InterpolationMode.NEAREST_EXACT)
        if spec.crop is not None:
            pixels = _centre_crop(pixels, spec.crop, spec.crop_floor)
        return pixels.permute(1, 2, 0).contiguous()


class HostToDevice:
    """Copies pinned host batches to the device on a side stream (on CUDA and ROCm).

    The job queues batch i+1 before it collects batch i, so the copy runs on the copy
    stream while the compute stream still works on batch i; the compute stream waits for
    the copy only where it uses the batch. Elsewhere a plain (non-blocking) copy.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if self.stream is None:
            return batch.to(self.device, non_blocking=True)
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.stream):
            moved = batch.to(self.device, non_blocking=True)
        compute.wait_stream(self.stream)
        moved.record_stream(compute)  # its memory is reused only after the compute is done
        return moved


class DeviceNormalize:
    """Device side: uint8 (N, H, W, 3) -> float (N, 3, H, W), normalised, channels_last or not."""

    def __init__(self, spec: PixelSpec, device: torch.device, channels_last: bool):
        self.scale = torch.tensor(spec.scale, device=device)
        self.shift = torch.tensor(spec.shift, device=device)
        self.copy = HostToDevice(device)
        self.channels_last = channels_last

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        pixels = self.copy(batch)
        # One pass over NHWC memory; the permuted view is NCHW in channels_last layout.
        pixels = torch.addcmul(self.shift, pixels.float(), self.scale).permute(0, 3, 1, 2)
        return pixels if self.channels_last else pixels.contiguous()


class ToDevice:
    """Device side of the reference path: the processor's float tensors, moved."""

    def __init__(self, device: torch.device, channels_last: bool):
        self.copy = HostToDevice(device)
        self.channels_last = channels_last

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        pixels = self.copy(batch)
        if self.channels_last and pixels.dim() == 4:
            return pixels.contiguous(memory_format=torch.channels_last)
        return pixels


def synthetic_images() -> list[Image.Image]:
    """Smooth, non-square test images of both orientations, one smaller than any crop."""
    rng = np.random.default_rng(0)
    images = []
    for width, height in ((333, 257), (241, 389), (61, 47)):
        coarse = rng.integers(0, 256, size=(9, 11, 3), dtype=np.uint8)
        images.append(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC))
    return images


def check_spec(reference_transform: Any, spec: PixelSpec, tolerance: float = 1.5) -> str | None:
    """Compare both paths on synthetic images; None if they agree, else what differs.

    ``tolerance`` is in uint8 levels, mean absolute difference per image: resampling
    implementations round differently by a level or so, a misread step differs by tens.
    The images go straight to the resize and crop, never through a reduced decode: the
    check compares the pixels of a full decode, which are those of any image under twice the
    resize target whatever ``runtime.reduced_decode`` says.
    """
    fast = FastTransform(spec)
    scale = torch.tensor(spec.scale).view(3, 1, 1)
    shift = torch.tensor(spec.shift).view(3, 1, 1)
    for image in synthetic_images():
        reference = reference_transform(image).float()
        mine = fast(image).permute(2, 0, 1).float() * scale + shift
        if mine.shape != reference.shape:
            return f"output shape {tuple(mine.shape)} vs the processor's {tuple(reference.shape)}"
        levels = ((mine - reference) / scale).abs().mean().item()
        if levels > tolerance:
            return (f"mean difference {levels:.2f} uint8 levels on a {image.width}x{image.height} "
                    f"image (tolerance {tolerance})")
    return None


class MultiTransform:
    """Several models' worker transforms on one decode of each image (picklable).

    The image is decoded once, into a tensor where any model's transform takes one (the
    pixels of ``open_image``, for less CPU); a transform that wants a PIL image gets that
    tensor as one. With runtime.reduced_decode auto for every model, a large image decodes
    reduced to the smallest size that still covers twice the largest of the models' resize
    targets (``shared_cover``), and each model resizes from that decode: a model whose target
    is the largest sees the pixels of its own run alone, the others a larger decode than
    their own. Where any model decodes every pixel (reduced_decode off, or the checkpoint's
    own processor), every pixel is decoded for all: each model sees exactly its pixels of off.
    """

    def __init__(self, transforms: list[Any]):
        self.transforms = transforms
        decoders = [getattr(t, "decoder", open_image) for t in transforms]
        self.takes_tensor = [getattr(d, "func", d) is read_pixels for d in decoders]
        decoder = read_pixels if any(self.takes_tensor) else open_image
        cover = shared_cover([getattr(d, "keywords", {}).get("cover") for d in decoders])
        self.decoder = functools.partial(decoder, cover=cover) if cover is not None else decoder
        self.note = (f"one reduced decode for {len(transforms)} models, kept at least {cover[0]}x{cover[1]} "
                     "(twice the largest resize target)" if cover is not None else None)

    def __call__(self, image: Image.Image | torch.Tensor) -> tuple[torch.Tensor, ...]:
        as_pil = image
        if isinstance(image, torch.Tensor) and not all(self.takes_tensor):
            as_pil = Image.fromarray(image.permute(1, 2, 0).numpy())
        return tuple(transform(image if tensor else as_pil)
                     for transform, tensor in zip(self.transforms, self.takes_tensor))


def shared_cover(covers: list[Cover | None]) -> Cover | None:
    """The cover one decode for several models keeps: the largest width and the largest height
    any of them needs (so it covers each); None (every pixel) where any model needs every pixel."""
    if not covers or any(cover is None for cover in covers):
        return None
    return max(cover[0] for cover in covers), max(cover[1] for cover in covers)


@dataclass
class InputPath:
    """The two halves of the chosen input path and how it was chosen."""

    worker: Any
    """Picklable callable run in the DataLoader workers: RGB image -> tensor."""
    spec: PixelSpec | None
    name: str
    """'fast' or 'processor'."""
    note: str
    device_decode: Any = None
    """``device_decode.DeviceDecode`` where JPEGs are decoded on the device, else None."""

    def finish_decoding(self, batch):
        """A worker batch with every image decoded (on the device, where that is the path)."""
        return batch if self.device_decode is None else self.device_decode(batch)

    def device_side(self, device: torch.device, channels_last: bool):
        if self.spec is None:
            return ToDevice(device, channels_last)
        return DeviceNormalize(self.spec, device, channels_last)


def choose_input_path(processor: Any, reference_transform: Any, mode: str,
                      reduced_decode: str = "off") -> InputPath:
    """'processor': the checkpoint's processor in the workers; 'fast' (or 'auto' where the
    processor is understood and agrees on the check images): uint8 crops, normalised on device.
    ``reduced_decode`` 'auto': the fast path decodes large images reduced (``FastTransform``)."""
    if mode == "processor":
        return InputPath(reference_transform, None, "processor", "runtime.preprocess processor")
    try:
        spec = pixel_spec(processor)
        problem = check_spec(reference_transform, spec)
    except UnsupportedProcessor as error:
        spec, problem = None, str(error)
    except Exception as error:  # a processor with settings the spec reader does not expect
        spec, problem = None, f"{type(error).__name__} while reading the processor: {error}"
    if problem is None:
        if reduced_decode == "auto":
            reduction = describe_reduction(spec)
            log.info("%s (runtime.reduced_decode auto; off decodes every pixel)", reduction)
            return InputPath(FastTransform(spec, reduce=True), spec, "fast",
                             f"{spec.describe()}; {reduction}")
        return InputPath(FastTransform(spec), spec, "fast", spec.describe())
    if mode == "fast":
        raise UnsupportedProcessor(
            f"runtime.preprocess fast: the fast path does not reproduce this checkpoint's image "
            f"processor ({problem}); use runtime.preprocess processor or auto"
        )
    log.warning("using the checkpoint's image processor in the workers (slower): %s", problem)
    return InputPath(reference_transform, None, "processor", f"fast path unavailable: {problem}")
