"""Prompts the benchmarks send offline equal what `vllm serve` builds for the same chat message.

For every family a generated checkpoint carries a chat template in that family's format
(LLaVA-1.5's "USER: <image>\\n... ASSISTANT:" as generated; LLaVA-NeXT with a Mistral-style
"[INST] ... [/INST]"; SigLIP-LLaVA (Interleave) and OneVision with Qwen's "<|im_start|>" turns,
written here in the processor's `chat_template.jinja` as llava-hf checkpoints ship them). The
independent side is vLLM's own OpenAI chat path, run offline without a server: the request's
`ChatCompletionRequest.build_chat_params` and the renderer vLLM builds from the engine config
(`renderer_from_config(...).render_messages`), which resolves the template, parses the OpenAI
content parts and tokenizes as the server does.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

FAMILIES = ("llava", "llava_next", "siglip", "onevision")

_MISTRAL_STYLE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ item['text'] }}{% endfor %}{{ ' [/INST]' }}"
    "{% else %}{% for item in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ ' ' + item['text'] }}{% endfor %}{{ eos_token }}{% endif %}{% endfor %}"
)
_QWEN_STYLE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + ' ' }}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>' }}{% endfor %}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>' }}{% endfor %}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ '\n' + item['text'] }}{% endfor %}{{ '<|im_end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Each family's format, and a piece of text only that format writes (None: keep the generated
# checkpoint's LLaVA-1.5 template).
TEMPLATES = {
    "llava": (None, "ASSISTANT:"),
    "llava_next": (_MISTRAL_STYLE, "[/INST]"),
    "siglip": (_QWEN_STYLE, "<|im_start|>assistant\n"),
    "onevision": (_QWEN_STYLE, "<|im_start|>assistant\n"),
}
QUESTION = "How many shapes are there?"


@pytest.fixture(scope="module")
def family_checkpoints(tmp_path_factory) -> dict[str, str]:
    """Each family's generated checkpoint, with that family's chat template."""
    from vllm_prumerge.testing import TinyLlavaSpec, write_tiny_llava

    folders = {}
    for family in FAMILIES:
        folder = write_tiny_llava(tmp_path_factory.mktemp(family), TinyLlavaSpec(family=family))
        template, _ = TEMPLATES[family]
        if template is not None:
            (folder / "chat_template.jinja").write_text(template)
        folders[family] = str(folder)
    return folders


def server_prompt_ids(checkpoint: str, messages: list[dict]) -> list[int]:
    """The prompt token ids vLLM's OpenAI chat path builds for `messages` (before the image
    placeholders are expanded), with the server's default chat settings."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.renderers import renderer_from_config

    config = EngineArgs(model=checkpoint, max_model_len=2048).create_engine_config()
    renderer = renderer_from_config(config)
    request = ChatCompletionRequest(model=checkpoint, messages=messages)
    _, prompt = renderer.render_messages(messages, request.build_chat_params(None, "auto"))
    return list(prompt["prompt_token_ids"])


@pytest.mark.parametrize("family", FAMILIES)
def test_benchmark_prompts_equal_the_servers_prompt_for_the_same_chat_message(
    family_checkpoints, scenes, family
):
    import quality
    import throughput
    from _common import BenchConfig

    from vllm_prumerge.testing.media import image_data_url
    from vllm_prumerge.testing.prompts import ChatPrompt, chat_messages
    from vllm_prumerge.testing.workload import build_workload

    checkpoint = family_checkpoints[family]
    chat = ChatPrompt(checkpoint)
    _, marker = TEMPLATES[family]
    assert marker in chat.text(QUESTION)
    url = image_data_url(scenes[0])

    # quality.py: offline it sends offline_prompt; with --server, these messages.
    args = quality.build_parser().parse_args(["--tiny", "--data", "unused.jsonl"])
    text = args.chat_template.format(question=QUESTION)
    expected = server_prompt_ids(checkpoint, chat_messages(text, [url]))
    assert quality.offline_prompt(QUESTION, args, chat) == {"prompt_token_ids": expected}

    # throughput.py / frontend.py: the workload's prompt ids, the question as the user text.
    (item,) = build_workload(1, seed=3, prompt=chat)
    request = throughput.make_prompt(item, BenchConfig("off", "off"))
    assert request["prompt_token_ids"] == server_prompt_ids(
        checkpoint, chat_messages(item.question, [url])
    )


def test_a_raw_prompt_template_is_still_sent_as_text():
    import quality

    argv = ["--tiny", "--data", "x.jsonl", "--prompt-template", "Q: <image> {question} A:"]
    args = quality.build_parser().parse_args(argv)
    assert quality.offline_prompt("Why?", args, None) == {"prompt": "Q: <image> Why? A:"}
