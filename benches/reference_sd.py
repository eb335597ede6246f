"""Times the Python reference pipeline (optimum's ORTStableDiffusionPipeline) on the same ONNX
files, thread count, scheduler, size, steps and initial noise as the Rust side of the benchmark.

    python benches/reference_sd.py MODEL_DIR --threads 2 --steps 20 --runs 10 --size 256

Prints one JSON object: per-run wall times in milliseconds (warm-up runs excluded).
"""

import argparse
import json
import os
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--runs", type=int, required=True)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative", required=True)
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import onnxruntime as ort
    import torch
    from diffusers import DDIMScheduler
    from optimum.onnxruntime import ORTStableDiffusionPipeline

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    torch.set_num_threads(args.threads)
    pipe = ORTStableDiffusionPipeline.from_pretrained(
        args.model_dir, provider="CPUExecutionProvider", session_options=options
    )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn((1, 4, args.size // 8, args.size // 8), generator=generator)

    times = []
    for run in range(args.warmup + args.runs):
        started = time.perf_counter()
        image = pipe(
            prompt=args.prompt,
            negative_prompt=args.negative,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            height=args.size,
            width=args.size,
            latents=latents.clone(),
            output_type="pil",
        ).images[0]
        elapsed = (time.perf_counter() - started) * 1000.0
        if run >= args.warmup:
            times.append(elapsed)
    assert image.size == (args.size, args.size)
    json.dump({"runs_ms": times, "onnxruntime": ort.__version__}, sys.stdout)


if __name__ == "__main__":
    main()
