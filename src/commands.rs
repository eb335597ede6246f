//! The offline subcommands: `deskgen generate`, `deskgen eval`, `deskgen models` (and
//! `models pull`) and `deskgen bench`.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::api::render::result_json;
use crate::config::{BenchCommand, EvalCommand, GenerateCommand, ModelsCommand, PullCommand};
use crate::core::validate::validate;
use crate::core::{
    ControlInput, Failure, FailureCode, GenerateInput, GenerateOutput, Invalid, Limits, Progress,
};
use crate::hub::{HubSettings, PlannedFile, PullObserver, RepoRef};
use crate::inference::Runtime;
use crate::inference::diffusion::{GenerateParams, StableDiffusion, resolve_variant};
use crate::inference::vision::{ModelFile, Vision, describe};
use crate::intake::{Intake, IntakeError};
use crate::pipeline::{DeskPipeline, Pipeline, RunContext, Services};
use crate::storage::ObjectStore;
use crate::tasks::{TaskRecord, new_task_id};

/// Runs the vision models over a labelled folder and prints the report.
pub fn eval(command: &EvalCommand, out: &mut impl Write) -> anyhow::Result<()> {
    let runtime = Runtime::init(&command.runtime)?;
    let mut vision = Vision::load(&runtime, &command.vision)?;
    let items = command.vision.items.clone();
    let report = crate::eval::run(&command.photos, command.labels.as_deref(), &mut vision, &items)?;
    crate::eval::print(&report, command.json, out)
}

/// Loads every model the pipeline uses and prints what each one is.
pub fn models(command: &ModelsCommand, out: &mut impl Write) -> anyhow::Result<()> {
    let runtime = Runtime::init(&command.runtime)?;
    let mut models = Vision::load(&runtime, &command.vision)?.models();
    let sd_dir = resolve_variant(&command.sd_model, runtime.provider());
    for part in ["text_encoder", "text_encoder_2", "unet", "vae_encoder", "vae_decoder"] {
        let path = sd_dir.join(part).join("model.onnx");
        if part.ends_with("_2") && !path.exists() {
            continue;
        }
        let session = runtime.for_model(part).session(&path)?;
        models.push(describe(&format!("sd-{part}"), &path, &session)?);
    }
    let provider = runtime.provider().as_str();
    if command.json {
        let rows: Vec<serde_json::Value> = models
            .iter()
            .map(|m| {
                let mut row = serde_json::to_value(m).expect("model info serialises");
                row["execution_provider"] = provider.into();
                row
            })
            .collect();
        writeln!(out, "{}", serde_json::to_string_pretty(&rows)?)?;
        return Ok(());
    }
    for model in &models {
        print_model(model, provider, out).context("writing the model list")?;
    }
    Ok(())
}

/// Pulls a pipeline from the Hugging Face hub (`deskgen models pull`): a progress bar per file on
/// stderr, then the folder to pass as `--sd-model` on `out`.
pub async fn models_pull(
    command: &PullCommand,
    hub: &HubSettings,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let dir = pull_with_progress(hub, &command.model, command.subfolder.as_deref()).await?;
    writeln!(out, "{}", dir.display())?;
    Ok(())
}

/// Pulls `model` (its `subfolder`, when given) from the hub with a progress bar per fetched file
/// on stderr, or a line per file when stderr is not a terminal; the folder to load.
pub async fn pull_with_progress(
    hub: &HubSettings,
    model: &RepoRef,
    subfolder: Option<&str>,
) -> anyhow::Result<PathBuf> {
    let bars = PullBars { terminal: std::io::stderr().is_terminal(), ..PullBars::default() };
    crate::hub::pull(hub, model, subfolder, &bars)
        .await
        .with_context(|| format!("pulling {model} from the hub"))
}

/// Progress bars of a pull, one per file it fetches.
#[derive(Default)]
struct PullBars {
    multi: indicatif::MultiProgress,
    terminal: bool,
    files: Mutex<Vec<(PlannedFile, Option<indicatif::ProgressBar>)>>,
}

