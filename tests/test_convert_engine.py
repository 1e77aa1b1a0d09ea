"""A converted checkpoint, served by vLLM with the plugin, against the original-format weights.

The stand-ins are the exact original formats (Vicuna-like base in float16 shards, pickled PEFT
LoRA adapter + non_lora_trainables.bin, OpenAI CLIP folder). The reference below never reads the
converted checkpoint or the converter's code: it loads the base with transformers, applies the
LoRA **unmerged** at run time (forward hooks: y = W x + scaling * B(A(x))), builds the projector
from non_lora_trainables.bin, runs the CLIP tower from the vision folder (q/k of the scoring layer
read with hooks) and the core reduction, pads images to a square and tokenizes the prompt the way
LLaVA's own code does (`expand2square`, SentencePiece on each text piece between `<image>`s),
and decodes greedily over raw logits.

The converted vocabulary has one more row, `<image>`, whose logit copies `<unk>`'s (see
vllm_prumerge/convert/assets.py): vLLM's log-probabilities must therefore equal the original
model's minus log(1 + p(<unk>)), and its greedy tokens the original's exactly.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from PIL import Image

from tests.conftest import TINY_ENGINE_ARGS
from vllm_prumerge import engine_kwargs
from vllm_prumerge.config import PruMergeConfig
from vllm_prumerge.reduction import reduce_tokens

pytestmark = pytest.mark.engine

# float32 both sides (vLLM's CPU kernels vs eager torch): we measured at most 5e-7 here, while
# leaving out the `<image>` row's log(1 + p(<unk>)) shifts every logprob by more than 2e-3.
LOGPROB_ATOL = 1e-5
MAX_TOKENS = 8
RECORDED_MODE = "prumerge+"  # what the checkpoint is converted for: not the plugin's default
SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the human's questions."
)
PROMPT = "USER: <image>\nWhat is shown in this image? ASSISTANT:"
PROMPT_2 = f"{SYSTEM} USER: <image>\n<image>\nHow many objects are there? ASSISTANT:"


class UnmergedLoraLlava:
    """LLaVA-1.5 as the original code runs it, from the original-format files."""

    def __init__(self, base, lora, vision) -> None:
        import sentencepiece as spm
        from transformers import CLIPImageProcessor, CLIPVisionModel, LlamaForCausalLM

        self.llm = LlamaForCausalLM.from_pretrained(
            str(base), dtype=torch.float32, attn_implementation="eager"
        ).eval()
        self.sp = spm.SentencePieceProcessor(model_file=str(base / "tokenizer.model"))
        adapter_config = json.loads((lora / "adapter_config.json").read_text())
        self.scaling = adapter_config["lora_alpha"] / adapter_config["r"]
        adapter = torch.load(lora / "adapter_model.bin", weights_only=True)
        pattern = re.compile(r"base_model\.model\.(.+)\.lora_A\.weight")
        self.hooks = []
        for key, a in adapter.items():
            match = pattern.fullmatch(key)
            if match is None:
                continue
            b = adapter[key.replace("lora_A", "lora_B")].float()
            module = self.llm.get_submodule(match[1])
            self.hooks.append(module.register_forward_hook(self._lora_hook(a.float(), b)))
        assert len(self.hooks) == 7 * self.llm.config.num_hidden_layers
        non_lora = torch.load(lora / "non_lora_trainables.bin", weights_only=True)
        prefix = "base_model.model.model.mm_projector."
        self.projector = torch.nn.Sequential(
            torch.nn.Linear(*non_lora[prefix + "0.weight"].shape[::-1]),
            torch.nn.GELU(),
            torch.nn.Linear(*non_lora[prefix + "2.weight"].shape[::-1]),
        )
        self.projector.load_state_dict(
            {k[len(prefix) :]: v.float() for k, v in non_lora.items()}, strict=True
        )
        self.tower, info = CLIPVisionModel.from_pretrained(
            str(vision), dtype=torch.float32, attn_implementation="eager", output_loading_info=True
        )
        assert not info["missing_keys"], info["missing_keys"]
        self.tower.eval()
        self.image_processor = CLIPImageProcessor.from_pretrained(str(vision))
        self.unk = self.sp.unk_id()

    def _lora_hook(self, a: torch.Tensor, b: torch.Tensor):
        def hook(module, inputs, output):
            return output + self.scaling * (inputs[0] @ a.T @ b.T)

        return hook

    def _pixels(self, image: Image.Image) -> torch.Tensor:
        # LLaVA's expand2square with the CLIP mean colour, then CLIP's own processor.
        mean = tuple(int(x * 255) for x in self.image_processor.image_mean)
        width, height = image.size
        if width != height:
            side = max(width, height)
            square = Image.new(image.mode, (side, side), mean)
            square.paste(image, ((side - width) // 2, (side - height) // 2))
            image = square
        return self.image_processor([image], return_tensors="pt")["pixel_values"]

    @torch.no_grad()
    def image_embeds(self, image: Image.Image, config: PruMergeConfig) -> torch.Tensor:
        """`[L, H]`: reduced features of layer -2 (CLS dropped), through the projector."""
        tower = getattr(self.tower, "vision_model", self.tower)
        layer = tower.encoder.layers[-1]  # consumes hidden_states[-2]
        captured = {}
        hooks = [
            layer.self_attn.q_proj.register_forward_hook(lambda m, i, o: captured.update(q=o)),
            layer.self_attn.k_proj.register_forward_hook(lambda m, i, o: captured.update(k=o)),
        ]
        try:
            out = self.tower(self._pixels(image), output_hidden_states=True)
        finally:
            for h in hooks:
                h.remove()
        features = out.hidden_states[-2][:, 1:]
        reduced = reduce_tokens(features, captured["q"][:, 0], captured["k"], config)
        return self.projector(reduced.split()[0])

    def prompt_ids(self, prompt: str) -> list[list[int] | None]:
        """LLaVA's tokenizer_image_token: BOS, then each text piece; None marks an image."""
        pieces: list[list[int] | None] = [[self.sp.bos_id()]]
        for i, chunk in enumerate(prompt.split("<image>")):
            if i:
                pieces.append(None)
            pieces.append(self.sp.encode(chunk))
        return pieces

    @torch.no_grad()
    def generate(self, prompt: str, images, config: PruMergeConfig):
        """(prompt ids with `image_id` placeholders, tokens, logprobs, p(<unk>) per step)."""
        embed = self.llm.get_input_embeddings()
        images = iter(images)
        parts, ids = [], []
        for piece in self.prompt_ids(prompt):
            if piece is None:
                feats = self.image_embeds(next(images), config)
                parts.append(feats)
                ids += [None] * len(feats)
            elif piece:
                parts.append(embed(torch.tensor(piece)))
                ids += piece
        out = self.llm(inputs_embeds=torch.cat(parts)[None], use_cache=True)
        tokens, logprobs, p_unk = [], [], []
        for _ in range(MAX_TOKENS):
            logp = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
            token = int(torch.argmax(logp))
            tokens.append(token)
            logprobs.append(float(logp[token]))
            p_unk.append(float(logp[self.unk].exp()))
            out = self.llm(
                inputs_embeds=embed(torch.tensor([[token]])),
                past_key_values=out.past_key_values,
                use_cache=True,
            )
        return ids, tokens, logprobs, p_unk


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    from vllm_prumerge.testing.original_format import cached_original_format

    return cached_original_format(cache_dir=tmp_path_factory.mktemp("original-format"))


