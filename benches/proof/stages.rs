//! Per-stage latency of one task on the embedded defaults, and resident memory over many tasks.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use deskgen::inference::vision::classifier::{Classifier, read_labels};
use deskgen::inference::vision::detector::Detector;
use deskgen::inference::vision::image::decode_image;
use deskgen::inference::{Runtime, RuntimeConfig};
use serde_json::{Value, json};

use crate::Settings;
use crate::report::{Report, summary};
use crate::server::{Server, check_assets, repo_path};

/// Stages in pipeline order, as `timings_ms` names them.
const STAGES: [&str; 11] = [
    "fetch",
    "decode",
    "vision",
    "caption",
    "text_encode",
    "unet",
    "controlnet",
    "vae",
    "encode_png",
    "upload",
    "shopping",
];

/// Serves the darknet dog photo on 127.0.0.1, as a user's photo host would.
pub async fn photo_host() -> anyhow::Result<String> {
    let photo = std::fs::read(repo_path("assets/testdata/darknet/dog.jpg"))?;
    let router = axum::Router::new().route(
        "/desk.jpg",
        axum::routing::get(move || {
            let photo = photo.clone();
            async move { ([("content-type", "image/jpeg")], photo) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, router).await });
    Ok(format!("http://{addr}/desk.jpg"))
}

/// Submits `body` and waits for its result (Prefer: wait).
pub async fn run_task(client: &reqwest::Client, server: &str, body: &Value) -> anyhow::Result<Value> {
    let response =
        client.post(format!("{server}/v1/generate")).header("prefer", "wait=60").json(body).send().await?;
    let status = response.status();
    let result: Value = response.json().await?;
    if status != 200 || result["status"] != "done" {
        bail!("task did not finish done ({status}): {result}");
    }
    Ok(result)
}

pub async fn run(settings: &Settings, report: &mut Report) -> anyhow::Result<()> {
    check_assets()?;
    let photo = photo_host().await?;
    let threads = settings.threads.to_string();
    let mut server = Server::spawn(&[
        "--intra-threads",
        &threads,
        "--fetch-allow",
        "127.0.0.1",
        "--fetch-allow-http",
        "--desk-threshold",
        "0",
        "--workers",
        "2",
    ])?;
    server.wait_ready(Instant::now()).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_rss = server.rss_mib()?;
    let client = reqwest::Client::new();

    if settings.wants("stages") {
        // The embedded defaults: 50 steps, the photo's shape at the model's native area, and the
        // desk's default control with its strength (0.75 without one).
        let body = json!({"initial_image_url": photo, "prompt": "warm wooden tones", "seed": 1});
        let info: Value = client.get(format!("{}/info", server.base)).send().await?.json().await?;
        let control = info["default_control"]["type"].as_str().unwrap_or("none").to_string();
        let strength = info["default_control"]["strength"].as_f64().unwrap_or(0.75);
        run_task(&client, &server.base, &body).await?; // warm-up
        let mut stages: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
        let mut totals = Vec::new();
        for _ in 0..settings.runs {
            let started = Instant::now();
            let result = run_task(&client, &server.base, &body).await?;
            totals.push(started.elapsed().as_secs_f64() * 1000.0);
            for stage in STAGES {
                if let Some(ms) = result["timings_ms"][stage].as_f64() {
                    stages.entry(stage).or_default().push(ms);
                }
            }
        }
        let steps_run = (50.0 * strength).floor();
        if let Some(unet) = stages.get("unet") {
            let per_step: Vec<f64> = unet.iter().map(|ms| ms / steps_run).collect();
            stages.insert("unet_step", per_step);
        }
        let (detect, classify) = vision_stages(settings)?;
        stages.insert("detect (in-process)", detect);
        stages.insert("classify (in-process)", classify);
        stages.insert("end to end (client)", totals);
        let mut lines = vec![format!("{:<24} {:>10} {:>10}", "stage", "median ms", "p95 ms")];
        let mut doc = serde_json::Map::new();
        for (stage, samples) in &stages {
            let s = summary(samples);
            lines.push(format!(
                "{:<24} {:>10.2} {:>10.2}",
                stage,
                s["median"].as_f64().unwrap_or(f64::NAN),
                s["p95"].as_f64().unwrap_or(f64::NAN)
            ));
            doc.insert(stage.to_string(), s);
        }
        lines.push(format!(
            "({} runs; dog.jpg from a local host, {steps_run} img2img steps at 288x224 with control {control} \
             (unet includes controlnet), catalog shopping, file store)",
            settings.runs
        ));
        report.section("stages", Value::Object(doc), lines);
    }

    if settings.wants("memory") && settings.memory_tasks > 0 {
        memory(settings, report, &server, &photo, idle_rss).await?;
    }
    Ok(())
}

/// The detector and the classifier timed apart (the pipeline reports them together as "vision"),
/// in this process, on the same photo and thread count.
fn vision_stages(settings: &Settings) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let runtime =
        Runtime::init(&RuntimeConfig { intra_threads: settings.threads, ..RuntimeConfig::default() })?;
    let mut detector = Detector::new(runtime.session(&repo_path("assets/models/detector.onnx"))?)?;
    let labels = read_labels(&repo_path("assets/models/imagenet_labels.txt"))?;
    let mut classifier =
        Classifier::new(runtime.session(&repo_path("assets/models/classifier.onnx"))?, labels)?;
    let photo = decode_image(&std::fs::read(repo_path("assets/testdata/darknet/dog.jpg"))?, 40_000_000)
        .context("decoding dog.jpg")?;
    detector.detect(&photo, 0.4)?;
    classifier.classify(&photo)?;
    let (mut detect, mut classify) = (Vec::new(), Vec::new());
    for _ in 0..settings.runs {
        let started = Instant::now();
        detector.detect(&photo, 0.4)?;
        detect.push(started.elapsed().as_secs_f64() * 1000.0);
        let started = Instant::now();
        classifier.classify(&photo)?;
        classify.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    Ok((detect, classify))
}

/// RSS idle and after each of `memory_phases` rounds of `memory_tasks` tasks; the growth over the
/// last round, once allocator pools and caches have had the earlier rounds to warm up.
async fn memory(
    settings: &Settings,
    report: &mut Report,
    server: &Server,
    photo: &str,
    idle_rss: f64,
) -> anyhow::Result<()> {
    let n = settings.memory_tasks;
    // Every stage runs (fetch, vision, img2img, VAE, PNG, upload, shopping), small and with few
    // steps so thousands of tasks take minutes, not hours.
    let body =
        Arc::new(json!({"initial_image_url": photo, "prompt": "a tidy desk", "num_inference_steps": 2,
                               "height": 64, "width": 64}));
    let client = reqwest::Client::new();
    let mut rss = vec![idle_rss];
    let started = Instant::now();
    for _ in 0..settings.memory_phases {
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut clients = tokio::task::JoinSet::new();
        for _ in 0..4 {
            let (client, body, next, base) =
                (client.clone(), body.clone(), next.clone(), server.base.clone());
            clients.spawn(async move {
                while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < n {
                    run_task(&client, &base, &body).await?;
                }
                anyhow::Ok(())
            });
        }
        while let Some(done) = clients.join_next().await {
            done??;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        rss.push(server.rss_mib()?);
    }
    let phases = rss.len() - 1;
    let growth = (rss[phases] - rss[phases - 1]) * 1000.0 / n as f64;
    let mut lines = vec![format!("RSS idle (default models)       {:>8.1} MiB", rss[0])];
    for (phase, mib) in rss.iter().enumerate().skip(1) {
        lines.push(format!("RSS after {:>5} tasks            {mib:>8.1} MiB", phase * n));
    }
    lines.push(format!("growth per 1,000 tasks (last)   {growth:>8.1} MiB   (target ~0)"));
    lines.push(format!(
        "({} tasks in {:.0} s: photo, 2 steps at 64x64, 2 workers, 4 clients)",
        phases * n,
        started.elapsed().as_secs_f64()
    ));
    report.section(
        "memory",
        json!({"rss_idle_mib": rss[0], "rss_after_each_phase_mib": &rss[1..], "tasks_per_phase": n,
               "growth_mib_per_1000_tasks_last_phase": growth}),
        lines,
    );
    Ok(())
}