impl PullBars {
    fn file_bar(&self, file: &PlannedFile) -> indicatif::ProgressBar {
        let bar = indicatif::ProgressBar::new(file.size).with_message(file.path.clone()).with_style(
            indicatif::ProgressStyle::with_template(
                "[{bar:30}] {bytes:>10}/{total_bytes:<10} {bytes_per_sec:>12} {msg}",
            )
            .expect("static template")
            .progress_chars("=> "),
        );
        self.multi.add(bar)
    }
}

impl PullObserver for PullBars {
    fn planned(&self, files: &[PlannedFile]) {
        let cached = files.iter().filter(|f| f.cached).count();
        eprintln!("{} files, {cached} already in the cache", files.len());
        *self.files.lock().expect("bars lock") = files
            .iter()
            .map(|file| (file.clone(), (self.terminal && !file.cached).then(|| self.file_bar(file))))
            .collect();
    }

    fn position(&self, index: usize, bytes: u64) {
        if let Some((_, Some(bar))) = self.files.lock().expect("bars lock").get(index) {
            bar.set_position(bytes);
        }
    }

    fn finished(&self, index: usize) {
        match self.files.lock().expect("bars lock").get(index) {
            Some((_, Some(bar))) => bar.finish(),
            Some((file, None)) => eprintln!("fetched {} ({} bytes)", file.path, file.size),
            None => {}
        }
    }
}

/// Times Stable Diffusion text-to-image generations and prints one JSON report.
pub fn bench(command: &BenchCommand, out: &mut impl Write) -> anyhow::Result<()> {
    let runtime = Runtime::init(&command.runtime)?;
    let started = Instant::now();
    let mut diffusion = StableDiffusion::load(&runtime, &command.sd_model)?;
    let load_ms = elapsed_ms(started);
    let started = Instant::now();
    diffusion.warm_up()?;
    let warm_up_ms = elapsed_ms(started);
    let (width, height) = diffusion.native_size();
    let scheduler = match &command.scheduler {
        Some(name) => name.parse()?,
        None => diffusion.default_scheduler(),
    };
    let mut runs = Vec::new();
    for &steps in &command.steps {
        for run in 0..command.runs {
            let params = GenerateParams {
                prompt: command.prompt.clone(),
                negative_prompt: "blurry, low resolution, distorted".into(),
                num_inference_steps: steps,
                guidance_scale: 7.5,
                width,
                height,
                strength: 1.0,
                seed: u64::from(run),
                scheduler,
                init_image: None,
                guidance_rescale: 0.0,
                loras: Vec::new(),
                control: Vec::new(),
                mask: None,
            };
            let started = Instant::now();
            let generated = diffusion.generate(&params, &mut |_| std::ops::ControlFlow::Continue(()))?;
            let end_to_end_ms = elapsed_ms(started);
            let t = generated.timings;
            let per_step = |ms: f64| ms / f64::from(t.steps.max(1));
            runs.push(serde_json::json!({
                "steps": steps,
                "end_to_end_ms": end_to_end_ms,
                "text_encode_ms": t.text_encode_ms,
                "unet_loop_ms": t.unet_ms,
                "vae_ms": t.vae_ms,
                "unet_step_ms": per_step(t.unet_ms),
                "unet_run_step_ms": per_step(t.unet_run_ms),
                "transfer_step_ms": per_step(t.transfer_ms),
            }));
        }
    }
    let report = serde_json::json!({
        "model": diffusion.config().dir,
        "execution_provider": runtime.for_model("unet").provider().as_str(),
        "size": [width, height],
        "scheduler": scheduler.as_str(),
        "load_ms": load_ms,
        "warm_up_ms": warm_up_ms,
        "runs": runs,
    });
    writeln!(out, "{report}")?;
    Ok(())
}

fn elapsed_ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}

