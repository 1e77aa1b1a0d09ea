"""PEFT LoRA adapters as LLaVA's trainer saved them, and their exact merge.

What PEFT's `merge_and_unload` computes for a `LoraConfig` (peft/tuners/lora/layer.py,
`get_delta_weight`): for every targeted linear layer `W [out, in]`,

    W' = W + scaling * (B @ A),    A = lora_A [r, in],  B = lora_B [out, r],
    scaling = lora_alpha / r            (use_rslora: lora_alpha / sqrt(r)),

with `r` / `lora_alpha` taken from `rank_pattern` / `alpha_pattern` where a pattern matches the
module. `fan_in_fan_out` transposes the delta for weights stored `[in, out]` (GPT-2's Conv1D);
for `torch.nn.Linear` targets, which every LLaMA layer is, PEFT resets the flag to False with a
warning, and so do we. Here the merge runs in float32 whatever the stored dtypes are.

Saved keys (PEFT's `get_peft_model_state_dict`, adapter name removed):
`base_model.model.<module>.lora_A.weight` / `.lora_B.weight`, `<module>` being the module's
name in the base model, e.g. `model.layers.0.self_attn.q_proj`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from pathlib import Path

import torch

from vllm_prumerge.convert.original import read_json
from vllm_prumerge.convert.weights import ConversionError, WeightFile

_KEY = re.compile(
    r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])(?:\.default)?\.weight$"
)
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """The fields of PEFT's `adapter_config.json` that decide the merge."""

    path: Path
    r: int
    lora_alpha: float
    use_rslora: bool
    fan_in_fan_out: bool
    target_modules: tuple[str, ...] | str
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    layers_to_transform: tuple[int, ...] | None

    @classmethod
    def from_file(cls, path: Path) -> LoraConfig:
        data = read_json(path, "a PEFT LoRA adapter needs it")
        peft_type = data.get("peft_type", "LORA")
        if peft_type != "LORA":
            raise ConversionError(f"{path}: peft_type is {peft_type!r}; only LORA is supported")
        if data.get("use_dora"):
            raise ConversionError(f"{path}: use_dora is true; DoRA adapters are not supported")
        bias = data.get("bias", "none")
        if bias != "none":
            raise ConversionError(f"{path}: bias is {bias!r}; only 'none' is supported")
        if data.get("modules_to_save"):
            raise ConversionError(
                f"{path}: modules_to_save {data['modules_to_save']!r} is not supported"
            )
        for name in ("r", "lora_alpha"):
            value = data.get(name)
            if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
                raise ConversionError(f"{path}: {name} must be a positive number, got {value!r}")
        if not isinstance(data["r"], int):
            raise ConversionError(f"{path}: r must be an integer, got {data['r']!r}")
        targets = data.get("target_modules")
        if isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets):
            targets = tuple(targets)
        elif not isinstance(targets, str) or not targets:
            raise ConversionError(
                f"{path}: target_modules must be a list of module names or a regex, got {targets!r}"
            )
        layers = data.get("layers_to_transform")
        if isinstance(layers, int):
            layers = [layers]
        return cls(
            path=path,
            r=data["r"],
            lora_alpha=float(data["lora_alpha"]),
            use_rslora=bool(data.get("use_rslora", False)),
            fan_in_fan_out=bool(data.get("fan_in_fan_out", False)),
            target_modules=targets,
            rank_pattern=dict(data.get("rank_pattern") or {}),
            alpha_pattern=dict(data.get("alpha_pattern") or {}),
            layers_to_transform=tuple(layers) if layers is not None else None,
        )

    def targets(self, module: str) -> bool:
        """Whether PEFT puts a LoRA on `module` (its name in the base model)."""
        if isinstance(self.target_modules, str):
            found = re.fullmatch(self.target_modules, module) is not None
        else:
            found = any(module == t or module.endswith("." + t) for t in self.target_modules)
        if found and self.layers_to_transform is not None:
            match = re.search(r"\.layers\.(\d+)\.", module)
            found = match is not None and int(match.group(1)) in self.layers_to_transform
        return found

    def rank_and_alpha(self, module: str) -> tuple[int, float]:
        return (
            int(_pattern_value(self.rank_pattern, module, self.r)),
            float(_pattern_value(self.alpha_pattern, module, self.lora_alpha)),
        )

    def scaling(self, module: str) -> float:
        r, alpha = self.rank_and_alpha(module)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def _pattern_value(patterns: dict, module: str, default):
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?{pattern}$", module):
            return value
    return default


