#!/usr/bin/env python3
"""Build deskgen's ONNX test fixtures and the Python reference outputs.

Run through onnx/make_fixtures.sh (it prepares the pinned venv). Everything is offline and
seeded; see onnx/fixtures/README.md for what each file is.

Stages (default: all):
  models      build tiny random-weight SD 1.x / SDXL checkpoints from configs and export them with
              onnx/export_sd.sh into fixtures/tiny-sd15, fixtures/tiny-sdxl
  captioner   build a tiny ViT+GPT2 captioner and export it with optimum-cli
  reference   run optimum's ORT pipelines on the exported files -> fixtures/reference/{sd15,sdxl}
  schedulers  diffusers scheduler tables -> fixtures/reference/schedulers.json
  caption-ref captioner token ids -> fixtures/reference/captioner
  loras       tiny LoRA adapters for tiny-sd15 (peft and kohya format) -> onnx/loras (see
              make_lora_fixtures.py)
  lora-ref    diffusers-fused LoRA references -> fixtures/reference/lora
  controlnet  tiny random ControlNets and the residual-input UNet for tiny-sd15 / tiny-sdxl
              (see make_controlnet_fixtures.py and export_controlnet.py)
  controlnet-ref
              diffusers' ControlNet pipelines -> fixtures/reference/controlnet
  lcm-lora    a tiny LCM-LoRA for tiny-sd15 -> onnx/loras/lcm-desk.safetensors (see
              make_fewstep_fixtures.py)
  fewstep-ref LCM, trailing Euler ancestral and guidance-free runs with every noise draw recorded,
              and the LCM-LoRA fused by diffusers -> fixtures/reference/fewstep
  canny       OpenCV's Canny maps of the darknet photos -> fixtures/reference/canny (see
              make_canny_fixtures.py)
  inpaint     a tiny 9-channel inpainting SD 1.x checkpoint (tiny-sd15's VAE, text encoder, tokenizer
              and scheduler) exported with onnx/export_sd.sh into fixtures/tiny-sd15-inpaint (see
              make_inpaint_fixtures.py)
  inpaint-ref diffusers' inpainting pipelines (9- and 4-channel SD 1.x, SDXL) -> fixtures/reference/inpaint
  selfcheck   re-run one case and assert bit-identical output
  manifest    write fixtures/manifest.fixtures.json (fixtures and onnx/loras)
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch

ONNX_DIR = pathlib.Path(__file__).resolve().parent
REPO = ONNX_DIR.parent

torch.set_num_threads(2)

PROMPT = "a photo of a wooden desk with a laptop, soft light"
NEGATIVE = "blurry, low quality"
GUIDANCE = 7.5
STEPS = 4
HEIGHT = WIDTH = 64
STRENGTH = 0.75
NOISE_SEED = {"sd15": 1234, "sdxl": 5678}

SCHED_COMMON = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    timestep_spacing="leading",
    prediction_type="epsilon",
    trained_betas=None,
)


# ----------------------------------------------------------------------------- helpers
def sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_npy(path: pathlib.Path, arr) -> str:
    if isinstance(arr, torch.Tensor):
        arr = arr.detach().cpu().numpy()
    arr = np.ascontiguousarray(arr)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, arr, allow_pickle=False)
    return path.name


def write_json(path: pathlib.Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


FIXTURES = {"out": ONNX_DIR / "fixtures"}


def rel(p: pathlib.Path) -> str:
    """Repo-relative path as committed (onnx/fixtures/...), also when building into a temp dir."""
    return "onnx/fixtures/" + str(p.resolve().relative_to(FIXTURES["out"]))


# ----------------------------------------------------------------------------- tokenizers
def clip_vocab_files(tmp: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """CLIP's real BPE vocabulary (49408 tokens) from open_clip_torch's bpe_simple_vocab_16e6."""
    import open_clip
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    bpe = pathlib.Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]  # 48894 merges, as open_clip's SimpleTokenizer
    base = list(bytes_to_unicode().values())
    vocab = base + [v + "</w>" for v in base] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408, len(vocab)
    tmp.mkdir(parents=True, exist_ok=True)
    vf, mf = tmp / "vocab.json", tmp / "merges.txt"
    vf.write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    mf.write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return vf, mf


def clip_tokenizer(tmp: pathlib.Path, pad_token: str):
    from transformers import CLIPTokenizer

    vf, mf = clip_vocab_files(tmp)
    tok = CLIPTokenizer(
        str(vf),
        str(mf),
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token=pad_token,
        model_max_length=77,
    )
    ids = tok("a photo of a desk").input_ids
    assert ids == [49406, 320, 1125, 539, 320, 6550, 49407], ids
    return tok


# ----------------------------------------------------------------------------- tiny pipelines
def clip_text_config(hidden: int, act: str, projection_dim: int | None = None):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        hidden_act=act,
        projection_dim=projection_dim or hidden,
        layer_norm_eps=1e-5,
        # as in the released SD checkpoints: pooled = hidden state at argmax(input_ids)
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )


def tiny_vae(scaling_factor: float):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        sample_size=256,
        scaling_factor=scaling_factor,
        force_upcast=True,
    )


def build_sd15(ckpt: pathlib.Path, tmp: pathlib.Path, unet_in_channels: int = 4, unet_seed: int = 0,
               pipeline_class: str = "StableDiffusionPipeline") -> None:
    """The tiny SD 1.x checkpoint; with unet_in_channels=9 (its own unet_seed) the inpainting variant,
    whose VAE, text encoder, tokenizer and scheduler are the same (same seeds)."""
    import diffusers
    from diffusers import PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(unet_seed)
    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=unet_in_channels,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = tiny_vae(0.18215)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(clip_text_config(32, "quick_gelu"))
    tokenizer = clip_tokenizer(tmp / "tok15", pad_token="<|endoftext|>")
    # the SD 1.5 scheduler_config.json (PNDMScheduler(**json) rejects clip_sample: use from_config)
    scheduler = PNDMScheduler.from_config(
        dict(SCHED_COMMON, set_alpha_to_one=False, skip_prk_steps=True, clip_sample=False)
    )
    pipe = getattr(diffusers, pipeline_class)(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(ckpt), safe_serialization=True)


def build_sdxl(ckpt: pathlib.Path, tmp: pathlib.Path) -> None:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    hidden1, hidden2, proj, time_dim = 16, 16, 16, 8
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        transformer_layers_per_block=1,
        projection_class_embeddings_input_dim=6 * time_dim + proj,  # 6 time ids + text_embeds
        cross_attention_dim=hidden1 + hidden2,
        norm_num_groups=32,
    )
    vae = tiny_vae(0.13025)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(clip_text_config(hidden1, "quick_gelu"))
    torch.manual_seed(1)
    text_encoder_2 = CLIPTextModelWithProjection(clip_text_config(hidden2, "gelu", proj))
    tokenizer = clip_tokenizer(tmp / "tokxl1", pad_token="<|endoftext|>")
    tokenizer_2 = clip_tokenizer(tmp / "tokxl2", pad_token="!")  # as SDXL base's tokenizer_2
    # the SDXL base scheduler_config.json
    scheduler = EulerDiscreteScheduler.from_config(
        dict(SCHED_COMMON, interpolation_type="linear", use_karras_sigmas=False,
             set_alpha_to_one=False, skip_prk_steps=True, clip_sample=False, sample_max_value=1.0)
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(str(ckpt), safe_serialization=True)


def export_pipeline(ckpt: pathlib.Path, out: pathlib.Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    subprocess.run(["bash", str(ONNX_DIR / "export_sd.sh"), str(ckpt), str(out)], check=True)
    finalize_export(out)


def finalize_export(out: pathlib.Path) -> None:
    """Make the export reproducible and small: stable _name_or_path, slim tokenizers."""
    for cfg in sorted(out.rglob("*.json")):
        obj = json.loads(cfg.read_text())
        if isinstance(obj, dict) and "_name_or_path" in obj:
            sub = cfg.parent.relative_to(out)
            obj["_name_or_path"] = out.name if str(sub) == "." else f"{out.name}/{sub}"
            write_json(cfg, obj)
    slim_tokenizers(out)


def slim_tokenizers(out: pathlib.Path) -> None:
    """Keep only tokenizer.json (+ configs) per tokenizer dir; write it compact.

    vocab.json / merges.txt duplicate tokenizer.json (≈ 2 MB per tokenizer), so they are dropped and
    model_index.json is pointed at CLIPTokenizerFast, which Python loads from tokenizer.json alone.
    """
    from tokenizers import Tokenizer

    index_path = out / "model_index.json"
    index = json.loads(index_path.read_text())
    for d in sorted(out.glob("tokenizer*")):
        tj = d / "tokenizer.json"
        assert tj.exists(), tj
        Tokenizer.from_file(str(tj)).save(str(tj), pretty=False)
        for extra in ("vocab.json", "merges.txt"):
            (d / extra).unlink(missing_ok=True)
        if d.name in index:
            index[d.name] = ["transformers", "CLIPTokenizerFast"]
    write_json(index_path, index)


# What every reference tensor is; copied into cases.json under "conventions".
CONVENTIONS = {
    "general": (
        "All .npy are little-endian, C-order, no pickle. Float tensors are float32, ids int64. S = number "
        "of denoising steps actually run (txt2img: num_inference_steps; img2img: "
        "len(timesteps) after strength truncation). Batch order for classifier-free guidance is "
        "[negative/unconditional, positive] everywhere (diffusers order). Produced by optimum's ORT "
        "pipelines on the committed ONNX files, onnxruntime CPU, 1 intra-op thread."
    ),
    "noise": "[1,4,H/8,W/8] float32, unscaled unit Gaussian: torch.randn(shape, generator=torch.Generator().manual_seed(seed)). txt2img: passed to the pipeline as `latents=`; the pipeline multiplies it by scheduler.init_noise_sigma, so latents_init = noise * init_noise_sigma. img2img: substituted for the pipeline's randn_tensor draw (the only draw), so latents_init = scheduler.add_noise(init_latents, noise, timesteps[0]).",
    "input_ids": "[2,77] int64, tokenizer/tokenizer.json: row 0 = negative prompt, row 1 = prompt; <|startoftext|> ... <|endoftext|>, padded to 77 with the pad token (tokenizer: <|endoftext|> 49407), truncated to 77.",
    "input_ids_2": "SDXL only: [2,77] int64 from tokenizer_2 (pad token '!' = id 0), rows as input_ids.",
    "prompt_embeds": "[2,77,C] float32 = the UNet's encoder_hidden_states (row 0 negative, row 1 positive). SD 1.x: text_encoder last_hidden_state (C=32). SDXL: concat on the last axis of text_encoder 'hidden_states.1' (penultimate layer of 2) and text_encoder_2 'hidden_states.1' (C=16+16=32).",
    "pooled_prompt_embeds": "SDXL only: [2,16] float32 = text_encoder_2 'text_embeds' (projected pooled output), fed to the UNet as text_embeds; row 0 negative.",
    "add_time_ids": "SDXL only: [2,6] float32 fed to the UNet as time_ids: [orig_h, orig_w, crop_top, crop_left, target_h, target_w] = [64,64,0,0,64,64] for both rows (img2img too: requires_aesthetics_score is false).",
    "init_image_pixels": "img2img: [1,3,H,W] float32 NCHW in [-1,1] = init_image.png (uint8 RGB) / 255 * 2 - 1, the vae_encoder input.",
    "init_latents": "img2img: [1,4,H/8,W/8] float32 = vae_encoder latent_parameters[:, :4] (the MEAN of the latent distribution, no sampling) * vae scaling_factor (0.18215 SD 1.x, 0.13025 SDXL).",
    "timesteps": "[S] timesteps actually used, one per step, in the scheduler's dtype (int64 for DDIM/DPM++, float32 for Euler). cases.json also lists timesteps_schedule = scheduler.timesteps after set_timesteps (before img2img truncation).",
    "sigmas": "Euler / DPM++ only: scheduler.sigmas as float32 [num_inference_steps+1] (the full schedule; for img2img the used part starts at index num_inference_steps - S).",
    "unet_timestep": "[S] float32: the value fed to the ONNX UNet's rank-0 float32 `timestep` input at each step (= float(timesteps[i])).",
    "latents_init": "[1,4,H/8,W/8] float32: latents before the first step, in scheduler space (see noise).",
    "unet_sample": "[S,2,4,H/8,W/8] float32: the ONNX UNet `sample` input per step = scheduler.scale_model_input(concat([latents, latents])) (Euler: latents / sqrt(sigma^2+1); DDIM, DPM++: unchanged).",
    "unet_out": "[S,2,4,H/8,W/8] float32: the ONNX UNet `out_sample` per step (row 0 unconditional, row 1 conditional).",
    "noise_pred": "[S,1,4,H/8,W/8] float32: guided prediction passed to scheduler.step = uncond + guidance_scale * (cond - uncond).",
    "step_latents": "[S,1,4,H/8,W/8] float32: scheduler.step(...).prev_sample after each step.",
    "final_latents": "[1,4,H/8,W/8] float32 = step_latents[-1], still multiplied by the VAE scaling factor; the vae_decoder input is final_latents / scaling_factor.",
    "vae_decoder_out": "[1,3,H,W] float32: raw vae_decoder `sample` output (roughly [-1,1]).",
    "image": "[1,H,W,3] float32 NHWC in [0,1] = clip(vae_decoder_out / 2 + 0.5, 0, 1) transposed; the pipeline's output_type='np' image.",
    "captioner.pixel_values": "[1,3,32,32] float32 NCHW from the ViTImageProcessor in preprocessor_config.json (bilinear resize 64->32, /255, (x-0.5)/0.5) applied to init_image.png.",
    "captioner.encoder_last_hidden_state": "[1,17,32] float32: encoder_model.onnx last_hidden_state for pixel_values.",
    "captioner.token_ids": "[1,1+max_new_tokens] int64 from ORTModelForVision2Seq.generate: decoder_start_token_id (0) followed by the generated ids; min_new_tokens suppresses EOS (id 0) for the first 8 new tokens.",
}


# ----------------------------------------------------------------------------- reference runs
SCHEDULERS = {
    # name: (class name, extra config over the pipeline's scheduler_config.json)
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
}


def make_scheduler(name: str, base_config):
    import diffusers

    cls_name, extra = SCHEDULERS[name]
    return getattr(diffusers, cls_name).from_config(dict(base_config, **extra))


def session_options():
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1  # single thread: bit-reproducible reductions
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return so


def init_image(path: pathlib.Path):
    """Deterministic 64x64 RGB test image: R = x ramp, G = y ramp, B = 8x8 checkerboard mix."""
    from PIL import Image

    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    r = (x * 255) // (WIDTH - 1)
    g = (y * 255) // (HEIGHT - 1)
    b = np.where(((x // 8) + (y // 8)) % 2 == 0, 200, 40) + 0 * x
    arr = np.stack([r, g, b], axis=-1).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, "RGB").save(path, optimize=False)
    return Image.open(path).convert("RGB")


class Recorder:
    """Wraps one ORT pipeline's parts and scheduler to record every tensor that flows through."""

    def __init__(self, pipe, noise: torch.Tensor, img2img_modules=()):
        self.pipe = pipe
        self.noise = noise
        self.rec: dict[str, list] = {}
        self._undo = []
        self._wrap(pipe.unet, "forward", self._unet)
        self._wrap(pipe.vae.decoder, "forward", self._vae_dec)
        self._wrap(pipe.vae.encoder, "forward", self._vae_enc)
        for name in ("text_encoder", "text_encoder_2"):
            part = getattr(pipe, name, None)
            if part is not None:
                self._wrap(part, "forward", self._text(name))
        self._wrap(pipe.scheduler, "step", self._step)
        for mod in img2img_modules:
            # VAE encode: deterministic mean of the latent distribution, not a sample
            self._patch(mod, "retrieve_latents", lambda enc, generator=None, sample_mode="sample": enc.latent_dist.mode())
            # the img2img noise: the saved tensor instead of a fresh draw
            self._patch(mod, "randn_tensor", self._randn)

    def _patch(self, obj, name, fn):
        old = getattr(obj, name)
        setattr(obj, name, fn)
        self._undo.append(lambda: setattr(obj, name, old))

    def _wrap(self, obj, name, make):
        old = getattr(obj, name)
        self._patch(obj, name, make(old))

    def restore(self):
        for undo in reversed(self._undo):
            undo()

    def add(self, key, val):
        if isinstance(val, torch.Tensor):
            val = val.detach().cpu().numpy().copy()
        elif isinstance(val, np.ndarray):
            val = val.copy()
        self.rec.setdefault(key, []).append(val)

    def _randn(self, shape, generator=None, device=None, dtype=None, layout=None):
        assert tuple(shape) == tuple(self.noise.shape), (shape, self.noise.shape)
        self.add("randn_calls", np.array(1))
        return self.noise.clone().to(dtype=dtype or torch.float32)

    def _unet(self, old):
        def f(sample, timestep, encoder_hidden_states, *a, added_cond_kwargs=None, **kw):
            self.add("unet_sample", sample)
            self.add("unet_timestep", torch.as_tensor(timestep))
            self.add("unet_encoder_hidden_states", encoder_hidden_states)
            if added_cond_kwargs:
                self.add("unet_text_embeds", added_cond_kwargs["text_embeds"])
                self.add("unet_time_ids", added_cond_kwargs["time_ids"])
            out = old(sample, timestep, encoder_hidden_states, *a, added_cond_kwargs=added_cond_kwargs, **kw)
            self.add("unet_out", out[0] if isinstance(out, tuple) else out.sample)
            return out
        return f

    def _step(self, old):
        def f(model_output, timestep, sample, *a, **kw):
            self.add("step_model_output", model_output)
            self.add("step_timestep", torch.as_tensor(timestep))
            self.add("step_sample", sample)
            out = old(model_output, timestep, sample, *a, **kw)
            self.add("step_prev_sample", out[0] if isinstance(out, tuple) else out.prev_sample)
            return out
        return f

    def _vae_dec(self, old):
        def f(latent_sample, *a, **kw):
            self.add("vae_decoder_in", latent_sample)
            out = old(latent_sample, *a, **kw)
            self.add("vae_decoder_out", out[0] if isinstance(out, tuple) else out.sample)
            return out
        return f

    def _vae_enc(self, old):
        def f(sample, *a, **kw):
            self.add("vae_encoder_in", sample)
            out = old(sample, *a, **kw)
            self.add("vae_encoder_mean", out.latent_dist.mean)
            return out
        return f

    def _text(self, name):
        def make(old):
            def f(input_ids, *a, **kw):
                self.add(f"{name}_input_ids", input_ids)
                return old(input_ids, *a, **kw)
            return f
        return make


