"""A tiny 9-channel inpainting SD 1.x checkpoint, and diffusers' inpainting outputs.

Stages of onnx/make_fixtures.py:
  inpaint      the tiny SD 1.x pipeline with a 9-channel UNet (latents + mask + masked-image
               latents, like stable-diffusion-v1-5/stable-diffusion-inpainting), exported with
               onnx/export_sd.sh into fixtures/tiny-sd15-inpaint/. Its VAE, text encoder,
               tokenizer and scheduler are tiny-sd15's (same seeds, byte-identical ONNX files).
  inpaint-ref  diffusers' PyTorch inpainting pipelines (StableDiffusionInpaintPipeline with the
               9-channel and with the ordinary 4-channel UNet, StableDiffusionXLInpaintPipeline)
               on the seeded checkpoints -> fixtures/reference/inpaint/
"""
from __future__ import annotations

import json
import pathlib
import shutil
import sys

import numpy as np
import torch

CKPT = "ckpt-sd15-inpaint"
MODEL_DIR = "tiny-sd15-inpaint"
UNET_SEED = 9
MASK_BLUR_RADII = (1, 2, 3.5, 7.5)
# (model, UNet input channels, checkpoint folder in the work dir, ONNX folder, schedulers, strengths, blurs)
MODELS = (
    ("sd15", 9, CKPT, MODEL_DIR, ("ddim", "euler"), (1.0, 0.6), (0, 2)),
    ("sd15", 4, "ckpt-sd15", "tiny-sd15", ("ddim", "euler"), (1.0, 0.6), (0, 2)),
    ("sdxl", 4, "ckpt-sdxl", "tiny-sdxl", ("euler",), (1.0, 0.6), (0,)),
)
# the case also run through optimum's ORT inpainting pipeline on the exported files
ORT_CASE = ("sd15", 9, "euler", 0.6, 2)


def build(fx, ckpt: pathlib.Path, tmp: pathlib.Path) -> None:
    fx.build_sd15(ckpt, tmp, unet_in_channels=9, unet_seed=UNET_SEED,
                  pipeline_class="StableDiffusionInpaintPipeline")


# ----------------------------------------------------------------------------- export
def export(fx, work: pathlib.Path, out: pathlib.Path) -> dict:
    """Build and export the 9-channel checkpoint; check it against torch and against tiny-sd15."""
    ckpt = work / CKPT
    shutil.rmtree(ckpt, ignore_errors=True)
    build(fx, ckpt, work)
    dst = out / MODEL_DIR
    fx.export_pipeline(ckpt, dst)
    cfg = json.loads((dst / "unet" / "config.json").read_text())
    assert cfg["in_channels"] == 9 and cfg["out_channels"] == 4, cfg
    checks = {"unet": unet_check(fx, ckpt, dst), "same_bytes_as_tiny_sd15": shared_files(fx, dst, out / "tiny-sd15")}
    for name in ("text_encoder/model.onnx", "vae_encoder/model.onnx", "vae_decoder/model.onnx",
                 "tokenizer/tokenizer.json", "scheduler/scheduler_config.json"):
        assert checks["same_bytes_as_tiny_sd15"].get(name), f"{name} differs from tiny-sd15's"
    return checks


def shared_files(fx, dst: pathlib.Path, base: pathlib.Path) -> dict:
    """Which files of the export are byte-identical to the same path in tiny-sd15."""
    res = {}
    for p in sorted(dst.rglob("*")):
        if not p.is_file():
            continue
        name = str(p.relative_to(dst))
        other = base / name
        res[name] = other.is_file() and fx.sha256(p) == fx.sha256(other)
    return res


