"""``runtime.decode device``: plain JPEGs decoded on the rank's device, in batches.

Where torchvision decodes JPEGs on the device (nvJPEG on NVIDIA; rocJPEG on ROCm builds
that have it, pytorch/vision#9342) the workers only read each file and check its header;
the rank decodes the batch's JPEGs in one ``decode_jpeg(..., device=...)`` call, then
resizes and crops each image on the device, at full size (``runtime.reduced_decode`` is the
workers' CPU decode). Other images arrive decoded and cropped by the workers, as on the
default path. A JPEG the device refuses (rocJPEG's hardware backend: under 64x64, some
chroma subsamplings) is decoded with Pillow instead, and one Pillow cannot decode either
becomes that item's error row.

Nothing here names a vendor: ROCm's PyTorch calls its GPUs ``cuda`` too. Where the start-up
probe fails (ROCm wheels without rocJPEG) the job decodes in the workers, with a warning.
On a CPU device the decode runs in the rank's process.
"""

from __future__ import annotations

import dataclasses
import io
import logging
from typing import Any

import torch
from PIL import Image

from batch_classify.pipeline.decode import Batch, Encoded, decode_jpeg, describe_error, read_encoded
from batch_classify.pipeline.preprocess import FastTransform, InputPath, PixelSpec

log = logging.getLogger(__name__)


PROBE_SIZE = (128, 96)
"""The probe JPEG's (width, height): 4:2:0 and over 64x64, a file every GPU decoder takes
(rocJPEG's hardware backend refuses smaller ones, which would fail a probe on good builds)."""


def _probe_jpeg() -> torch.Tensor:
    buffer = io.BytesIO()
    Image.new("RGB", PROBE_SIZE, (200, 30, 90)).save(buffer, format="JPEG", subsampling="4:2:0")
    return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)


def unavailable(device: torch.device) -> str | None:
    """None if JPEGs can be decoded on ``device``, else why not."""
    if decode_jpeg is None:
        return "this torchvision has no JPEG decoder"
    try:
        image = decode_jpeg(_probe_jpeg(), mode="RGB", device=device)
    except Exception as error:  # no GPU decoder in this build (most ROCm wheels), no device
        return f"torchvision cannot decode JPEGs on {device} ({describe_error(error)})"
    width, height = PROBE_SIZE
    if tuple(image.shape) != (3, height, width):
        return (f"torchvision decoded a {width}x{height} test JPEG on {device} to shape "
                f"{tuple(image.shape)}")
    return None


class Passthrough:
    """Worker side: plain JPEGs stay encoded; other images are resized and cropped here."""

    def __init__(self, fast: FastTransform):
        self.fast = fast
        self.decoder = read_encoded

    def __call__(self, value: Encoded | torch.Tensor) -> Encoded | torch.Tensor:
        return value if isinstance(value, Encoded) else self.fast(value)


class DeviceDecode:
    """Rank side: a batch's encoded JPEGs -> uint8 (N, H, W, 3) crops on the device.

    On CUDA the decode, resize and crop run on a stream of their own, which the compute
    stream waits for before it uses the crops. nvJPEG can write its output buffers before
    the work already queued on the calling stream has run (pytorch/vision#9606), and the
    caching allocator hands it blocks that such work may still read; so each batch starts
    from an idle decode stream, while the model's stream runs on.
    """

    def __init__(self, spec: PixelSpec, device: torch.device):
        self.fast = FastTransform(spec)
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def _decode(self, encoded: list[torch.Tensor]) -> list[torch.Tensor | Exception]:
        try:
            return decode_jpeg(encoded, mode="RGB", device=self.device)
        except Exception:  # one bad file fails the whole call: decode them one by one
            results: list[torch.Tensor | Exception] = []
            for data in encoded:
                try:
                    results.append(decode_jpeg(data, mode="RGB", device=self.device))
                except Exception as error:  # Pillow gets it next
                    results.append(error)
            return results


    def __call__(self, batch: Batch) -> Batch:
        """Decode in place; items that fail are marked as errors in ``batch``."""
        if not isinstance(batch.pixel_values, list):
            return batch
        if self.stream is None:
            return self._decode_batch(batch)
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.stream):
            self.stream.synchronize()  # holds only this class's work: the previous batch's
            self._decode_batch(batch)
        if batch.pixel_values is not None:
            compute.wait_stream(self.stream)
            batch.pixel_values.record_stream(compute)
        return batch

    def _decode_batch(self, batch: Batch) -> Batch:
        parts: Any = batch.pixel_values
        positions = [i for i, ok in enumerate(batch.ok) if ok]  # parts[k] is item positions[k]
        encoded = [k for k, part in enumerate(parts) if isinstance(part, Encoded)]
        decoded = dict(zip(encoded, self._decode([parts[k].data for k in encoded])))
        crops: list[torch.Tensor | None] = []
        for k, part in enumerate(parts):
            try:
                if not isinstance(part, Encoded):
                    crops.append(part.to(self.device, non_blocking=True))
                elif isinstance(decoded[k], Exception):
                    crops.append(self.fast(part.with_pillow()).to(self.device))
                else:
                    crops.append(self.fast(decoded[k]))
            except Exception as error:  # this item's error row; the batch goes on
                crops.append(None)
                batch.ok[positions[k]] = False
                batch.errors[positions[k]] = describe_error(error)
        kept = [crop for crop in crops if crop is not None]
        batch.pixel_values = torch.stack(kept) if kept else None
        return batch


def decode_on_device(path: InputPath, device: torch.device) -> InputPath:
    """``path`` with its JPEGs decoded on ``device``, or unchanged (with a warning) where
    that cannot work."""
    if path.spec is None:
        problem = f"the input path is the checkpoint's processor ({path.note})"
    elif not FastTransform(path.spec).takes_tensor:
        problem = (f"the processor's resize filter ({Image.Resampling(path.spec.resample).name}) "
                   "exists only in Pillow")
    else:
        problem = unavailable(device)
    if problem is not None:
        log.warning("runtime.decode device: decoding in the workers instead: %s", problem)
        return dataclasses.replace(path, note=f"{path.note}; decoded in the workers ({problem})")
    return dataclasses.replace(path, worker=Passthrough(FastTransform(path.spec)),
                               device_decode=DeviceDecode(path.spec, device),
                               note=f"{path.spec.describe()}; plain JPEGs decoded on {device}, "
                                    "every image at full size")