def load_pipes(kind: str, model_dir: pathlib.Path):
    from optimum.onnxruntime import (
        ORTStableDiffusionImg2ImgPipeline,
        ORTStableDiffusionPipeline,
        ORTStableDiffusionXLImg2ImgPipeline,
        ORTStableDiffusionXLPipeline,
    )

    t2i_cls, i2i_cls = {
        "sd15": (ORTStableDiffusionPipeline, ORTStableDiffusionImg2ImgPipeline),
        "sdxl": (ORTStableDiffusionXLPipeline, ORTStableDiffusionXLImg2ImgPipeline),
    }[kind]
    kw = dict(provider="CPUExecutionProvider", session_options=session_options())
    return t2i_cls.from_pretrained(str(model_dir), **kw), i2i_cls.from_pretrained(str(model_dir), **kw)


def img2img_modules(kind: str):
    if kind == "sd15":
        from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as m
    else:
        from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_img2img as m
    return (m,)


def run_case(kind, mode, sched_name, pipes, noise, image):
    """Run one case through the ORT pipeline; return (recorded tensors, scheduler, output image)."""
    pipe = pipes[0] if mode == "txt2img" else pipes[1]
    base_cfg = dict(pipe.scheduler.config) if not hasattr(pipe, "_deskgen_base_cfg") else pipe._deskgen_base_cfg
    pipe._deskgen_base_cfg = base_cfg
    pipe.scheduler = make_scheduler(sched_name, base_cfg)
    rec = Recorder(pipe, noise, img2img_modules(kind) if mode == "img2img" else ())
    try:
        kw = dict(
            prompt=PROMPT,
            negative_prompt=NEGATIVE,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            output_type="np",
        )
        if mode == "txt2img":
            kw.update(height=HEIGHT, width=WIDTH, latents=noise.clone())
        else:
            kw.update(image=image, strength=STRENGTH)
        images = pipe(**kw).images
    finally:
        rec.restore()
    return rec.rec, pipe.scheduler, np.asarray(images, dtype=np.float32)


