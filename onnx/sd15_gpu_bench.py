#!/usr/bin/env python3
"""An SD 1.5-shaped pipeline with random weights, for measuring deskgen against diffusers on a GPU.

    sd15_gpu_bench.py export OUT_DIR [--tiny] [--device cuda] [--dtype fp16]
        Builds text encoder, UNet and VAE from SD 1.5's configs with random weights (seed 0), saves
        them for diffusers (OUT_DIR/torch) and exports text_encoder, unet and vae_decoder to ONNX in
        optimum's layout (OUT_DIR/cpu: model_index.json, scheduler/, tokenizer/, */model.onnx,
        */config.json; legacy exporter, opset 17, static shapes: batch 2 at 512x512).
    sd15_gpu_bench.py diffusers OUT_DIR --steps 30 50 [--runs 2] [--device cuda]
        Times diffusers' StableDiffusionPipeline (eager, SDPA) on the same weights: end to end per
        generation and the UNet alone per step. Prints one JSON object.

The tokenizer is copied from onnx/fixtures/tiny-sd15/tokenizer (the real CLIP vocabulary).
--tiny shrinks every model (for checking the script on a CPU).
"""
import argparse
import json
import os
import shutil
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TOKENIZER = os.path.join(HERE, "fixtures", "tiny-sd15", "tokenizer")

UNET_SD15 = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                 cross_attention_dim=768, attention_head_dim=8)
VAE_SD15 = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
                block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
CLIP_SD15 = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
                 bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
SCHEDULER = {"_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "clip_sample": False, "num_train_timesteps": 1000,
             "prediction_type": "epsilon", "set_alpha_to_one": False, "steps_offset": 1,
             "timestep_spacing": "leading", "trained_betas": None}
MODEL_INDEX = {"_class_name": "StableDiffusionPipeline", "requires_safety_checker": False,
               "feature_extractor": [None, None], "safety_checker": [None, None],
               "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
               "tokenizer": ["transformers", "CLIPTokenizerFast"], "unet": ["diffusers", "UNet2DConditionModel"],
               "vae": ["diffusers", "AutoencoderKL"]}
PROMPT = "a tidy wooden desk with a large monitor, a mechanical keyboard and a desk lamp, photo"
NEGATIVE = "blurry, low resolution, distorted"

T0 = time.time()


def log(*parts):
    print(f"[sd15 +{time.time() - T0:6.1f}s]", *parts, file=sys.stderr, flush=True)


def shapes(tiny):
    if not tiny:
        return UNET_SD15, VAE_SD15, CLIP_SD15
    unet = dict(UNET_SD15, block_out_channels=(32, 64, 64, 64), layers_per_block=1, cross_attention_dim=32,
                attention_head_dim=4)
    vae = dict(VAE_SD15, block_out_channels=(32, 32, 32, 32), layers_per_block=1, norm_num_groups=8)
    clip = dict(CLIP_SD15, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                projection_dim=32)
    return unet, vae, clip