def lora_delta(
    a: torch.Tensor, b: torch.Tensor, scaling: float, fan_in_fan_out: bool = False
) -> torch.Tensor:
    """`scaling * B @ A` in float32: `[out, in]`, or `[in, out]` when `fan_in_fan_out`.

    a: `[r, in]` (lora_A), b: `[out, r]` (lora_B).
    """
    delta = b.to(torch.float32) @ a.to(torch.float32)
    if fan_in_fan_out:
        delta = delta.T
    return delta * scaling


class LoraAdapter:
    """A PEFT LoRA adapter folder: config, tensors, and validation against a base model."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.config = LoraConfig.from_file(folder / "adapter_config.json")
        path = next((folder / n for n in ADAPTER_FILES if (folder / n).is_file()), None)
        if path is None:
            raise ConversionError(
                f"{folder}: no adapter weights (expected {' or '.join(ADAPTER_FILES)})"
            )
        self.file = WeightFile(path)
        self.pairs: dict[str, dict[str, str]] = {}
        for key in self.file.names():
            match = _KEY.match(key)
            if match is None:
                raise ConversionError(
                    f"{path}: unknown key {key!r} (expected base_model.model.<module>"
                    ".lora_A.weight / .lora_B.weight)"
                )
            self.pairs.setdefault(match["module"], {})[match["which"]] = key
        for module, pair in self.pairs.items():
            for which in "AB":
                if which not in pair:
                    raise ConversionError(
                        f"{path}: missing key 'base_model.model.{module}.lora_{which}.weight'"
                    )
        if self.config.fan_in_fan_out:
            warnings.warn(
                f"{self.config.path}: fan_in_fan_out is true but the LLaMA layers are "
                "torch.nn.Linear; merging with fan_in_fan_out=False, as PEFT does",
                stacklevel=2,
            )

    def validate(self, base_shapes: dict[str, tuple[int, ...]], base_name: str) -> None:
        """Raise ConversionError unless the adapter fits the base exactly, both ways.

        `base_shapes`: the base model's weight shapes by original key (`model.layers.0...`).
        """
        path = self.file.path
        for module, pair in self.pairs.items():
            weight = module + ".weight"
            if weight not in base_shapes:
                raise ConversionError(
                    f"{path}: {pair['A']!r} targets {weight!r}, which the base model "
                    f"({base_name}) does not have: is it the adapter's base model?"
                )
            if not self.config.targets(module):
                raise ConversionError(
                    f"{path}: {pair['A']!r} targets {module!r}, which is not in "
                    f"target_modules of {self.config.path}"
                )
            a_shape, b_shape = self.file.shape(pair["A"]), self.file.shape(pair["B"])
            w_shape = base_shapes[weight]
            r, _ = self.config.rank_and_alpha(module)
            if len(a_shape) != 2 or len(b_shape) != 2 or len(w_shape) != 2:
                raise ConversionError(
                    f"{path}: {pair['A']!r} {list(a_shape)} / lora_B {list(b_shape)} / base "
                    f"{list(w_shape)}: LoRA merges need 2-D weights"
                )
            if a_shape[0] != r or b_shape[1] != r:
                raise ConversionError(
                    f"{path}: rank mismatch at {module!r}: lora_A {list(a_shape)}, lora_B "
                    f"{list(b_shape)}, but r = {r} in {self.config.path}"
                )
            if (b_shape[0], a_shape[1]) != tuple(w_shape):
                raise ConversionError(
                    f"{path}: shape mismatch at {module!r}: lora_B @ lora_A is "
                    f"[{b_shape[0]}, {a_shape[1]}] but the base weight {weight!r} of "
                    f"{base_name} is {list(w_shape)}: is it the adapter's base model?"
                )
        for weight, shape in base_shapes.items():
            module = weight.removesuffix(".weight")
            if (
                weight.endswith(".weight")
                and len(shape) == 2
                and ".layers." in weight
                and self.config.targets(module)
                and module not in self.pairs
            ):
                raise ConversionError(
                    f"{path}: missing key 'base_model.model.{module}.lora_A.weight': "
                    f"target_modules of {self.config.path} cover {weight!r} of {base_name}"
                )

    def merged(self, key: str, weight: torch.Tensor) -> torch.Tensor:
        """A float32 copy of `weight` (the base's `key`), plus this adapter's delta if any."""
        merged = weight.to(torch.float32, copy=True)
        module = key.removesuffix(".weight")
        pair = self.pairs.get(module) if key.endswith(".weight") else None
        if pair is not None:
            # nn.Linear targets: PEFT merges with fan_in_fan_out=False whatever the config says.
            a, b = self.file.get(pair["A"]), self.file.get(pair["B"])
            merged += lora_delta(a, b, self.config.scaling(module))
        return merged
