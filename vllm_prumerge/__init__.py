"""PruMerge / PruMerge+ visual-token reduction for LLaVA-family checkpoints, served by vLLM.

Families: LLaVA-1.5, LLaVA-NeXT and SigLIP-based LLaVA (LLaVA-Interleave) for images,
LLaVA-OneVision and Video-LLaVA for images and videos, LLaVA-NeXT-Video for videos; the model
class is picked from the checkpoint's own architecture. Images are reduced per image (per crop
on LLaVA-NeXT / OneVision), videos per frame.

from vllm import LLM
from vllm_prumerge import engine_kwargs
llm = LLM(model="llava-hf/llava-1.5-7b-hf", **engine_kwargs("prumerge+"))
"""

from vllm_prumerge.config import PruMergeConfig
from vllm_prumerge.serving.options import engine_kwargs

__version__ = "0.1.0"

__all__ = ["PruMergeConfig", "__version__", "engine_kwargs"]
