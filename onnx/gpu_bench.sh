#!/usr/bin/env bash
# Measures deskgen's CUDA pipeline against diffusers (PyTorch eager, fp16) on one GPU, on an SD
# 1.5-shaped pipeline with random weights at 512x512.
#
#   onnx/gpu_bench.sh models WORK          export WORK/cpu (plain fp16 ONNX) and WORK/cuda (fused
#                                          for CUDA by optimize_sd.py), WORK/torch for diffusers
#   onnx/gpu_bench.sh measure WORK OUT     time deskgen on WORK/cuda and WORK/cpu (both on CUDA) and
#                                          diffusers on WORK/torch; JSON reports and a summary in OUT
#
# Environment: PYTHON (python3 with torch, transformers, diffusers, onnx, onnxruntime), DESKGEN
# (the deskgen binary built with --features cuda), ORT_DYLIB_PATH (onnxruntime-gpu's core library,
# its provider libraries beside it), LD_LIBRARY_PATH holding CUDA 13 and cuDNN 9, STEPS (30,50),
# RUNS (2).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON=${PYTHON:-python3}
STEPS=${STEPS:-30,50}
RUNS=${RUNS:-2}
mode=${1:?models or measure}
work=${2:?work folder}

if [[ "$mode" == models ]]; then
  rm -f "$work/models.done"
  "$PYTHON" "$HERE/sd15_gpu_bench.py" export "$work" --device cuda --dtype fp16
  TQDM_DISABLE=1 "$PYTHON" "$HERE/optimize_sd.py" "$work/cpu" "$work/cuda"
  touch "$work/models.done"
  exit 0
fi

out=${3:?output folder}
mkdir -p "$out"
for _ in $(seq 1 400); do [[ -f "$work/models.done" ]] && break; sleep 1; done
[[ -f "$work/models.done" ]] || { echo "gpu_bench: models not ready" >&2; exit 1; }

# Peak GPU memory in use while a command runs, over what was in use before, in MiB.
with_memory() {
  local name=$1; shift
  local before; before=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$out/$name.mem" &
  local sampler=$!
  local status=0
  "$@" > "$out/$name.json" 2> "$out/$name.log" || status=$?
  kill "$sampler"; wait "$sampler" 2>/dev/null || true
  local peak; peak=$(sort -n "$out/$name.mem" | tail -1)
  echo "{\"name\": \"$name\", \"status\": $status, \"peak_mib\": $((peak - before))}" > "$out/$name.memory.json"
  echo "gpu_bench: $name exited $status, peak $((peak - before)) MiB over $before MiB" >&2
  tail -3 "$out/$name.log" >&2
}

bench=(bench --execution-provider cuda --scheduler ddim --steps "$STEPS" --runs "$RUNS")
with_memory deskgen-fused "$DESKGEN" "${bench[@]}" --sd-model "$work"
with_memory deskgen-plain "$DESKGEN" "${bench[@]}" --sd-model "$work/cpu"
with_memory diffusers "$PYTHON" "$HERE/sd15_gpu_bench.py" diffusers "$work" --steps ${STEPS//,/ } --runs "$RUNS"
# The fused graph must be refused on the CPU with a clear message.
"$DESKGEN" bench --execution-provider cpu --sd-model "$work/cuda" > /dev/null 2> "$out/refusal.log" || true
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/gpu.csv"

"$PYTHON" - "$out" <<'PY'
import json, pathlib, statistics, sys
out = pathlib.Path(sys.argv[1])
def load(name):
    try:
        return json.loads((out / f"{name}.json").read_text().strip().splitlines()[-1])
    except Exception as e:  # noqa: BLE001 - the summary says what is missing
        return {"error": str(e)}
fused, plain, torch = load("deskgen-fused"), load("deskgen-plain"), load("diffusers")
mem = {n: json.loads((out / f"{n}.memory.json").read_text())["peak_mib"]
       for n in ("deskgen-fused", "deskgen-plain", "diffusers") if (out / f"{n}.memory.json").exists()}
gpu = (out / "gpu.csv").read_text().splitlines()[-1]
lines = [f"GPU: {gpu}", f"diffusers {torch.get('diffusers')} torch {torch.get('torch')}: UNet alone "
         f"{torch.get('unet_step_ms_median')} ms/step, load {torch.get('load_s')} s"]
summary = {"gpu": gpu, "memory_mib": mem, "steps": {}}
for steps in sorted({r["steps"] for r in fused.get("runs", [])}):
    def med(report, key):
        values = [r[key] for r in report.get("runs", []) if r["steps"] == steps]
        return statistics.median(values) if values else float("nan")
    torch_s = torch.get("runs", {}).get(str(steps), {}).get("median_s", float("nan"))
    row = {"deskgen_fused_s": med(fused, "end_to_end_ms") / 1e3, "deskgen_plain_s": med(plain, "end_to_end_ms") / 1e3,
           "diffusers_s": torch_s, "fused_unet_run_step_ms": med(fused, "unet_run_step_ms"),
           "fused_unet_step_ms": med(fused, "unet_step_ms"), "fused_transfer_step_ms": med(fused, "transfer_step_ms"),
           "plain_unet_run_step_ms": med(plain, "unet_run_step_ms")}
    row["ratio_fused"] = row["deskgen_fused_s"] / torch_s
    row["ratio_plain"] = row["deskgen_plain_s"] / torch_s
    summary["steps"][steps] = row
    lines.append(f"{steps} steps: deskgen fused {row['deskgen_fused_s']:.3f} s (UNet run {row['fused_unet_run_step_ms']:.2f} "
                 f"ms/step, step {row['fused_unet_step_ms']:.2f}, copies {row['fused_transfer_step_ms']:.3f}) | plain "
                 f"{row['deskgen_plain_s']:.3f} s (UNet {row['plain_unet_run_step_ms']:.2f} ms/step) | diffusers "
                 f"{torch_s:.3f} s | ratio fused {row['ratio_fused']:.3f}, plain {row['ratio_plain']:.3f}")
lines.append(f"peak GPU memory MiB: {mem}; deskgen load {fused.get('load_ms')} ms, warm-up {fused.get('warm_up_ms')} ms")
(out / "summary.json").write_text(json.dumps(summary, indent=1))
print("\n".join(lines))
PY
