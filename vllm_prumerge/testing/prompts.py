"""Prompts as `vllm serve` builds them from a chat message: the checkpoint's own chat template.

The one home of prompt building for benchmarks and examples. LLaVA-1.5 and Vicuna-based
LLaVA-NeXT checkpoints use "USER: <image>\\n... ASSISTANT:", Mistral-based LLaVA-NeXT
"[INST] <image>\\n... [/INST]", the Qwen-based LLaVA-Interleave and LLaVA-OneVision
"<|im_start|>user <image>\\n...<|im_end|><|im_start|>assistant\\n": a hard-coded format is wrong
for most of them, so every prompt here comes from the checkpoint's template.

vLLM's OpenAI server resolves the template as `ChatPrompt` does (the processor's, else the
tokenizer's), hands the template OpenAI content parts as `{"type": "image"}` /
`{"type": "text", ...}` items, and tokenizes the rendered text without adding special tokens
(the template writes any BOS itself). `tests/test_chat_prompts.py` pins `ChatPrompt.token_ids`
against vLLM's own renderer for every family.
"""

from __future__ import annotations

from typing import Any


def chat_messages(text: str, image_urls: list[str] | tuple[str, ...] = ()) -> list[dict]:
    """One user message for the OpenAI chat API: the images (`image_url` parts, e.g.
    `media.image_data_url`) first, then the text, as LLaVA's training data places them."""
    content: list[dict[str, Any]] = [
        {"type": "image_url", "image_url": {"url": url}} for url in image_urls
    ]
    content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


def template_messages(text: str, images: int = 1) -> list[dict]:
    """`chat_messages` as a chat template sees it: each image part as `{"type": "image"}`."""
    content: list[dict[str, Any]] = [{"type": "image"} for _ in range(images)]
    content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


class ChatPrompt:
    """A checkpoint's chat template and tokenizer: prompts for one user message of `images`
    images and a text, ending with the assistant's turn (`add_generation_prompt`).

    `model` is a hub id or a local folder (loaded like vLLM loads it: `AutoProcessor`'s
    template first, else the tokenizer's). Renderings are cached per (text, images).
    """

    def __init__(self, model: str, *, trust_remote_code: bool = False) -> None:
        from transformers import AutoProcessor, AutoTokenizer

        self.model = model
        self.tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
        try:
            processor = AutoProcessor.from_pretrained(model, trust_remote_code=trust_remote_code)
        except (OSError, ValueError):  # no processor files: the tokenizer's template alone
            processor = None
        template = getattr(processor, "chat_template", None) or self.tokenizer.chat_template
        if not isinstance(template, str) or not template:
            raise ValueError(
                f"{model} has no chat template (neither its processor nor its tokenizer has one): "
                "give the prompt explicitly"
            )
        self.template = template
        self._texts: dict[tuple[str, int], str] = {}
        self._ids: dict[tuple[str, int], list[int]] = {}

    def text(self, text: str, images: int = 1) -> str:
        """The rendered prompt string of one user message (`images` images, then `text`)."""
        key = (text, images)
        if key not in self._texts:
            self._texts[key] = self.tokenizer.apply_chat_template(
                template_messages(text, images),
                chat_template=self.template,
                add_generation_prompt=True,
                tokenize=False,
            )
        return self._texts[key]

    def token_ids(self, text: str, images: int = 1) -> list[int]:
        """The prompt's token ids before the image placeholders are expanded (one image token
        per image): what the server sends its engine for the same chat message."""
        key = (text, images)
        if key not in self._ids:
            rendered = self.text(text, images)
            self._ids[key] = list(self.tokenizer.encode(rendered, add_special_tokens=False))
        return list(self._ids[key])
