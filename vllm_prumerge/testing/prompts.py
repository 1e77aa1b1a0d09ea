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

Videos: a template that has no case for `{"type": "video"}` parts (LLaVA-1.5's format, as the
generated checkpoints carry it) drops the video's placeholder, and the server then has nowhere to
put the video. vLLM's `--chat-template-content-format string` gives such templates the message as
a string with the placeholders in front ("<video>\n" + text); `ChatPrompt(model,
content_format="string")` renders that same string, and `ChatPrompt.drops("video")` tells which
format a checkpoint needs.
"""

from __future__ import annotations

from typing import Any


def chat_messages(
    text: str,
    image_urls: list[str] | tuple[str, ...] = (),
    video_urls: list[str] | tuple[str, ...] = (),
) -> list[dict]:
    """One user message for the OpenAI chat API: the images (`image_url` parts, e.g.
    `media.image_data_url`), then the videos (`video_url` parts, e.g. `media.video_data_url`),
    then the text, as LLaVA's training data places them."""
    content: list[dict[str, Any]] = [
        {"type": "image_url", "image_url": {"url": url}} for url in image_urls
    ]
    content += [{"type": "video_url", "video_url": {"url": url}} for url in video_urls]
    content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


def template_messages(text: str, images: int = 1, videos: int = 0) -> list[dict]:
    """`chat_messages` as a chat template sees it: each image part as `{"type": "image"}`, each
    video part as `{"type": "video"}`."""
    content: list[dict[str, Any]] = [{"type": "image"} for _ in range(images)]
    content += [{"type": "video"} for _ in range(videos)]
    content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


CONTENT_FORMATS = ("openai", "string")


class ChatPrompt:
    """A checkpoint's chat template and tokenizer: prompts for one user message of `images`
    images, `videos` videos and a text, ending with the assistant's turn
    (`add_generation_prompt`).

    `model` is a hub id or a local folder (loaded like vLLM loads it: `AutoProcessor`'s
    template first, else the tokenizer's). `content_format` is vLLM's
    `--chat-template-content-format`: "openai" (the template sees the content parts) or
    "string" (the placeholders, one line each, then the text, as one string). Renderings are
    cached per (text, images, videos).
    """

    def __init__(
        self, model: str, *, trust_remote_code: bool = False, content_format: str = "openai"
    ) -> None:
        from transformers import AutoProcessor, AutoTokenizer

        if content_format not in CONTENT_FORMATS:
            raise ValueError(f"content_format must be one of {CONTENT_FORMATS}: {content_format!r}")
        self.model = model
        self.content_format = content_format
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
        # The placeholder text of each modality (the processor's, else the tokenizer's).
        self.placeholders = {
            modality: getattr(processor, f"{modality}_token", None)
            or getattr(self.tokenizer, f"{modality}_token", None)
            for modality in ("image", "video")
        }
        self._texts: dict[tuple[str, int, int], str] = {}
        self._ids: dict[tuple[str, int, int], list[int]] = {}

    def _render(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.template, add_generation_prompt=True, tokenize=False
        )

    def drops(self, modality: str) -> bool:
        """Whether the template leaves out a `{"type": modality}` content part (renders no
        placeholder for it): such a checkpoint needs the "string" content format for it."""
        placeholder = self.placeholders.get(modality)
        if not placeholder:
            raise ValueError(f"{self.model} has no {modality} placeholder token")
        counts = {"images": 0, "videos": 0, modality + "s": 1}
        return placeholder not in self._render(template_messages("x", **counts))

    def text(self, text: str, images: int = 1, videos: int = 0) -> str:
        """The rendered prompt string of one user message (`images` images, `videos` videos,
        then `text`)."""
        key = (text, images, videos)
        if key not in self._texts:
            if self.content_format == "string":  # vLLM's: placeholders, one per line, then text
                lines = [self.placeholders["image"]] * images + [
                    self.placeholders["video"]
                ] * videos
                content = "\n".join([*lines, text])
                self._texts[key] = self._render([{"role": "user", "content": content}])
            else:
                self._texts[key] = self._render(template_messages(text, images, videos))
        return self._texts[key]

    def token_ids(self, text: str, images: int = 1, videos: int = 0) -> list[int]:
        """The prompt's token ids before the placeholders are expanded (one image or video
        token per item): what the server sends its engine for the same chat message."""
        key = (text, images, videos)
        if key not in self._ids:
            rendered = self.text(text, images, videos)
            self._ids[key] = list(self.tokenizer.encode(rendered, add_special_tokens=False))
        return list(self._ids[key])
