"""Reference outputs of the Open Images v4 detector (MediaPipe's SSD-MobileNetV2 OIV4, fp16 TFLite)
for tests/vision.rs: what TensorFlow Lite itself computes, so that the ONNX conversion and the
Rust decoding are checked against the model as shipped.

    onnx/make_oidv4_reference.sh        (runs this in the conversion venv of onnx/make_models.sh)

Writes onnx/fixtures/reference/oidv4/:
  input_<name>.png   300x300 RGB, the exact model input (before scaling to [-1, 1]): darknet's
                     dog.jpg and person.jpg resized with PIL's bilinear filter, and a composition
                     (dog.jpg's left half beside person.jpg's right half)
  cases.json         per input: the raw outputs of the TFLite model at a set of anchors (the 48
                     with the highest class logit, and every 24th), and the detections MediaPipe's
                     settings decode from the full outputs (anchors, box decoding, sigmoid scores
                     >= 0.5, greedy IoU suppression at 0.5 over all classes, at most 100)
"""
from __future__ import annotations

import hashlib
import json
import math
import pathlib
import sys

import numpy as np
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "onnx/fixtures/reference/oidv4"
PHOTOS = ROOT / "assets/testdata/darknet"

# MediaPipe's ObjectDetectionOidV4Subgraph, as its binary graph in @mediapipe/objectron's wasm has it.
ANCHORS = dict(
    num_layers=6, min_scale=0.2, max_scale=0.95, input_size=300, anchor_offset=0.5,
    strides=[16, 32, 64, 128, 256, 512], aspect_ratios=[1.0, 2.0, 0.5, 3.0, 0.3333],
    reduce_boxes_in_lowest_layer=True, interpolated_scale_aspect_ratio=1.0,
)
DECODE = dict(x_scale=10.0, y_scale=10.0, w_scale=5.0, h_scale=5.0, min_score=0.5, iou=0.5, max_detections=100)


def scale(min_scale, max_scale, index, count):
    return (min_scale + max_scale) / 2 if count == 1 else min_scale + (max_scale - min_scale) * index / (count - 1)


def ssd_anchors(o=ANCHORS):
    """MediaPipe's SsdAnchorsCalculator: (y_center, x_center, h, w) per anchor."""
    anchors, layer, strides = [], 0, o["strides"]
    while layer < o["num_layers"]:
        heights, widths, ratios, scales = [], [], [], []
        last = layer
        while last < len(strides) and strides[last] == strides[layer]:
            s = scale(o["min_scale"], o["max_scale"], last, len(strides))
            if last == 0 and o["reduce_boxes_in_lowest_layer"]:
                ratios += [1.0, 2.0, 0.5]
                scales += [0.1, s, s]
            else:
                for r in o["aspect_ratios"]:
                    ratios.append(r)
                    scales.append(s)
                if o["interpolated_scale_aspect_ratio"] > 0:
                    nxt = 1.0 if last == len(strides) - 1 else scale(o["min_scale"], o["max_scale"], last + 1, len(strides))
                    scales.append(math.sqrt(s * nxt))
                    ratios.append(o["interpolated_scale_aspect_ratio"])
            last += 1
        for r, s in zip(ratios, scales):
            heights.append(s / math.sqrt(r))
            widths.append(s * math.sqrt(r))
        side = math.ceil(o["input_size"] / strides[layer])
        for y in range(side):
            for x in range(side):
                for h, w in zip(heights, widths):
                    anchors.append(((y + o["anchor_offset"]) / side, (x + o["anchor_offset"]) / side, h, w))
        layer = last
    return np.array(anchors, dtype=np.float32)