def unet_check(fx, ckpt: pathlib.Path, dst: pathlib.Path) -> dict:
    """The exported 9-channel UNet against torch: max abs diff at 64x64 and 320x256."""
    import onnxruntime as ort
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(ckpt / "unet")).eval()
    sess = ort.InferenceSession(str(dst / "unet" / "model.onnx"), fx.session_options(),
                                providers=["CPUExecutionProvider"])
    shapes = {i.name: i.shape for i in sess.get_inputs()}
    assert shapes["sample"][1] == 9, shapes
    g = torch.Generator().manual_seed(7)
    res = {}
    for h, w in ((8, 8), (40, 32)):
        x = torch.randn(2, 9, h, w, generator=g)
        ehs = torch.randn(2, 77, 32, generator=g)
        t = torch.tensor(501.0)
        with torch.no_grad():
            ref = unet(x, t, ehs).sample.numpy()
        got = sess.run(None, {"sample": x.numpy(), "timestep": t.numpy(), "encoder_hidden_states": ehs.numpy()})[0]
        assert got.shape == (2, 4, h, w), got.shape
        res[f"sd15-inpaint/unet/{h * 8}x{w * 8}"] = float(np.abs(ref - got).max())
    return res


# ----------------------------------------------------------------------------- masks
def make_mask(path: pathlib.Path):
    """64x64 mode-L mask, 255 = repaint: the rectangle x in [8,40), y in [16,48) and the disc
    (x-46)^2 + (y-20)^2 <= 81. The rectangle's top-left corner (8,16) is a latent sample point."""
    from PIL import Image

    y, x = np.mgrid[0:64, 0:64]
    m = ((x >= 8) & (x < 40) & (y >= 16) & (y < 48)) | ((x - 46) ** 2 + (y - 20) ** 2 <= 81)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.where(m, 255, 0).astype(np.uint8), "L").save(path, optimize=False)
    return Image.open(path)


def binarized(image) -> np.ndarray:
    """VaeImageProcessor's mask preprocessing at the same size: /255 in float32, then >= 0.5."""
    return (np.asarray(image.convert("L")).astype(np.float32) / 255.0 >= 0.5).astype(np.float32)


