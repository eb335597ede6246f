#!/usr/bin/env bash
# Export a Stable Diffusion pipeline (SD 1.x / 2.x / SDXL, diffusers layout) to the standard
# optimum ONNX layout that deskgen loads:
#
#   OUT_DIR/model_index.json  scheduler/  tokenizer/[tokenizer_2/]
#   OUT_DIR/text_encoder/model.onnx  [text_encoder_2/model.onnx]
#   OUT_DIR/unet/model.onnx  vae_encoder/model.onnx  vae_decoder/model.onnx
#
# Usage:
#   onnx/export_sd.sh MODEL_DIR_OR_ID OUT_DIR [--fp16] [--target cpu|cuda] [--device cpu|cuda]
#                     [--opset N] [--atol X] [--controlnet TYPE=DIR_OR_ID ...]
#   onnx/export_sd.sh --ensure-venv     only create/update the venv
#   onnx/export_sd.sh --find-python     print the Python 3.12 the venv would be made with; no changes
#
#   MODEL_DIR_OR_ID  a local diffusers checkpoint directory or a Hugging Face model id
#                    (e.g. runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-xl-base-1.0;
#                    an id needs network access to the hub and, for gated models, `hf auth login`).
#                    Inpainting checkpoints export the same way, e.g.
#                    stable-diffusion-v1-5/stable-diffusion-inpainting or
#                    diffusers/stable-diffusion-xl-1.0-inpainting-0.1: their UNet takes 9 input
#                    channels (latents, mask, masked-image latents). optimum loads the pipeline class
#                    that model_index.json names (StableDiffusion[XL]InpaintPipeline) whatever
#                    --task says, traces the UNet with unet/config.json's in_channels, and keeps that
#                    class in OUT_DIR/model_index.json, so unet/model.onnx takes `sample`
#                    [batch, 9, h, w]. weights_map.py and optimize_sd.py (--target cuda) make no
#                    assumption about the channel count; onnx/fixtures/tiny-sd15-inpaint is a tiny
#                    9-channel checkpoint exported by this script (see onnx/fixtures/README.md).
#   --fp16           export float16 weights and inputs/outputs (`optimum-cli ... --dtype fp16`;
#                    the UNet timestep becomes a rank-0 float16). Works with the CPU tracer here
#                    (checked on the tiny fixtures), but PyTorch warns that fp16 pipelines are not
#                    meant for CPU: for real checkpoints prefer `--fp16 --device cuda`. optimum's
#                    post-export validation compares against PyTorch with --atol (default 1e-2
#                    for fp16; fp16 rounding alone gives ~3e-3..1.5e-2 differences).
#   --target         cpu (default): the plain graph, which runs on any execution provider.
#                    cuda: the export is then fused for ONNX Runtime's CUDA provider by
#                    onnx/optimize_sd.py (MultiHeadAttention, GroupNorm, BiasSplitGelu, NhwcConv:
#                    operators with CUDA kernels only; UNet steps 2.6x faster on an H200, see
#                    docs/gpu.md). OUT_DIR then holds cpu/ (plain) and cuda/ (fused), and deskgen
#                    loads the one matching --execution-provider. Use with --fp16.
#                    Either way the export folder gets deskgen-export.json, which records per
#                    sub-model the provider its graph needs; deskgen refuses a CUDA-only graph on
#                    the CPU with a clear error.
#   --device         device used for tracing (default cpu).
#   --opset          ONNX opset (default: optimum's choice, 18 for these models).
#   --atol           validation tolerance passed to optimum (default: optimum's, or 1e-2 with --fp16).
#   --controlnet     also export a ControlNet for control type TYPE (repeatable), e.g.
#                    canny=lllyasviel/control_v11p_sd15_canny,
#                    softedge=lllyasviel/control_v11p_sd15_softedge (SD 1.5) or
#                    canny=diffusers/controlnet-canny-sdxl-1.0 (SDXL), into OUT_DIR/controlnet/TYPE/,
#                    and the UNet with residual inputs into OUT_DIR/unet_controlnet/ (fp32, plain
#                    graph; onnx/export_controlnet.py). deskgen loads them with the pipeline.
#
# The tool chain is pinned in onnx/requirements-export.txt and installed into a virtual
# environment at $DESKGEN_EXPORT_VENV (default ~/.cache/deskgen/venv-export), created with
# Python 3.12 ($DESKGEN_PYTHON, else python3.12 on PATH if it runs, else pyenv's 3.12.x). The
# venv is (re)installed whenever requirements-export.txt changes; the first install downloads
# about 3.5 GB (torch with its CUDA libraries) and takes 5-15 minutes.
# (torch from PyPI is the CUDA build, so the same venv serves --device cuda on a GPU machine.)
#
# After the export every tokenizer directory is given a tokenizer.json (fast tokenizer file),
# because the Rust side reads tokenizer/tokenizer.json with the `tokenizers` crate and many
# checkpoints ship only vocab.json + merges.txt.
#
# A model id listed in config/model-defaults.json (SD-Turbo, SDXL-Turbo) also gets
# deskgen-defaults.json: the steps, guidance, scheduler and size it is made for, which requests
# that set none of them get (edit or write the file for any other model).
#
# Then onnx/weights_map.py writes unet/weights_map.json and text_encoder*/weights_map.json: which
# ONNX initializer holds each PyTorch weight, and whether it is stored transposed (the exporter
# renames Linear weights to `onnx::MatMul_N` and transposes them). deskgen needs these maps to merge
# LoRA adapters; a model exported without them serves requests without LoRA only.
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit "${1:-2}"; }

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REQ="$HERE/requirements-export.txt"
VENV="${DESKGEN_EXPORT_VENV:-$HOME/.cache/deskgen/venv-export}"

