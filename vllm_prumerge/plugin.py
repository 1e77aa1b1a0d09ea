"""vLLM general-plugin entry point (`vllm.general_plugins`, name `prumerge`).

vLLM calls `register()` once in every process (CLI, API server, engine core, workers). It must be
cheap and idempotent: the model is registered lazily by name (no model code is imported here) and
the CLI gains `--plugin prumerge`. Nothing is served differently until a model is started with
`--plugin prumerge` (or `hf_overrides` naming our architecture).
"""

from vllm_prumerge.serving.options import ARCHITECTURE

MODEL_CLASS = "vllm_prumerge.serving.model:PruMergeLlavaForConditionalGeneration"


def register() -> None:
    from vllm import ModelRegistry

    from vllm_prumerge.serving.cli import install_cli_hook

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
    install_cli_hook()
