"""PruMerge / PruMerge+ visual-token reduction for LLaVA-1.5, served by vLLM.

from vllm import LLM
from vllm_prumerge import engine_kwargs
llm = LLM(model="llava-hf/llava-1.5-7b-hf", **engine_kwargs("prumerge+"))
"""

from vllm_prumerge.config import PruMergeConfig
from vllm_prumerge.serving.options import engine_kwargs

__version__ = "0.1.0"

__all__ = ["PruMergeConfig", "__version__", "engine_kwargs"]