[[ "${1:-}" == "-h" || "${1:-}" == "--help" ]] && usage 0
[[ "${1:-}" == "--ensure-venv" || "${1:-}" == "--find-python" ]] || [[ $# -ge 2 ]] || usage 2
MODE=export
if [[ "$1" == "--find-python" ]]; then MODE=find; shift; set -- x x "$@"; fi
if [[ "$1" == "--ensure-venv" ]]; then MODE=venv; shift; set -- x x "$@"; fi
MODEL="$1"; OUT="$2"; shift 2
DTYPE=fp32; DEVICE=cpu; TARGET=cpu; OPSET=(); ATOL=(); CONTROLNETS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --fp16) DTYPE=fp16 ;;
    --device) DEVICE="$2"; shift ;;
    --target) TARGET="$2"; shift ;;
    --opset) OPSET=(--opset "$2"); shift ;;
    --atol) ATOL=(--atol "$2"); shift ;;
    --controlnet) CONTROLNETS+=("$2"); shift ;;
    -h|--help) usage 0 ;;
    *) echo "export_sd.sh: unknown argument $1" >&2; usage 2 ;;
  esac
  shift
done

# The first interpreter that really runs and is 3.12: $DESKGEN_PYTHON, python3.12 on PATH (a pyenv
# shim is on PATH even when pyenv has not selected 3.12, so it is run, not just looked up), then
# pyenv's newest installed 3.12.x (under $PYENV_ROOT, `pyenv root` or ~/.pyenv).
find_python() {
  local candidates=() root p
  if [[ -n "${DESKGEN_PYTHON:-}" ]]; then candidates+=("$DESKGEN_PYTHON"); fi
  if p="$(command -v python3.12 2>/dev/null)"; then candidates+=("$p"); fi
  root="${PYENV_ROOT:-}"
  if [[ -z "$root" ]] && command -v pyenv >/dev/null 2>&1; then root="$(pyenv root 2>/dev/null || true)"; fi
  root="${root:-$HOME/.pyenv}"
  while IFS= read -r p; do candidates+=("$p"); done \
    < <(ls -d "$root"/versions/3.12.*/bin/python3.12 2>/dev/null | sort -V -r)
  for p in "${candidates[@]}"; do
    if [[ "$("$p" -c 'import sys; print(sys.version_info[:2] == (3, 12))' 2>/dev/null)" == True ]]; then
      echo "$p"; return
    fi
  done
  {
    echo "export_sd.sh: no working Python 3.12 (tried: ${candidates[*]:-nothing found})."
    echo "  Set DESKGEN_PYTHON=/path/to/python3.12, or \`pyenv install 3.12\` (pyenv's 3.12.x is used"
    echo "  even when it is not the selected version)."
  } >&2
  exit 1
}

