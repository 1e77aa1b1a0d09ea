"""`--plugin prumerge` and `--prumerge-*` for vLLM's CLI (`vllm serve`, `vllm bench ...`).

vLLM has no `--plugin` flag, but it loads general plugins while it builds its argument parser,
right before `EngineArgs.add_cli_args(parser)`. We wrap that one static method (vLLM 0.32 / 0.33)
to add our argument group, and wrap that parser's `parse_known_args` to turn the parsed flags
into the real engine argument `hf_overrides` (a :class:`PruMergeOverrides` that picks the
family's model class and sets our options), so everything after parsing is stock vLLM. Without
`--plugin prumerge` nothing changes.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
from collections.abc import Sequence
from typing import Any

from vllm_prumerge.config import (
    IMPORTANCES,
    MERGE_WEIGHTINGS,
    MODES,
    ORDERS,
    TEMPORALS,
    PruMergeConfig,
)
from vllm_prumerge.serving.options import (
    ARCHITECTURES,
    FAMILIES,
    TOWER_DTYPE,
    TOWER_THREADS,
    PruMergeOverrides,
    resolve_architecture,
)
from vllm_prumerge.vision.precision import TOWER_DTYPES, parse_tower_dtype

# vLLM releases whose `EngineArgs.add_cli_args` / parser flow the hook was checked against
# (0.33 by `make compat`: scripts/compat.sh).
SUPPORTED_VLLM = ("0.32.", "0.33.")
PLUGIN_NAME = "prumerge"
_HOOKED = "_vllm_prumerge_hooked"

# One line per option for `vllm serve --help`; PruMergeConfig's docstring has the details.
OPTION_HELP = {
    "mode": "Reduction mode: prumerge (~32 tokens per LLaVA-1.5 image or crop), prumerge+ "
    "(~144), fixed (budget below) or off (the family's stock count). Per request (needs "
    "vLLM's --trust-request-mm-kwargs): "
    "mm_processor_kwargs={'prumerge': {'mode': ...}}.",
    "iqr_multiplier": "IQR multiplier of the outlier fence Q3 + m*(Q3-Q1); larger keeps fewer.",
    "k_neighbors": "Key-similar patches merged into each kept token.",
    "merge_weighting": "reference (unnormalised sums, as the authors' code and checkpoints) or "
    "normalized (weighted averages, as the paper's text).",
    "order": "Token order: reference (descending attention) or raster (spatial order).",
    "min_tokens": "Safeguard: keep at least this many tokens (top attention) when few or no "
    "patches are outliers, e.g. uniform attention.",
    "budget": "fixed mode: patches to keep per image, crop or frame (plus its extra token).",
    "budget_ratio": "fixed mode: fraction of the tower's N patches to keep per image, crop or "
    "frame (N = 576 for CLIP-L/14-336, 729 for SigLIP 384/14, 256 for Video-LLaVA's 224 px CLIP), "
    "instead of --prumerge-budget.",
    "spatial_samples": "fixed mode: add PruMerge+-style spatial samples (a switch: "
    "--prumerge-spatial-samples / --no-prumerge-spatial-samples).",
    "importance": "Patch score: cls (CLS attention, the reference; CLIP only), received "
    "(attention each patch receives, averaged over heads and queries; SigLIP) or auto (cls "
    "when the tower has a CLS token, else received).",
    "max_tokens": "Ceiling per image, crop or frame: keep at most N patches (highest importance "
    "first; plus the extra token). At engine level also the worst case vLLM profiles memory "
    "with (N + 1 tokens per image, crop or frame); requests may lower it, not raise it, nor use "
    "mode off. Not with mode off.",
    "temporal": "Videos: drop patches that did not change between frames before each frame's "
    "reduction. off (each frame whole), evs (vLLM's EVS criterion: the first frame whole, a "
    "fixed share --prumerge-temporal-rate of the video's patches dropped, the least changed "
    "first) or adaptive (a patch is dropped when its cosine similarity to the last kept patch at "
    "its position is >= --prumerge-temporal-threshold: a static video costs about one frame). "
    "Not with mode off.",
    "temporal_rate": "evs: the share of a video's patches dropped, in [0, 1) (vLLM's "
    "--video-pruning-rate).",
    "temporal_threshold": "adaptive: the cosine similarity, in [0, 1), at and above which a "
    "patch counts as unchanged; higher keeps more.",
}
TOWER_DTYPE_HELP = (
    "Engine level only: the dtype the plugin's vision tower computes in (it runs in the API "
    "server; the features it hands to the engine are cast to the model dtype). auto: the model "
    "dtype on a GPU; on a CPU the model dtype if the CPU computes it natively (bfloat16: AMX or "
    "avx512_bf16; float16: AMX-FP16 or avx512_fp16, from /proc/cpuinfo's flags), else float32 "
    "(bfloat16 without them runs several times slower; float32 weights take twice the memory: "
    "about 1.2 GB instead of 0.6 GB for CLIP-L/14-336). The start-up log states the choice. "
    "Default: auto."
)
TOWER_THREADS_HELP = (
    "Engine level only: torch threads of the plugin's vision tower (and reduction) on a CPU, "
    "in each API server's pre-processing thread. auto: the cores this process may run on "
    "(sched_getaffinity) divided by --api-server-count, at least 1; when "
    "VLLM_CPU_NUM_OF_RESERVED_CPU is set below that core count, the reserved cores divided by "
    "--api-server-count instead. Ignored on a GPU (the tower runs there). The environment "
    "variable VLLM_PRUMERGE_TOWER_THREADS overrides it. The start-up log states the count. "
    "Default: auto."
)
_METAVARS = {
    "iqr_multiplier": "FLOAT",
    "k_neighbors": "K",
    "min_tokens": "N",
    "budget": "N",
    "budget_ratio": "RATIO",
    "max_tokens": "N",
    "temporal_rate": "RATE",
    "temporal_threshold": "COSINE",
}
_CHOICES = {
    "mode": list(MODES),
    "merge_weighting": list(MERGE_WEIGHTINGS),
    "order": list(ORDERS),
    "importance": list(IMPORTANCES),
    "temporal": list(TEMPORALS),
}


def _flag(name: str) -> str:
    return "--prumerge-" + name.replace("_", "-")


def _families_text() -> str:
    """The supported families and what each serves, from :data:`FAMILIES`."""
    return "; ".join(f"{name}: {what}" for fams in FAMILIES.values() for name, what in fams)


def add_plugin_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "PruMerge",
        "vllm-prumerge plugin: serve LLaVA-family checkpoints (" + _families_text() + ") with "
        "PruMerge / PruMerge+ visual-token reduction; each image (crop) or video frame costs the "
        "LLM only its reduced, content-dependent token count. Unset options come from the "
        "checkpoint's own 'prumerge' config if it has one, else the defaults below.",
    )
    group.add_argument(
        "--plugin",
        choices=[PLUGIN_NAME],
        default=None,
        help="Enable the vllm-prumerge plugin for this model; the PruMerge model class is picked "
        f"from the checkpoint's architecture ({', '.join(ARCHITECTURES)}). Without it the "
        "--prumerge-* options are rejected and vLLM runs unchanged.",
    )
    for field in dataclasses.fields(PruMergeConfig):
        # SUPPRESS: unset options stay out of the namespace (and out of vLLM's "(default: ...)").
        kwargs: dict[str, Any] = {
            "default": argparse.SUPPRESS,
            "dest": "prumerge_" + field.name,
            "help": OPTION_HELP[field.name],
        }
        if field.name == "spatial_samples":
            kwargs["action"] = argparse.BooleanOptionalAction
        elif field.name in _CHOICES:
            kwargs["type"] = str
            kwargs["metavar"] = "{" + ",".join(_CHOICES[field.name]) + "}"
        else:
            kwargs["type"] = str  # coerced and validated by PruMergeConfig.from_dict
            kwargs["metavar"] = _METAVARS[field.name]
        if field.default is not dataclasses.MISSING and field.default is not None:
            kwargs["help"] += f" Default: {field.default}."
        group.add_argument(_flag(field.name), **kwargs)
    group.add_argument(
        _flag(TOWER_DTYPE),
        default=argparse.SUPPRESS,
        dest="prumerge_" + TOWER_DTYPE,
        type=str,
        metavar="{" + ",".join(TOWER_DTYPES) + "}",
        help=TOWER_DTYPE_HELP,
    )
    group.add_argument(
        _flag(TOWER_THREADS),
        default=argparse.SUPPRESS,
        dest="prumerge_" + TOWER_THREADS,
        type=str,
        metavar="{auto,N}",
        help=TOWER_THREADS_HELP,
    )


def _checkpoint_architectures(namespace: argparse.Namespace) -> list[str] | None:
    """The checkpoint's `architectures` from its config.json if it is on this machine (a folder,
    or a hub id already in the Hugging Face cache), else None: no network at parse time; vLLM
    then reads the config itself and our override reports an unsupported architecture."""
    # `vllm serve MODEL` parses MODEL as `model_tag` (copied to `model` after parsing).
    model = getattr(namespace, "model_tag", None) or getattr(namespace, "model", None)
    if not model:
        return None
    try:
        from transformers import PretrainedConfig

        config, _ = PretrainedConfig.get_config_dict(
            getattr(namespace, "hf_config_path", None) or model,
            revision=getattr(namespace, "revision", None),
            local_files_only=True,
        )
    except Exception:  # not local, gated, no config.json, ...: not ours to report here
        return None
    return config.get("architectures")


def _model_in_argv(argv: Sequence[str]) -> str | None:
    """The model of a `vllm serve MODEL` / `--model MODEL` command line, if it names one."""
    for i, arg in enumerate(argv):
        if arg == "--model" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--model="):
            return arg.split("=", 1)[1]
    if "serve" in argv:
        rest = argv[argv.index("serve") + 1 :]
        if rest and not rest[0].startswith("-"):
            return rest[0]
    return None


def fallback_hint(architectures: list[str] | None) -> str:
    """How to select the PruMerge class without `--plugin`: the `--hf-overrides` for the
    checkpoint's own architecture when it is known and supported, else one per family."""
    try:
        return "--hf-overrides " + repr(
            json.dumps({"architectures": [resolve_architecture(architectures)]})
        )
    except ValueError:
        pairs = "; ".join(f"{ours} for {theirs}" for theirs, ours in ARCHITECTURES.items())
        example = json.dumps({"architectures": ["CLASS"]})
        return f"--hf-overrides '{example}' with CLASS by the checkpoint's architecture: {pairs}"


