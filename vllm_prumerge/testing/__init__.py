"""Generated fixtures for tests, benchmarks and examples: tiny LLaVA checkpoints, scene images
and videos.

Nothing here downloads anything; everything is deterministic from a seed.
"""

from vllm_prumerge.testing.checkpoint import TinyLlavaSpec, cached_tiny_llava, write_tiny_llava
from vllm_prumerge.testing.scenes import VIDEO_KINDS, make_scene, make_scenes, make_video

__all__ = [
    "VIDEO_KINDS",
    "TinyLlavaSpec",
    "cached_tiny_llava",
    "make_scene",
    "make_scenes",
    "make_video",
    "write_tiny_llava",
]