def latent_mask(mask_condition: np.ndarray) -> np.ndarray:
    m = torch.from_numpy(mask_condition)[None, None]
    return torch.nn.functional.interpolate(m, size=(m.shape[2] // 8, m.shape[3] // 8))[0, 0].numpy()


def blurred_masks(fx, root: pathlib.Path, mask) -> list:
    """PIL's GaussianBlur of the mask at each radius (diffusers' VaeImageProcessor.blur), as PNGs."""
    import PIL
    from diffusers.image_processor import VaeImageProcessor
    from PIL import Image, ImageFilter

    base = binarized(mask)
    entries = []
    for r in MASK_BLUR_RADII:
        path = root / f"mask_blur_{r:g}.png"
        blurred = VaeImageProcessor.blur(mask, blur_factor=r)
        assert np.array_equal(np.asarray(blurred), np.asarray(mask.filter(ImageFilter.GaussianBlur(r))))
        assert blurred.mode == "L"
        blurred.save(path, optimize=False)
        assert np.array_equal(np.asarray(Image.open(path)), np.asarray(blurred))
        b = binarized(blurred)
        entries.append({
            "radius": r,
            "file": fx.rel(path),
            "pillow": PIL.__version__,
            "pixels_changed_by_blur_and_binarize": int((b != base).sum()),
            "latent_cells_changed": int((latent_mask(b) != latent_mask(base)).sum()),
        })
    return entries


# ----------------------------------------------------------------------------- reference runs
def pipeline(kind: str, ckpt: pathlib.Path):
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionXLInpaintPipeline

    if kind == "sd15":
        return StableDiffusionInpaintPipeline.from_pretrained(
            str(ckpt), safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return StableDiffusionXLInpaintPipeline.from_pretrained(str(ckpt), add_watermarker=False)


def pipeline_module(kind: str):
    if kind == "sd15":
        from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_inpaint as m
    else:
        from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_inpaint as m
    return m


def run(fx, pipe, kind, sched_name, strength, noise, init, mask_image, output_type, base_cfg):
    """One inpainting run with the saved noise as the only draw and the VAE mean; returns (images, record)."""
    pipe.scheduler = fx.make_scheduler(sched_name, base_cfg)
    module = pipeline_module(kind)
    rec: dict[str, list] = {"randn_calls": [], "step_latents": [], "timesteps": [], "unet_time_ids": [],
                            "unet_sample": []}

    def randn(shape, generator=None, device=None, dtype=None, layout=None):
        assert tuple(shape) == tuple(noise.shape), (shape, noise.shape)
        rec["randn_calls"].append(1)
        return noise.clone().to(dtype=dtype or torch.float32)

    def mean(encoder_output, generator=None, sample_mode="sample"):
        return encoder_output.latent_dist.mode()

    prepare_mask_latents = pipe.prepare_mask_latents
    prepare_latents = pipe.prepare_latents
    unet_forward = pipe.unet.forward

    def record_mask(mask, masked_image, *a, **kw):
        rec["mask_condition"] = mask.detach().numpy().copy()
        out = prepare_mask_latents(mask, masked_image, *a, **kw)
        rec["mask"], rec["masked_image_latents"] = (t.detach().numpy().copy() for t in out)
        return out

    def record_latents(*a, **kw):
        out = prepare_latents(*a, **kw)
        rec["latents_init"] = out[0].detach().numpy().copy()
        if kw.get("return_image_latents"):
            rec["image_latents"] = out[-1].detach().numpy().copy()
        return out

    def record_unet(sample, *a, added_cond_kwargs=None, **kw):
        rec["unet_sample"].append(sample.detach().numpy().copy())
        if added_cond_kwargs and "time_ids" in added_cond_kwargs:
            rec["unet_time_ids"].append(added_cond_kwargs["time_ids"].detach().numpy().copy())
        return unet_forward(sample, *a, added_cond_kwargs=added_cond_kwargs, **kw)

    def on_step_end(p, i, t, kwargs):
        # the latents after scheduler.step and, for a 4-channel UNet, after the blend with the init latents
        rec["step_latents"].append(kwargs["latents"].detach().numpy().copy())
        rec["timesteps"].append(t.item() if isinstance(t, torch.Tensor) else t)
        return {}

    saved = {name: getattr(module, name) for name in ("randn_tensor", "retrieve_latents")}
    module.randn_tensor, module.retrieve_latents = randn, mean
    pipe.prepare_mask_latents, pipe.prepare_latents = record_mask, record_latents
    pipe.unet.forward = record_unet
    try:
        with torch.no_grad():
            images = pipe(
                prompt=fx.PROMPT, negative_prompt=fx.NEGATIVE, image=init, mask_image=mask_image,
                strength=strength, num_inference_steps=fx.STEPS, guidance_scale=fx.GUIDANCE,
                height=fx.HEIGHT, width=fx.WIDTH, output_type=output_type,
                callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["latents"],
            ).images
    finally:
        for name, fn in saved.items():
            setattr(module, name, fn)
        del pipe.prepare_mask_latents, pipe.prepare_latents, pipe.unet.forward
    assert len(rec["randn_calls"]) == 1, f"randn_tensor called {len(rec['randn_calls'])} times, not once"
    return np.asarray(images, dtype=np.float32), rec


def first_half(arr: np.ndarray) -> np.ndarray:
    """The classifier-free guidance batch [uncond, cond] holds the same mask twice: keep one."""
    assert arr.shape[0] == 2 and np.array_equal(arr[0], arr[1]), arr.shape
    return arr[:1]


def check_record(rec, channels, kind):
    mask, masked = first_half(rec["mask"]), first_half(rec["masked_image_latents"])
    for sample in rec["unet_sample"]:
        assert sample.shape[1] == channels, sample.shape
        if channels == 9:
            # UNet input = [scale_model_input(latents), mask, masked_image_latents] on the channel axis
            assert np.array_equal(sample[:, 4:5], rec["mask"])
            assert np.array_equal(sample[:, 5:], rec["masked_image_latents"])
    assert np.array_equal(mask[0, 0], latent_mask(rec["mask_condition"][0, 0]))
    if kind == "sdxl":
        assert all(np.array_equal(t, rec["unet_time_ids"][0]) for t in rec["unet_time_ids"])
    return mask, masked


def reference(fx, work: pathlib.Path, ref_root: pathlib.Path) -> dict:
    """Every case of MODELS -> ref_root/inpaint/<model>-<channels>ch/<case>/; returns the checks."""
    import diffusers
    import PIL
    from PIL import Image

    root = ref_root / "inpaint"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    out = fx.FIXTURES["out"]
    mask = make_mask(root / "mask.png")
    blur_entries = blurred_masks(fx, root, mask)
    init = Image.open(ref_root / "init_image.png").convert("RGB")
    conditions = {}
    cases = []
    checks = {}
    for kind, channels, ckpt_name, model_dir, schedulers, strengths, blurs in MODELS:
        ckpt = work / ckpt_name
        noise = torch.from_numpy(np.load(ref_root / kind / "noise.npy"))
        pipe = pipeline(kind, ckpt)
        assert pipe.unet.config.in_channels == channels, pipe.unet.config.in_channels
        base_cfg = dict(pipe.scheduler.config)
        sf = float(pipe.vae.config.scaling_factor)
        group = f"{kind}-{channels}ch"
        for sched_name in schedulers:
            for strength in strengths:
                for blur in blurs:
                    cid = f"{sched_name}_s{strength:g}_blur{blur:g}"
                    passed = root / (f"mask_blur_{blur:g}.png" if blur > 0 else "mask.png")
                    mask_image = pipe.mask_processor.blur(mask, blur_factor=blur) if blur > 0 else mask
                    assert np.array_equal(np.asarray(mask_image), np.asarray(Image.open(passed)))
                    args = (fx, pipe, kind, sched_name, strength, noise, init, mask_image)
                    image, rec = run(*args, "np", base_cfg)
                    latents, rec2 = run(*args, "latent", base_cfg)
                    for k in ("mask", "masked_image_latents", "latents_init", "step_latents"):
                        assert np.array_equal(np.asarray(rec[k]), np.asarray(rec2[k])), k
                    assert np.array_equal(latents, rec["step_latents"][-1])
                    m, masked = check_record(rec, channels, kind)
                    cond = rec["mask_condition"]
                    if blur not in conditions:
                        conditions[blur] = cond
                        assert np.array_equal(cond[0, 0], binarized(mask_image))
                        fx.save_npy(root / f"mask_condition_blur{blur:g}.npy", cond)
                    assert np.array_equal(conditions[blur], cond)
                    cdir = root / group / cid
                    files = {
                        "image": fx.save_npy(cdir / "image.npy", image),
                        "final_latents": fx.save_npy(cdir / "final_latents.npy", latents),
                        "latents_init": fx.save_npy(cdir / "latents_init.npy", rec["latents_init"]),
                        "step_latents": fx.save_npy(cdir / "step_latents.npy", np.stack(rec["step_latents"])),
                        "latent_mask": fx.save_npy(cdir / "latent_mask.npy", m),
                        "masked_image_latents": fx.save_npy(cdir / "masked_image_latents.npy", masked),
                    }
                    if "image_latents" in rec:
                        files["image_latents"] = fx.save_npy(cdir / "image_latents.npy", rec["image_latents"])
                    case = {
                        "id": f"{group}/{cid}",
                        "model": kind,
                        "model_dir": fx.rel(out / model_dir),
                        "unet_channels": channels,
                        "pipeline_class": type(pipe).__name__,
                        "scheduler": sched_name,
                        "scheduler_class": type(pipe.scheduler).__name__,
                        "strength": strength,
                        "mask_blur": blur,
                        "prompt": fx.PROMPT,
                        "negative_prompt": fx.NEGATIVE,
                        "guidance_scale": fx.GUIDANCE,
                        "num_inference_steps": fx.STEPS,
                        "steps_run": len(rec["timesteps"]),
                        "timesteps": rec["timesteps"],
                        "height": fx.HEIGHT,
                        "width": fx.WIDTH,
                        "vae_scaling_factor": sf,
                        "init_noise_sigma": float(pipe.scheduler.init_noise_sigma),
                        "noise": fx.rel(ref_root / kind / "noise.npy"),
                        "init_image": fx.rel(ref_root / "init_image.png"),
                        "mask": fx.rel(root / "mask.png"),
                        "mask_image_passed": fx.rel(passed),
                        "mask_condition": fx.rel(root / f"mask_condition_blur{blur:g}.npy"),
                        "vae_encode": "mean",
                        "add_time_ids": rec["unet_time_ids"][0].tolist() if kind == "sdxl" else None,
                        "files": {k: fx.rel(cdir / v) for k, v in files.items()},
                    }
                    cases.append(case)
                    print(f"inpaint-ref: {group}/{cid} image mean {image.mean():.6f}", file=sys.stderr)
                    if (kind, channels, sched_name, strength, blur) == ORT_CASE:
                        checks[f"{group}/{cid}"] = ort_check(fx, kind, out / model_dir, sched_name, strength, noise,
                                                             init, mask_image, base_cfg, image, latents)
    doc = {
        "conventions": conventions(diffusers.__version__, PIL.__version__),
        "mask_blur_files": blur_entries,
        "cases": cases,
    }
    fx.write_json(root / "cases.json", doc)
    return checks


def ort_check(fx, kind, model_dir, sched_name, strength, noise, init, mask_image, base_cfg, image, latents) -> dict:
    """The same case through optimum's ORT inpainting pipeline on the exported files."""
    from optimum.onnxruntime import ORTStableDiffusionInpaintPipeline

    assert kind == "sd15"
    pipe = ORTStableDiffusionInpaintPipeline.from_pretrained(
        str(model_dir), provider="CPUExecutionProvider", session_options=fx.session_options())
    got, _ = run(fx, pipe, kind, sched_name, strength, noise, init, mask_image, "np", base_cfg)
    got_latents, _ = run(fx, pipe, kind, sched_name, strength, noise, init, mask_image, "latent", base_cfg)
    return {
        "ort_vs_torch_image_max_abs_diff": float(np.abs(got - image).max()),
        "ort_vs_torch_final_latents_max_abs_diff": float(np.abs(got_latents - latents).max()),
    }


def conventions(diffusers_version: str, pillow_version: str) -> str:
    return (
        f"diffusers {diffusers_version} PyTorch inpainting pipelines (CPU, float32): StableDiffusionInpaintPipeline "
        "on the 9-channel checkpoint tiny-sd15-inpaint was exported from (unet_channels 9) and on the ordinary "
        "checkpoint of tiny-sd15 (unet_channels 4), StableDiffusionXLInpaintPipeline on tiny-sdxl's (4). Prompt, "
        "negative prompt, guidance, steps and size as in cases.json; scheduler = make_scheduler(name, the "
        "pipeline's scheduler config) (DDIM eta 0; Euler). Noise: the pipeline's one randn_tensor draw (asserted: "
        "exactly one per run) is reference/<model>/noise.npy, unscaled N(0,1) [1,4,H/8,W/8]. VAE encode (init "
        "image and masked image) = the latent MEAN (retrieve_latents patched to latent_dist.mode()), times "
        "scaling_factor. "
        "Mask: mask.png, 64x64 mode L, 255 = repaint, 0 = keep (rectangle x in [8,40), y in [16,48) plus the disc "
        "(x-46)^2+(y-20)^2 <= 81). mask_blur r > 0: mask_image = VaeImageProcessor.blur(mask, blur_factor=r) = "
        f"PIL ImageFilter.GaussianBlur(r) (Pillow {pillow_version}; mask_blur_<r>.png are those outputs, uint8, "
        "for r = 1, 2, 3.5, 7.5), passed to the pipeline instead of mask.png. mask_processor.preprocess "
        "(VaeImageProcessor with do_normalize False, do_binarize True, do_convert_grayscale True): PIL resize to "
        "(W,H) (Lanczos; a no-op at 64x64, PIL returns a copy at the same size), convert('L'), float32 /255, "
        "binarize: < 0.5 -> 0, >= 0.5 -> 1 (i.e. uint8 >= 128 repaints) = mask_condition [1,1,H,W] "
        "(mask_condition_blur<r>.npy). masked_image = init_image_pixels * (mask_condition < 0.5) (pixels in "
        "[-1,1]: repainted pixels become 0), VAE-encoded (mean) * scaling_factor = masked_image_latents "
        "[1,4,H/8,W/8]. Latent mask (prepare_mask_latents) = torch.nn.functional.interpolate(mask_condition, "
        "size=(H/8, W/8)), default mode 'nearest': latent cell (i,j) = mask_condition at pixel (8i, 8j) "
        "(src = floor(dst * 8)), no averaging; latent_mask.npy [1,1,H/8,W/8]. Both are duplicated for the "
        "classifier-free guidance batch [uncond, cond]; the files keep one copy. "
        "Timesteps: get_timesteps: init_timestep = min(int(steps*strength), steps), t_start = steps - "
        "init_timestep, timesteps = scheduler.timesteps[t_start:] (strength 1.0: all 4; 0.6: the last 2), "
        "set_begin_index(t_start). Initial latents (prepare_latents): strength == 1.0 (is_strength_max): "
        "latents_init = noise * init_noise_sigma, the image does not enter them (pure noise, like txt2img); "
        "strength < 1: latents_init = scheduler.add_noise(image_latents, noise, timesteps[0]) with image_latents = "
        "VAE mean of init_image * scaling_factor. "
        "unet_channels 9: at each step the UNet sample is concat([scheduler.scale_model_input(concat([latents, "
        "latents])), mask, masked_image_latents], dim=1) = [2,9,h,w]: channels 0-3 the (scaled) latents, 4 the "
        "latent mask, 5-8 masked_image_latents; only the latents are scaled by scale_model_input (Euler: / "
        "sqrt(sigma^2+1)); output 4 channels; CFG and scheduler.step as txt2img; no blending. "
        "unet_channels 4: the UNet sees the 4 latent channels only (masked_image_latents are computed but "
        "unused); after scheduler.step at step i: latents = (1 - mask) * init_latents_proper + mask * latents, "
        "init_latents_proper = scheduler.add_noise(image_latents, noise, timesteps[i+1]) for i < S-1 and "
        "image_latents itself after the last step (image_latents.npy; the init image is encoded even at "
        "strength 1.0). Euler's add_noise inside the loop uses sigmas[step_index] (step_index already advanced "
        "by step, i.e. the sigma of timesteps[i+1]): image_latents + noise * sigma. "
        "SDXL (StableDiffusionXLInpaintPipeline): requires_aesthetics_score is false (tiny-sdxl's model_index "
        "does not set it), so aesthetic_score / negative_aesthetic_score are not used and time_ids = "
        "[orig_h, orig_w, crop_top, crop_left, target_h, target_w] = [64,64,0,0,64,64] for both CFG rows, as "
        "txt2img (add_time_ids in each case is what the UNet received); text embeddings as txt2img; "
        "add_watermarker False. "
        "Per case: image.npy [1,H,W,3] float32 in [0,1] (output_type 'np'); final_latents.npy [1,4,H/8,W/8] "
        "(output_type 'latent', scaled latents after the last step and blend; the decoder gets final / "
        "scaling_factor); latents_init.npy; step_latents.npy [S,1,4,H/8,W/8] (latents after each step, after the "
        "blend for 4 channels: callback_on_step_end); latent_mask.npy; masked_image_latents.npy; "
        "image_latents.npy (4 channels only). timesteps = the S timesteps run."
    )
