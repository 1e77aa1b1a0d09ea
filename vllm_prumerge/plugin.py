"""vLLM general-plugin entry point (`vllm.general_plugins`, name `prumerge`).

vLLM calls `register()` once in every process (CLI, API server, engine core, workers). It must be
cheap and idempotent: the models are registered lazily by name (no model code is imported here)
and the CLI gains `--plugin prumerge`. Nothing is served differently until a model is started with
`--plugin prumerge` (or `hf_overrides` naming one of our architectures).

Each process logs once, at INFO, which copy of the package it loaded ("vllm-prumerge VERSION
loaded from DIR"), so a server's log shows whether it runs the code you think it runs.
"""

from pathlib import Path

from vllm_prumerge.serving.options import ARCHITECTURES

# Our architecture name -> "module:Class", one adapter module per LLaVA family.
MODEL_CLASSES = {
    ARCHITECTURES["LlavaForConditionalGeneration"]: (
        "vllm_prumerge.serving.llava:PruMergeLlavaForConditionalGeneration"
    ),
    ARCHITECTURES["LlavaNextForConditionalGeneration"]: (
        "vllm_prumerge.serving.llava_next:PruMergeLlavaNextForConditionalGeneration"
    ),
    ARCHITECTURES["LlavaOnevisionForConditionalGeneration"]: (
        "vllm_prumerge.serving.llava_onevision:PruMergeLlavaOnevisionForConditionalGeneration"
    ),
    ARCHITECTURES["LlavaNextVideoForConditionalGeneration"]: (
        "vllm_prumerge.serving.llava_next_video:PruMergeLlavaNextVideoForConditionalGeneration"
    ),
    ARCHITECTURES["VideoLlavaForConditionalGeneration"]: (
        "vllm_prumerge.serving.video_llava:PruMergeVideoLlavaForConditionalGeneration"
    ),
}

# The line each process logs; tests parse it to check which clone a served process imported.
LOADED_FROM = "vllm-prumerge %s loaded from %s"


def package_dir() -> Path:
    """The folder of the `vllm_prumerge` package this process imported."""
    import vllm_prumerge

    return Path(vllm_prumerge.__file__).resolve().parent


def register() -> None:
    from vllm import ModelRegistry
    from vllm.logger import init_logger

    from vllm_prumerge import __version__
    from vllm_prumerge.serving.cli import install_cli_hook

    init_logger("vllm.prumerge").info_once(
        LOADED_FROM, __version__, str(package_dir()), scope="process"
    )
    supported = ModelRegistry.get_supported_archs()
    for name, model_class in MODEL_CLASSES.items():
        if name not in supported:
            ModelRegistry.register_model(name, model_class)
    install_cli_hook()
