"""Few-step fixtures: LCM, trailing Euler ancestral and the guidance-free (conditional-only) path,
with every noise draw recorded, and a tiny LCM-LoRA with its diffusers-fused reference.

Used by make_fixtures.py (stages `lcm-lora` and `fewstep-ref`); see onnx/fixtures/README.md.

Schedulers that add fresh noise each step (Euler ancestral every step, LCM every step but the last)
cannot be compared through the seed: the recorder replaces diffusers' `randn_tensor` in those
scheduler modules by seeded torch draws and saves each one, in order, as `draws.npy`
[D,1,4,H/8,W/8]. A replay feeds the initial noise first (reference/<model>/noise.npy, as for every
case) and then these draws.

Adapter (onnx/loras/lcm-desk.safetensors): the layout of the published LCM-LoRAs
(latent-consistency/lcm-lora-sdv1-5): kohya keys over diffusers module names
(`lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight`, `.lora_up.weight`, `.alpha`), UNet
only, on every module the LCM distillation script trains (attention projections, proj_in/out,
feed-forward, resnet convolutions and time embeddings, down/up samplers); rank 4, alpha 4, seeded
random weights.
"""
from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import torch

# (model, case id, mode, scheduler, steps, guidance): the recipes of LCM-LoRA (4 steps, guidance 1)
# and SD/SDXL-Turbo (Euler ancestral with trailing spacing, 1 step, guidance 0), and trailing Euler
# ancestral with classifier-free guidance.
CASES = [
    ("sd15", "txt2img_lcm", "txt2img", "lcm", 4, 1.0),
    ("sd15", "img2img_lcm", "img2img", "lcm", 4, 1.0),
    ("sd15", "txt2img_euler_a_trailing", "txt2img", "euler_a_trailing", 4, 7.5),
    ("sd15", "txt2img_turbo", "txt2img", "euler_a_trailing", 1, 0.0),
    ("sdxl", "txt2img_lcm", "txt2img", "lcm", 4, 1.0),
    ("sdxl", "txt2img_turbo", "txt2img", "euler_a_trailing", 1, 0.0),
]
# id -> (deskgen scheduler id, diffusers class, keys over the model's scheduler_config.json)
SCHEDULERS = {
    "lcm": ("lcm", "LCMScheduler", {}),
    "euler_a_trailing": ("euler_a", "EulerAncestralDiscreteScheduler", {"timestep_spacing": "trailing"}),
}
IMG2IMG_STRENGTH = 0.5
DRAW_SEED = 4321
LCM_LORA = "lcm-desk"
LCM_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
               "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]
LCM_RANK, LCM_ALPHA = 4, 4.0


class StepDraws:
    """Replaces `randn_tensor` in the noise-adding scheduler modules with recorded seeded draws."""

    def __init__(self, recorder):
        from diffusers.schedulers import scheduling_euler_ancestral_discrete, scheduling_lcm

        self.generator = torch.Generator().manual_seed(DRAW_SEED)
        self.draws: list[np.ndarray] = []
        for module in (scheduling_lcm, scheduling_euler_ancestral_discrete):
            recorder._patch(module, "randn_tensor", self._draw)

    def _draw(self, shape, generator=None, device=None, dtype=None, layout=None):
        noise = torch.randn(tuple(shape), generator=self.generator, dtype=torch.float32)
        self.draws.append(noise.numpy().copy())
        return noise.to(dtype=dtype or torch.float32)


def make_scheduler(fx, pipe, sched_id):
    import diffusers

    _, cls_name, extra = SCHEDULERS[sched_id]
    base = pipe._deskgen_base_cfg = getattr(pipe, "_deskgen_base_cfg", None) or dict(pipe.scheduler.config)
    return getattr(diffusers, cls_name).from_config(dict(base, **extra))


def run(fx, kind, pipes, mode, sched_id, steps, guidance, noise, image):
    """One generation through optimum's ORT pipeline; returns (recorded tensors, draws, scheduler, image)."""
    pipe = pipes[0] if mode == "txt2img" else pipes[1]
    pipe.scheduler = make_scheduler(fx, pipe, sched_id)
    rec = fx.Recorder(pipe, noise, fx.img2img_modules(kind) if mode == "img2img" else ())
    draws = StepDraws(rec)
    try:
        kw = dict(prompt=fx.PROMPT, negative_prompt=fx.NEGATIVE, num_inference_steps=steps,
                  guidance_scale=guidance, output_type="np")
        if mode == "txt2img":
            kw.update(height=fx.HEIGHT, width=fx.WIDTH, latents=noise.clone())
        else:
            kw.update(image=image, strength=IMG2IMG_STRENGTH)
        images = pipe(**kw).images
    finally:
        rec.restore()
    return rec.rec, draws.draws, pipe.scheduler, np.asarray(images, dtype=np.float32)


