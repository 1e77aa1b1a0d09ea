"""Write tiny LLaVA-family checkpoints that vLLM 0.32 and transformers both load.

Families (`TinyLlavaSpec.family`): `"llava"` (LLaVA-1.5), `"llava_next"` (LLaVA-NeXT anyres, with
several `image_grid_pinpoints`), `"siglip"` (SigLIP-based LLaVA like LLaVA-Interleave: SigLIP
384/14, 729 patches without CLS, `vision_feature_layer=-1`, strategy `full`) and `"onevision"`
(LLaVA-OneVision: that SigLIP tower per anyres crop, `anyres_max_9`, with a `<video>` token),
`"next_video"` (LLaVA-NeXT-Video: the CLIP 336/14 tower per frame, 2x2 average pooling, `<video>`)
and `"video_llava"` (Video-LLaVA: two CLIP 224/14 towers, `image_tower` and `video_tower`, 256
patches + CLS on a 16x16 grid, `<image>` and `<video>`).

The CLIP towers have the real geometry (336 px, patch 14: 576 patches + CLS, on a 24x24 grid;
Video-LLaVA's 224 px: 256 patches + CLS) with a
tiny width and depth; the text model is a tiny Llama whose head size (32) vLLM's CPU attention
supports; the tokenizer is built locally (byte-level BPE trained on a fixed corpus, with `<image>`);
image processor and chat template follow llava-hf/llava-1.5-7b-hf. Weights are written in the hub
key layout (`vllm_prumerge.hub_layout`: `vision_tower.vision_model.*`, `language_model.model.*`,
`language_model.lm_head.*`), the layout of the checkpoints users serve and the one vLLM 0.32's
loader expects.

    python -m vllm_prumerge.testing.checkpoint OUT_DIR [--seed 0]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType

from vllm_prumerge.hub_layout import hub_key

# LLaVA-1.5's conversation format, as in llava-hf/llava-1.5-7b-hf: "USER: <image>\n... ASSISTANT:".
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}"
    "{% else %}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ item['text'] + ' ' }}{% endfor %}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# The video families' (Video-LLaVA's as LanguageBind's): images, then videos ("USER: <video>\n...").
_IMAGE_ITEMS = "{{ '<image>\n' }}{% endfor %}"
VIDEO_CHAT_TEMPLATE = CHAT_TEMPLATE.replace(
    _IMAGE_ITEMS,
    _IMAGE_ITEMS + "{% for item in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>\n' }}{% endfor %}",
)

# A fixed corpus for the tokenizer's merges: the tokenizer is part of the checkpoint's identity.
_CORPUS = [
    "USER: ASSISTANT: What is shown in this image? Describe the picture in detail.",
    "How many objects are there? What colour is the circle? Is there any text in the image?",
    "The image shows a red square, a blue circle and a green triangle on a white background.",
    "Answer the question using a single word or phrase. Yes No one two three four five",
    "the of and a to in is that it with as for was on are be this by at from",
]

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]

FAMILIES = ("llava", "llava_next", "siglip", "onevision", "next_video", "video_llava")
# Families whose tokenizer has a `<video>` token.
_VIDEO_FAMILIES = ("onevision", "next_video", "video_llava")
# Families whose generated files changed after their first release, with the change's number
# (part of the cache key). 2: the chat template writes video parts.
_REVISED = {"onevision": 2, "next_video": 2}
# LLaVA-NeXT grids of the tiny checkpoint: 1x2, 2x1 and 2x2 tiles of 336 px (up to 5 crops).
NEXT_GRID_PINPOINTS = [[336, 672], [672, 336], [672, 672]]
# LLaVA-OneVision's: the same grids of 384 px SigLIP tiles.
ONEVISION_GRID_PINPOINTS = [[384, 768], [768, 384], [768, 768]]
_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclasses.dataclass(frozen=True)
class TinyLlavaSpec:
    """Shapes of the generated checkpoint. Defaults give a ~10 MB model that loads in seconds."""

    seed: int = 0
    family: str = "llava"  # one of FAMILIES
    vision_hidden_size: int = 64
    vision_layers: int = 3  # >= 2 so that "penultimate" (-2) and "last" (-1) are distinct layers
    vision_heads: int = 4
    vision_intermediate_size: int = 128
    text_hidden_size: int = 128
    text_layers: int = 2
    text_heads: int = 4  # head_dim 32: vLLM's CPU attention rejects e.g. 24
    text_intermediate_size: int = 256
    vocab_size: int = (
        512  # tokenizer size; the model's embedding table is padded to a multiple of 64
    )
    # Scales the vision tower's q/k weights so class attention is peaked like a trained CLIP's,
    # instead of the near-uniform attention of a fresh random init.
    attention_sharpness: float = 4.0

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"TinyLlavaSpec.family must be one of {FAMILIES}, got {self.family!r}")

    def key(self) -> str:
        fields = dataclasses.asdict(self)
        if self.family == "llava":  # the key of the original (family-less) spec: caches stay valid
            fields.pop("family")
        if self.family in _REVISED:  # what it writes changed: a new folder, not a stale cache
            fields["revision"] = _REVISED[self.family]
        blob = json.dumps(fields, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def _chat_template(spec: TinyLlavaSpec) -> str:
    """The families with a `<video>` token get the template that writes video parts too (an
    OpenAI `video_url` part needs its placeholder in the rendered prompt)."""
    return VIDEO_CHAT_TEMPLATE if spec.family in _VIDEO_FAMILIES else CHAT_TEMPLATE


def _build_tokenizer(spec: TinyLlavaSpec):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    if spec.family in _VIDEO_FAMILIES:  # added after training: other families' bytes unchanged
        tok.add_special_tokens(["<video>"])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={
            "image_token": "<image>",
            **({"video_token": "<video>"} if spec.family in _VIDEO_FAMILIES else {}),
        },
        chat_template=_chat_template(spec),
        model_max_length=4096,
    )


def _vision_config(spec: TinyLlavaSpec):
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    shape = dict(
        hidden_size=spec.vision_hidden_size,
        intermediate_size=spec.vision_intermediate_size,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        patch_size=14,
    )
    if spec.family in ("siglip", "onevision"):
        return SiglipVisionConfig(image_size=384, vision_use_head=False, **shape)
    return CLIPVisionConfig(
        image_size=224 if spec.family == "video_llava" else 336,
        projection_dim=spec.vision_hidden_size,
        hidden_act="quick_gelu",
        **shape,
    )


def _transformers():
    import transformers

    return transformers


def _clip_processor(size: int, **center_crop: bool) -> dict:
    """A CLIP image processor's arguments at `size` px (LLaVA-1.5's 336 px with
    ``do_center_crop=True``; Video-LLaVA's 224 px)."""
    return dict(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        **center_crop,
        image_mean=_CLIP_MEAN,
        image_std=_CLIP_STD,
    )