@pytest.fixture(scope="module")
def converted(stand_ins, tmp_path_factory):
    """The stand-ins converted by the CLI, recording PruMerge+ as the checkpoint's mode."""
    from vllm_prumerge.convert.cli import main

    out = tmp_path_factory.mktemp("converted") / "llava-prumerge-plus"
    args = ["--base", str(stand_ins.base), "--lora", str(stand_ins.lora)]
    args += ["--vision", str(stand_ins.vision), "--out", str(out)]
    assert main([*args, "--mode", RECORDED_MODE, "--dtype", "float32"]) == 0
    return out


@pytest.fixture(scope="module")
def reference(stand_ins):
    return UnmergedLoraLlava(stand_ins.base, stand_ins.lora, stand_ins.vision)


@pytest.fixture(scope="module")
def images(scenes):
    # Two square scenes, and a wide one that LLaVA-1.5 pads to a square first.
    wide = scenes[2].resize((336, 200))
    return [scenes[0], scenes[1], wide, scenes[3]]


@pytest.fixture(scope="class")
def llm(converted):
    """ONE engine (shut down before the server test): the converted folder, no option given."""
    from tests.helpers import shutdown, start_llm

    engine = start_llm(str(converted), **TINY_ENGINE_ARGS, **engine_kwargs())
    try:
        yield engine
    finally:
        shutdown(engine)


