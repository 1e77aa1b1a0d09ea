"""The dtype the vision tower computes in: the model's, unless this CPU has no native path for it.

The plugin runs its own tower in the front end, so the tower's precision is independent of the
LLM's: the features it hands to the engine are cast to the model dtype either way. On a GPU the
tower simply runs in the model dtype. On a CPU without native bfloat16 arithmetic PyTorch still
runs bfloat16 matmuls (oneDNN converts around every kernel), several times slower than float32:
on a 2-core AVX-512 Xeon without ``avx512_bf16`` / AMX a CLIP-L/14-336 tower forward cost
14.5 s of CPU in bfloat16 and 3.8 s in float32. So ``auto`` picks:

- GPU (any non-CPU device): the model dtype;
- CPU, model dtype float32: float32;
- CPU, bfloat16: bfloat16 if the CPU has AMX (``amx_bf16``) or AVX-512 BF16 (``avx512_bf16``),
  else float32;
- CPU, float16: float16 if the CPU has AMX-FP16 (``amx_fp16``) or AVX-512 FP16
  (``avx512_fp16``), the instruction sets oneDNN computes float16 with, else float32.

An explicit ``float32`` / ``bfloat16`` / ``float16`` is used as given, on any device.

Detection reads the CPU flags the Linux kernel lists in ``/proc/cpuinfo`` (the list ``lscpu``
prints, so a benchmark's machine line and the choice come from one source; injectable for
tests). Where that file does not exist, PyTorch's own probes (``torch.cpu._is_amx_tile_supported``
and kin, from the cpuinfo library) stand in. Neither ``torch.backends.cpu.get_cpu_capability()``
(ATen's vector level, ``AVX2`` / ``AVX512``: an AVX-512 CPU without ``avx512_bf16`` is exactly
the slow case) nor ``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` (true wherever oneDNN can run
bfloat16 at all, emulated included) tells whether bfloat16 is native.
"""

from __future__ import annotations

import dataclasses
import platform
from pathlib import Path

import torch

__all__ = [
    "TOWER_DTYPES",
    "CpuInfo",
    "TowerPrecision",
    "choose_tower_dtype",
    "cpu_description",
    "parse_tower_dtype",
]

#: Values of the tower-precision option: ``auto`` or an explicit dtype.
TOWER_DTYPES = ("auto", "float32", "bfloat16", "float16")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16"}

# CPU flags (as /proc/cpuinfo names them) that compute a dtype natively, fastest path first,
# with the name a machine line gives them.
_NATIVE_FLAGS = {
    torch.bfloat16: (("amx_bf16", "AMX"), ("avx512_bf16", "avx512_bf16")),
    torch.float16: (("amx_fp16", "AMX-FP16"), ("avx512_fp16", "avx512_fp16")),
}
# PyTorch's probes, used where /proc/cpuinfo does not exist: probe name -> the flag it stands for.
_TORCH_PROBES = {
    "_is_amx_tile_supported": "amx_bf16",
    "_is_avx512_bf16_supported": "avx512_bf16",
    "_is_amx_fp16_supported": "amx_fp16",
}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclasses.dataclass(frozen=True)
class CpuInfo:
    """A CPU's model name and its instruction-set flags (lower case, as /proc/cpuinfo has them)."""

    model: str
    flags: frozenset[str]

    @classmethod
    def from_cpuinfo(cls, text: str) -> CpuInfo:
        """Parse the text of ``/proc/cpuinfo`` (first processor's ``model name`` and ``flags``)."""
        model, flags = "", frozenset()
        for line in text.splitlines():
            key, sep, value = line.partition(":")
            if not sep:
                continue
            key = key.strip().lower()
            if key == "model name" and not model:
                model = value.strip()
            elif key in ("flags", "features") and not flags:  # x86 / Arm spelling
                flags = frozenset(value.lower().split())
        return cls(model or platform.processor() or platform.machine() or "unknown", flags)

    @classmethod
    def detect(cls, path: str | Path = "/proc/cpuinfo") -> CpuInfo:
        """This machine's CPU: from ``path`` if readable, else from PyTorch's probes."""
        try:
            return cls.from_cpuinfo(Path(path).read_text())
        except OSError:
            flags = {
                flag
                for probe, flag in _TORCH_PROBES.items()
                if getattr(torch.cpu, probe, lambda: False)()
            }
            return cls(platform.processor() or platform.machine() or "unknown", frozenset(flags))

    def native(self, dtype: torch.dtype) -> str | None:
        """The fastest instruction set this CPU computes `dtype` with natively; None if it has
        none (float32 is always native)."""
        if dtype == torch.float32:
            return "float32"
        for flag, name in _NATIVE_FLAGS.get(dtype, ()):
            if flag in self.flags:
                return name
        return None

    def describe(self) -> str:
        """One line for benchmark output: ``CPU: <model>; native bf16: AMX|avx512_bf16|none``
        (then the same for fp16)."""
        bf16 = self.native(torch.bfloat16) or "none"
        fp16 = self.native(torch.float16) or "none"
        return f"CPU: {self.model}; native bf16: {bf16}; native fp16: {fp16}"