def save_case(fx, root, kind, cid, mode, sched_id, steps, guidance, result, model_dir, ref_root, extra=None):
    rec, draws, sched, images = result
    rows = {int(np.asarray(s).shape[0]) for s in rec["unet_sample"]}
    assert rows == ({2} if guidance > 1 else {1}), (cid, rows)  # guidance <= 1: conditional pass only
    noise_steps = len(rec["unet_sample"]) - (1 if sched_id == "lcm" else 0)
    assert len(draws) == noise_steps, (cid, len(draws), noise_steps)
    cdir = root / kind / cid
    cdir.mkdir(parents=True, exist_ok=True)
    files = {
        "timesteps": fx.save_npy(cdir / "timesteps.npy", fx.stack(rec, "step_timestep")),
        "step_latents": fx.save_npy(cdir / "step_latents.npy", fx.stack(rec, "step_prev_sample")),
        "final_latents": fx.save_npy(cdir / "final_latents.npy", rec["step_prev_sample"][-1]),
        "image": fx.save_npy(cdir / "image.npy", images),
    }
    if draws:
        files["draws"] = fx.save_npy(cdir / "draws.npy", np.stack(draws))
    scheduler_id, cls_name, overrides = SCHEDULERS[sched_id]
    case = {
        "id": f"{kind}/{cid}",
        "model": kind,
        "model_dir": fx.rel(model_dir),
        "mode": mode,
        "scheduler": scheduler_id,
        "scheduler_class": cls_name,
        "scheduler_config_overrides": overrides,
        "prompt": fx.PROMPT,
        "negative_prompt": fx.NEGATIVE,
        "guidance_scale": guidance,
        "num_inference_steps": steps,
        "height": fx.HEIGHT,
        "width": fx.WIDTH,
        "timesteps_schedule": np.asarray(sched.timesteps).tolist(),
        "noise": fx.rel(ref_root / kind / "noise.npy"),
        "files": {k: fx.rel(cdir / v) for k, v in files.items()},
        "loras": [],
    }
    if mode == "img2img":
        case.update(strength=IMG2IMG_STRENGTH, init_image=fx.rel(ref_root / "init_image.png"))
    case.update(extra or {})
    print(f"fewstep-ref: {kind}/{cid} image mean {images.mean():.6f}", file=sys.stderr)
    return case


def build_lcm_lora(ckpt: pathlib.Path, loras_out: pathlib.Path) -> None:
    """onnx/loras/lcm-desk.safetensors, in the published LCM-LoRAs' key layout."""
    import make_lora_fixtures as lf
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    unet = UNet2DConditionModel.from_pretrained(str(ckpt / "unet"))
    state, _ = lf._peft_adapter(unet, LCM_TARGETS, LCM_RANK, LCM_ALPHA, seed=31)
    kohya = {}
    for key, value in state.items():
        module, kind = key.rsplit(".lora_", 1)
        name = "lora_unet_" + module.replace(".", "_")
        kohya[f"{name}.{'lora_down' if kind.startswith('A') else 'lora_up'}.weight"] = value
        kohya[f"{name}.alpha"] = torch.tensor(LCM_ALPHA)
    path = loras_out / f"{LCM_LORA}.safetensors"
    save_file(dict(sorted(kohya.items())), str(path))
    lf._rewrite_sorted(path)
    path.chmod(0o644)
    modules = sorted({k.rsplit(".", 2)[0] for k in kohya})
    print(f"lcm-lora: {path.name} {path.stat().st_size} bytes, {len(modules)} modules", file=sys.stderr)


