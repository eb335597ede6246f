#!/usr/bin/env python3
"""Fuse a Stable Diffusion ONNX export for ONNX Runtime's CUDA execution provider.

    optimize_sd.py SRC_DIR DST_DIR [--cpu-safe]

SRC_DIR is a pipeline in optimum's layout (model_index.json, scheduler/, tokenizer/, text_encoder/,
unet/, vae_decoder/, [vae_encoder/]). DST_DIR receives the same layout with every sub-model run
through onnxruntime.transformers' optimizer (model types clip, unet and vae: fused
MultiHeadAttention, GroupNorm, BiasSplitGelu, BiasAdd, NhwcConv, ...), which is what ONNX
Runtime's own Stable Diffusion tooling does. Most of those fused operators exist only as CUDA
kernels, so the result is a CUDA-only pipeline: keep the plain export for the CPU.

DST_DIR/deskgen-export.json records, per sub-model, which execution provider the graph needs
("cuda" when a CUDA-only operator is in it, else "any"); deskgen reads it to refuse a CUDA-only
graph on the CPU. --cpu-safe keeps only fusions that have CPU kernels too (for checking numerics on
a machine without a GPU).

Only graph rewriting in Python (opt_level 0), so the CPU build of onnxruntime is enough.
Prints one JSON object per sub-model and writes the manifest.
"""
import json
import os
import shutil
import sys
import time

import numpy as np
import onnx
from onnx import helper, numpy_helper

# Operators that ONNX Runtime implements only for CUDA (com.microsoft domain).
CUDA_ONLY_OPS = {
    "GroupNorm", "SkipGroupNorm", "NhwcConv", "BiasSplitGelu", "BiasAdd", "BiasGelu_cuda_only",
    "MultiHeadAttention_packed", "PackedAttention", "PackedMultiHeadAttention",
}
# MultiHeadAttention has a CPU kernel, but not for float16 inputs or packed QKV/KV layouts.
HALF_CUDA_ONLY_OPS = {"MultiHeadAttention"}
SUB_MODELS = {"text_encoder": "clip", "text_encoder_2": "clip", "unet": "unet", "vae_decoder": "vae",
              "vae_encoder": "vae"}