ensure_venv() {
  local stamp="$VENV/.deskgen-requirements.sha256" want
  want="$(sha256sum "$REQ" | cut -d' ' -f1)"
  if [[ -x "$VENV/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then return; fi
  if [[ ! -x "$VENV/bin/python" ]]; then
    "$(find_python)" -m venv "$VENV"
  fi
  "$VENV/bin/python" -m pip install --quiet --upgrade pip >&2
  "$VENV/bin/python" -m pip install --quiet -r "$REQ" >&2
  echo "$want" > "$stamp"
}

if [[ "$MODE" == find ]]; then find_python; exit 0; fi
ensure_venv
[[ "$MODE" == venv ]] && exit 0

DEV_ARGS=(--device "$DEVICE")
if [[ "$DTYPE" == fp16 && ${#ATOL[@]} -eq 0 ]]; then ATOL=(--atol 1e-2); fi
if [[ "$DTYPE" == fp16 && "$DEVICE" == cpu ]]; then
  echo "export_sd.sh: note: fp16 export traced on CPU; for real checkpoints prefer --device cuda" >&2
fi

case "$TARGET" in
  cpu) PLAIN="$OUT" ;;
  cuda) PLAIN="$OUT/cpu" ;;
  *) echo "export_sd.sh: --target must be cpu or cuda" >&2; exit 2 ;;
esac
OUT_ROOT="$OUT"; OUT="$PLAIN"
mkdir -p "$OUT"
"$VENV/bin/optimum-cli" export onnx --model "$MODEL" --task text-to-image \
  --dtype "$DTYPE" "${DEV_ARGS[@]}" "${OPSET[@]}" "${ATOL[@]}" "$OUT"

# Make sure every tokenizer directory has a tokenizer.json.
"$VENV/bin/python" - "$OUT" <<'PY'
import sys, pathlib
from transformers import AutoTokenizer
out = pathlib.Path(sys.argv[1])
for d in sorted(out.glob("tokenizer*")):
    if d.is_dir() and not (d / "tokenizer.json").exists():
        tok = AutoTokenizer.from_pretrained(str(d), use_fast=True)
        tok.backend_tokenizer.save(str(d / "tokenizer.json"))
        print(f"export_sd.sh: wrote {d / 'tokenizer.json'}", file=sys.stderr)
PY
if [[ ${#CONTROLNETS[@]} -gt 0 ]]; then
  "$VENV/bin/python" "$HERE/export_controlnet.py" "$MODEL" "$OUT" "${CONTROLNETS[@]}"
fi
MAP_ARGS=()
if [[ "$DTYPE" == fp16 ]]; then MAP_ARGS=(--fp16); fi
"$VENV/bin/python" "$HERE/weights_map.py" "$MODEL" "$OUT" "${MAP_ARGS[@]}"
# The plain graph runs anywhere.
"$VENV/bin/python" - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
models = {d.name: {"execution_provider": "any"} for d in sorted(out.iterdir()) if (d / "model.onnx").is_file()}
(out / "deskgen-export.json").write_text(json.dumps({"target": "cpu", "models": models}, indent=2) + "\n")
PY
if [[ "$TARGET" == cuda ]]; then
  TQDM_DISABLE=1 "$VENV/bin/python" "$HERE/optimize_sd.py" "$PLAIN" "$OUT_ROOT/cuda"
fi
# Few-step models (SD-Turbo, ...) get their steps, guidance, scheduler and size as deskgen's defaults.
"$VENV/bin/python" - "$MODEL" "$HERE/../config/model-defaults.json" "$PLAIN" "$OUT_ROOT/cuda" <<'PY'
import json, pathlib, sys
model, table, *dirs = sys.argv[1:]
defaults = json.loads(pathlib.Path(table).read_text()).get(model)
for d in map(pathlib.Path, dirs):
    if defaults is not None and d.is_dir():
        (d / "deskgen-defaults.json").write_text(json.dumps(defaults, indent=2) + "\n")
        print(f"export_sd.sh: wrote {d / 'deskgen-defaults.json'} (defaults of {model})", file=sys.stderr)
PY
echo "export_sd.sh: exported $MODEL -> $OUT_ROOT ($DTYPE, target $TARGET)" >&2