def _fused_lcm_checkpoint(ckpt: pathlib.Path, loras: pathlib.Path, out: pathlib.Path) -> float:
    """The base checkpoint with lcm-desk fused by diffusers (load_lora_weights + fuse_lora), saved to
    `out`; returns the max abs difference to W + (alpha / rank)·(B·A) over every adapted module."""
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    pipe = StableDiffusionPipeline.from_pretrained(str(ckpt))
    base = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    pipe.load_lora_weights(str(loras), weight_name=f"{LCM_LORA}.safetensors", adapter_name="lcm")
    pipe.fuse_lora(components=["unet"], lora_scale=1.0)
    pipe.unload_lora_weights()
    fused = pipe.unet.state_dict()
    kohya_names = {"lora_unet_" + name.replace(".", "_"): name for name, _ in pipe.unet.named_modules()}
    worst, changed = 0.0, 0
    with safe_open(str(loras / f"{LCM_LORA}.safetensors"), "pt") as f:
        adapted = sorted({k.rsplit(".", 2)[0] for k in f.keys() if k.endswith(".lora_down.weight")})
        for kohya in adapted:
            module = kohya_names[kohya]
            a, b = f.get_tensor(f"{kohya}.lora_down.weight"), f.get_tensor(f"{kohya}.lora_up.weight")
            w = base[f"{module}.weight"]
            delta = (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)).reshape(w.shape)
            expected = w + float(f.get_tensor(f"{kohya}.alpha")) / a.shape[0] * delta
            worst = max(worst, float((fused[f"{module}.weight"] - expected).abs().max()))
            changed += 1
    assert changed == len(adapted) and worst < 1e-5, (changed, worst)
    if out.exists():
        shutil.rmtree(out)
    pipe.save_pretrained(str(out), safe_serialization=True)
    return worst


def reference(fx, work: pathlib.Path, ref_root: pathlib.Path, loras: pathlib.Path) -> dict:
    """Every CASES entry and the LCM-LoRA case -> ref_root/fewstep/; returns the fuse check."""
    from PIL import Image

    root = ref_root / "fewstep"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    image = Image.open(ref_root / "init_image.png").convert("RGB")
    cases = []
    for kind in ("sd15", "sdxl"):
        model_dir = fx.FIXTURES["out"] / f"tiny-{kind}"
        pipes = fx.load_pipes(kind, model_dir)
        noise = torch.from_numpy(np.load(ref_root / kind / "noise.npy"))
        for k, cid, mode, sched_id, steps, guidance in CASES:
            if k == kind:
                result = run(fx, kind, pipes, mode, sched_id, steps, guidance, noise, image)
                cases.append(save_case(fx, root, kind, cid, mode, sched_id, steps, guidance, result, model_dir, ref_root))

    fused = work / "ckpt-sd15-lcm-desk"
    fuse_check = _fused_lcm_checkpoint(work / "ckpt-sd15", loras, fused)
    exported = work / "onnx-sd15-lcm-desk"
    if exported.exists():
        shutil.rmtree(exported)
    subprocess.run(["bash", str(fx.ONNX_DIR / "export_sd.sh"), str(fused), str(exported)], check=True)
    pipes = fx.load_pipes("sd15", exported)
    noise = torch.from_numpy(np.load(ref_root / "sd15" / "noise.npy"))
    result = run(fx, "sd15", pipes, "txt2img", "lcm", 4, 1.0, noise, None)
    cases.append(save_case(
        fx, root, "sd15", "txt2img_lcm_lora", "txt2img", "lcm", 4, 1.0, result,
        fx.FIXTURES["out"] / "tiny-sd15", ref_root, {"loras": [{"name": LCM_LORA, "weight": 1.0}]},
    ))
    doc = {
        "conventions": (
            "optimum's ORT pipelines (ORTStableDiffusion[XL][Img2Img]Pipeline, onnxruntime CPU, 1 thread) on the "
            "committed tiny ONNX files, with the scheduler class named and scheduler_config_overrides applied over "
            "the model's scheduler_config.json. Noise: reference/<model>/noise.npy as in cases.json, then draws.npy "
            "[D,1,4,H/8,W/8]: every draw the scheduler made, in order (Euler ancestral one per step, LCM one per "
            "step but the last). guidance_scale <= 1 runs the conditional UNet pass alone. img2img: strength 0.5, "
            "VAE encode = latent mean. txt2img_lcm_lora: onnx/loras/lcm-desk.safetensors fused by diffusers "
            "(load_lora_weights, fuse_lora(lora_scale=1)) into the checkpoint tiny-sd15 was exported from, "
            "re-exported with onnx/export_sd.sh and run like txt2img_lcm. image: [1,H,W,3] in [0,1]; final_latents "
            "and step_latents in scheduler space."
        ),
        "cases": cases,
    }
    fx.write_json(root / "cases.json", doc)
    return fuse_check