def stack(rec, key):
    return np.stack([np.asarray(v) for v in rec[key]])


def reference_model(kind: str, model_dir: pathlib.Path, ref_root: pathlib.Path) -> dict:
    outdir = ref_root / kind
    if outdir.exists():
        shutil.rmtree(outdir)
    outdir.mkdir(parents=True)
    pipes = load_pipes(kind, model_dir)
    image = init_image(ref_root / "init_image.png")
    g = torch.Generator().manual_seed(NOISE_SEED[kind])
    noise = torch.randn((1, 4, HEIGHT // 8, WIDTH // 8), generator=g, dtype=torch.float32)
    shared = {"noise": save_npy(outdir / "noise.npy", noise)}
    cases = []
    shared_vals: dict[str, np.ndarray] = {}

    def keep_shared(name, arr, desc_file):
        arr = np.asarray(arr)
        if name in shared_vals:
            assert shared_vals[name].dtype == arr.dtype and np.array_equal(shared_vals[name], arr), name
        else:
            shared_vals[name] = arr
            shared[name] = save_npy(outdir / desc_file, arr)

    for mode in ("txt2img", "img2img"):
        for sched_name in SCHEDULERS:
            cid = f"{mode}_{sched_name}"
            rec, sched, images = run_case(kind, mode, sched_name, pipes, noise, image)
            cdir = outdir / cid
            sf = float(pipes[0].vae.config.scaling_factor)
            # text side (identical for every case; saved once per model)
            ids = stack(rec, "text_encoder_input_ids")[:, 0]  # calls: [prompt, negative]
            keep_shared("input_ids", ids[::-1].astype(np.int64), "input_ids.npy")  # -> [negative, prompt]
            if "text_encoder_2_input_ids" in rec:
                ids2 = stack(rec, "text_encoder_2_input_ids")[:, 0]
                keep_shared("input_ids_2", ids2[::-1].astype(np.int64), "input_ids_2.npy")
            ehs = rec["unet_encoder_hidden_states"]
            assert all(np.array_equal(ehs[0], e) for e in ehs)
            keep_shared("prompt_embeds", ehs[0], "prompt_embeds.npy")
            if "unet_text_embeds" in rec:
                keep_shared("pooled_prompt_embeds", rec["unet_text_embeds"][0], "pooled_prompt_embeds.npy")
                keep_shared("add_time_ids", rec["unet_time_ids"][0], "add_time_ids.npy")
            files = {}
            S = len(rec["unet_sample"])
            used = stack(rec, "step_timestep")
            assert S == len(used) and np.array_equal(used, np.asarray(sched.timesteps)[-S:]), (S, sched.timesteps)
            files["timesteps"] = save_npy(cdir / "timesteps.npy", used)
            if getattr(sched, "sigmas", None) is not None:
                files["sigmas"] = save_npy(cdir / "sigmas.npy", np.asarray(sched.sigmas, dtype=np.float32))
            files["unet_timestep"] = save_npy(cdir / "unet_timestep.npy", stack(rec, "unet_timestep").astype(np.float32))
            files["latents_init"] = save_npy(cdir / "latents_init.npy", rec["step_sample"][0])
            files["unet_sample"] = save_npy(cdir / "unet_sample.npy", stack(rec, "unet_sample"))
            files["unet_out"] = save_npy(cdir / "unet_out.npy", stack(rec, "unet_out"))
            files["noise_pred"] = save_npy(cdir / "noise_pred.npy", stack(rec, "step_model_output"))
            files["step_latents"] = save_npy(cdir / "step_latents.npy", stack(rec, "step_prev_sample"))
            final = rec["step_prev_sample"][-1]
            files["final_latents"] = save_npy(cdir / "final_latents.npy", final)
            dec_in = rec["vae_decoder_in"][0]
            assert np.allclose(dec_in, final / sf, rtol=0, atol=1e-6)
            files["vae_decoder_out"] = save_npy(cdir / "vae_decoder_out.npy", rec["vae_decoder_out"][0])
            files["image"] = save_npy(cdir / "image.npy", images)
            if mode == "img2img":
                assert len(rec.get("randn_calls", [])) == 1, "img2img must draw its noise exactly once"
                keep_shared("init_image_pixels", rec["vae_encoder_in"][0], "init_image_pixels.npy")
                keep_shared("init_latents", rec["vae_encoder_mean"][0] * sf, "init_latents.npy")
            else:
                assert "randn_calls" not in rec
                assert np.array_equal(rec["step_sample"][0], (noise * sched.init_noise_sigma).numpy()) or np.allclose(
                    rec["step_sample"][0], (noise * sched.init_noise_sigma).numpy(), rtol=0, atol=0
                )
            case = {
                "id": f"{kind}/{cid}",
                "model": kind,
                "model_dir": rel(model_dir),
                "mode": mode,
                "scheduler": sched_name,
                "scheduler_class": type(sched).__name__,
                "scheduler_config": json.loads(json.dumps(dict(sched.config), default=str)),
                "prompt": PROMPT,
                "negative_prompt": NEGATIVE,
                "guidance_scale": GUIDANCE,
                "num_inference_steps": STEPS,
                "height": HEIGHT,
                "width": WIDTH,
                "vae_scaling_factor": sf,
                "init_noise_sigma": float(sched.init_noise_sigma),
                "timesteps_schedule": np.asarray(sched.timesteps).tolist(),
                "timesteps": used.tolist(),
                "timesteps_dtype": str(used.dtype),
                "sigmas": None if getattr(sched, "sigmas", None) is None else np.asarray(sched.sigmas, dtype=np.float64).tolist(),
                "dir": rel(cdir),
                "files": {k: rel(cdir / v) for k, v in files.items()},
            }
            if mode == "img2img":
                case.update(strength=STRENGTH, init_image=rel(ref_root / "init_image.png"), vae_encode="mean")
            cases.append(case)
            print(f"reference: {kind}/{cid} image mean {images.mean():.6f}", file=sys.stderr)
    shared_files = {k: rel(outdir / v) for k, v in shared.items()}
    for c in cases:
        c["shared_files"] = {
            k: v for k, v in shared_files.items()
            if c["mode"] == "img2img" or k not in ("init_image_pixels", "init_latents")
        }
    return {"cases": cases, "shared_files": shared_files}


# ----------------------------------------------------------------------------- scheduler tables
TABLE_SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
}
TABLE_STEPS = (1, 4, 20, 50, 150)
TABLE_SPACINGS = ("leading", "trailing", "linspace")


def sd15_scheduler_config() -> dict:
    from diffusers import PNDMScheduler

    return dict(PNDMScheduler.from_config(
        dict(SCHED_COMMON, set_alpha_to_one=False, skip_prk_steps=True, clip_sample=False)
    ).config)


def floats(x) -> list:
    return [float(v) for v in np.asarray(x, dtype=np.float64).ravel()]


def scheduler_tables(path: pathlib.Path) -> None:
    import diffusers

    base = sd15_scheduler_config()
    entries = []
    for name, (cls_name, extra) in TABLE_SCHEDULERS.items():
        for spacing in TABLE_SPACINGS:
            cfg = dict(base, **extra, timestep_spacing=spacing)
            for steps in TABLE_STEPS:
                s = getattr(diffusers, cls_name).from_config(cfg)
                s.set_timesteps(steps)
                ts = np.asarray(s.timesteps)
                # StableDiffusionImg2ImgPipeline.get_timesteps (SDXL's is identical without denoising_start)
                init_timestep = min(int(steps * STRENGTH), steps)
                t_start = max(steps - init_timestep, 0)
                begin = t_start * s.order
                i2i = ts[begin:]
                e = {
                    "scheduler": name,
                    "class": cls_name,
                    "timestep_spacing": spacing,
                    "num_inference_steps": steps,
                    "order": s.order,
                    "timesteps": ts.tolist(),
                    "timesteps_dtype": str(ts.dtype),
                    "init_noise_sigma": float(s.init_noise_sigma),
                    "sigmas": floats(s.sigmas) if getattr(s, "sigmas", None) is not None else None,
                    "img2img": {
                        "strength": STRENGTH,
                        "t_start": t_start,
                        "begin_index": begin,
                        "timesteps": i2i.tolist(),
                        "sigma_at_start": (float(np.asarray(s.sigmas)[begin]) if getattr(s, "sigmas", None) is not None and len(i2i) else None),
                    },
                    "config": json.loads(json.dumps(dict(s.config), default=str)),
                }
                entries.append(e)
    doc = {
        "description": (
            "diffusers 0.39.0 schedulers on the Stable Diffusion 1.5 scheduler config "
            "(scaled_linear betas 0.00085..0.012, 1000 train steps, steps_offset 1, set_alpha_to_one false, "
            "prediction_type epsilon) with timestep_spacing overridden per entry. `timesteps` = scheduler.timesteps "
            "after set_timesteps(num_inference_steps) (dtype in timesteps_dtype); `sigmas` = scheduler.sigmas "
            "(len(timesteps)+1, last is the final sigma; null for DDIM); `init_noise_sigma` multiplies unit "
            "noise for txt2img. img2img: init_timestep = min(int(steps*strength), steps), t_start = steps - "
            "init_timestep, remaining timesteps = timesteps[t_start*order:], noise is added at timesteps[0] of "
            "that list (sigma_at_start = sigmas[begin_index] for sigma schedulers). `config` is the full "
            "scheduler config used."
        ),
        "base_config": json.loads(json.dumps(base, default=str)),
        "entries": entries,
    }
    write_json(path, doc)


# ----------------------------------------------------------------------------- captioner
CAPTION_IMAGE = 32
CAPTION_MIN_NEW = 8
CAPTION_MAX_NEW = 16


def caption_tokenizer():
    """A small byte-level BPE (GPT-2 style, 256 byte symbols + merges, 320 tokens in all)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2TokenizerFast

    corpus = [
        "a desk with a laptop and a cup of coffee",
        "a wooden table with a keyboard, a mouse and a monitor",
        "a chair in front of a desk near a window",
        "a photo of an office with books on the shelf",
        "a cat sitting on a laptop keyboard",
        "two monitors and a lamp on a white desk",
    ] * 4
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return GPT2TokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        model_max_length=64,
    )


def build_captioner(ckpt: pathlib.Path) -> None:
    from transformers import (
        GenerationConfig,
        GPT2Config,
        GPT2LMHeadModel,
        ViTConfig,
        ViTImageProcessor,
        ViTModel,
        VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
    )

    tok = caption_tokenizer()
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    enc_cfg = ViTConfig(
        image_size=CAPTION_IMAGE, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, initializer_range=0.2,
    )
    dec_cfg = GPT2Config(
        vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2, n_inner=64,
        bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
        add_cross_attention=True, is_decoder=True,
        # wide init so the random model's greedy/beam outputs vary from step to step
        initializer_range=0.2,
    )
    cfg = VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc_cfg, dec_cfg)
    cfg.decoder_start_token_id = eos
    cfg.pad_token_id = eos
    cfg.eos_token_id = eos
    torch.manual_seed(0)
    model = VisionEncoderDecoderModel(config=cfg, encoder=ViTModel(enc_cfg), decoder=GPT2LMHeadModel(dec_cfg))
    with torch.no_grad():
        # position embeddings dominate the random token embeddings, so the greedy path does not
        # lock onto one repeated token and a wrong position / past-key-value offset shows up
        model.decoder.transformer.wpe.weight.mul_(8.0)
    model.config.decoder_start_token_id = eos
    model.config.pad_token_id = eos
    model.config.eos_token_id = eos
    model.generation_config = GenerationConfig(
        decoder_start_token_id=eos, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, max_length=CAPTION_MAX_NEW + 1,
    )
    model.eval()
    model.save_pretrained(str(ckpt), safe_serialization=True)
    tok.save_pretrained(str(ckpt))
    ViTImageProcessor(
        do_resize=True, size={"height": CAPTION_IMAGE, "width": CAPTION_IMAGE}, resample=2,
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    ).save_pretrained(str(ckpt))


def export_captioner(ckpt: pathlib.Path, out: pathlib.Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    optimum_cli = pathlib.Path(sys.executable).parent / "optimum-cli"
    subprocess.run(
        [str(optimum_cli), "export", "onnx", "--model", str(ckpt), "--task", "image-to-text-with-past", str(out)],
        check=True,
    )
    for extra in ("vocab.json", "merges.txt"):
        (out / extra).unlink(missing_ok=True)
    for cfg in sorted(out.rglob("*.json")):
        obj = json.loads(cfg.read_text())
        if isinstance(obj, dict) and "_name_or_path" in obj:
            obj["_name_or_path"] = out.name
            write_json(cfg, obj)
    assert (out / "tokenizer.json").exists()


def caption_reference(model_dir: pathlib.Path, ref_root: pathlib.Path) -> dict:
    from optimum.onnxruntime import ORTModelForVision2Seq
    from PIL import Image
    from transformers import AutoImageProcessor

    outdir = ref_root / "captioner"
    if outdir.exists():
        shutil.rmtree(outdir)
    outdir.mkdir(parents=True)
    image_path = ref_root / "init_image.png"
    if not image_path.exists():
        init_image(image_path)
    image = Image.open(image_path).convert("RGB")
    proc = AutoImageProcessor.from_pretrained(str(model_dir))
    pixel_values = proc(images=image, return_tensors="pt").pixel_values
    model = ORTModelForVision2Seq.from_pretrained(
        str(model_dir), provider="CPUExecutionProvider", session_options=session_options(), use_cache=True,
    )
    files = {"pixel_values": rel(outdir / save_npy(outdir / "pixel_values.npy", pixel_values))}
    enc = model.encoder(pixel_values=pixel_values)
    files["encoder_last_hidden_state"] = rel(outdir / save_npy(outdir / "encoder_last_hidden_state.npy", enc.last_hidden_state))
    cases = []
    for name, extra in (("greedy", dict(do_sample=False, num_beams=1)), ("beam3", dict(do_sample=False, num_beams=3))):
        gen = model.generate(
            pixel_values=pixel_values, max_new_tokens=CAPTION_MAX_NEW, min_new_tokens=CAPTION_MIN_NEW, **extra
        )
        ids = gen.numpy().astype(np.int64)
        cases.append({
            "id": f"captioner/{name}",
            "decoding": name,
            "num_beams": extra["num_beams"],
            "do_sample": False,
            "max_new_tokens": CAPTION_MAX_NEW,
            "min_new_tokens": CAPTION_MIN_NEW,
            "length_penalty": float(model.generation_config.length_penalty),
            "early_stopping": model.generation_config.early_stopping,
            "token_ids": ids.tolist(),
            "file": rel(outdir / save_npy(outdir / f"token_ids_{name}.npy", ids)),
        })
        print(f"reference: captioner/{name} {ids.tolist()}", file=sys.stderr)
    return {
        "model_dir": rel(model_dir),
        "image": rel(image_path),
        "decoder_file_used": pathlib.Path(getattr(model.decoder.session, "_model_path", "?")).name,
        "files": files,
        "cases": cases,
    }


# ----------------------------------------------------------------------------- checks
def caption_parity(work: pathlib.Path, ref_root: pathlib.Path) -> dict:
    from transformers import VisionEncoderDecoderModel

    model = VisionEncoderDecoderModel.from_pretrained(str(work / "ckpt-captioner")).eval()
    pv = torch.from_numpy(np.load(ref_root / "captioner" / "pixel_values.npy"))
    res = {}
    for name, beams in (("greedy", 1), ("beam3", 3)):
        with torch.no_grad():
            ids = model.generate(pixel_values=pv, max_new_tokens=CAPTION_MAX_NEW, min_new_tokens=CAPTION_MIN_NEW,
                                 num_beams=beams, do_sample=False).numpy()
        res[f"captioner/{name}/token_ids_equal"] = bool(np.array_equal(ids, np.load(ref_root / "captioner" / f"token_ids_{name}.npy")))
    return res


def export_checks(work: pathlib.Path, out: pathlib.Path) -> dict:
    """ONNX vs PyTorch on the same weights, at the traced and at other sizes (dynamic shapes)."""
    import onnxruntime as ort
    from diffusers import UNet2DConditionModel

    res = {}
    for kind in ("sd15", "sdxl"):
        unet = UNet2DConditionModel.from_pretrained(str(work / f"ckpt-{kind}" / "unet")).eval()
        sess = ort.InferenceSession(str(out / f"tiny-{kind}" / "unet" / "model.onnx"), session_options(), providers=["CPUExecutionProvider"])
        g = torch.Generator().manual_seed(7)
        for h, w in ((8, 8), (32, 32), (40, 32)):
            x = torch.randn(2, 4, h, w, generator=g)
            ehs = torch.randn(2, 77, 32, generator=g)
            t = torch.tensor(501.0)
            feed = {"sample": x.numpy(), "timestep": t.numpy(), "encoder_hidden_states": ehs.numpy()}
            added = None
            if kind == "sdxl":
                te = torch.randn(2, 16, generator=g)
                ti = torch.tensor([[h * 8.0, w * 8.0, 0.0, 0.0, h * 8.0, w * 8.0]] * 2)
                feed.update(text_embeds=te.numpy(), time_ids=ti.numpy())
                added = {"text_embeds": te, "time_ids": ti}
            with torch.no_grad():
                ref = unet(x, t, ehs, added_cond_kwargs=added).sample.numpy()
            got = sess.run(None, feed)[0]
            res[f"{kind}/unet/{h * 8}x{w * 8}"] = float(np.abs(ref - got).max())
    return res


def pipeline_parity(work: pathlib.Path, ref_root: pathlib.Path) -> dict:
    """The same txt2img case through the PyTorch diffusers pipeline on the source checkpoint."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    res = {}
    for kind, cls in (("sd15", StableDiffusionPipeline), ("sdxl", StableDiffusionXLPipeline)):
        pipe = cls.from_pretrained(str(work / f"ckpt-{kind}"))
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        noise = torch.from_numpy(np.load(ref_root / kind / "noise.npy"))
        with torch.no_grad():
            img = pipe(
                prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                height=HEIGHT, width=WIDTH, latents=noise.clone(), output_type="np",
            ).images
        ref = np.load(ref_root / kind / "txt2img_euler" / "image.npy")
        res[f"{kind}/txt2img_euler/image"] = float(np.abs(np.asarray(img, np.float32) - ref).max())
    return res


def selfcheck(out: pathlib.Path) -> dict:
    """Re-run cases with freshly loaded pipelines and compare every saved tensor bit for bit."""
    ref_root = out / "reference"
    res = {}
    for kind, mode, sched in (("sd15", "txt2img", "euler"), ("sdxl", "img2img", "dpmpp_2m")):
        pipes = load_pipes(kind, out / f"tiny-{kind}")
        noise = torch.from_numpy(np.load(ref_root / kind / "noise.npy"))
        from PIL import Image

        image = Image.open(ref_root / "init_image.png").convert("RGB")
        rec, _, images = run_case(kind, mode, sched, pipes, noise, image)
        cdir = ref_root / kind / f"{mode}_{sched}"
        pairs = {
            "image": images,
            "final_latents": rec["step_prev_sample"][-1],
            "unet_out": stack(rec, "unet_out"),
            "step_latents": stack(rec, "step_prev_sample"),
        }
        worst = 0.0
        for name, arr in pairs.items():
            saved = np.load(cdir / f"{name}.npy")
            assert saved.shape == arr.shape and saved.dtype == arr.dtype, name
            d = float(np.abs(saved.astype(np.float64) - arr.astype(np.float64)).max())
            worst = max(worst, d)
            assert np.array_equal(saved, arr), f"{kind}/{mode}_{sched}/{name} not bit-identical (max diff {d})"
        res[f"{kind}/{mode}_{sched}"] = worst
        print(f"selfcheck: {kind}/{mode}_{sched} bit-identical (max abs diff {worst})", file=sys.stderr)
    return res


def write_manifest(out: pathlib.Path) -> None:
    entries = []
    skip = {"manifest.fixtures.json", "README.md"}
    for p in sorted(out.rglob("*")):
        if not p.is_file() or p.name in skip or p.name.endswith(".tmp.json"):
            continue
        entries.append({
            "id": str(p.relative_to(out)),
            "path": rel(p),
            "sha256": sha256(p),
            "size": p.stat().st_size,
            "made_by": "onnx/make_fixtures.sh",
        })
    # the LoRA adapters live beside the fixtures (onnx/loras is the service's default --lora-dir)
    loras = out.parent / "loras"
    for p in sorted(loras.glob("*")) if loras.is_dir() else []:
        entries.append({
            "id": f"../loras/{p.name}",
            "path": f"onnx/loras/{p.name}",
            "sha256": sha256(p),
            "size": p.stat().st_size,
            "made_by": "onnx/make_fixtures.sh",
        })
    write_json(out / "manifest.fixtures.json", entries)


# ----------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("stages", nargs="*", default=["all"])
    ap.add_argument("--out", default=str(ONNX_DIR / "fixtures"))
    ap.add_argument("--work", default=None, help="scratch dir for checkpoints (default: temp)")
    args = ap.parse_args()
    out = pathlib.Path(args.out).resolve()
    FIXTURES["out"] = out
    stages = args.stages
    if "all" in stages:
        stages = ["models", "captioner", "reference", "schedulers", "caption-ref", "loras", "lora-ref",
                  "controlnet", "controlnet-ref", "lcm-lora", "fewstep-ref", "canny", "preview", "inpaint", "inpaint-ref",
                  "selfcheck", "manifest"]
    work_ctx = tempfile.TemporaryDirectory(prefix="deskgen-fixtures-") if args.work is None else None
    work = pathlib.Path(args.work or work_ctx.name)
    work.mkdir(parents=True, exist_ok=True)

    ref = out / "reference"
    checks_path = ref / "checks.json"
    checks = json.loads(checks_path.read_text()) if checks_path.exists() else {}

    if "models" in stages:
        build_sd15(work / "ckpt-sd15", work)
        export_pipeline(work / "ckpt-sd15", out / "tiny-sd15")
        build_sdxl(work / "ckpt-sdxl", work)
        export_pipeline(work / "ckpt-sdxl", out / "tiny-sdxl")
        checks["onnx_vs_torch_unet_max_abs_diff"] = export_checks(work, out)

    if "captioner" in stages:
        build_captioner(work / "ckpt-captioner")
        export_captioner(work / "ckpt-captioner", out / "tiny-captioner")

    cases_path = ref / "cases.json"
    if "reference" in stages:
        doc = json.loads(cases_path.read_text()) if cases_path.exists() else {}
        doc = {"conventions": CONVENTIONS, **{k: v for k, v in doc.items() if k != "conventions"}}
        for k in ("sd15", "sdxl"):
            doc[k] = reference_model(k, out / f"tiny-{k}", ref)
        write_json(cases_path, doc)
        if (work / "ckpt-sd15").exists():
            checks["ort_vs_torch_pipeline_max_abs_diff"] = pipeline_parity(work, ref)

    if "schedulers" in stages:
        scheduler_tables(ref / "schedulers.json")

    if "caption-ref" in stages:
        doc = json.loads(cases_path.read_text()) if cases_path.exists() else {}
        doc["captioner"] = caption_reference(out / "tiny-captioner", ref)
        write_json(cases_path, doc)
        if (work / "ckpt-captioner").exists():
            checks["captioner_ort_vs_torch"] = caption_parity(work, ref)

    loras = out.parent / "loras"
    if ("loras" in stages or "lora-ref" in stages) and not (work / "ckpt-sd15").exists():
        build_sd15(work / "ckpt-sd15", work)  # seeded: the checkpoint tiny-sd15 was exported from
    if "loras" in stages:
        import make_lora_fixtures

        make_lora_fixtures.build_adapters(work / "ckpt-sd15", loras)

    if "lora-ref" in stages:
        import make_lora_fixtures

        checks["lora_fused_by_diffusers_vs_w_plus_scaled_ba_max_abs_diff"] = make_lora_fixtures.lora_reference(
            work / "ckpt-sd15", loras, ref, work, sys.modules[__name__]
        )

    if "controlnet" in stages or "controlnet-ref" in stages:
        import make_controlnet_fixtures

        for kind, build in (("sd15", build_sd15), ("sdxl", build_sdxl)):
            ckpt = work / f"ckpt-{kind}"
            if not ckpt.exists():
                build(ckpt, work)  # seeded: the checkpoint tiny-<kind> was exported from
            if "controlnet" in stages:
                make_controlnet_fixtures.export(kind, ckpt, out / f"tiny-{kind}")
            elif not (ckpt / "controlnet-canny").exists():
                make_controlnet_fixtures.build_controlnets(ckpt)
        if "controlnet-ref" in stages:
            make_controlnet_fixtures.reference(sys.modules[__name__], work, ref)

    if "preview" in stages:
        import make_preview_fixtures

        checks["preview_decoder_ort_vs_torch_max_abs_diff"] = make_preview_fixtures.build(
            out / "tiny-taesd", ref / "preview", save_npy
        )

    if "lcm-lora" in stages or "fewstep-ref" in stages:
        import make_fewstep_fixtures

        if not (work / "ckpt-sd15").exists():
            build_sd15(work / "ckpt-sd15", work)
        if "lcm-lora" in stages:
            make_fewstep_fixtures.build_lcm_lora(work / "ckpt-sd15", loras)
        if "fewstep-ref" in stages:
            checks["lcm_lora_fused_by_diffusers_vs_w_plus_scaled_ba_max_abs_diff"] = make_fewstep_fixtures.reference(
                sys.modules[__name__], work, ref, loras
            )

    if "canny" in stages:
        import make_canny_fixtures

        make_canny_fixtures.build(REPO, ref / "canny")

    if "inpaint" in stages or "inpaint-ref" in stages:
        import make_inpaint_fixtures as inpaint

        fx = sys.modules[__name__]
        if "inpaint" in stages:
            res = inpaint.export(fx, work, out)
            checks["inpaint_onnx_vs_torch_unet_max_abs_diff"] = res["unet"]
            checks["inpaint_files_byte_identical_to_tiny_sd15"] = res["same_bytes_as_tiny_sd15"]
        if "inpaint-ref" in stages:
            for name, build in ((inpaint.CKPT, lambda c, w: inpaint.build(fx, c, w)), ("ckpt-sd15", build_sd15),
                                ("ckpt-sdxl", build_sdxl)):
                if not (work / name).exists():
                    build(work / name, work)  # seeded: the checkpoints the tiny exports came from
            checks["inpaint_ort_vs_torch_pipeline"] = inpaint.reference(fx, work, ref)

    if "selfcheck" in stages:
        checks["rerun_max_abs_diff"] = selfcheck(out)

    if checks:
        write_json(checks_path, checks)

    if "manifest" in stages:
        write_manifest(out)


if __name__ == "__main__":
    main()