def _sampling():
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=1)


def _requests(images, mode: str | None):
    kwargs = {} if mode is None else {"mm_processor_kwargs": {"prumerge": mode}}
    single = [
        {"prompt": PROMPT, "multi_modal_data": {"image": img}, **kwargs} for img in images[:3]
    ]
    pair = {"prompt": PROMPT_2, "multi_modal_data": {"image": [images[3], images[0]]}, **kwargs}
    return [*single, pair], [[img] for img in images[:3]] + [[images[3], images[0]]]


def _check_against_reference(output, reference, prompt, imgs, config, image_id):
    ids, tokens, logprobs, p_unk = reference.generate(prompt, imgs, config)
    # The exact prompt LLaVA's code builds, image placeholders expanded to the reduced counts.
    assert list(output.prompt_token_ids) == [image_id if t is None else t for t in ids]
    completion = output.outputs[0]
    assert list(completion.token_ids) == tokens
    served = [completion.logprobs[i][t].logprob for i, t in enumerate(tokens)]
    expected = [lp - math.log1p(p) for lp, p in zip(logprobs, p_unk, strict=True)]
    assert served == pytest.approx(expected, abs=LOGPROB_ATOL)
    return ids.count(None)


class TestOfflineEngine:
    @pytest.mark.parametrize("mode", ["prumerge", "prumerge+"])
    def test_converted_checkpoint_answers_like_the_unmerged_original(
        self, llm, reference, images, converted, mode
    ):
        image_id = json.loads((converted / "config.json").read_text())["image_token_index"]
        requests, per_request = _requests(images, mode)
        outputs = llm.generate(requests, _sampling())
        config = PruMergeConfig(mode=mode)
        counts = []
        for output, request, imgs in zip(outputs, requests, per_request, strict=True):
            counts.append(
                _check_against_reference(
                    output, reference, request["prompt"], imgs, config, image_id
                )
            )
        assert all(c < 576 for c in counts[:3]) and len(set(counts[:3])) > 1, counts


@pytest.mark.server
def test_vllm_serve_with_no_mode_flag_serves_the_recorded_mode_through_the_chat_template(
    converted, reference, images
):
    """The README's command: chat template, tokenizer and recorded mode through the CLI. Without
    vLLM's `--trust-request-mm-kwargs`, a request that names a mode is refused with HTTP 400
    naming the flag (vLLM's own check), and the server goes on serving its recorded mode."""
    from openai import BadRequestError, OpenAI

    from vllm_prumerge.testing.media import image_data_url
    from vllm_prumerge.testing.server import serve

    url = image_data_url(images[2])  # the wide image: padded to a square first
    question = "What is shown in this image?"
    args = ["--plugin", "prumerge", "--dtype", "float32", "--enforce-eager"]
    args += ["--max-model-len", "2048", "--max-num-seqs", "8"]
    messages = [
        {"role": "system", "content": [{"type": "text", "text": SYSTEM}]},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": question},
            ],
        },
    ]
    with serve(converted, args) as base_url:
        client = OpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0)
        with pytest.raises(BadRequestError) as refused:
            client.chat.completions.create(
                model=str(converted),
                messages=messages,
                max_tokens=1,
                extra_body={"mm_processor_kwargs": {"prumerge": "off"}},
            )
        assert refused.value.status_code == 400
        assert "--trust-request-mm-kwargs" in str(refused.value)
        response = client.chat.completions.create(
            model=str(converted),
            messages=messages,
            max_tokens=MAX_TOKENS,
            temperature=0.0,
            logprobs=True,
            extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True},
        )
    # LLaVA's vicuna_v1 prompt, as the original code would build it.
    prompt = f"{SYSTEM} USER: <image>\n{question} ASSISTANT:"
    ids, tokens, logprobs, p_unk = reference.generate(
        prompt, [images[2]], PruMergeConfig(mode=RECORDED_MODE)
    )
    assert response.usage.prompt_tokens == len(ids)
    content = response.choices[0].logprobs.content
    assert [int(t.token.removeprefix("token_id:")) for t in content] == tokens
    served = [t.logprob for t in content]
    expected = [lp - math.log1p(p) for lp, p in zip(logprobs, p_unk, strict=True)]
    assert served == pytest.approx(expected, abs=LOGPROB_ATOL)