def decode(boxes, logits, anchors, labels):
    d = DECODE
    yc = boxes[:, 0] / d["y_scale"] * anchors[:, 2] + anchors[:, 0]
    xc = boxes[:, 1] / d["x_scale"] * anchors[:, 3] + anchors[:, 1]
    h = np.exp(boxes[:, 2] / d["h_scale"]) * anchors[:, 2]
    w = np.exp(boxes[:, 3] / d["w_scale"]) * anchors[:, 3]
    scores = 1 / (1 + np.exp(-logits[:, 1:].astype(np.float64)))
    cls = scores.argmax(1)
    best = scores.max(1)
    order = [i for i in np.argsort(-best, kind="stable") if best[i] >= d["min_score"]]
    kept = []
    for i in order:
        box = (xc[i] - w[i] / 2, yc[i] - h[i] / 2, xc[i] + w[i] / 2, yc[i] + h[i] / 2)
        if all(iou(box, k["box"]) <= d["iou"] for k in kept):
            kept.append({"anchor": int(i), "label": labels[1 + cls[i]], "score": float(best[i]),
                         "box": [float(v) for v in box]})
        if len(kept) == d["max_detections"]:
            break
    return kept


def iou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def inputs():
    dog = Image.open(PHOTOS / "dog.jpg").convert("RGB")
    person = Image.open(PHOTOS / "person.jpg").convert("RGB")
    pair = Image.new("RGB", (600, 300))
    pair.paste(dog.resize((600, 300), Image.BILINEAR).crop((0, 0, 300, 300)), (0, 0))
    pair.paste(person.resize((600, 300), Image.BILINEAR).crop((300, 0, 600, 300)), (300, 0))
    return {
        "dog": dog.resize((300, 300), Image.BILINEAR),
        "person": person.resize((300, 300), Image.BILINEAR),
        "pair": pair.resize((300, 300), Image.BILINEAR),
    }


def main(model: str, labels_file: str) -> None:
    import tensorflow as tf

    labels = pathlib.Path(labels_file).read_text().split("\n")
    interpreter = tf.lite.Interpreter(model_path=model)
    interpreter.allocate_tensors()
    (inp,) = interpreter.get_input_details()
    outs = {o["name"]: o["index"] for o in interpreter.get_output_details()}
    anchors = ssd_anchors()
    OUT.mkdir(parents=True, exist_ok=True)
    cases = []
    for name, image in inputs().items():
        path = OUT / f"input_{name}.png"
        image.save(path, optimize=False)
        pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
        interpreter.set_tensor(inp["index"], (pixels / 127.5 - 1.0)[None])
        interpreter.invoke()
        boxes = interpreter.get_tensor(outs["raw_outputs/box_encodings"])[0]
        logits = interpreter.get_tensor(outs["raw_outputs/class_predictions"])[0]
        strongest = np.argsort(-logits[:, 1:].max(1), kind="stable")[:48]
        picked = sorted(set(int(i) for i in strongest) | set(range(0, len(anchors), 24)))
        cases.append({
            "name": name,
            "input": str(path.relative_to(ROOT)),
            "anchors": picked,
            "box_encodings": [[float(v) for v in boxes[i]] for i in picked],
            "class_predictions": [[float(v) for v in logits[i]] for i in picked],
            "detections": decode(boxes, logits, anchors, labels),
        })
        print(f"oidv4 reference: {name}: {[(d['label'], round(d['score'], 3)) for d in cases[-1]['detections']]}",
              file=sys.stderr)
    doc = {
        "conventions": (
            "TensorFlow Lite " + tf.__version__ + " on object_detection_ssd_mobilenetv2_oidv4_fp16.tflite "
            "(sha256 " + hashlib.sha256(pathlib.Path(model).read_bytes()).hexdigest() + "), input "
            "[1,300,300,3] = input png / 127.5 - 1. Raw outputs at the listed anchors; detections decoded "
            "with MediaPipe's settings (anchors " + json.dumps(ANCHORS) + ", decoding " + json.dumps(DECODE) +
            "): box encodings (y, x, h, w) over anchors (y, x, h, w), y/10, x/10, exp(h/5), exp(w/5); "
            "sigmoid of the logits, class 0 (background) ignored; greedy suppression over all classes. "
            "box = [x_min, y_min, x_max, y_max] normalised."
        ),
        "anchor_count": int(len(anchors)),
        "first_anchors": [[float(v) for v in a] for a in anchors[:4]],
        "last_anchors": [[float(v) for v in a] for a in anchors[-2:]],
        "cases": cases,
    }
    (OUT / "cases.json").write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:3])
