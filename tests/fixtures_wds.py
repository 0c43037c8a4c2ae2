"""WebDataset tar shards made by the tests: good ones in the img2dataset layout, and one flawed
tar per error type that `batch_classify.shards.iter_tar` must turn into error records."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from PIL import Image


def write_tar(path: str | Path, members: list[tuple[str, bytes]]) -> Path:
    """A plain tar holding `members` (name, bytes) as regular files, in the given order."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return path


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def tiny_image(seed: int, size: tuple[int, int] = (12, 10)) -> Image.Image:
    """A small image that differs per seed, so each sample's bytes are distinct."""
    image = Image.new("RGB", size, ((seed * 37) % 256, (seed * 91) % 256, (seed * 53) % 256))
    image.putpixel((seed % size[0], seed % size[1]), (255, 255, 255))
    return image


def sample_members(key: str, image: Image.Image, label: int | None,
                   json_labels: bool = False) -> list[tuple[str, bytes]]:
    """One img2dataset-style sample: .jpg, then .cls (or .json with a "label"), then .txt."""
    members = [(f"{key}.jpg", jpeg(image))]
    if json_labels:
        document = {"key": key} if label is None else {"key": key, "label": label}
        members.append((f"{key}.json", json.dumps(document).encode()))
    elif label is not None:
        members.append((f"{key}.cls", str(label).encode()))
    members.append((f"{key}.txt", f"a photo of {key}".encode()))
    return members


def make_wds(folder: str | Path, images: list[tuple[str, Image.Image, int | None]], per_tar: int,
             json_labels: bool = False) -> list[Path]:
    """`{folder}/{i:05d}.tar` shards of `per_tar` samples each (the last may hold fewer)."""
    folder = Path(folder)
    tars = []
    for index, start in enumerate(range(0, len(images), per_tar)):
        members = [member for key, image, label in images[start:start + per_tar]
                   for member in sample_members(key, image, label, json_labels)]
        tars.append(write_tar(folder / f"{index:05d}.tar", members))
    return tars


def _good(key: str, label: int) -> list[tuple[str, bytes]]:
    return sample_members(key, tiny_image(label), label)


def flawed_tars(folder: str | Path) -> dict[str, Path]:
    """One flawed tar per case, `{folder}/{case}.tar`; with rel = the file name, `iter_tar` yields:

    - ``not_a_tar``: JPEG bytes named .tar. One record: id ``rel``, error ``NotATar: ...``.
    - ``truncated``: samples ``s0``, ``s1``, ``s2``, ``s3`` (labels 0-3), cut in the middle of
      ``s2.jpg``'s data. Good ``rel/s0`` (label 0) and ``rel/s1`` (label 1), then one record
      with id ``rel`` and error ``TruncatedShard: ...`` naming ``s2.jpg`` and the byte where the
      file ends (its size). ``s2`` and ``s3`` are not yielded.
    - ``missing_image``: ``m0`` (label 0), ``nopic`` (only .json and .txt), ``m1`` (label 1).
      Good ``rel/m0``, then ``rel/nopic`` with ``MissingImage: ...``, then good ``rel/m1``.
    - ``duplicate_member``: ``d0`` (label 0), ``twice`` (two members ``twice.jpg`` plus a .cls),
      ``d1`` (label 1). Good ``rel/d0``, ``rel/twice`` with ``DuplicateMember: ...``, good ``rel/d1``.
    - ``split_sample``: members ``a.jpg a.cls b.jpg b.cls a.txt``. Good ``rel/a`` (label 0), good
      ``rel/b`` (label 1), then ``rel/a@{offset of a.txt's header}`` with ``SplitSample: ...``.
    - ``empty``: a valid tar without members. One record: id ``rel``, error ``EmptyShard: ...``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tars: dict[str, Path] = {}

    tars["not_a_tar"] = folder / "not_a_tar.tar"
    tars["not_a_tar"].write_bytes(jpeg(tiny_image(7)))

    whole = write_tar(folder / "truncated.tar", [m for i in range(4) for m in _good(f"s{i}", i)])
    with tarfile.open(whole) as tar:
        third_image = tar.getmember("s2.jpg")
    cut = third_image.offset_data + third_image.size // 2
    whole.write_bytes(whole.read_bytes()[:cut])
    tars["truncated"] = whole

    tars["missing_image"] = write_tar(folder / "missing_image.tar", [
        *_good("m0", 0), ("nopic.json", b'{"caption": "no image"}'), ("nopic.txt", b"no image"),
        *_good("m1", 1)])

    picture = jpeg(tiny_image(5))
    tars["duplicate_member"] = write_tar(folder / "duplicate_member.tar", [
        *_good("d0", 0), ("twice.jpg", picture), ("twice.jpg", picture), ("twice.cls", b"5"),
        *_good("d1", 1)])

    first, second = _good("a", 0), _good("b", 1)
    tars["split_sample"] = write_tar(folder / "split_sample.tar", [
        *first[:2], *second[:2], first[2]])

    tars["empty"] = write_tar(folder / "empty.tar", [])
    return tars