def apply_plugin_args(namespace: argparse.Namespace) -> None:
    """Turn `--plugin prumerge --prumerge-*` into `hf_overrides`; raise ValueError if invalid
    (bad option values, or a checkpoint whose architecture has no PruMerge model)."""
    options = {
        field.name: getattr(namespace, "prumerge_" + field.name)
        for field in dataclasses.fields(PruMergeConfig)
        if getattr(namespace, "prumerge_" + field.name, None) is not None
    }
    tower_dtype = getattr(namespace, "prumerge_" + TOWER_DTYPE, None)
    tower_threads = getattr(namespace, "prumerge_" + TOWER_THREADS, None)
    if getattr(namespace, "plugin", None) != PLUGIN_NAME:
        engine_level = {TOWER_DTYPE: tower_dtype, TOWER_THREADS: tower_threads}
        given = [*options, *(k for k, v in engine_level.items() if v is not None)]
        if given:
            raise ValueError(f"{', '.join(_flag(k) for k in given)} need(s) --plugin {PLUGIN_NAME}")
        return
    PruMergeConfig.from_dict(options)  # validated now; merged with the checkpoint's later
    if tower_dtype is not None:
        tower_dtype = parse_tower_dtype(tower_dtype)
    from vllm_prumerge.encoder import PruMergeEncoder, parse_tower_threads

    if tower_threads is not None:
        tower_threads = parse_tower_threads(tower_threads)
    PruMergeEncoder.threads_from_env()  # a bad VLLM_PRUMERGE_TOWER_THREADS fails here, not later
    overrides = getattr(namespace, "hf_overrides", None) or {}
    if not isinstance(overrides, dict):
        raise ValueError("--plugin prumerge needs --hf-overrides to be a JSON object")
    architectures = _checkpoint_architectures(namespace)
    if architectures is not None:
        resolve_architecture(overrides.get("architectures", architectures))
    namespace.hf_overrides = PruMergeOverrides(
        options=options, extra=overrides, tower_dtype=tower_dtype, tower_threads=tower_threads
    )