def _clip_336() -> dict:
    """LLaVA-1.5's image processor arguments (llava-hf/llava-1.5-7b-hf)."""
    return _clip_processor(336, do_center_crop=True)


@dataclasses.dataclass(frozen=True)
class _FamilyLayout:
    """What a family's checkpoint is made of: transformers classes (by name), the config fields
    of the family, its image processor and the processor's extra arguments."""

    architecture: str  # the model class, also the config's `architectures`
    config_class: str
    processor_class: str
    config_fields: Mapping[str, object]
    image_processor: Callable[[], object]
    processor_fields: Callable[[], dict]  # besides image processor, tokenizer and template


_LAYOUTS = MappingProxyType(
    {
        "llava": _FamilyLayout(
            "LlavaForConditionalGeneration",
            "LlavaConfig",
            "LlavaProcessor",
            dict(
                vision_feature_select_strategy="default",
                vision_feature_layer=-2,
                image_seq_length=576,
            ),
            lambda: _transformers().CLIPImageProcessor(**_clip_336()),
            lambda: {"num_additional_image_tokens": 1},
        ),
        "llava_next": _FamilyLayout(
            "LlavaNextForConditionalGeneration",
            "LlavaNextConfig",
            "LlavaNextProcessor",
            dict(
                vision_feature_select_strategy="default",
                vision_feature_layer=-2,
                image_grid_pinpoints=NEXT_GRID_PINPOINTS,
            ),
            lambda: _transformers().LlavaNextImageProcessor(
                image_grid_pinpoints=NEXT_GRID_PINPOINTS, **_clip_336()
            ),
            lambda: {"num_additional_image_tokens": 1},
        ),
        "siglip": _FamilyLayout(
            "LlavaForConditionalGeneration",
            "LlavaConfig",
            "LlavaProcessor",
            dict(
                vision_feature_select_strategy="full",
                vision_feature_layer=-1,
                image_seq_length=729,
            ),
            lambda: _transformers().SiglipImageProcessor(
                size={"height": 384, "width": 384}, image_mean=[0.5] * 3, image_std=[0.5] * 3
            ),
            lambda: {"num_additional_image_tokens": 0},
        ),
        "onevision": _FamilyLayout(
            "LlavaOnevisionForConditionalGeneration",
            "LlavaOnevisionConfig",
            "LlavaOnevisionProcessor",
            dict(
                vision_feature_select_strategy="full",
                vision_feature_layer=-1,
                image_grid_pinpoints=ONEVISION_GRID_PINPOINTS,
                vision_aspect_ratio="anyres_max_9",
            ),
            lambda: _transformers().LlavaOnevisionImageProcessor(
                image_grid_pinpoints=ONEVISION_GRID_PINPOINTS,
                size={"height": 384, "width": 384},
                image_mean=[0.5] * 3,
                image_std=[0.5] * 3,
            ),
            lambda: {
                "video_processor": _transformers().LlavaOnevisionVideoProcessor(),
                "num_image_tokens": 729,
                "vision_aspect_ratio": "anyres_max_9",
            },
        ),
        "next_video": _FamilyLayout(
            "LlavaNextVideoForConditionalGeneration",
            "LlavaNextVideoConfig",
            "LlavaNextVideoProcessor",
            dict(
                vision_feature_select_strategy="default",
                vision_feature_layer=-2,
                image_grid_pinpoints=NEXT_GRID_PINPOINTS,
                spatial_pool_mode="average",
                spatial_pool_stride=2,
            ),
            lambda: _transformers().LlavaNextImageProcessor(
                image_grid_pinpoints=NEXT_GRID_PINPOINTS, **_clip_336()
            ),
            lambda: {
                "video_processor": _transformers().LlavaNextVideoVideoProcessor(**_clip_336()),
                "num_additional_image_tokens": 1,
            },
        ),
        "video_llava": _FamilyLayout(
            "VideoLlavaForConditionalGeneration",
            "VideoLlavaConfig",
            "VideoLlavaProcessor",
            dict(
                vision_feature_select_strategy="default",
                vision_feature_layer=-2,
                image_seq_length=256,
                video_seq_length=8 * 257,
            ),
            lambda: _transformers().VideoLlavaImageProcessor(**_clip_processor(224)),
            lambda: {
                "video_processor": _transformers().VideoLlavaVideoProcessor(**_clip_processor(224)),
                "num_additional_image_tokens": 1,
            },
        ),
    }
)