fn print_model(model: &ModelFile, provider: &str, out: &mut impl Write) -> std::io::Result<()> {
    writeln!(out, "{}  ({provider})", model.id)?;
    writeln!(out, "  path    {}", model.path.display())?;
    writeln!(out, "  sha256  {}", model.sha256)?;
    writeln!(out, "  size    {} bytes", model.size_bytes)?;
    writeln!(out, "  inputs  {}", model.inputs.join(", "))?;
    writeln!(out, "  outputs {}", model.outputs.join(", "))
}

/// Exit status of `deskgen generate` when the input was at fault (bad flags, photo, URL).
pub const EXIT_BAD_INPUT: u8 = 2;
/// Exit status of `deskgen generate` when the pipeline failed.
pub const EXIT_FAILED: u8 = 1;

/// Runs the pipeline once without a server: progress on stderr, the PNG to `--out`, the result
/// (REST shape with `--json`) on `out`. Returns the process exit status.
pub async fn generate(command: GenerateCommand, out: &mut impl Write) -> anyhow::Result<u8> {
    if command.image.is_none() && command.prompt.is_none() {
        eprintln!("error: give --image, --prompt, or both");
        return Ok(EXIT_BAD_INPUT);
    }
    let local_photo = command.image.as_deref().filter(|image| !image.contains("://")).map(str::to_string);
    let photo = match local_photo.as_deref().map(|path| (path, std::fs::read(path))) {
        Some((_, Ok(bytes))) => Some(Bytes::from(bytes)),
        Some((path, Err(e))) => {
            eprintln!("error: cannot read {path}: {e}");
            return Ok(EXIT_BAD_INPUT);
        }
        None => None,
    };
    let store = crate::storage::build(&command.pipeline.storage, &command.data_dir).await?;
    let services = Services {
        store: store.clone(),
        shopping: crate::shopping::build(&command.pipeline.shopping)?,
        downloads: Default::default(),
    };
    let config = command.pipeline.clone();
    let pipeline = tokio::task::spawn_blocking(move || DeskPipeline::load(&config, services)).await??;
    let stored_photo = match photo {
        Some(bytes) => match store_photo(bytes, &command, store.as_ref()).await? {
            Ok(key) => Some(key),
            Err(refused) => {
                // Refused before any work, in the words a failed task would use.
                writeln!(out, "failed: {} {refused}", FailureCode::InvalidImage.as_str())?;
                return Ok(EXIT_BAD_INPUT);
            }
        },
        None => None,
    };
    let local_mask = command.mask.as_deref().filter(|mask| !mask.contains("://"));
    let stored_mask = match local_mask.map(|path| (path, std::fs::read(path))) {
        Some((path, Err(e))) => {
            eprintln!("error: cannot read {path}: {e}");
            return Ok(EXIT_BAD_INPUT);
        }
        Some((_, Ok(bytes))) => match store_photo(Bytes::from(bytes), &command, store.as_ref()).await? {
            Ok(key) => Some(key),
            Err(refused) => {
                let refused = refused.to_string().replacen("The photo", "The mask", 1);
                writeln!(out, "failed: {} {refused}", FailureCode::InvalidImage.as_str())?;
                return Ok(EXIT_BAD_INPUT);
            }
        },
        None => None,
    };
    let input = GenerateInput {
        initial_image_url: command.image.clone().filter(|_| local_photo.is_none()),
        stored_photo,
        mask_image_url: command.mask.clone().filter(|_| local_mask.is_none()),
        stored_mask,
        ..generate_input(&command)
    };
    let (task_id, request) = match validate(
        input,
        &Limits { max_side: command.pipeline.max_side, max_images: command.pipeline.max_images },
        &pipeline.info(),
    ) {
        Ok(ok) => ok,
        Err(invalid) => {
            for line in invalid_lines(invalid) {
                eprintln!("error: {line}");
            }
            return Ok(EXIT_BAD_INPUT);
        }
    };
    let mut record = TaskRecord::new(task_id.unwrap_or_else(new_task_id), request, String::new());
    let (ctx, updates) = RunContext::new(
        record.task_id.clone(),
        CancellationToken::new(),
        Instant::now() + Duration::from_secs(24 * 3600),
    );
    let display = tokio::spawn(show_progress(updates));
    let outcome = pipeline.run(&record.request, &ctx).await;
    drop(ctx);
    let _ = display.await;
    let outcome = match outcome {
        Ok(output) => Ok(save_image(store.as_ref(), output, &command, local_photo).await?),
        Err(failure) => Err(failure),
    };
    let status = outcome.as_ref().err().map_or(0, exit_status);
    record.complete(outcome);
    if command.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&result_json(&record))?)?;
    } else {
        summarise(&record, out)?;
    }
    Ok(status)
}