def install_cli_hook() -> bool:
    """Wrap `EngineArgs.add_cli_args` once per process; False if this vLLM is not supported."""
    import vllm
    from vllm.engine.arg_utils import EngineArgs

    if not vllm.__version__.startswith(SUPPORTED_VLLM):
        from vllm.logger import init_logger

        model = _model_in_argv(sys.argv[1:])
        architectures = _checkpoint_architectures(argparse.Namespace(model=model))
        init_logger(__name__).warning(
            "vllm-prumerge's --plugin flag supports vLLM %s, found %s; use %s instead.",
            " and ".join(version + "x" for version in SUPPORTED_VLLM),
            vllm.__version__,
            fallback_hint(architectures),
        )
        return False
    original = EngineArgs.add_cli_args
    if getattr(original, _HOOKED, False):
        return True

    @functools.wraps(original)
    def add_cli_args(parser, *args, **kwargs):
        parser = original(parser, *args, **kwargs)
        if not any("--plugin" in action.option_strings for action in parser._actions):
            add_plugin_args(parser)
            parse_known_args = parser.parse_known_args

            def parse_and_apply(args=None, namespace=None):
                namespace, rest = parse_known_args(args, namespace)
                try:
                    apply_plugin_args(namespace)
                except ValueError as exc:
                    parser.error(str(exc))
                return namespace, rest

            parser.parse_known_args = parse_and_apply
        return parser

    setattr(add_cli_args, _HOOKED, True)
    EngineArgs.add_cli_args = staticmethod(add_cli_args)
    _pass_download_dir(EngineArgs)
    return True


def _pass_download_dir(engine_args_class) -> None:
    """Wrap `create_model_config` so that our `hf_overrides` carry the engine's `download_dir`
    and its API-server count (the pre-processor, which loads the tower and picks its threads,
    sees only the model config). Each API-server process builds its own config from engine
    arguments that vLLM gave that count (`_api_process_count`)."""
    original = engine_args_class.create_model_config
    if getattr(original, _HOOKED, False):
        return

    @functools.wraps(original)
    def create_model_config(self):
        overrides = self.hf_overrides
        if isinstance(overrides, PruMergeOverrides):
            servers = getattr(self, "_api_process_count", None)
            self.hf_overrides = dataclasses.replace(
                overrides,
                download_dir=self.download_dir
                if self.download_dir is not None
                else overrides.download_dir,
                api_server_count=servers if isinstance(servers, int) else None,
            )
        return original(self)

    setattr(create_model_config, _HOOKED, True)
    engine_args_class.create_model_config = create_model_config
