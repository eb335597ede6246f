"""Tiny random ControlNets for the tiny SD 1.x and SDXL fixtures, and diffusers' ControlNet outputs.

Stages of onnx/make_fixtures.py:
  controlnet      two ControlNets per model ("canny" and "softedge", random weights made from the
                  tiny UNet like `ControlNetModel.from_unet`) and the residual-input UNet, exported
                  by onnx/export_controlnet.py into fixtures/tiny-{sd15,sdxl}/
  controlnet-ref  diffusers' PyTorch ControlNet pipelines (txt2img and img2img) on the same
                  checkpoints -> fixtures/reference/controlnet/
"""
from __future__ import annotations

import json
import pathlib
import shutil
import sys

import numpy as np
import torch

import export_controlnet
import weights_map

CONTROL_TYPES = ("canny", "softedge")
# (mode, scheduler, units of (type, scale, guidance_start, guidance_end))
CASES = (
    ("txt2img", "ddim", (("canny", 1.0, 0.0, 1.0),)),
    ("txt2img", "euler", (("canny", 0.5, 0.0, 1.0), ("softedge", 1.0, 0.0, 0.5))),
    ("img2img", "ddim", (("canny", 1.0, 0.25, 1.0), ("softedge", 0.5, 0.0, 1.0))),
    ("img2img", "euler", (("softedge", 0.5, 0.0, 0.75),)),
)