def patch_optimizer():
    """Three fixes the fusions need for graphs exported by torch >= 2.9 (see the functions below)."""
    # Importing the optimizer first loads the fusions under their top-level names too, which is
    # what the model classes use: both copies get patched.
    import onnxruntime.transformers.optimizer  # noqa: F401
    from onnxruntime.transformers import fusion_attention_unet, fusion_base

    # The GroupNorm fusion writes gamma/beta as FLOAT from the graph's weights; on a float16 graph those
    # are float16 arrays whose raw bytes onnx rejects. Cast such values to the declared type.
    # (onnxruntime.transformers puts its folder on sys.path, so the fusions also import `fusion_base`.)
    def cast_initializer(original):
        def add_initializer(self, name, data_type, dims, vals, raw=True):
            if isinstance(vals, np.ndarray):
                wanted = helper.tensor_dtype_to_np_dtype(data_type)
                if vals.dtype != wanted:
                    vals = vals.astype(wanted)
            return original(self, name, data_type, dims, vals, raw)
        return add_initializer

    seen = set()
    for module in (fusion_base, sys.modules.get("fusion_base")):
        if module is not None and id(module.Fusion) not in seen:
            module.Fusion.add_initializer = cast_initializer(module.Fusion.add_initializer)
            seen.add(id(module.Fusion))

    # torch >= 2.9 puts Cast nodes into the SDPA scale path sqrt(1/sqrt(head_size)), which
    # FusionAttentionUnet.match_qkv_torch2 expects without them: accept those variants too (the fused
    # operator recomputes the same default scale).
    scale_paths = [
        (["Sqrt", "Div", "Sqrt", "Cast", "Slice", "Shape", "Transpose", "Reshape"], [None, 0, 1, 0, 0, 0, 0, 0]),
        (["Sqrt", "Cast", "Div", "Sqrt", "Cast", "Slice", "Shape", "Transpose", "Reshape"],
         [None, 0, 0, 1, 0, 0, 0, 0, 0]),
        (["Sqrt", "Cast", "Div", "Cast", "Sqrt", "Cast", "Slice", "Shape", "Transpose", "Reshape"],
         [None, 0, 0, 1, 0, 0, 0, 0, 0, 0]),
        (["Sqrt", "Div", "Cast", "Sqrt", "Cast", "Slice", "Shape", "Transpose", "Reshape"],
         [None, 0, 1, 0, 0, 0, 0, 0, 0]),
    ]

    def match_qkv_torch2(self, root_input, skip_add):
        another_input = 1 if skip_add.input[0] == root_input else 0
        parents = self.model.match_parent_path
        qkv = parents(skip_add, ["Add", "MatMul", "Reshape", "Transpose", "MatMul"], [another_input, None, None, 0, 0])
        if qkv is None:
            return None
        _, _, reshape_qkv, transpose_qkv, matmul_qkv = qkv
        v_path = parents(matmul_qkv, ["Transpose", "Reshape", "MatMul"], [1, 0, 0])
        qk_path = parents(matmul_qkv, ["Softmax", "MatMul"], [0, 0])
        if v_path is None or qk_path is None:
            return None
        matmul_qk = qk_path[-1]
        q_path = parents(matmul_qk, ["Mul", "Transpose", "Reshape", "MatMul"], [0, None, 0, 0])
        k_path = parents(matmul_qk, ["Mul", "Transpose", "Reshape", "MatMul"], [1, None, 0, 0])
        if q_path is None or k_path is None:
            return None
        mul_q, _, reshape_q, matmul_q = q_path
        for types, indices in scale_paths:
            path = parents(mul_q, types, indices)
            if path is not None and path[-1] == reshape_q:
                # With static shapes the head count is read from the constant [B, S, heads, head_dim].
                shape = self.model.get_constant_value(reshape_q.input[1])
                is_torch2 = not (isinstance(shape, np.ndarray) and list(shape.shape) == [4])
                return is_torch2, reshape_qkv, transpose_qkv, reshape_q, matmul_q, k_path[-1], v_path[-1]
        return None

    for module in {id(m): m for m in (fusion_attention_unet, sys.modules.get("fusion_attention_unet")) if m}.values():
        module.FusionAttentionUnet.match_qkv_torch2 = match_qkv_torch2


def bypass_noops(model):
    """Removes two no-op nodes diffusers' attention leaves between the patterns the fusions match:
    Cast(to the model's type) after the attention output's Reshape, and Div by 1.0
    (rescale_output_factor) after to_out."""
    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    constants = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}
    producer = {o: n for n in graph.node for o in n.output}
    graph_outputs = {o.name for o in graph.output}
    float_type = next((i.type.tensor_type.elem_type for i in graph.input
                       if i.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)),
                      onnx.TensorProto.FLOAT)

    def constant(name):
        if name in initializers:
            return numpy_helper.to_array(initializers[name])
        node = constants.get(name)
        for attribute in node.attribute if node is not None else []:
            if attribute.name == "value":
                return numpy_helper.to_array(attribute.t)
        return None

    def is_attention_output(node):
        for op in ["Reshape", "Transpose", "MatMul", "Softmax"]:
            if node is None or node.op_type != op:
                return False
            node = producer.get(node.input[0]) if op != "Softmax" else node
        return True

    replaced, dropped = {}, set()
    for node in graph.node:
        if node.output[0] in graph_outputs:
            continue
        if node.op_type == "Div" and len(node.input) == 2:
            value = constant(node.input[1])
            if value is not None and value.size == 1 and float(value.reshape(-1)[0]) == 1.0:
                replaced[node.output[0]] = node.input[0]
                dropped.add(id(node))
        elif node.op_type == "Cast":
            to = next((a.i for a in node.attribute if a.name == "to"), None)
            if to == float_type and is_attention_output(producer.get(node.input[0])):
                replaced[node.output[0]] = node.input[0]
                dropped.add(id(node))

    def resolve(name):
        while name in replaced:
            name = replaced[name]
        return name

    kept = [n for n in graph.node if id(n) not in dropped]
    for node in kept:
        for i, name in enumerate(node.input):
            node.input[i] = resolve(name)
    del graph.node[:]
    graph.node.extend(kept)
    return len(dropped)


