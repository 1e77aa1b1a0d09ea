"""Lazy, tensor-by-tensor reading of Hugging Face weight files (safetensors or pickled `.bin`).

Nothing here loads a whole model: shapes and dtypes come from safetensors headers or from
memory-mapped pickles, and tensors are read one at a time.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# Index files first (sharded checkpoints), then single files, in the order transformers prefers.
_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SINGLE = ("model.safetensors", "pytorch_model.bin")

_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class ConversionError(Exception):
    """Bad converter input; the message names the file and, where there is one, the key.

    Always one line: line breaks of wrapped library errors become spaces.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(line.strip() for line in str(message).splitlines()))


def load_pickle(path: Path) -> dict[str, torch.Tensor]:
    """A pickled state dict (`torch.save`), memory-mapped when the file format allows it."""
    try:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):  # legacy (pre-zip) pickles cannot be mapped
                raise
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConversionError(f"{path}: cannot read the pickled tensors ({exc})") from exc
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()
    ):
        raise ConversionError(f"{path}: expected a dict of named tensors (a state dict)")
    return data


class WeightFile:
    """One weights file: keys, shapes and dtypes without reading data; tensors one at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._pickled: dict[str, torch.Tensor] | None = None
        self._header: dict[str, dict] | None = None
        if path.suffix == ".safetensors":
            self._header = _read_safetensors_header(path)
        else:
            self._pickled = load_pickle(path)

    def names(self) -> list[str]:
        return list(self._header if self._header is not None else self._pickled)

    def shape(self, key: str) -> tuple[int, ...]:
        if self._header is not None:
            return tuple(self._header[key]["shape"])
        return tuple(self._pickled[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        if self._header is not None:
            name = self._header[key]["dtype"]
            if name not in _SAFETENSORS_DTYPES:
                raise ConversionError(f"{self.path}: tensor {key!r} has unsupported dtype {name}")
            return _SAFETENSORS_DTYPES[name]
        return self._pickled[key].dtype

    def get(self, key: str) -> torch.Tensor:
        if self._header is not None:
            from safetensors import safe_open

            # Opened per tensor: the mapping (and the pages it made resident) goes with it.
            try:
                with safe_open(str(self.path), framework="pt", device="cpu") as f:
                    return f.get_tensor(key)
            except Exception as exc:
                raise ConversionError(f"{self.path}: cannot read tensor {key!r} ({exc})") from exc
        return self._pickled[key]

    def close(self) -> None:
        self._pickled = None


def _read_safetensors_header(path: Path) -> dict[str, dict]:
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if size <= 0 or size > 100_000_000:
                raise ValueError("bad header length")
            header = json.loads(f.read(size))
    except Exception as exc:
        raise ConversionError(f"{path}: not a readable safetensors file ({exc})") from exc
    header.pop("__metadata__", None)
    return header


class WeightFolder:
    """All weight files of a checkpoint folder (sharded with an index, or a single file)."""

    def __init__(self, folder: Path, what: str) -> None:
        self.folder = folder
        self.what = what
        self.files = _weight_files(folder, what)
        self._where: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        for path in self.files:
            wf = WeightFile(path)
            for key in wf.names():
                if key in self._where:
                    raise ConversionError(f"{path}: tensor {key!r} is also in {self._where[key]}")
                self._where[key] = path
                self._shapes[key] = wf.shape(key)
                self._dtypes[key] = wf.dtype(key)
            wf.close()

    def names(self) -> list[str]:
        return list(self._where)

    def file_of(self, key: str) -> Path:
        return self._where[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def dtype(self, key: str) -> torch.dtype:
        return self._dtypes[key]

    def floating_dtype(self) -> torch.dtype:
        """The dtype most of the checkpoint's floating-point bytes are stored in."""
        sizes: dict[torch.dtype, int] = {}
        for key, dtype in self._dtypes.items():
            if dtype.is_floating_point:
                sizes[dtype] = sizes.get(dtype, 0) + _numel(self._shapes[key])
        if not sizes:
            raise ConversionError(f"{self.folder}: the {self.what} has no floating-point tensors")
        return max(sizes, key=sizes.get)


class TensorReader:
    """Reads tensors while keeping at most one weights file open."""

    def __init__(self) -> None:
        self._open: dict[Path, WeightFile] = {}

    def get(self, folder: WeightFolder, key: str) -> torch.Tensor:
        path = folder.file_of(key)
        if path not in self._open:
            # Plans read file by file: drop the previous file (and its mapped pages) first.
            self.close()
            self._open[path] = WeightFile(path)
        return self._open[path].get(key)

    def close(self) -> None:
        for wf in self._open.values():
            wf.close()
        self._open.clear()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _weight_files(folder: Path, what: str) -> list[Path]:
    for name in _INDEXES:
        index = folder / name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except Exception as exc:
                raise ConversionError(f"{index}: not a valid weight index ({exc})") from exc
            files = list(dict.fromkeys(weight_map.values()))
            missing = [f for f in files if not (folder / f).is_file()]
            if missing:
                raise ConversionError(f"{folder / missing[0]}: missing (listed in {index})")
            return [folder / f for f in files]
    for name in _SINGLE:
        if (folder / name).is_file():
            return [folder / name]
    raise ConversionError(
        f"{folder}: no weights of the {what} found (expected {', '.join(_INDEXES + _SINGLE)})"
    )