def build_controlnets(ckpt: pathlib.Path) -> dict:
    """Two ControlNets from the checkpoint's UNet, saved beside it as controlnet-<type>/."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(ckpt / "unet"))
    nets = {}
    for i, control_type in enumerate(CONTROL_TYPES):
        torch.manual_seed(100 + i)
        net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 16, 16))
        # from_unet zero-initialises the output convolutions, which would make every residual zero
        # and the parity check trivial: random values there, and in the copied encoder so that the
        # two nets differ from the UNet and from each other.
        g = torch.Generator().manual_seed(200 + i)
        with torch.no_grad():
            for name, p in net.named_parameters():
                if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
                elif p.dim() > 1:
                    p.add_(torch.randn(p.shape, generator=g) * 0.01)
        net.save_pretrained(str(ckpt / f"controlnet-{control_type}"), safe_serialization=True)
        nets[control_type] = net
    return nets


def export(kind: str, ckpt: pathlib.Path, out: pathlib.Path) -> None:
    from diffusers import UNet2DConditionModel

    nets = build_controlnets(ckpt)
    unet = UNet2DConditionModel.from_pretrained(str(ckpt / "unet"))
    for sub in ("controlnet", "unet_controlnet"):
        shutil.rmtree(out / sub, ignore_errors=True)
    for control_type, net in nets.items():
        export_controlnet.export_controlnet(net, unet, control_type, out)
    export_controlnet.export_residual_unet(unet, nets[CONTROL_TYPES[0]], out)
    doc = weights_map.map_part(str(ckpt), out / "unet_controlnet", "unet_controlnet", torch.float32)
    (out / "unet_controlnet" / "weights_map.json").write_text(weights_map.to_json(doc))
    for cfg in (out / "controlnet").rglob("config.json"):
        obj = json.loads(cfg.read_text())
        obj["_name_or_path"] = f"{out.name}/{cfg.parent.relative_to(out)}"
        cfg.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    print(f"controlnet: exported {kind} ControlNets {list(nets)} and unet_controlnet", file=sys.stderr)


def control_images(ref: pathlib.Path, size: int) -> dict:
    """Deterministic control images: thin white lines on black (canny-like), smooth blobs (soft edges)."""
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size]
    lines = np.zeros((size, size), np.uint8)
    lines[(x == 8) | (x == size - 9) | (y == 12) | (y == size - 13) | (np.abs(x - y) <= 0)] = 255
    blobs = (127.5 + 127.5 * np.sin(x / 5.0) * np.cos(y / 7.0)).round().astype(np.uint8)
    images = {}
    for control_type, gray in (("canny", lines), ("softedge", blobs)):
        path = ref / f"control_{control_type}.png"
        Image.fromarray(np.stack([gray] * 3, -1), "RGB").save(path, optimize=False)
        images[control_type] = Image.open(path).convert("RGB")
    return images


def pipelines(kind: str, ckpt: pathlib.Path, nets: list):
    import diffusers

    base_cls, t2i, i2i = {
        "sd15": ("StableDiffusionPipeline", "StableDiffusionControlNetPipeline",
                 "StableDiffusionControlNetImg2ImgPipeline"),
        "sdxl": ("StableDiffusionXLPipeline", "StableDiffusionXLControlNetPipeline",
                 "StableDiffusionXLControlNetImg2ImgPipeline"),
    }[kind]
    base = getattr(diffusers, base_cls).from_pretrained(str(ckpt))
    parts = {k: v for k, v in base.components.items() if k not in ("safety_checker", "feature_extractor", "image_encoder")}
    controlnet = nets[0] if len(nets) == 1 else diffusers.MultiControlNetModel(nets)
    extra = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False} if kind == "sd15" else {}
    return (getattr(diffusers, t2i)(**parts, controlnet=controlnet, **extra),
            getattr(diffusers, i2i)(**parts, controlnet=controlnet, **extra))


def img2img_module(kind: str):
    if kind == "sd15":
        from diffusers.pipelines.controlnet import pipeline_controlnet_img2img as m
    else:
        from diffusers.pipelines.controlnet import pipeline_controlnet_sd_xl_img2img as m
    return m


def run(fx, kind, mode, sched_name, units, ckpt, noise, init, images, output_type, pipeline_ckpt=None):
    """One case; the pipeline's weights from `pipeline_ckpt` (a LoRA-fused copy) when given."""
    from diffusers import ControlNetModel

    nets = [ControlNetModel.from_pretrained(str(ckpt / f"controlnet-{t}")) for t, *_ in units]
    t2i, i2i = pipelines(kind, pipeline_ckpt or ckpt, nets)
    pipe = t2i if mode == "txt2img" else i2i
    pipe.scheduler = fx.make_scheduler(sched_name, pipe.scheduler.config)
    mids = []
    unet_forward = pipe.unet.forward

    def record(*a, mid_block_additional_residual=None, **kw):
        mids.append(mid_block_additional_residual.detach().numpy().copy())
        return unet_forward(*a, mid_block_additional_residual=mid_block_additional_residual, **kw)

    pipe.unet.forward = record
    one = len(units) == 1
    pick = lambda i: units[0][i] if one else [u[i] for u in units]  # noqa: E731
    control = images[units[0][0]] if one else [images[u[0]] for u in units]
    kw = dict(prompt=fx.PROMPT, negative_prompt=fx.NEGATIVE, num_inference_steps=fx.STEPS,
              guidance_scale=fx.GUIDANCE, output_type=output_type, controlnet_conditioning_scale=pick(1),
              control_guidance_start=pick(2), control_guidance_end=pick(3))
    module = img2img_module(kind)
    undo = []
    if mode == "txt2img":
        kw.update(image=control, height=fx.HEIGHT, width=fx.WIDTH, latents=noise.clone())
    else:
        kw.update(image=init, control_image=control, strength=fx.STRENGTH)
        for name, fn in (("retrieve_latents", lambda enc, generator=None, sample_mode="sample": enc.latent_dist.mode()),
                         ("randn_tensor", lambda shape, generator=None, device=None, dtype=None, layout=None: noise.clone())):
            undo.append((name, getattr(module, name)))
            setattr(module, name, fn)
    try:
        with torch.no_grad():
            result = pipe(**kw).images
    finally:
        for name, fn in undo:
            setattr(module, name, fn)
    return np.asarray(result, dtype=np.float32), np.stack(mids)


# LoRA adapters fused into the UNet and text encoder, the ControlNet as it is (diffusers merges LoRA
# into the pipeline's UNet only): (case, adapters, mode, scheduler, units)
LORA_CASES = (
    ("lora_txt2img_ddim_1net", (("minimal-desk", 1.0),), "txt2img", "ddim", (("canny", 1.0, 0.0, 1.0),)),
)