def _model_and_processor(spec: TinyLlavaSpec, tokenizer, vision, text):
    """The family's transformers config, model (random weights) and processor."""
    import torch

    layout = _LAYOUTS[spec.family]
    transformers = _transformers()
    fields = dict(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
        **layout.config_fields,
    )
    if spec.family in _VIDEO_FAMILIES:
        fields["video_token_index"] = tokenizer.convert_tokens_to_ids("<video>")
    config = getattr(transformers, layout.config_class)(**fields)
    config.architectures = [layout.architecture]
    config.dtype = "float32"
    torch.manual_seed(spec.seed)
    model = getattr(transformers, layout.architecture)(config).eval()
    extra = layout.processor_fields()
    if layout.processor_class != "LlavaOnevisionProcessor":
        extra["patch_size"] = 14
    processor = getattr(transformers, layout.processor_class)(
        image_processor=layout.image_processor(),
        tokenizer=tokenizer,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        chat_template=_chat_template(spec),
        **extra,
    )
    return config, model, processor


def write_tiny_llava(out_dir: str | os.PathLike, spec: TinyLlavaSpec | None = None) -> Path:
    """Write a tiny LLaVA-family checkpoint (`spec.family`) to `out_dir` (created); return it.

    Deterministic: the same spec writes byte-identical weights.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    spec = spec or TinyLlavaSpec()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = _build_tokenizer(spec)
    vocab = (len(tokenizer) + 63) // 64 * 64
    text = LlamaConfig(
        vocab_size=vocab,
        hidden_size=spec.text_hidden_size,
        intermediate_size=spec.text_intermediate_size,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_heads,
        # OneVision's stock images reach ~3.7k tokens each on the tiny grids: room for two.
        max_position_embeddings=16384 if spec.family == "onevision" else 4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config, model, processor = _model_and_processor(spec, tokenizer, _vision_config(spec), text)
    state = {}
    for key, value in model.state_dict().items():
        if key.endswith((".q_proj.weight", ".k_proj.weight")) and "_tower." in key:
            value = value * spec.attention_sharpness
        state[hub_key(key)] = value.detach().to(torch.float32).contiguous()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config_dict = config.to_dict()
    config_dict.pop("transformers_version", None)
    (out / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
    (out / "generation_config.json").write_text(
        json.dumps(
            {
                "bos_token_id": text.bos_token_id,
                "eos_token_id": text.eos_token_id,
                "pad_token_id": text.pad_token_id,
            },
            indent=2,
        )
        + "\n"
    )
    processor.save_pretrained(str(out))
    return out


def default_cache_dir() -> Path:
    root = os.environ.get("VLLM_PRUMERGE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vllm-prumerge"
    )
    return Path(root) / "checkpoints"


def cached_tiny_llava(
    spec: TinyLlavaSpec | None = None, cache_dir: str | os.PathLike | None = None
) -> Path:
    """Return the folder of the tiny checkpoint for `spec`, generating it once per cache.

    The folder name is a hash of the spec; generation writes to a temporary folder and renames it,
    so concurrent callers never see a half-written checkpoint.
    """
    import tempfile

    spec = spec or TinyLlavaSpec()
    base = Path(cache_dir) if cache_dir else default_cache_dir()
    target = base / f"tiny-llava-{spec.key()}"
    if (target / "model.safetensors").exists():
        return target
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=base))
    write_tiny_llava(tmp, spec)
    try:
        tmp.rename(target)
    except OSError:  # another process won the race; its checkpoint is identical
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Write a tiny, randomly initialised LLaVA-family checkpoint (hub layout)."
    )
    parser.add_argument("out_dir", help="folder to write (created if missing)")
    parser.add_argument(
        "--seed", type=int, default=0, help="random seed of the weights (default 0)"
    )
    parser.add_argument(
        "--family",
        choices=FAMILIES,
        default="llava",
        help="llava: LLaVA-1.5 (CLIP 336/14, 576 patches); llava_next: LLaVA-NeXT anyres "
        f"(grids {NEXT_GRID_PINPOINTS}); siglip: SigLIP-LLaVA like LLaVA-Interleave (384/14, 729 "
        "patches, no CLS); onevision: LLaVA-OneVision (that SigLIP tower per anyres crop, grids "
        f"{ONEVISION_GRID_PINPOINTS}); next_video: LLaVA-NeXT-Video (CLIP 336/14 per frame, 2x2 "
        "average pooling); video_llava: Video-LLaVA (image and video CLIP 224/14 towers, 256 "
        "patches). Default: llava.",
    )
    args = parser.parse_args(argv)
    path = write_tiny_llava(args.out_dir, TinyLlavaSpec(seed=args.seed, family=args.family))
    print(path)


if __name__ == "__main__":
    main()
