#!/usr/bin/env bash
# Rebuilds onnx/fixtures/reference/ocr/ (see onnx/ocr_reference.py): rapidocr-onnxruntime's own
# reading of images with rendered text, on the very PP-OCRv4 files `make models` links (the
# wheel's, sha256-checked by onnx/make_models.sh). Its venv lives beside the other caches.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cache=${DESKGEN_CACHE:-$HOME/.cache/deskgen}
venv=$cache/venv-ocr
tools=(rapidocr-onnxruntime==1.4.4 onnxruntime==1.31.1 opencv-python==5.1.0.95 numpy==2.4.6
  pillow==13.0.0 shapely==2.2.0 pyclipper==1.4.0 PyYAML==6.0.4)
stamp=$venv/.deskgen-tools
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "${tools[*]}" ]; then
  rm -rf "$venv"
  "${DESKGEN_CONVERT_PYTHON:-python3}" -m venv "$venv"
  "$venv/bin/pip" install --quiet "${tools[@]}"
  echo "${tools[*]}" >"$stamp"
fi
for file in ocr_det.onnx ocr_cls.onnx ocr_rec.onnx; do
  [ -f "$root/assets/models/$file" ] || { echo "no assets/models/$file: run make models first" >&2; exit 1; }
done
[ -f "$root/assets/testdata/darknet/dog.jpg" ] || "$root/onnx/fetch_testdata.sh" >&2
"$venv/bin/python" "$root/onnx/ocr_reference.py" "$root/assets/models"
