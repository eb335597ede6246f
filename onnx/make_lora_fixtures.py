"""LoRA fixtures: tiny adapters for the tiny SD 1.x pipeline and the diffusers reference they must match.

Used by make_fixtures.py (stages `loras` and `lora-ref`); see onnx/fixtures/README.md.

Adapters (onnx/loras/, trained on nothing: seeded random weights, so only the numerics matter):
  minimal-desk.safetensors  diffusers/peft format (`unet.….lora_A.weight`, `text_encoder.….lora_B.weight`),
                            rank 4, lora_alpha 8 (scale 2) on the UNet attention projections, rank 4,
                            lora_alpha 4 on the text encoder's attention projections; the peft
                            LoraConfig is in the safetensors metadata (`lora_adapter_metadata`), as
                            diffusers' save_lora_weights writes it. Trigger words: minimal-desk.json.
  cozy-desk.safetensors     kohya format (`lora_unet_…` / `lora_te_…`, `lora_down` / `lora_up`,
                            `.alpha`), rank 2, alpha 1 (scale 0.5): UNet proj_in (1×1 conv), a 3×3
                            resnet conv (LoCon), ff.net.2, cross-attention to_k / to_v; text encoder
                            MLP fc1 / fc2. Trigger words: cozy-desk.txt.

Reference (onnx/fixtures/reference/lora/): for each case, the PyTorch checkpoint the tiny-sd15 export was
made from gets the adapters through diffusers (`load_lora_weights`, `set_adapters`,
`fuse_lora(lora_scale=w)`, `unload_lora_weights`), is saved, exported with onnx/export_sd.sh and run
by optimum's ORTStableDiffusionPipeline exactly like the `sd15/txt2img_euler` case (same prompt, noise,
4 steps, 64×64).
"""
from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import torch

# case id -> [(adapter, weight)]; the fuse scale is 1 for stacks (the weights go to set_adapters)
LORA_CASES = {
    "minimal_w0.5": [("minimal-desk", 0.5)],
    "minimal_w1.0": [("minimal-desk", 1.0)],
    "stacked_minimal1.0_cozy0.5": [("minimal-desk", 1.0), ("cozy-desk", 0.5)],
}

MINIMAL_UNET = ["to_q", "to_k", "to_v", "to_out.0"]
MINIMAL_TE = ["q_proj", "k_proj", "v_proj", "out_proj"]
COZY_UNET = [
    "down_blocks.1.attentions.0.proj_in",
    "down_blocks.1.resnets.0.conv1",
    "mid_block.attentions.0.transformer_blocks.0.ff.net.2",
    "up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k",
    "up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_v",
]
COZY_TE = ["mlp.fc1", "mlp.fc2"]


