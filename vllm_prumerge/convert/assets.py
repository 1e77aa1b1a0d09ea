"""Everything of the output checkpoint besides the weights: config, tokenizer, processor, template.

Choices that keep the converted model answering like the original LLaVA code:

- **Vocabulary.** llava-hf appends `<image>` and `<pad>` and pads the embedding and lm_head to a
  multiple of 64 with random rows; every extra lm_head row is one more logit in the softmax, so
  the served distribution over the original vocabulary is no longer the original one (and a
  padding token can even be sampled). We append only `<image>` (id = the base's row count, 32000
  for Vicuna, as in llava-hf) and give its embedding and lm_head rows copies of `<unk>`'s rows:
  its logit always equals `<unk>`'s, a token the base never emits (byte fallback) and never saw
  as a training target. So greedy decoding is unchanged (ties go to the lower id), and every
  original token's probability is the original one divided by `1 + p(<unk>)`. Padding uses
  `<unk>`, as LLaVA's own training did (`tokenizer.pad_token = tokenizer.unk_token`).
- **Tokenization.** LLaVA tokenizes the text between image placeholders piece by piece
  (`tokenizer_image_token`), so SentencePiece's dummy prefix `▁` (29871 in Vicuna) starts every
  piece, including the one right after `<image>`. A `LlamaTokenizer` with `legacy: true` does
  the same around special tokens; with `legacy: false` that `▁` is dropped.
- **Images.** With `image_aspect_ratio: pad` (LLaVA-1.5) the original pads each image to a square
  with the CLIP mean colour before resizing; `LlavaImageProcessor(do_pad=True)` does the same.
- **Chat template.** llava-hf's LLaVA-1.5 template (`USER: <image>\\n... ASSISTANT:`) with
  `{{ bos_token }}` in front: vLLM adds no special tokens to rendered chat prompts, so with
  llava-hf's template chat requests would reach the model without the BOS that starts every
  LLaVA prompt. A system message is rendered as plain text before the first turn, which gives
  LLaVA's `vicuna_v1` prompt when that system text is sent.
"""

from __future__ import annotations

import json
from pathlib import Path

# llava-hf/llava-1.5-7b-hf's chat template, with the BOS LLaVA always had in front.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
IMAGE_TOKEN = "<image>"
# Arguments of `from_pretrained` that transformers keeps in a tokenizer's init kwargs and saves
# into tokenizer_config.json as if they were settings (a pushed checkpoint must not carry them).
LOADING_ARGUMENTS = (
    "is_local",
    "local_files_only",
    "cache_dir",
    "force_download",
    "proxies",
    "token",
    "revision",
    "subfolder",
    "trust_remote_code",
    "_commit_hash",
    "_from_auto",
    "_from_pipeline",
)


def load_tokenizer(folder: Path):
    """The base's LLaMA tokenizer with `<image>` appended and `legacy` segment handling."""
    from transformers import AddedToken, AutoTokenizer

    from vllm_prumerge.convert.weights import ConversionError

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), legacy=True)
    except Exception as exc:
        raise ConversionError(f"{folder}: cannot load the tokenizer ({exc})") from exc
    if "Llama" not in type(tokenizer).__name__:
        raise ConversionError(
            f"{folder}: tokenizer is {type(tokenizer).__name__}; a LLaMA tokenizer is needed"
        )
    if tokenizer.unk_token_id is None:
        raise ConversionError(f"{folder}: the tokenizer has no <unk> token")
    if IMAGE_TOKEN in tokenizer.get_vocab():
        raise ConversionError(f"{folder}: the tokenizer already has {IMAGE_TOKEN}")
    tokenizer.add_tokens(
        AddedToken(IMAGE_TOKEN, special=True, normalized=False), special_tokens=True
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    return tokenizer


def image_processor(vision: Path, pad_to_square: bool):
    """LLaVA's image processor from the CLIP folder's preprocessing settings."""
    from transformers import CLIPImageProcessor, LlavaImageProcessor

    from vllm_prumerge.convert.weights import ConversionError

    try:
        clip = CLIPImageProcessor.from_pretrained(str(vision))
    except Exception as exc:
        raise ConversionError(f"{vision}: cannot load preprocessor_config.json ({exc})") from exc
    return LlavaImageProcessor(
        do_resize=clip.do_resize,
        size=dict(clip.size),
        resample=clip.resample,
        do_center_crop=clip.do_center_crop,
        crop_size=dict(clip.crop_size),
        do_rescale=clip.do_rescale,
        rescale_factor=clip.rescale_factor,
        do_normalize=clip.do_normalize,
        image_mean=list(clip.image_mean),
        image_std=list(clip.image_std),
        do_convert_rgb=True,
        do_pad=pad_to_square,
    )


def save_processor(out: Path, tokenizer, processor, patch_size: int) -> None:
    """Write tokenizer, image processor and chat template the way llava-hf ships them."""
    from transformers import LlavaProcessor

    LlavaProcessor(
        image_processor=processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,
        image_token=IMAGE_TOKEN,
    ).save_pretrained(str(out))
    # transformers does not save `legacy`; without it the tokenizer reloads with legacy=False.
    path = out / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["legacy"] = True
    for key in LOADING_ARGUMENTS:
        config.pop(key, None)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def vision_config(vision: Path):
    """The CLIP vision config of an OpenAI CLIP folder (`CLIPModel` or `CLIPVisionModel`)."""
    from transformers import CLIPVisionConfig

    from vllm_prumerge.convert.original import read_json
    from vllm_prumerge.convert.weights import ConversionError

    data = read_json(vision / "config.json", "the CLIP tower's config")
    model_type = data.get("model_type")
    if model_type == "clip":
        data = dict(data.get("vision_config") or {})
    elif model_type != "clip_vision_model":
        raise ConversionError(
            f"{vision / 'config.json'}: model_type {model_type!r}; a CLIP tower is needed "
            "(e.g. openai/clip-vit-large-patch14-336)"
        )
    data.pop("model_type", None)
    data.pop("transformers_version", None)
    return CLIPVisionConfig(**data)