def lora_reference(fx, work: pathlib.Path, ref_root: pathlib.Path, images, init) -> list:
    import make_lora_fixtures

    ckpt = work / "ckpt-sd15"
    noise = torch.from_numpy(np.load(ref_root / "sd15" / "noise.npy"))
    cases = []
    for cid, adapters, mode, sched_name, units in LORA_CASES:
        fused = work / f"ckpt-sd15-controlnet-{cid}"
        shutil.rmtree(fused, ignore_errors=True)
        make_lora_fixtures._fused_checkpoint(ckpt, fx.ONNX_DIR / "loras", list(adapters), fused)
        cdir = ref_root / "controlnet" / "sd15" / cid
        cdir.mkdir(parents=True)
        image, mids = run(fx, "sd15", mode, sched_name, units, ckpt, noise, init, images, "np", fused)
        latents, _ = run(fx, "sd15", mode, sched_name, units, ckpt, noise, init, images, "latent", fused)
        files = {
            "image": fx.save_npy(cdir / "image.npy", image),
            "final_latents": fx.save_npy(cdir / "final_latents.npy", latents),
            "mid_residual": fx.save_npy(cdir / "mid_residual.npy", mids),
        }
        cases.append(case_entry(fx, "sd15", cid, mode, sched_name, units, ref_root, files, cdir)
                     | {"loras": [{"name": n, "weight": w} for n, w in adapters]})
        print(f"controlnet-ref: sd15/{cid} image mean {image.mean():.6f}", file=sys.stderr)
    return cases


def case_entry(fx, kind, cid, mode, sched_name, units, ref_root, files, cdir) -> dict:
    root = ref_root / "controlnet"
    return {
        "id": f"{kind}/{cid}",
        "model": kind,
        "model_dir": fx.rel(fx.FIXTURES["out"] / f"tiny-{kind}"),
        "mode": mode,
        "scheduler": sched_name,
        "units": [{"type": t, "scale": s, "guidance_start": a, "guidance_end": b,
                   "image": fx.rel(root / f"control_{t}.png")} for t, s, a, b in units],
        "prompt": fx.PROMPT,
        "negative_prompt": fx.NEGATIVE,
        "guidance_scale": fx.GUIDANCE,
        "num_inference_steps": fx.STEPS,
        "height": fx.HEIGHT,
        "width": fx.WIDTH,
        "strength": fx.STRENGTH if mode == "img2img" else None,
        "noise": fx.rel(ref_root / kind / "noise.npy"),
        "init_image": fx.rel(ref_root / "init_image.png") if mode == "img2img" else None,
        "loras": [],
        "files": {k: fx.rel(cdir / v) for k, v in files.items()},
    }


def reference(fx, work: pathlib.Path, ref_root: pathlib.Path) -> dict:
    """Every case of CASES for both models -> ref_root/controlnet/<kind>/<case>/."""
    from PIL import Image

    root = ref_root / "controlnet"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    images = control_images(root, fx.WIDTH)
    init = Image.open(ref_root / "init_image.png").convert("RGB")
    cases = []
    for kind in ("sd15", "sdxl"):
        ckpt = work / f"ckpt-{kind}"
        noise = torch.from_numpy(np.load(ref_root / kind / "noise.npy"))
        for mode, sched_name, units in CASES:
            cid = f"{mode}_{sched_name}_{len(units)}net"
            cdir = root / kind / cid
            cdir.mkdir(parents=True)
            image, mids = run(fx, kind, mode, sched_name, units, ckpt, noise, init, images, "np")
            latents, _ = run(fx, kind, mode, sched_name, units, ckpt, noise, init, images, "latent")
            files = {
                "image": fx.save_npy(cdir / "image.npy", image),
                "final_latents": fx.save_npy(cdir / "final_latents.npy", latents),
                "mid_residual": fx.save_npy(cdir / "mid_residual.npy", mids),
            }
            cases.append(case_entry(fx, kind, cid, mode, sched_name, units, ref_root, files, cdir))
            print(f"controlnet-ref: {kind}/{cid} image mean {image.mean():.6f}", file=sys.stderr)
    cases.extend(lora_reference(fx, work, ref_root, images, init))
    doc = {
        "conventions": (
            "diffusers' PyTorch ControlNet pipelines (StableDiffusion[XL]ControlNet[Img2Img]Pipeline, CPU, "
            "float32) on the checkpoints the tiny ONNX files were exported from, one ControlNetModel or a "
            "MultiControlNetModel of the listed units, controlnet_conditioning_scale / control_guidance_start / "
            "control_guidance_end per unit. Noise and img2img conventions as in cases.json (the noise of "
            "reference/<model>/noise.npy; VAE encode = latent mean). image: [1,H,W,3] in [0,1]; final_latents: "
            "[1,4,H/8,W/8] in scheduler space; mid_residual: [S,2,C,h,w] the summed, scaled mid-block residual "
            "the UNet received at each step. Cases with loras: the adapters (onnx/loras/) fused by diffusers into the "
            "pipeline's UNet and text encoder as for reference/lora, the ControlNet unchanged."
        ),
        "cases": cases,
    }
    fx.write_json(root / "cases.json", doc)
    return doc