def cpu_description(cpu: CpuInfo | None = None) -> str:
    """This machine's CPU line (see :meth:`CpuInfo.describe`)."""
    return (cpu or CpuInfo.detect()).describe()


def parse_tower_dtype(value: object) -> str:
    """The canonical option value (one of :data:`TOWER_DTYPES`) for a user's `value`
    (case-insensitive; ``fp32`` / ``bf16`` / ``fp16`` accepted). Raises ValueError naming the
    option."""
    text = value.strip().lower() if isinstance(value, str) else value
    text = _ALIASES.get(text, text) if isinstance(text, str) else text
    if text not in TOWER_DTYPES:
        raise ValueError(f"tower_dtype must be one of {', '.join(TOWER_DTYPES)}, got {value!r}")
    return text


@dataclasses.dataclass(frozen=True)
class TowerPrecision:
    """The tower's compute dtype and why it was chosen.

    Attributes:
        dtype: the dtype the tower is built and run in.
        model_dtype: the LLM's dtype, the one the features are handed to the engine in.
        setting: the option's value (``auto`` or an explicit dtype name).
        reason: why, in words (for the start-up log).
    """

    dtype: torch.dtype
    model_dtype: torch.dtype
    setting: str
    reason: str

    def describe(self) -> str:
        return (
            f"{_dtype_name(self.dtype)} (tower_dtype={self.setting}: {self.reason}); features "
            f"handed to the engine in {_dtype_name(self.model_dtype)}"
        )


def choose_tower_dtype(
    setting: str,
    model_dtype: torch.dtype,
    device: str | torch.device,
    cpu: CpuInfo | None = None,
) -> TowerPrecision:
    """The tower's dtype for the option `setting` (see the module docstring).

    Args:
        setting: ``auto`` or an explicit dtype (validated by :func:`parse_tower_dtype`).
        model_dtype: the LLM's dtype (vLLM's resolved ``model_config.dtype``).
        device: where the tower runs.
        cpu: the CPU to judge (default: this machine's, :meth:`CpuInfo.detect`); only read for
            ``auto`` on a CPU.
    """
    setting = parse_tower_dtype(setting)
    if setting != "auto":
        dtype = _DTYPES[setting]
        return TowerPrecision(dtype, model_dtype, setting, "set explicitly")
    model_name = _dtype_name(model_dtype)
    if torch.device(device).type != "cpu":
        return TowerPrecision(
            model_dtype, model_dtype, setting, f"the model dtype, on {torch.device(device).type}"
        )
    if model_dtype == torch.float32:
        return TowerPrecision(model_dtype, model_dtype, setting, "the model dtype")
    cpu = cpu or CpuInfo.detect()
    native = cpu.native(model_dtype)
    if native is not None:
        return TowerPrecision(
            model_dtype,
            model_dtype,
            setting,
            f"the model dtype, which this CPU ({cpu.model}) computes natively with {native}",
        )
    wanted = " / ".join(flag for flag, _ in _NATIVE_FLAGS.get(model_dtype, ()))
    return TowerPrecision(
        torch.float32,
        model_dtype,
        setting,
        f"this CPU ({cpu.model}) has no native {model_name} arithmetic ({wanted or 'none known'} "
        f"absent), where PyTorch runs {model_name} several times slower than float32",
    )
