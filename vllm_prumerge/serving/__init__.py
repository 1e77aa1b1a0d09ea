"""The vLLM adapter: model, processor, CLI flag and metrics. Imports vLLM; knows no statistics."""

from vllm_prumerge.serving.options import ARCHITECTURE, CONFIG_KEY, engine_kwargs

__all__ = ["ARCHITECTURE", "CONFIG_KEY", "engine_kwargs"]