/// Puts a local photo through the checks of an upload and into the object store like one; the
/// request names its key. The inner error is the photo's refusal.
async fn store_photo(
    bytes: Bytes,
    command: &GenerateCommand,
    store: &dyn ObjectStore,
) -> anyhow::Result<Result<String, IntakeError>> {
    let intake = Intake {
        max_bytes: command.pipeline.fetch.max_image_bytes,
        max_pixels: command.pipeline.vision.max_image_pixels,
    };
    match intake.check_blocking(bytes).await {
        Ok(photo) => {
            photo.store(store).await.context("storing the photo")?;
            Ok(Ok(photo.key))
        }
        Err(refused) => Ok(Err(refused)),
    }
}

/// The request the command's flags describe, before its photo is known.
fn generate_input(command: &GenerateCommand) -> GenerateInput {
    GenerateInput {
        prompt: command.prompt.clone(),
        negative_prompt: command.negative_prompt.clone(),
        num_inference_steps: command.steps,
        guidance_scale: command.guidance_scale,
        height: command.height,
        width: command.width,
        resize_mode: command.resize_mode.clone(),
        strength: command.strength,
        seed: command.seed,
        scheduler: command.scheduler.clone(),
        model: command.model.clone(),
        num_images: command.num_images,
        max_items_per_category: command.max_items_per_category,
        control: control_units(command),
        keep: (!command.keep.is_empty()).then(|| command.keep.clone()),
        repaint: (!command.repaint.is_empty()).then(|| command.repaint.clone()),
        preserve_unmasked: command.preserve_unmasked.then_some(true),
        mask_blur: command.mask_blur,
        padding_mask_crop: command.padding_mask_crop,
        ..GenerateInput::default()
    }
}

/// `--control TYPE[:SCALE]` as units, `--no-control` as none; neither means the default.
fn control_units(command: &GenerateCommand) -> Option<Vec<ControlInput>> {
    if command.no_control {
        return Some(Vec::new());
    }
    let units = command.control.iter().map(|spec| {
        let (control_type, scale) = match spec.split_once(':') {
            Some((name, scale)) => (name, Some(scale.parse::<f64>().unwrap_or(f64::NAN))),
            None => (spec.as_str(), None),
        };
        ControlInput { control_type: control_type.to_string(), scale, ..ControlInput::default() }
    });
    (!command.control.is_empty()).then(|| units.collect())
}

/// What was wrong with the request, a line each.
fn invalid_lines(invalid: Invalid) -> Vec<String> {
    match invalid {
        Invalid::EmptyPrompt => vec!["Prompt must not be empty.".into()],
        Invalid::Rules(violations) => violations.into_iter().map(|v| v.description).collect(),
    }
}

