#!/usr/bin/env python3
"""Write `<part>/weights_map.json` for an exported pipeline: PyTorch parameter name -> ONNX initializer.

The ONNX exporter keeps some parameter names (`conv_in.weight`) but turns most Linear weights into
anonymous MatMul constants (`onnx::MatMul_1632`) stored transposed ([in, out]). deskgen merges LoRA
adapters into these initializers at session build, so it needs to know which constant holds which
PyTorch weight and whether it is transposed. The exporter does not record that, so it is recovered
here by value: every weight matrix of a real or random checkpoint is unique, and the exported
constant holds exactly the same numbers (bit for bit), possibly transposed.

Usage: weights_map.py MODEL_DIR_OR_ID OUT_DIR [--fp16]
Called by export_sd.sh after `optimum-cli export onnx` (and after onnx/export_controlnet.py); writes
OUT_DIR/{unet,unet_controlnet,text_encoder,text_encoder_2}/weights_map.json for the parts that exist.

Only weights with two or more dimensions (Linear and Conv, what LoRA targets) are mapped. A weight
whose values are found in no initializer, or in several, is listed under "unmapped" with the reason;
deskgen refuses adapters that target those.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import sys

import numpy as np
import onnx
import torch
from onnx import numpy_helper

FORMAT = "deskgen.weights_map.v1"
PARTS = {
    "unet": ("diffusers", "UNet2DConditionModel"),
    # the UNet exported again with ControlNet residual inputs (onnx/export_controlnet.py)
    "unet_controlnet": ("diffusers", "UNet2DConditionModel"),
    "text_encoder": ("transformers", "CLIPTextModel"),
    "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"),
}


def sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


# the PyTorch weights a part's graph was exported from, when not its own folder
SOURCE = {"unet_controlnet": "unet"}


def load_module(model: str, part: str, dtype: torch.dtype):
    package, cls_name = PARTS[part]
    part = SOURCE.get(part, part)
    cls = getattr(__import__(package), cls_name)
    # diffusers and transformers spell the dtype argument differently
    kwargs = {"torch_dtype" if package == "diffusers" else "dtype": dtype}
    local = pathlib.Path(model)
    if local.is_dir():
        return cls.from_pretrained(str(local / part), **kwargs)
    return cls.from_pretrained(model, subfolder=part, **kwargs)


def map_part(model: str, part_dir: pathlib.Path, part: str, dtype: torch.dtype) -> dict:
    onnx_path = part_dir / "model.onnx"
    graph = onnx.load(str(onnx_path), load_external_data=True).graph
    by_name: dict[str, np.ndarray] = {}
    # value digest -> [(initializer name, transposed)]
    by_value: dict[str, list[tuple[str, bool]]] = {}
    for init in graph.initializer:
        if len(init.dims) < 2:
            continue
        array = numpy_helper.to_array(init)
        by_name[init.name] = array
        by_value.setdefault(digest(array), []).append((init.name, False))
        if array.ndim == 2:
            by_value.setdefault(digest(array.T), []).append((init.name, True))

    module = load_module(model, part, dtype)
    weights, unmapped = {}, {}
    for name, param in module.state_dict().items():
        if param.ndim < 2 or not name.endswith(".weight"):
            continue
        value = param.detach().cpu().numpy()
        same = by_name.get(name)
        if same is not None and same.shape == value.shape and np.array_equal(same, value):
            found = [(name, False)]
        else:
            found = by_value.get(digest(value), [])
            if value.ndim == 2 and len(found) > 1:
                # a square matrix can match itself transposed only if symmetric; keep exact matches
                found = [f for f in found if np.array_equal(by_name[f[0]].T if f[1] else by_name[f[0]], value)]
        if len(found) == 1:
            initializer, transposed = found[0]
            weights[name] = {"initializer": initializer, "transposed": transposed, "shape": list(value.shape)}
        else:
            unmapped[name] = "not found in the ONNX file" if not found else (
                "its values are in several initializers: " + ", ".join(n for n, _ in found)
            )
    return {
        "format": FORMAT,
        "part": part,
        "onnx_file": "model.onnx",
        "onnx_sha256": sha256(onnx_path),
        "dtype": str(dtype).removeprefix("torch."),
        "weights": dict(sorted(weights.items())),
        "unmapped": dict(sorted(unmapped.items())),
    }


def to_json(doc: dict) -> str:
    """Indented JSON with one line per weight, so diffs of a re-export stay readable."""
    lines = []
    for key, value in doc.items():
        if isinstance(value, dict) and value:
            entries = [f"    {json.dumps(k)}: {json.dumps(v)}" for k, v in value.items()]
            lines.append(f"  {json.dumps(key)}: {{\n" + ",\n".join(entries) + "\n  }")
        else:
            lines.append(f"  {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--fp16", action="store_true")
    args = ap.parse_args()
    out = pathlib.Path(args.out)
    dtype = torch.float16 if args.fp16 else torch.float32
    for part in PARTS:
        part_dir = out / part
        if not (part_dir / "model.onnx").is_file():
            continue
        doc = map_part(args.model, part_dir, part, dtype)
        (part_dir / "weights_map.json").write_text(to_json(doc))
        print(
            f"weights_map.py: {part}: {len(doc['weights'])} weights mapped, {len(doc['unmapped'])} unmapped",
            file=sys.stderr,
        )


if __name__ == "__main__":
    main()
