"""vLLM general-plugin entry point (`vllm.general_plugins`, name `prumerge`)."""


def register() -> None:
    """Called once in every vLLM process; must be idempotent and cheap."""
