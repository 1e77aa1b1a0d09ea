"""vLLM general-plugin entry point (`vllm.general_plugins`, name `prumerge`).

vLLM calls `register()` once in every process (CLI, API server, engine core, workers). It must be
cheap and idempotent: the models are registered lazily by name (no model code is imported here)
and the CLI gains `--plugin prumerge`. Nothing is served differently until a model is started with
`--plugin prumerge` (or `hf_overrides` naming one of our architectures).
"""

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
}


def register() -> None:
    from vllm import ModelRegistry

    from vllm_prumerge.serving.cli import install_cli_hook

    supported = ModelRegistry.get_supported_archs()
    for name, model_class in MODEL_CLASSES.items():
        if name not in supported:
            ModelRegistry.register_model(name, model_class)
    install_cli_hook()
