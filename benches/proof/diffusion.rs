//! The Rust diffusion pipeline against the Python reference on the same ONNX files, thread count,
//! scheduler (DDIM), size, steps and guidance; the denoising loop's own cost per step; what a
//! ControlNet adds to a step; and what few-step generation saves.

use std::ops::ControlFlow;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};
use deskgen::core::request::DEFAULT_PREVIEW_EVERY;
use deskgen::inference::diffusion::{
    ControlUnit, GenerateParams, InpaintMask, SchedulerKind, StableDiffusion,
};
use deskgen::inference::{Runtime, RuntimeConfig};
use deskgen::pipeline::draw::preview_of;
use serde_json::{Value, json};

use crate::Settings;
use crate::report::{Report, percentile, summary, verdict};
use crate::server::repo_path;

const MODEL: &str = "onnx/fixtures/tiny-sd15";
const STEPS: u32 = 20;
const SIZE: u32 = 256;
const PROMPT: &str = "a realistic photo of a tidy wooden desk with a monitor and a lamp";
const NEGATIVE: &str = "blurry, low resolution, distorted";

/// The interpreter of the export venv (created on first use), or BENCH_PYTHON.
fn python() -> anyhow::Result<String> {
    if let Ok(python) = std::env::var("BENCH_PYTHON") {
        return Ok(python);
    }
    let out = Command::new("bash").arg(repo_path("onnx/ensure_venv.sh")).output()?;
    if !out.status.success() {
        bail!("onnx/ensure_venv.sh failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}

fn python_runs(settings: &Settings) -> anyhow::Result<(Vec<f64>, String)> {
    let out = Command::new(python()?)
        .current_dir(repo_path(""))
        .arg(repo_path("benches/reference_sd.py"))
        .arg(MODEL)
        .args(["--threads", &settings.threads.to_string(), "--steps", &STEPS.to_string()])
        .args(["--runs", &settings.runs.to_string(), "--size", &SIZE.to_string()])
        .args(["--prompt", PROMPT, "--negative", NEGATIVE])
        .env("OMP_NUM_THREADS", settings.threads.to_string())
        .env("TOKENIZERS_PARALLELISM", "false")
        .output()
        .context("running the Python reference")?;
    if !out.status.success() {
        bail!("the Python reference failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let doc: Value = serde_json::from_slice(&out.stdout).context("the Python reference's JSON")?;
    let runs = doc["runs_ms"].as_array().context("runs_ms")?.iter().filter_map(Value::as_f64).collect();
    Ok((runs, doc["onnxruntime"].as_str().unwrap_or("?").to_string()))
}

struct RustRun {
    total_ms: f64,
    unet_ms: f64,
    unet_run_ms: f64,
    controlnet_ms: f64,
}

fn params() -> GenerateParams {
    GenerateParams {
        prompt: PROMPT.into(),
        negative_prompt: NEGATIVE.into(),
        num_inference_steps: STEPS,
        guidance_scale: 7.5,
        width: SIZE,
        height: SIZE,
        strength: 1.0,
        seed: 0,
        scheduler: SchedulerKind::Ddim,
        init_image: None,
        guidance_rescale: 0.0,
        loras: Vec::new(),
        control: Vec::new(),
        mask: None,
    }
}

/// One canny ControlNet over every step, on the fixture's control image.
fn controlled() -> anyhow::Result<GenerateParams> {
    let image = image::open(repo_path("onnx/fixtures/reference/controlnet/control_canny.png"))?.to_rgb8();
    let unit = ControlUnit {
        control_type: "canny".into(),
        image,
        scale: 1.0,
        guidance_start: 0.0,
        guidance_end: 1.0,
    };
    Ok(GenerateParams { control: vec![unit], ..params() })
}

fn rust_runs(
    pipeline: &mut StableDiffusion,
    params: &GenerateParams,
    runs: usize,
) -> anyhow::Result<Vec<RustRun>> {
    let mut out = Vec::new();
    for _ in 0..runs {
        let started = Instant::now();
        let generated = pipeline.generate(params, &mut |_| ControlFlow::Continue(()))?;
        out.push(RustRun {
            total_ms: started.elapsed().as_secs_f64() * 1000.0,
            unet_ms: generated.timings.unet_ms,
            unet_run_ms: generated.timings.unet_run_ms,
            controlnet_ms: generated.timings.controlnet_ms,
        });
    }
    Ok(out)
}

pub async fn run(settings: &Settings, report: &mut Report) -> anyhow::Result<()> {
    let runtime =
        Runtime::init(&RuntimeConfig { intra_threads: settings.threads, ..RuntimeConfig::default() })?;
    let mut pipeline = StableDiffusion::load(&runtime, repo_path(MODEL))?;
    // Warm-up, then half the Rust runs before the Python ones and half after, so drift in the
    // machine's load falls on both sides.
    let (plain, steered) = (params(), controlled()?);
    rust_runs(&mut pipeline, &plain, 2)?;
    let half = settings.runs.div_ceil(2);
    let mut rust = rust_runs(&mut pipeline, &plain, half)?;
    // Without the reference the Rust figures still stand; the report says why the ratio is missing.
    let reference = tokio::task::block_in_place(|| python_runs(settings));
    rust.extend(rust_runs(&mut pipeline, &plain, settings.runs - half)?);
    rust_runs(&mut pipeline, &steered, 1)?;
    let with_control = rust_runs(&mut pipeline, &steered, settings.runs)?;

    let rust_total: Vec<f64> = rust.iter().map(|r| r.total_ms).collect();
    let step_ms: Vec<f64> = rust.iter().map(|r| r.unet_ms / f64::from(STEPS)).collect();
    let overhead_ms: Vec<f64> = rust.iter().map(|r| (r.unet_ms - r.unet_run_ms) / f64::from(STEPS)).collect();
    let overhead_share: Vec<f64> = rust.iter().map(|r| (r.unet_ms - r.unet_run_ms) / r.unet_ms).collect();
    let share = percentile(&overhead_share, 50.0);
    let mut lines = vec![
        format!(
            "txt2img {SIZE}x{SIZE}, {STEPS} DDIM steps, guidance 7.5, {} threads, {} runs each",
            settings.threads, settings.runs
        ),
        format!(
            "Rust   end to end   median {:>8.1} ms   p95 {:>8.1} ms",
            percentile(&rust_total, 50.0),
            percentile(&rust_total, 95.0)
        ),
    ];
    let mut doc = json!({
        "model": MODEL, "steps": STEPS, "size": SIZE, "scheduler": "ddim", "threads": settings.threads,
        "rust_ms": summary(&rust_total), "unet_step_ms": summary(&step_ms),
        "outside_session_run_ms_per_step": summary(&overhead_ms), "outside_session_run_share": share,
    });
    match reference {
        Ok((python, ort_version)) => {
            let ratio = percentile(&rust_total, 50.0) / percentile(&python, 50.0);
            lines.push(format!(
                "Python end to end   median {:>8.1} ms   p95 {:>8.1} ms   (optimum ORTStableDiffusionPipeline, onnxruntime {ort_version})",
                percentile(&python, 50.0),
                percentile(&python, 95.0)
            ));
            lines.push(format!(
                "Rust / Python       {ratio:>8.3}x   (target <= 0.9x: {})",
                verdict(ratio <= 0.9)
            ));
            doc["python_ms"] = summary(&python);
            doc["python_onnxruntime"] = json!(ort_version);
            doc["rust_over_python"] = json!(ratio);
        }
        Err(e) => {
            let reason = format!("{e:#}");
            lines.push(format!("Python reference    SKIPPED: {}", first_line(&reason)));
            doc["python_skipped"] = json!(reason);
        }
    }
    lines.push(format!("UNet step           median {:>8.3} ms", percentile(&step_ms, 50.0)));
    lines.push(format!(
        "outside session.run median {:>8.4} ms per step = {:.3}% of the step (target < 1%: {})",
        percentile(&overhead_ms, 50.0),
        share * 100.0,
        verdict(share < 0.01)
    ));
    let controlled_step: Vec<f64> = with_control.iter().map(|r| r.unet_ms / f64::from(STEPS)).collect();
    let controlnet_step: Vec<f64> = with_control.iter().map(|r| r.controlnet_ms / f64::from(STEPS)).collect();
    let control_ratio = percentile(&controlled_step, 50.0) / percentile(&step_ms, 50.0);
    lines.push(format!(
        "UNet step + 1 ControlNet median {:>8.3} ms = {control_ratio:.2}x the plain step (the ControlNet alone {:.3} ms)",
        percentile(&controlled_step, 50.0),
        percentile(&controlnet_step, 50.0)
    ));
    doc["controlnet"] = json!({
        "unet_step_ms": summary(&controlled_step), "controlnet_ms_per_step": summary(&controlnet_step),
        "over_plain_step": control_ratio,
    });
    let (few_lines, few_doc) = few_steps(&mut pipeline, settings.runs)?;
    lines.extend(few_lines);
    doc["few_steps"] = few_doc;
    let (batch_lines, batch_doc) = batch(&mut pipeline, settings.runs)?;
    lines.extend(batch_lines);
    doc["batch"] = batch_doc;
    let (mask_lines, mask_doc) = masked(&mut pipeline, settings.runs)?;
    lines.extend(mask_lines);
    doc["inpainting"] = mask_doc;
    let (preview_lines, preview_doc) = previews(&mut pipeline, settings.runs)?;
    lines.extend(preview_lines);
    doc["previews"] = preview_doc;
    report.section("diffusion", doc, lines);
    Ok(())
}

/// A 4-step LCM image without guidance against a 50-step DDIM image with it, and the conditional
/// pass alone (guidance <= 1) against the guided step, on the same pipeline.
fn few_steps(pipeline: &mut StableDiffusion, runs: usize) -> anyhow::Result<(Vec<String>, Value)> {
    let lcm = GenerateParams {
        num_inference_steps: 4,
        guidance_scale: 1.0,
        scheduler: SchedulerKind::Lcm,
        ..params()
    };
    let ddim = GenerateParams { num_inference_steps: 50, ..params() };
    let unguided = GenerateParams { guidance_scale: 1.0, ..params() };
    let mut timed = |params: &GenerateParams| -> anyhow::Result<Vec<RustRun>> {
        rust_runs(pipeline, params, 1)?;
        rust_runs(pipeline, params, runs)
    };
    let (lcm_runs, ddim_runs, unguided_runs) = (timed(&lcm)?, timed(&ddim)?, timed(&unguided)?);
    let guided_runs = timed(&params())?;
    let total = |runs: &[RustRun]| runs.iter().map(|r| r.total_ms).collect::<Vec<_>>();
    let step = |runs: &[RustRun]| runs.iter().map(|r| r.unet_ms / f64::from(STEPS)).collect::<Vec<_>>();
    let (lcm_ms, ddim_ms) = (total(&lcm_runs), total(&ddim_runs));
    let (unguided_step, guided_step) = (step(&unguided_runs), step(&guided_runs));
    let image_ratio = percentile(&lcm_ms, 50.0) / percentile(&ddim_ms, 50.0);
    let step_ratio = percentile(&unguided_step, 50.0) / percentile(&guided_step, 50.0);
    let lines = vec![
        format!(
            "4 LCM steps, guidance 1  median {:>8.1} ms = {image_ratio:.3}x 50 DDIM steps, guidance 7.5 ({:.1} ms)",
            percentile(&lcm_ms, 50.0),
            percentile(&ddim_ms, 50.0)
        ),
        format!(
            "conditional-only step    median {:>8.3} ms = {step_ratio:.2}x the guided step ({:.3} ms)",
            percentile(&unguided_step, 50.0),
            percentile(&guided_step, 50.0)
        ),
    ];
    let doc = json!({
        "lcm_4_steps_ms": summary(&lcm_ms), "ddim_50_steps_ms": summary(&ddim_ms), "lcm_over_ddim": image_ratio,
        "conditional_step_ms": summary(&unguided_step), "guided_step_ms": summary(&guided_step),
        "conditional_over_guided_step": step_ratio,
    });
    Ok((lines, doc))
}

/// Images in one batch, as `num_images` asks for.
const BATCH: usize = 3;

/// Three images drawn as one UNet batch against the same three drawn one after another.
fn batch(pipeline: &mut StableDiffusion, runs: usize) -> anyhow::Result<(Vec<String>, Value)> {
    let params = params();
    let mut batched = |count: usize| -> anyhow::Result<f64> {
        let started = Instant::now();
        pipeline.generate_batch(&params, count, &mut |_| ControlFlow::Continue(()))?;
        Ok(started.elapsed().as_secs_f64() * 1000.0)
    };
    batched(BATCH)?;
    let (mut together, mut apart) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        together.push(batched(BATCH)?);
        let mut sum = 0.0;
        for _ in 0..BATCH {
            sum += batched(1)?;
        }
        apart.push(sum);
    }
    let ratio = percentile(&together, 50.0) / percentile(&apart, 50.0);
    let lines = vec![format!(
        "{BATCH} images in one batch median {:>8.1} ms = {ratio:.3}x {BATCH} single runs ({:.1} ms; target < 1x: {})",
        percentile(&together, 50.0),
        percentile(&apart, 50.0),
        verdict(ratio < 1.0)
    )];
    let doc = json!({
        "images": BATCH, "batched_ms": summary(&together), "single_runs_ms": summary(&apart),
        "batched_over_single_runs": ratio,
    });
    Ok((lines, doc))
}

/// A masked task (blurred mask, the photo pasted back outside it) against the same photo drawn
/// unmasked at the same strength, on the ordinary UNet (the known latents blended back each step).
fn masked(pipeline: &mut StableDiffusion, runs: usize) -> anyhow::Result<(Vec<String>, Value)> {
    let photo = image::open(repo_path("onnx/fixtures/reference/init_image.png"))?.to_rgb8();
    let mask = image::open(repo_path("onnx/fixtures/reference/inpaint/mask.png"))?.to_luma8();
    let unmasked = GenerateParams { init_image: Some(photo), ..params() };
    let inpaint = InpaintMask { image: mask, blur: 4.0, padding_crop: None, preserve_unmasked: true };
    let masked = GenerateParams { mask: Some(inpaint), ..unmasked.clone() };
    let mut timed = |params: &GenerateParams| -> anyhow::Result<f64> {
        let started = Instant::now();
        pipeline.generate(params, &mut |_| ControlFlow::Continue(()))?;
        Ok(started.elapsed().as_secs_f64() * 1000.0)
    };
    timed(&masked)?;
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        with.push(timed(&masked)?);
        without.push(timed(&unmasked)?);
    }
    let ratio = percentile(&with, 50.0) / percentile(&without, 50.0);
    let lines = vec![format!(
        "masked image-to-image    median {:>8.1} ms = {ratio:.3}x unmasked ({:.1} ms)",
        percentile(&with, 50.0),
        percentile(&without, 50.0)
    )];
    let doc =
        json!({"masked_ms": summary(&with), "unmasked_ms": summary(&without), "masked_over_unmasked": ratio});
    Ok((lines, doc))
}

/// What previews at the default interval cost a watched generation: the time spent making them
/// (latents to RGB, resizing, JPEG) against the UNet's time in the same runs.
fn previews(pipeline: &mut StableDiffusion, runs: usize) -> anyhow::Result<(Vec<String>, Value)> {
    let params = params();
    let every = DEFAULT_PREVIEW_EVERY;
    let (mut shares, mut per_preview) = (Vec::new(), Vec::new());
    for run in 0..=runs {
        let (mut spent, mut made) = (0.0, 0u32);
        let generated = pipeline.generate(&params, &mut |mut step| {
            if step.done % every == 0 {
                let started = Instant::now();
                let preview = preview_of(&mut step, SIZE, SIZE);
                spent += started.elapsed().as_secs_f64() * 1000.0;
                made += u32::from(preview.is_some_and(|p| p.is_ok_and(|p| !p.jpeg.is_empty())));
            }
            ControlFlow::Continue(())
        })?;
        anyhow::ensure!(made > 0, "the fixture's latents have no preview");
        // The first run warms up.
        if run > 0 {
            shares.push(spent / (generated.timings.unet_ms - spent));
            per_preview.push(spent / f64::from(made));
        }
    }
    let share = percentile(&shares, 50.0);
    let lines = vec![format!(
        "previews every {every} steps median {:>6.3} ms each = {:.2}% of the UNet time (target <= 2%: {})",
        percentile(&per_preview, 50.0),
        share * 100.0,
        verdict(share <= 0.02)
    )];
    let doc = json!({
        "every": every, "ms_per_preview": summary(&per_preview), "share_of_unet": summary(&shares),
        "share_of_unet_median": share,
    });
    Ok((lines, doc))
}

/// The first non-empty line of a possibly long error (a script's whole stderr).
fn first_line(text: &str) -> &str {
    text.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or(text)
}