def _randomize(model, seed: int, std: float) -> None:
    """peft starts lora_B at zero (an adapter that does nothing); give A and B seeded random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def _peft_adapter(model, targets, rank: int, alpha: float, seed: int):
    from peft import LoraConfig, get_peft_model_state_dict

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=True)
    model.add_adapter(config, adapter_name="fixture")
    _randomize(model, seed, 0.1)
    state = get_peft_model_state_dict(model, adapter_name="fixture")
    # reproducible metadata: no temp path, targets in a fixed order (peft keeps them in a set)
    meta = dict(config.to_dict(), base_model_name_or_path=None, target_modules=sorted(targets))
    return {k: v.detach().clone().contiguous() for k, v in state.items()}, meta


def _rewrite_sorted(path: pathlib.Path) -> None:
    """Rewrite a safetensors file with tensors and metadata in sorted order (same content).

    The safetensors writer orders the header by hash, so the bytes of two runs differ; this keeps
    the committed files byte-reproducible.
    """
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        metadata = dict(sorted((f.metadata() or {}).items()))
        tensors = {k: f.get_tensor(k).contiguous() for k in sorted(f.keys())}
    dtypes = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
    header, blobs, offset = {"__metadata__": metadata}, [], 0
    for key, t in tensors.items():
        blob = t.numpy().tobytes()
        header[key] = {"dtype": dtypes[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(blobs))


def build_adapters(ckpt: pathlib.Path, loras_out: pathlib.Path) -> None:
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    if loras_out.exists():
        shutil.rmtree(loras_out)
    loras_out.mkdir(parents=True)

    # minimal-desk: diffusers' own format, through save_lora_weights
    unet = UNet2DConditionModel.from_pretrained(str(ckpt / "unet"))
    text_encoder = CLIPTextModel.from_pretrained(str(ckpt / "text_encoder"))
    unet_state, unet_cfg = _peft_adapter(unet, MINIMAL_UNET, 4, 8, seed=11)
    te_state, te_cfg = _peft_adapter(text_encoder, MINIMAL_TE, 4, 4, seed=12)
    StableDiffusionPipeline.save_lora_weights(
        str(loras_out),
        unet_lora_layers=unet_state,
        text_encoder_lora_layers=te_state,
        weight_name="minimal-desk.safetensors",
        unet_lora_adapter_metadata=unet_cfg,
        text_encoder_lora_adapter_metadata=te_cfg,
    )
    (loras_out / "minimal-desk.json").write_text(
        json.dumps({"trigger_words": ["minimal desk", "clean lines"]}, indent=2) + "\n"
    )

    # cozy-desk: kohya's format, converted by hand from peft's (lora_A -> lora_down, lora_B -> lora_up)
    unet = UNet2DConditionModel.from_pretrained(str(ckpt / "unet"))
    text_encoder = CLIPTextModel.from_pretrained(str(ckpt / "text_encoder"))
    rank, alpha = 2, 1.0
    unet_state, _ = _peft_adapter(unet, COZY_UNET, rank, alpha, seed=21)
    te_state, _ = _peft_adapter(text_encoder, COZY_TE, rank, alpha, seed=22)
    kohya = {}
    for prefix, state in (("lora_unet_", unet_state), ("lora_te_", te_state)):
        for key, value in state.items():
            module, kind = key.rsplit(".lora_", 1)
            name = prefix + module.replace(".", "_")
            kohya[f"{name}.{'lora_down' if kind.startswith('A') else 'lora_up'}.weight"] = value
            kohya[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(
        dict(sorted(kohya.items())),
        str(loras_out / "cozy-desk.safetensors"),
        metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(rank),
                  "ss_network_alpha": str(alpha), "ss_base_model_version": "sd_v1"},
    )
    (loras_out / "cozy-desk.txt").write_text("cozy desk, warm light\n")
    for p in sorted(loras_out.iterdir()):
        if p.suffix == ".safetensors":
            _rewrite_sorted(p)
        p.chmod(0o644)  # safetensors writes through a private temp file
        print(f"loras: {p.name} {p.stat().st_size} bytes", file=sys.stderr)


def _fused_checkpoint(ckpt: pathlib.Path, loras: pathlib.Path, adapters, out: pathlib.Path) -> dict:
    """The base checkpoint with `adapters` fused by diffusers, saved to `out`; returns the max abs
    difference between diffusers' fused weights and W + w·(alpha/rank)·(B·A) computed here, per part."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(ckpt))
    base = {part: {k: v.clone() for k, v in getattr(pipe, part).state_dict().items()} for part in ("unet", "text_encoder")}
    names = []
    for name, _ in adapters:
        pipe.load_lora_weights(str(loras), weight_name=f"{name}.safetensors", adapter_name=name)
        names.append(name)
    pipe.set_adapters(names, adapter_weights=[w for _, w in adapters])
    pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=1.0, adapter_names=names)
    pipe.unload_lora_weights()
    expected = {part: {k: v.clone() for k, v in sd.items()} for part, sd in base.items()}
    for name, weight in adapters:
        for (part, module), (a, b, scale) in _read_adapter(loras / f"{name}.safetensors").items():
            key = f"{module}.weight"
            w = expected[part][key]
            delta = (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)).reshape(w.shape)
            expected[part][key] = w + weight * scale * delta
    check = {}
    for part in expected:
        fused = getattr(pipe, part).state_dict()
        check[part] = max(float((fused[k] - v).abs().max()) for k, v in expected[part].items())
    if out.exists():
        shutil.rmtree(out)
    pipe.save_pretrained(str(out), safe_serialization=True)
    return check


