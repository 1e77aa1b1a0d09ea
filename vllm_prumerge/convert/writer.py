"""Output side of the converter: a staging folder published by rename, and streamed shards.

Shards are written as safetensors byte by byte from a plan whose keys, shapes and dtype are
known in advance: each file's header is written first, then every tensor is produced, written
and dropped, so memory holds one tensor at a time whatever the shard size.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from vllm_prumerge.convert.weights import ConversionError

_DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
INDEX_NAME = "model.safetensors.index.json"


@dataclasses.dataclass(frozen=True)
class PlannedTensor:
    """One output tensor: its llava-hf key, shape, and how to make it (in the output dtype)."""

    key: str
    shape: tuple[int, ...]
    produce: Callable[[], torch.Tensor]

    def nbytes(self, dtype: torch.dtype) -> int:
        n = dtype.itemsize
        for d in self.shape:
            n *= d
        return n


def parse_size(text: str) -> int:
    """`"5GB"`, `"500MB"`, `"1GiB"` or a plain byte count, as bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    units |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    value = text.strip().upper()
    number = value.rstrip("KMGTIB")
    try:
        size = int(float(number) * units[value[len(number) :]])
    except (KeyError, ValueError):
        raise ValueError(f"not a size: {text!r} (e.g. 5GB, 500MB)") from None
    if size <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return size


def split_shards(plan: Sequence[PlannedTensor], dtype: torch.dtype, max_bytes: int):
    """Consecutive groups of at most `max_bytes` each (a larger tensor gets a file alone)."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for item in plan:
        n = item.nbytes(dtype)
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += n
    return shards


def write_shards(
    folder: Path,
    plan: Sequence[PlannedTensor],
    dtype: torch.dtype,
    max_bytes: int,
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    """Write `plan` as `model-0000i-of-0000N.safetensors` + index into `folder`; file names."""
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"unsupported output dtype {dtype}")
    shards = split_shards(plan, dtype, max_bytes)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map: dict[str, str] = {}
    total = 0
    for name, shard in zip(names, shards, strict=True):
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for item in shard:
            n = item.nbytes(dtype)
            header[item.key] = {
                "dtype": _DTYPE_NAMES[dtype],
                "shape": list(item.shape),
                "data_offsets": [offset, offset + n],
            }
            offset += n
            weight_map[item.key] = name
        total += offset
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # safetensors aligns the data to 8 bytes
        with open(folder / name, "wb") as f:
            f.write(len(blob).to_bytes(8, "little"))
            f.write(blob)
            for item in shard:
                tensor = item.produce()
                if tuple(tensor.shape) != item.shape or tensor.dtype != dtype:
                    raise AssertionError(
                        f"{item.key}: produced {tuple(tensor.shape)} {tensor.dtype}, "
                        f"planned {item.shape} {dtype}"
                    )
                f.write(memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))
                del tensor
                if progress is not None:
                    progress(1)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return names


class StagingFolder:
    """A temporary folder next to `out`, renamed to `out` on success and deleted on failure.

    An existing `out` must be an empty folder unless `overwrite`; it is replaced only after the
    new checkpoint is complete.
    """

    def __init__(self, out: Path, overwrite: bool) -> None:
        self.out = out
        self.overwrite = overwrite
        self.path: Path | None = None
        check_output(out, overwrite)

    def __enter__(self) -> Path:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        return self.path

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self.path is not None
        if exc_type is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        try:
            self._publish()
        except BaseException:
            shutil.rmtree(self.path, ignore_errors=True)
            raise

    def _publish(self) -> None:
        check_output(self.out, self.overwrite)  # unchanged while we wrote?
        if not self.out.exists():
            self.path.rename(self.out)
            return
        old = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.old-", dir=self.out.parent))
        self.out.rename(old / "previous")
        self.path.rename(self.out)
        shutil.rmtree(old, ignore_errors=True)


def check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConversionError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConversionError(f"{out}: exists and is not empty (pass --overwrite to replace it)")
