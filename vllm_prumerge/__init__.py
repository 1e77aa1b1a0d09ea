"""PruMerge / PruMerge+ visual-token reduction for LLaVA-1.5, served by vLLM."""

__version__ = "0.1.0"
