#!/usr/bin/env bash
# Rebuilds onnx/fixtures/reference/oidv4/ (see onnx/oidv4_reference.py): TensorFlow Lite's own
# outputs of the OIV4 detector as shipped, on three 300x300 inputs. Needs npm and the conversion
# venv of onnx/make_models.sh (run `make models` first).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${DESKGEN_CACHE:-$HOME/.cache/deskgen}/venv-convert
[ -x "$venv/bin/python" ] || { echo "no $venv: run make models first" >&2; exit 1; }
eval "$(grep -E '^(objectron_spec|objectron_sha256|oidv4_tflite_range|oidv4_tflite_sha256|oidv4_labels_range)=' "$root/onnx/make_models.sh")"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "$objectron_spec" >/dev/null)
[ "$(sha256sum "$work"/mediapipe-objectron-*.tgz | cut -d' ' -f1)" = "$objectron_sha256" ] || { echo "tarball sha256 mismatch" >&2; exit 1; }
tar -xzf "$work"/mediapipe-objectron-*.tgz -C "$work" package/objectron_solution_packed_assets.data
for part in "$oidv4_tflite_range oidv4.tflite" "$oidv4_labels_range labels.txt"; do
  read -r range out <<<"$part"
  "$venv/bin/python" -c 'import sys; s, e = map(int, sys.argv[1].split(":")); open(sys.argv[3], "wb").write(open(sys.argv[2], "rb").read()[s:e])' \
    "$range" "$work/package/objectron_solution_packed_assets.data" "$work/$out"
done
[ "$(sha256sum "$work/oidv4.tflite" | cut -d' ' -f1)" = "$oidv4_tflite_sha256" ] || { echo "model sha256 mismatch" >&2; exit 1; }
[ -f "$root/assets/testdata/darknet/dog.jpg" ] || "$root/onnx/fetch_testdata.sh" >&2
TF_CPP_MIN_LOG_LEVEL=2 "$venv/bin/python" "$root/onnx/oidv4_reference.py" "$work/oidv4.tflite" "$work/labels.txt"