def export(args):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    dtype = torch.float16 if args.dtype == "fp16" else torch.float32
    unet_config, vae_config, clip_config = shapes(args.tiny)
    torch.manual_seed(0)
    with torch.device(args.device):
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(**vae_config)
        text_encoder = CLIPTextModel(CLIPTextConfig(**clip_config, attn_implementation="eager"))
    unet, vae, text_encoder = (m.to(dtype).eval() for m in (unet, vae, text_encoder))
    log(f"built models: unet {sum(p.numel() for p in unet.parameters()) / 1e6:.0f} M parameters")

    torch_dir = os.path.join(args.out, "torch")
    unet.save_pretrained(os.path.join(torch_dir, "unet"))
    vae.save_pretrained(os.path.join(torch_dir, "vae"))
    text_encoder.save_pretrained(os.path.join(torch_dir, "text_encoder"))
    log("saved torch weights")

    onnx_dir = os.path.join(args.out, "cpu")
    os.makedirs(onnx_dir, exist_ok=True)
    with open(os.path.join(onnx_dir, "model_index.json"), "w") as f:
        json.dump(MODEL_INDEX, f, indent=2)
    for sub in ("scheduler", "unet", "vae_decoder", "text_encoder"):
        os.makedirs(os.path.join(onnx_dir, sub), exist_ok=True)
    with open(os.path.join(onnx_dir, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(SCHEDULER, f, indent=2)
    shutil.copytree(TOKENIZER, os.path.join(onnx_dir, "tokenizer"), dirs_exist_ok=True)
    unet.save_config(os.path.join(onnx_dir, "unet"))
    vae.save_config(os.path.join(onnx_dir, "vae_decoder"))
    text_encoder.config.to_json_file(os.path.join(onnx_dir, "text_encoder", "config.json"))

    class TextEncoder(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids):
            out = self.model(input_ids, return_dict=True)
            return out.last_hidden_state, out.pooler_output

    class Unet(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, sample, timestep, encoder_hidden_states):
            return self.model(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]

    class VaeDecoder(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, latent_sample):
            return self.model.decode(latent_sample, return_dict=False)[0]

    latent = unet_config["sample_size"]
    hidden = clip_config["hidden_size"]
    dev = args.device
    jobs = [
        ("text_encoder", TextEncoder(text_encoder), (torch.full((2, 77), 49407, dtype=torch.int64, device=dev),),
         ["input_ids"], ["last_hidden_state", "pooler_output"]),
        ("unet", Unet(unet), (torch.randn(2, 4, latent, latent, device=dev, dtype=dtype),
                              torch.tensor(500.0, device=dev),
                              torch.randn(2, 77, hidden, device=dev, dtype=dtype)),
         ["sample", "timestep", "encoder_hidden_states"], ["out_sample"]),
        ("vae_decoder", VaeDecoder(vae), (torch.randn(1, 4, latent, latent, device=dev, dtype=dtype),),
         ["latent_sample"], ["sample"]),
    ]
    for name, module, inputs, input_names, output_names in jobs:
        started = time.time()
        with torch.no_grad():
            torch.onnx.export(module, inputs, os.path.join(onnx_dir, name, "model.onnx"), dynamo=False,
                              input_names=input_names, output_names=output_names, opset_version=17,
                              do_constant_folding=True)
        log(f"exported {name} in {time.time() - started:.1f} s")
    with open(os.path.join(onnx_dir, "deskgen-export.json"), "w") as f:
        json.dump({"target": "cpu", "models": {m: {"execution_provider": "any"} for m, *_ in jobs}}, f, indent=2)
    print(json.dumps({"ok": True, "seconds": round(time.time() - T0, 1)}))


def bench_diffusers(args):
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizerFast

    dtype = torch.float16 if args.dtype == "fp16" else torch.float32
    torch_dir = os.path.join(args.out, "torch")
    started = time.time()
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(os.path.join(torch_dir, "vae"), torch_dtype=dtype),
        text_encoder=CLIPTextModel.from_pretrained(os.path.join(torch_dir, "text_encoder"), torch_dtype=dtype),
        tokenizer=CLIPTokenizerFast.from_pretrained(TOKENIZER),
        unet=UNet2DConditionModel.from_pretrained(os.path.join(torch_dir, "unet"), torch_dtype=dtype),
        scheduler=DDIMScheduler.from_config(SCHEDULER),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    side = pipe.unet.config.sample_size * 8
    result = {"tool": "diffusers", "device": torch.cuda.get_device_name(0) if cuda else "cpu",
              "torch": torch.__version__, "dtype": args.dtype, "size": side, "load_s": round(time.time() - started, 2)}
    import diffusers
    result["diffusers"] = diffusers.__version__

    def generate(steps):
        generator = torch.Generator(args.device).manual_seed(42)
        return pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=7.5,
                    height=side, width=side, generator=generator, output_type="np").images

    with torch.inference_mode():
        started = time.time()
        generate(2)
        sync()
        result["warmup_s"] = round(time.time() - started, 2)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        runs = {}
        for steps in args.steps:
            times = []
            for _ in range(args.runs):
                sync()
                started = time.perf_counter()
                generate(steps)
                sync()
                times.append(time.perf_counter() - started)
            runs[str(steps)] = {"end_to_end_s": [round(t, 3) for t in times],
                                "median_s": round(statistics.median(times), 3)}
            log(f"diffusers {steps} steps: {runs[str(steps)]}")
        result["runs"] = runs
        if cuda:
            result["torch_max_memory_allocated_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            result["torch_max_memory_reserved_GiB"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)

        # The UNet alone on the guided batch, as one denoising step runs it.
        latent = pipe.unet.config.sample_size
        sample = torch.randn(2, 4, latent, latent, device=args.device, dtype=dtype)
        hidden = torch.randn(2, 77, pipe.text_encoder.config.hidden_size, device=args.device, dtype=dtype)
        timestep = torch.tensor(500.0, device=args.device)
        for _ in range(3):
            pipe.unet(sample, timestep, encoder_hidden_states=hidden)
        step_times = []
        for _ in range(args.unet_runs):
            sync()
            started = time.perf_counter()
            pipe.unet(sample, timestep, encoder_hidden_states=hidden)
            sync()
            step_times.append((time.perf_counter() - started) * 1e3)
        result["unet_step_ms_median"] = round(statistics.median(step_times), 2)
        result["unet_step_ms_min"] = round(min(step_times), 2)
    print(json.dumps(result), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["export", "diffusers"])
    parser.add_argument("out")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="fp16", choices=["fp16", "fp32"])
    parser.add_argument("--steps", type=int, nargs="+", default=[30, 50])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--unet-runs", type=int, default=20)
    args = parser.parse_args()
    if args.command == "export":
        export(args)
    else:
        bench_diffusers(args)


if __name__ == "__main__":
    main()
