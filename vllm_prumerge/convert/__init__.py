"""`vllm-prumerge convert`: the authors' original-format LLaVA checkpoints -> llava-hf LLaVA-1.5.

Free of vLLM imports: runs anywhere transformers and torch run.

    from vllm_prumerge.convert import convert
    convert(base="lmsys/vicuna-7b-v1.5", lora="yuzhang/llava-prumerge-vicuna-7b-v1.5-lora",
            vision="openai/clip-vit-large-patch14-336", out="llava-prumerge-7b")
"""

from vllm_prumerge.convert.converter import ConversionResult, convert
from vllm_prumerge.convert.weights import ConversionError

__all__ = ["ConversionError", "ConversionResult", "convert"]
