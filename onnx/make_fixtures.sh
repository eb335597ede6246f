#!/usr/bin/env bash
# Rebuild every fixture under onnx/fixtures/ (tiny SD 1.x, tiny SDXL, tiny captioner, reference
# tensors, scheduler tables, manifest). Offline; uses the pinned venv of onnx/export_sd.sh.
#
#   onnx/make_fixtures.sh            rebuild in place (then review `git diff --stat onnx/fixtures`)
#   onnx/make_fixtures.sh --verify   rebuild into a temp dir and compare sha256s with
#                                    onnx/fixtures/manifest.fixtures.json (determinism check)
#   onnx/make_fixtures.sh STAGE...   run only some stages (see onnx/make_fixtures.py)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
export PYTHONHASHSEED=0 OMP_NUM_THREADS=2 CUBLAS_WORKSPACE_CONFIG=:4096:8 CUDA_VISIBLE_DEVICES=""

PY="$(bash "$HERE/ensure_venv.sh")"

if [[ "${1:-}" == "--verify" ]]; then
  shift
  TMP="$(mktemp -d)"
  trap 'rm -rf "$TMP"' EXIT
  "$PY" "$HERE/make_fixtures.py" --out "$TMP/fixtures" "$@"
  "$PY" - "$HERE/fixtures/manifest.fixtures.json" "$TMP/fixtures" <<'PY'
import hashlib, json, pathlib, sys
committed = json.load(open(sys.argv[1]))
new = pathlib.Path(sys.argv[2])
bad = 0
for e in committed:
    p = new / e["id"]
    h = hashlib.sha256(p.read_bytes()).hexdigest() if p.exists() else None
    if h != e["sha256"]:
        bad += 1
        print(f"DIFFERS {e['id']}")
print(f"{len(committed) - bad}/{len(committed)} files byte-identical")
sys.exit(1 if bad else 0)
PY
  exit $?
fi
exec "$PY" "$HERE/make_fixtures.py" "$@"