/// Copies the generated PNG to `--out`; the result names the local files instead of the store's.
async fn save_image(
    store: &dyn ObjectStore,
    mut output: GenerateOutput,
    command: &GenerateCommand,
    local_photo: Option<String>,
) -> anyhow::Result<GenerateOutput> {
    let mut saved = Vec::with_capacity(output.processed_image_urls.len());
    for (i, url) in output.processed_image_urls.iter().enumerate() {
        let key = store.key_for_url(url).context("the store did not recognise its own URL")?;
        let png = store.get(&key, u64::MAX).await?;
        let path = numbered_path(&command.out, i);
        std::fs::write(&path, &png).with_context(|| format!("writing {}", path.display()))?;
        saved.push(path.display().to_string());
    }
    output.processed_image_url = saved.first().cloned();
    output.processed_image_urls = saved;
    if local_photo.is_some() {
        output.initial_image_url = local_photo;
    }
    Ok(output)
}

/// Where image `index` of a task is saved: `out` itself for the first, then `NAME-2.png`,
/// `NAME-3.png`, … beside it.
fn numbered_path(out: &Path, index: usize) -> PathBuf {
    if index == 0 {
        return out.to_path_buf();
    }
    let stem = out.file_stem().map(|s| s.to_string_lossy()).unwrap_or_default();
    let name = match out.extension() {
        Some(ext) => format!("{stem}-{}.{}", index + 1, ext.to_string_lossy()),
        None => format!("{stem}-{}", index + 1),
    };
    out.with_file_name(name)
}

fn exit_status(error: &Failure) -> u8 {
    match error.code {
        FailureCode::InvalidInput | FailureCode::InvalidImage | FailureCode::ImageFetchFailed => {
            EXIT_BAD_INPUT
        }
        FailureCode::ModelError
        | FailureCode::S3UploadFailed
        | FailureCode::ShoppingFailed
        | FailureCode::Canceled
        | FailureCode::Timeout
        | FailureCode::Internal => EXIT_FAILED,
    }
}

fn summarise(record: &TaskRecord, out: &mut impl Write) -> std::io::Result<()> {
    if let Some(error) = &record.error {
        return writeln!(out, "failed: {} {}", error.code.as_str(), error.message);
    }
    let Some(output) = &record.output else { return Ok(()) };
    if let Some(is_desk) = output.is_desk {
        writeln!(out, "desk: {}", if is_desk { "yes" } else { "no" })?;
    }
    if let Some(caption) = &output.caption {
        writeln!(out, "caption: {caption}")?;
    }
    for line in &output.detected_text {
        let brand = line.brand.as_ref().map(|b| format!(" (brand: {b})")).unwrap_or_default();
        writeln!(out, "text: {} {:.2}{brand}", line.text, line.score)?;
    }
    if output.processed_image_urls.is_empty() {
        writeln!(out, "image: none")?;
    }
    for path in &output.processed_image_urls {
        writeln!(out, "image: {path}")?;
    }
    for unit in &output.control {
        writeln!(out, "control: {} at scale {}", unit.control_type, unit.scale)?;
    }
    for warning in &output.warnings {
        writeln!(out, "warning: {warning}")?;
    }
    for recommendation in &output.recommendations {
        writeln!(out, "{}:", recommendation.display_name)?;
        for offer in &recommendation.items {
            writeln!(out, "  {} {} ({}) {}", offer.price, offer.title, offer.mall, offer.link)?;
        }
    }
    Ok(())
}

/// Shows progress on stderr: a bar on a terminal, plain lines otherwise.
async fn show_progress(mut updates: watch::Receiver<Option<Progress>>) {
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {msg:>10} [{bar:40}] {pos}/{len}")
                .expect("static template")
                .progress_chars("=> "),
        );
        bar
    });
    let mut last: Option<Progress> = None;
    while updates.changed().await.is_ok() {
        let Some(progress) = updates.borrow_and_update().clone() else { continue };
        if last.as_ref() == Some(&progress) {
            continue;
        }
        match &bar {
            Some(bar) => {
                bar.set_message(progress.stage.clone());
                bar.set_length(u64::from(progress.steps));
                bar.set_position(u64::from(progress.step));
            }
            None => eprintln!("{} {}/{}", progress.stage, progress.step, progress.steps),
        }
        last = Some(progress);
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
}
