"""A LLaVA checkpoint's vision tower plus the reduction: images in, reduced tower-space features.

This is the front half of LLaVA with PruMerge, independent of vLLM: the vLLM adapter runs it in
the request pre-processor (so the exact reduced count is known before scheduling), and examples
and benchmarks use it directly. The tower is read from the same checkpoint the LLM is served
from: only its `vision_tower.*` tensors are loaded (local folder or hub id). CLIP towers (with a
CLS token) and SigLIP towers (without) are both supported; the importance that ranks patches is
chosen per request (`PruMergeConfig.importance`). Crops of tiled (anyres) families are just more
rows of the batch: each row is reduced on its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    PretrainedConfig,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from vllm_prumerge.config import PruMergeConfig
from vllm_prumerge.hub_layout import VISION_TOWER
from vllm_prumerge.hub_layout import strip_tower_prefix as _strip_tower_prefix
from vllm_prumerge.reduction import ReducedTokens, reduce_by_importance, reduce_frames
from vllm_prumerge.vision import num_patches, resolve_vision_feature_layer, tower_scores

T = TypeVar("T")
R = TypeVar("R")
# The vision-tower classes the encoder builds, by the checkpoint's vision_config type.
_TOWER_CLASSES = {CLIPVisionConfig: CLIPVisionModel, SiglipVisionConfig: SiglipVisionModel}
# Tensors of the checkpoint's tower that PruMerge never reads (LLaVA skips them too).
_UNUSED_TOWER_PREFIXES = ("post_layernorm.", "head.")


_INDEX_FILE = "model.safetensors.index.json"


def _tower_shards(index_file: Path, tower: str = VISION_TOWER) -> list[str]:
    """The safetensors files that hold the tower's tensors, from a sharded checkpoint's index."""
    weight_map = json.loads(index_file.read_text())["weight_map"]
    return sorted({f for k, f in weight_map.items() if _strip_tower_prefix(k, tower) is not None})


def _checkpoint_folder(
    model: str,
    revision: str | None,
    download_dir: str | None,
    token: bool | str | None = None,
    tower: str = VISION_TOWER,
) -> Path:
    """A local folder holding the checkpoint's config and the safetensors with the tower.

    A hub id is resolved as vLLM resolves the engine's weights: `revision`, `download_dir` as the
    cache (None: the Hugging Face default), `HF_HUB_OFFLINE` (then only the cached snapshot),
    `token` (None: `HF_TOKEN` or the stored login), so the tower comes from the files the engine
    loads. Only "the repository has no index" is handled (a single-file checkpoint); any other hub,
    network or authentication error propagates as itself, with a note naming the checkpoint.
    """
    if os.path.isdir(model):
        return Path(model)
    import huggingface_hub
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import RemoteEntryNotFoundError

    offline = huggingface_hub.constants.HF_HUB_OFFLINE
    hub = dict(revision=revision, cache_dir=download_dir, token=token, local_files_only=offline)
    try:
        if offline:
            return Path(snapshot_download(model, **hub))
        try:
            index_file = hf_hub_download(model, _INDEX_FILE, **hub)
        except RemoteEntryNotFoundError:
            patterns = ["*.json", "model.safetensors"]
        else:
            # Only the shards holding vision-tower tensors: the LLM's shards are not needed here.
            patterns = ["*.json", *_tower_shards(Path(index_file), tower)]
        return Path(snapshot_download(model, allow_patterns=patterns, **hub))
    except Exception as exc:
        exc.add_note(
            f"vllm-prumerge: while fetching the vision tower of {model!r} (revision "
            f"{revision or 'main'}, cache {download_dir or 'the Hugging Face default'}, "
            f"HF_HUB_OFFLINE={int(offline)})"
        )
        raise


def _tower_tensors(folder: Path, tower: str = VISION_TOWER) -> Iterable[tuple[str, torch.Tensor]]:
    """Yield (key without tower prefix, tensor) for every tensor of `tower` in the folder.

    Raises FileNotFoundError naming what is missing: safetensors weights, or a shard the index
    lists for the tower."""
    from safetensors import safe_open

    index = folder / _INDEX_FILE
    if index.exists():
        files = _tower_shards(index, tower)
        absent = [name for name in files if not (folder / name).is_file()]
        if absent:
            raise FileNotFoundError(
                f"{index} puts vision-tower tensors in {absent}, missing from {folder}"
            )
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"no safetensors weights with a vision tower in {folder} (vllm-prumerge reads the "
            "tower from the checkpoint's *.safetensors)"
        )
    for name in files:
        with safe_open(str(folder / name), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118  safe_open handles are not mappings
                short = _strip_tower_prefix(key, tower)
                if short is not None:
                    yield short, f.get_tensor(key)


def supported_vision_config(vision_config: PretrainedConfig) -> bool:
    """Whether the encoder can build this tower (CLIP or SigLIP vision config)."""
    return type(vision_config) in _TOWER_CLASSES


def load_vision_tower(
    model: str,
    vision_config: PretrainedConfig,
    *,
    vision_feature_layer: int = -2,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    revision: str | None = None,
    download_dir: str | None = None,
    token: bool | str | None = None,
    tower_name: str = VISION_TOWER,
) -> nn.Module:
    """Build the CLIP or SigLIP tower of a LLaVA checkpoint with SDPA attention, load its weights.

    Only the layers PruMerge reads are built (up to the layer after `vision_feature_layer`);
    SigLIP's pooling head is never built (llava-hf checkpoints carry none).
    `model` is a local folder or a hub id, resolved as the engine's weights are (`revision`,
    `download_dir`, `token`, `HF_HUB_OFFLINE`: see :func:`_checkpoint_folder`). `tower_name` names
    the checkpoint's tower (`vision_tower`; Video-LLaVA: `image_tower` or `video_tower`).
    """
    tower_class = _TOWER_CLASSES.get(type(vision_config))
    if tower_class is None:
        raise TypeError(
            "vllm-prumerge supports CLIP and SigLIP vision towers, got "
            f"{type(vision_config).__name__}"
        )
    num_layers = vision_config.num_hidden_layers
    feature_index = resolve_vision_feature_layer(vision_feature_layer, num_layers)
    config = type(vision_config).from_dict(vision_config.to_dict())
    config.num_hidden_layers = min(num_layers, feature_index + 1)
    if isinstance(config, SiglipVisionConfig):
        config.vision_use_head = False
    tower = tower_class._from_config(config, attn_implementation="sdpa", dtype=dtype)
    target = tower.vision_model if hasattr(tower, "vision_model") else tower
    wanted = set(target.state_dict().keys())
    folder = _checkpoint_folder(model, revision, download_dir, token, tower_name)
    state = {
        key: tensor.to(dtype=dtype)
        for key, tensor in _tower_tensors(folder, tower_name)
        if key in wanted
    }
    if not state:
        raise ValueError(
            f"checkpoint {model} has no vision-tower tensors (keys under {tower_name}.) in its "
            f"safetensors in {folder}"
        )
    missing = sorted(k for k in wanted - state.keys() if not k.startswith(_UNUSED_TOWER_PREFIXES))
    if missing:
        raise ValueError(f"checkpoint {model} lacks vision-tower weights: {missing[:5]} ...")
    target.load_state_dict(state, strict=False)  # post_layernorm is unused by PruMerge
    return tower.to(device).eval()


@dataclass(frozen=True)
class EncodedImages:
    """The result of :meth:`PruMergeEncoder.encode` for a batch of B images."""

    features: list[torch.Tensor]  # B tensors [L_i, C] on the CPU, tower space (before projector)
    reduced: ReducedTokens  # the full reduction result (kept indices, counts, attention)
    seconds: float  # wall time of tower + reduction for the batch


class PruMergeEncoder:
    """Vision tower (CLIP or SigLIP) + reduction of one LLaVA checkpoint, loaded on first use
    (thread-safe).

    Args:
        model: local checkpoint folder or hub id (the LLaVA checkpoint itself).
        vision_config: the checkpoint's `vision_config` (CLIP or SigLIP).
        vision_feature_layer: LLaVA's `vision_feature_layer` (-2 for LLaVA-1.5).
        dtype: compute dtype of the tower (statistics of the reduction are float32 regardless).
        device: "cuda" when available, else "cpu", unless given.
        revision, download_dir, token: how a hub id is resolved (vLLM's `--revision`,
            `--download-dir`, `--hf-token`); see :func:`load_vision_tower`.
        tower_name: the checkpoint's tower (`vision_tower`; Video-LLaVA: `image_tower` or
            `video_tower`).
        num_threads: torch intra-op threads for the tower forward and the reduction on a CPU,
            set around every :meth:`encode` (encodes are then serialised: the count is
            process-wide) and restored after it; None keeps the caller's
            (in vLLM's pre-processor: ``OMP_NUM_THREADS``, else 1). The server picks it with
            :func:`choose_tower_threads` (engine option `tower_threads`, default ``auto``;
            the environment variable :attr:`THREADS_ENV` overrides it).
    """

    #: Environment variable with the tower's thread count in a vLLM server (a positive integer);
    #: it overrides the engine option `tower_threads`.
    THREADS_ENV = "VLLM_PRUMERGE_TOWER_THREADS"

    def __init__(
        self,
        model: str,
        vision_config: PretrainedConfig,
        *,
        vision_feature_layer: int = -2,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device | None = None,
        revision: str | None = None,
        download_dir: str | None = None,
        token: bool | str | None = None,
        num_threads: int | None = None,
        tower_name: str = VISION_TOWER,
    ) -> None:
        if num_threads is not None and (
            isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1
        ):
            raise ValueError(f"num_threads must be a positive integer or None, got {num_threads!r}")
        self.model = model
        self.vision_config = vision_config
        self.vision_feature_layer = vision_feature_layer
        self.dtype = dtype
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.revision = revision
        self.download_dir = download_dir
        self.token = token
        self.num_threads = num_threads
        self.tower_name = tower_name
        self._tower: nn.Module | None = None
        self._lock = threading.Lock()
        self._encode_lock = threading.Lock()

    @property
    def num_patches(self) -> int:
        """Patch tokens per image or crop (576 for CLIP-L/14-336, 729 for SigLIP 384/14)."""
        return num_patches(self.vision_config)

    @property
    def has_cls(self) -> bool:
        """Whether the tower prepends a CLS token (CLIP) or has only patches (SigLIP)."""
        return isinstance(self.vision_config, CLIPVisionConfig)

    @property
    def tower(self) -> nn.Module:
        with self._lock:
            if self._tower is None:
                self._tower = load_vision_tower(
                    self.model,
                    self.vision_config,
                    vision_feature_layer=self.vision_feature_layer,
                    dtype=self.dtype,
                    device=self.device,
                    revision=self.revision,
                    download_dir=self.download_dir,
                    token=self.token,
                    tower_name=self.tower_name,
                )
            return self._tower

    @torch.inference_mode()
    def encode(self, pixel_values: torch.Tensor, config: PruMergeConfig) -> EncodedImages:
        """Reduce a batch of preprocessed images (or crops) `[B, 3, H, W]` with `config`.

        Each row goes through the tower and the reduction alone (a forward of batch 1), so its
        features and count are bit-identical whatever else is in the batch: the same image gives
        the same result alone, in any request, and through vLLM's processor cache (a hit serves
        what a miss would compute). Raises ValueError for an importance the tower cannot give.
        """

        def reduce(tower: nn.Module, row: torch.Tensor) -> ReducedTokens:
            scores = tower_scores(tower, row, self.vision_feature_layer, config.importance)
            return reduce_by_importance(*scores, config)

        def collect(rows: list[ReducedTokens]) -> tuple[ReducedTokens, list[torch.Tensor]]:
            reduced = ReducedTokens.concat(rows)
            return reduced, [f.to("cpu") for f in reduced.split()]

        (reduced, features), seconds = self._per_row(pixel_values, reduce, collect)
        return EncodedImages(features, reduced, seconds)

    @torch.inference_mode()
    def encode_frames(self, pixel_values: torch.Tensor, config: PruMergeConfig) -> EncodedImages:
        """Reduce a video's preprocessed frames `[T, 3, H, W]` with `config`, frames in time order.

        `config.temporal` ``"off"`` (or mode ``"off"``): :meth:`encode`, each frame on its own.
        Otherwise every frame goes through the tower alone (as in :meth:`encode`), then the
        temporal stage and each frame's reduction on its retained patches
        (:func:`vllm_prumerge.reduction.reduce_frames`): `features` has one `[L_t, C]` tensor per
        frame, `L_t = 0` for a frame that retained no patch.
        """
        if not config.enabled or config.temporal == "off":
            return self.encode(pixel_values, config)

        def score(tower: nn.Module, row: torch.Tensor):
            return tower_scores(tower, row, self.vision_feature_layer, config.importance)

        def collect(rows: list) -> tuple[ReducedTokens, list[torch.Tensor]]:
            features, importance, keys = (torch.cat(parts) for parts in zip(*rows, strict=True))
            reduced = reduce_frames(features, importance, keys, config)
            return reduced, [f.to("cpu") for f in reduced.split()]

        (reduced, features), seconds = self._per_row(pixel_values, score, collect)
        return EncodedImages(features, reduced, seconds)

    @torch.inference_mode()
    def hidden_states(self, pixel_values: torch.Tensor) -> tuple[list[torch.Tensor], float]:
        """``hidden_states[vision_feature_layer]`` of each row of `[B, 3, H, W]` with no token
        selection (CLIP: the CLS row kept, ``[N + 1, C]``), a forward of batch 1 per row as in
        :meth:`encode`; and the seconds taken."""
        index = resolve_vision_feature_layer(
            self.vision_feature_layer, self.vision_config.num_hidden_layers
        )

        def forward(tower: nn.Module, row: torch.Tensor) -> torch.Tensor:
            weight = next(tower.parameters())
            out = tower(row.to(weight.device, weight.dtype), output_hidden_states=True)
            return out.hidden_states[index][0].to("cpu")

        return self._per_row(pixel_values, forward, list)

    def _per_row(
        self,
        pixel_values: torch.Tensor,
        run: Callable[[nn.Module, torch.Tensor], T],
        collect: Callable[[list[T]], R],
    ) -> tuple[R, float]:
        """`run(tower, row)` for each `[1, 3, H, W]` row, then `collect` of the results in row
        order, both with this encoder's thread count (`collect` may reduce: a video's temporal
        stage needs every frame); results on the CPU (the timing waits for the device); and the
        seconds of both (the tower is loaded before timing)."""
        tower = self.tower
        start = time.perf_counter()
        with self._threads():
            results = [run(tower, row) for row in pixel_values.split(1)]
            collected = collect(results)
        return collected, time.perf_counter() - start

    @contextlib.contextmanager
    def _threads(self) -> Iterator[None]:
        """Run the body with `num_threads` torch threads, then restore the caller's count.

        torch's intra-op thread count is process-wide, not per thread: two threads setting and
        restoring it around their own work would undo each other's setting mid-forward. So
        encodes that change it hold this encoder's lock for the whole body (vLLM pre-processes
        on one worker thread per API-server process, so nothing waits there); other torch work
        in the process still sees the count while an encode runs.
        """
        if self.num_threads is None:
            yield
            return
        with self._encode_lock:
            previous = torch.get_num_threads()
            torch.set_num_threads(self.num_threads)
            try:
                yield
            finally:
                torch.set_num_threads(previous)

    @classmethod
    def threads_from_env(cls, environ: Mapping[str, str] | None = None) -> int | None:
        """The tower's thread count from :attr:`THREADS_ENV` in `environ` (default
        ``os.environ``); None when unset or empty.

        Raises ValueError naming the variable when it is not a positive integer."""
        raw = (os.environ if environ is None else environ).get(cls.THREADS_ENV, "").strip()
        if not raw:
            return None
        try:
            value = int(raw)
        except ValueError:
            value = 0
        if value < 1:
            raise ValueError(f"{cls.THREADS_ENV} must be a positive integer, got {raw!r}")
        return value


# --- The tower's thread count on a CPU (engine option `tower_threads`) -----------------------

#: vLLM's environment variable with the cores its CPU backend keeps out of the engine worker's
#: OpenMP binding (for the engine-core and API-server processes).
RESERVED_CPU_ENV = "VLLM_CPU_NUM_OF_RESERVED_CPU"


def parse_tower_threads(value: object) -> str | int:
    """The canonical `tower_threads` value: ``"auto"`` or a positive integer (``"4"`` -> 4).
    Raises ValueError naming the option."""
    text = value.strip().lower() if isinstance(value, str) else value
    if text == "auto":
        return "auto"
    if isinstance(text, str):
        with contextlib.suppress(ValueError):
            text = int(text)
    if isinstance(text, int) and not isinstance(text, bool) and text >= 1:
        return text
    raise ValueError(f"tower_threads must be 'auto' or a positive integer, got {value!r}")


@dataclass(frozen=True)
class TowerThreads:
    """The tower's torch thread count and why it was chosen.

    Attributes:
        count: threads for every encode (:class:`PruMergeEncoder`'s ``num_threads``), or None
            to keep the caller's (on a GPU, where the tower's arithmetic is not on the CPU).
        setting: the option's value (``auto`` or an integer).
        reason: why, in words (for the start-up log).
    """

    count: int | None
    setting: str | int
    reason: str

    def describe(self) -> str:
        count = "unchanged" if self.count is None else str(self.count)
        return f"{count} (tower_threads={self.setting}: {self.reason})"


def choose_tower_threads(
    setting: object,
    device: str | torch.device,
    *,
    api_servers: int = 1,
    cpus: Iterable[int] | None = None,
    environ: Mapping[str, str] | None = None,
) -> TowerThreads:
    """The tower's thread count for the option `setting` on `device`.

    Precedence: :attr:`PruMergeEncoder.THREADS_ENV` in `environ` (an override, any device), then
    an explicit count, then ``auto``. ``auto``:

    - GPU (any non-CPU device): None, the caller's count is kept; the tower's arithmetic runs on
      the GPU, so the CPU thread count does not matter.
    - CPU: the cores this process may run on (`cpus`, default ``os.sched_getaffinity(0)``)
      shared evenly by the `api_servers` API-server processes (each runs its own tower), at
      least 1. vLLM's CPU backend binds its engine worker's OpenMP threads to all of those cores
      but a few it reserves for the engine-core and API-server processes (by default one per
      local worker, too few to matter for the tower: they are for the scheduler). When the
      front end is what limits throughput the worker idles between short steps, so the tower
      gets every core, which is what stock vLLM's in-engine tower gets too (less the reserved
      core); measurements in benchmarks/RESULTS.md. When the user sets vLLM's
      ``VLLM_CPU_NUM_OF_RESERVED_CPU`` to fewer cores than the process has, they have split the
      machine between the worker and the rest: the towers then share the reserved cores only.

    Raises ValueError for a bad setting or a bad environment value, naming it.
    """
    environ = os.environ if environ is None else environ
    override = PruMergeEncoder.threads_from_env(environ)
    setting = parse_tower_threads(setting)
    if not isinstance(api_servers, int) or isinstance(api_servers, bool) or api_servers < 1:
        raise ValueError(f"api_servers must be a positive integer, got {api_servers!r}")
    if override is not None:
        return TowerThreads(
            override, setting, f"set by {PruMergeEncoder.THREADS_ENV}, which overrides the option"
        )
    if setting != "auto":
        return TowerThreads(setting, setting, "set explicitly")
    kind = torch.device(device).type
    if kind != "cpu":
        return TowerThreads(
            None, setting, f"the tower runs on {kind}; a CPU thread count does not apply"
        )
    allowed = len(set(os.sched_getaffinity(0) if cpus is None else cpus)) or 1
    servers = f"{api_servers} API server{'s' if api_servers > 1 else ''}"
    reserved = _reserved_cpus(environ)
    if reserved is not None and 0 < reserved < allowed:
        count = max(1, reserved // api_servers)
        reason = (
            f"{RESERVED_CPU_ENV}={reserved} of the {allowed} cores this process may run on are "
            f"kept from vLLM's engine worker, shared by {servers}"
        )
    else:
        count = max(1, allowed // api_servers)
        reason = (
            f"the {allowed} core{'s' if allowed > 1 else ''} this process may run on "
            f"(sched_getaffinity), shared by {servers}"
        )
    return TowerThreads(count, setting, reason)


def _reserved_cpus(environ: Mapping[str, str]) -> int | None:
    """vLLM's ``VLLM_CPU_NUM_OF_RESERVED_CPU`` when set to an integer, else None (vLLM's own
    default reservation: one core per local worker)."""
    raw = environ.get(RESERVED_CPU_ENV, "").strip()
    try:
        return int(raw) if raw else None
    except ValueError:
        return None  # vLLM itself refuses it at start-up