def _read_adapter(path: pathlib.Path) -> dict:
    """{(part, module): (A, B, alpha / rank)} from either fixture format, independently of diffusers."""
    from safetensors import safe_open

    out = {}
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        meta = f.metadata() or {}
        if any(k.startswith("lora_unet_") or k.startswith("lora_te_") for k in keys):
            lookup = _kohya_lookup()
            for k in sorted(keys):
                if k.endswith(".lora_down.weight"):
                    name = k[: -len(".lora_down.weight")]
                    a, b = f.get_tensor(k), f.get_tensor(f"{name}.lora_up.weight")
                    alpha = float(f.get_tensor(f"{name}.alpha"))
                    out[lookup[name]] = (a, b, alpha / a.shape[0])
        else:
            configs = json.loads(meta["lora_adapter_metadata"])
            for k in sorted(keys):
                if k.endswith(".lora_A.weight"):
                    part, module = k[: -len(".lora_A.weight")].split(".", 1)
                    a, b = f.get_tensor(k), f.get_tensor(k.replace("lora_A", "lora_B"))
                    alpha = configs[f"{part}.lora_alpha"]
                    out[(part, module)] = (a, b, alpha / a.shape[0])
    return out


def _kohya_lookup() -> dict:
    names = {}
    for module in COZY_UNET:
        names["lora_unet_" + module.replace(".", "_")] = ("unet", module)
    for layer in range(2):
        for t in COZY_TE:
            module = f"text_model.encoder.layers.{layer}.{t}"
            names["lora_te_" + module.replace(".", "_")] = ("text_encoder", module)
    return names


def lora_reference(ckpt: pathlib.Path, loras: pathlib.Path, ref_root: pathlib.Path, work: pathlib.Path, helpers) -> dict:
    """Reference tensors for every LORA_CASES entry; `helpers` is make_fixtures' module."""
    outdir = ref_root / "lora"
    if outdir.exists():
        shutil.rmtree(outdir)
    outdir.mkdir(parents=True)
    noise = torch.from_numpy(np.load(ref_root / "sd15" / "noise.npy"))
    cases, fuse_checks = [], {}
    for cid, adapters in LORA_CASES.items():
        fused = work / f"ckpt-sd15-{cid}"
        fuse_checks[cid] = _fused_checkpoint(ckpt, loras, adapters, fused)
        exported = work / f"onnx-sd15-{cid}"
        if exported.exists():
            shutil.rmtree(exported)
        subprocess.run(["bash", str(helpers.ONNX_DIR / "export_sd.sh"), str(fused), str(exported)], check=True)
        pipes = helpers.load_pipes("sd15", exported)
        rec, sched, images = helpers.run_case("sd15", "txt2img", "euler", pipes, noise, None)
        cdir = outdir / cid
        files = {
            "prompt_embeds": helpers.save_npy(cdir / "prompt_embeds.npy", rec["unet_encoder_hidden_states"][0]),
            "unet_out": helpers.save_npy(cdir / "unet_out.npy", helpers.stack(rec, "unet_out")),
            "final_latents": helpers.save_npy(cdir / "final_latents.npy", rec["step_prev_sample"][-1]),
            "image": helpers.save_npy(cdir / "image.npy", images),
        }
        cases.append({
            "id": f"lora/{cid}",
            "base_case": "sd15/txt2img_euler",
            "model_dir": helpers.rel(helpers.FIXTURES["out"] / "tiny-sd15"),
            "loras": [{"name": n, "weight": w} for n, w in adapters],
            "scheduler": "euler",
            "prompt": helpers.PROMPT,
            "negative_prompt": helpers.NEGATIVE,
            "guidance_scale": helpers.GUIDANCE,
            "num_inference_steps": helpers.STEPS,
            "height": helpers.HEIGHT,
            "width": helpers.WIDTH,
            "noise": helpers.rel(ref_root / "sd15" / "noise.npy"),
            "timesteps": np.asarray(sched.timesteps).tolist(),
            "files": {k: helpers.rel(cdir / v) for k, v in files.items()},
        })
        print(f"reference: lora/{cid} image mean {images.mean():.6f}", file=sys.stderr)
    doc = {
        "description": (
            "Stable Diffusion with LoRA adapters fused by diffusers 0.39.0 + peft 0.18.0 "
            "(load_lora_weights, set_adapters(names, adapter_weights), fuse_lora(lora_scale=1), "
            "unload_lora_weights) into the PyTorch checkpoint tiny-sd15 was exported from, re-exported "
            "with onnx/export_sd.sh and run by optimum's ORTStableDiffusionPipeline like sd15/txt2img_euler "
            "(same prompt, negative prompt, noise, guidance, steps, size). Tensors follow the conventions "
            "in ../cases.json. Adapters: onnx/loras/."
        ),
        "cases": cases,
    }
    helpers.write_json(outdir / "cases.json", doc)
    return fuse_checks