def needs_cuda(graph, half):
    ops = {n.op_type for n in graph.node if n.domain == "com.microsoft"}
    return bool(ops & CUDA_ONLY_OPS or (half and ops & HALF_CUDA_ONLY_OPS))


def optimize(src, dst, model_type, cpu_safe):
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    started = time.time()
    result = {"model": os.path.basename(os.path.dirname(dst)), "model_type": model_type}
    model = onnx.load(src)
    half = any(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 for i in model.graph.input) or any(
        o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 for o in model.graph.output)
    result["noop_nodes_bypassed"] = bypass_noops(model)
    optimized = None
    for attempt in ("all fusions", "without GroupNorm"):
        options = FusionOptions(model_type)
        if cpu_safe:
            for flag in ("enable_group_norm", "enable_skip_group_norm", "enable_nhwc_conv", "enable_bias_splitgelu",
                         "enable_packed_qkv", "enable_packed_kv", "enable_bias_add"):
                setattr(options, flag, False)
        if attempt != "all fusions":
            options.enable_group_norm = False
            options.enable_skip_group_norm = False
            model = onnx.load(src)  # the failed attempt may have rewritten the graph in place
            bypass_noops(model)
        try:
            optimized = optimize_model(model, model_type=model_type, num_heads=0, hidden_size=0, opt_level=0,
                                       optimization_options=options, use_gpu=not cpu_safe)
            result["fusions"] = attempt
            break
        except Exception as e:  # noqa: BLE001 - the next attempt or the plain graph follows
            result.setdefault("errors", {})[attempt] = f"{type(e).__name__}: {str(e)[:300]}"
    if optimized is None:
        shutil.copyfile(src, dst)
        result["fusions"] = "none (plain graph kept)"
        graph = onnx.load(src).graph
    else:
        optimized.save_model_to_file(dst, use_external_data_format=os.path.getsize(src) > 1.8e9)
        graph = optimized.model.graph
    ops = {}
    for node in graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    result["nodes"] = len(graph.node)
    result["fused_ops"] = {op: n for op, n in sorted(ops.items()) if op in CUDA_ONLY_OPS | HALF_CUDA_ONLY_OPS
                           | {"Attention", "SkipLayerNormalization", "LayerNormalization", "FastGelu", "QuickGelu"}}
    result["execution_provider"] = "cuda" if needs_cuda(graph, half) else "any"
    result["seconds"] = round(time.time() - started, 1)
    return result


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if len(args) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    src, dst = args
    cpu_safe = "--cpu-safe" in sys.argv
    patch_optimizer()
    os.makedirs(dst, exist_ok=True)
    # Configs, scheduler and tokenizers are copied as they are.
    for entry in os.listdir(src):
        path = os.path.join(src, entry)
        if os.path.isfile(path) and entry != "deskgen-export.json":
            shutil.copyfile(path, os.path.join(dst, entry))
        elif os.path.isdir(path) and entry not in SUB_MODELS:
            shutil.copytree(path, os.path.join(dst, entry), dirs_exist_ok=True)
    manifest = {"target": "cpu" if cpu_safe else "cuda", "optimizer": "onnxruntime.transformers", "models": {}}
    failed = False
    for sub, model_type in SUB_MODELS.items():
        model_path = os.path.join(src, sub, "model.onnx")
        if not os.path.isfile(model_path):
            continue
        os.makedirs(os.path.join(dst, sub), exist_ok=True)
        for entry in os.listdir(os.path.join(src, sub)):
            # weights_map.json names the plain graph's initializers, which fusion renames or packs:
            # LoRA adapters are merged into the plain export only.
            if entry.endswith(".json") and entry != "weights_map.json":
                shutil.copyfile(os.path.join(src, sub, entry), os.path.join(dst, sub, entry))
        try:
            result = optimize(model_path, os.path.join(dst, sub, "model.onnx"), model_type, cpu_safe)
        except Exception as e:  # noqa: BLE001 - reported, and the run fails below
            result = {"model": sub, "error": f"{type(e).__name__}: {str(e)[:500]}"}
            failed = True
        print(json.dumps(result), flush=True)
        manifest["models"][sub] = {k: result.get(k) for k in ("execution_provider", "fusions", "fused_ops")}
    with open(os.path.join(dst, "deskgen-export.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
