//! Test harness: the real server on 127.0.0.1:0 with a scripted pipeline whose timing tests control.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use clap::Parser;
use deskgen::config::{Cli, Command, ServeConfig};
use deskgen::core::{
    Failure, FailureCode, GenerateOutput, GenerateRequest, ModelInfo, PhotoSource, PipelineInfo, Preview,
    Recommendation, SdModelDefaults, SdModelInfo,
};
use deskgen::pipeline::{DeskPipeline, Pipeline, RunContext};
use deskgen::server::{PipelineLoader, RunningServer};
use deskgen::shopping::Offer;
use tokio::sync::Semaphore;

/// A pipeline double: `steps` diffusion steps of `step_ms` each. Prompts steer it: "hold" waits for
/// a permit from `gate` before starting; "fail" fails with MODEL_ERROR; "upload" fails with
/// S3_UPLOAD_FAILED; "notdesk" answers as for a photo without a desk (shopping only, no image).
/// While someone watches, it makes a real 8×8 JPEG preview every `preview_every` steps and counts
/// them in `previews_made`.
pub struct ScriptedPipeline {
    pub steps: u32,
    pub step_ms: u64,
    pub gate: Arc<Semaphore>,
    pub previews_made: AtomicU32,
    /// The prompts of the tasks it ran, in the order they started.
    pub started: std::sync::Mutex<Vec<String>>,
}

impl ScriptedPipeline {
    pub fn new(steps: u32, step_ms: u64) -> Arc<ScriptedPipeline> {
        let gate = Arc::new(Semaphore::new(0));
        Arc::new(ScriptedPipeline {
            steps,
            step_ms,
            gate,
            previews_made: AtomicU32::new(0),
            started: Default::default(),
        })
    }
}

/// An 8×8 JPEG whose grey level is the step.
fn preview_jpeg(step: u32) -> bytes::Bytes {
    let picture = image::GrayImage::from_pixel(8, 8, image::Luma([(step * 10).min(255) as u8]));
    let mut jpeg = Vec::new();
    picture.write_to(&mut std::io::Cursor::new(&mut jpeg), image::ImageFormat::Jpeg).unwrap();
    jpeg.into()
}

#[async_trait]
impl Pipeline for ScriptedPipeline {
    async fn run(&self, request: &GenerateRequest, ctx: &RunContext) -> Result<GenerateOutput, Failure> {
        let prompt = request.prompt.clone().unwrap_or_default();
        self.started.lock().unwrap().push(prompt.clone());
        if prompt.contains("hold") {
            let permit = self.gate.acquire().await.expect("gate open");
            permit.forget();
        }
        ctx.check()?;
        if prompt.contains("fail") {
            return Err(Failure::new(FailureCode::ModelError, "scripted failure"));
        }
        for step in 1..=self.steps {
            tokio::time::sleep(Duration::from_millis(self.step_ms)).await;
            ctx.check()?;
            let every = request.preview_every;
            if every > 0 && step % every == 0 && ctx.previews_wanted() {
                ctx.preview(Preview { step, steps: self.steps, jpeg: preview_jpeg(step) });
                self.previews_made.fetch_add(1, Ordering::SeqCst);
            }
            ctx.progress("diffusion", step, self.steps);
        }
        if prompt.contains("upload") {
            return Err(Failure::new(FailureCode::S3UploadFailed, "Failed to upload image to S3."));
        }
        let is_desk = !prompt.contains("notdesk");
        let image_url = format!("http://example.invalid/{}.png", ctx.id());
        Ok(GenerateOutput {
            initial_image_url: match &request.photo {
                Some(PhotoSource::Url(url)) => Some(url.clone()),
                Some(PhotoSource::Stored { key }) => Some(format!("stored:{key}")),
                None => None,
            },
            processed_image_url: is_desk.then(|| image_url.clone()),
            processed_image_urls: if is_desk { vec![image_url] } else { Vec::new() },
            is_desk: Some(is_desk),
            caption: Some("a desk with a laptop".into()),
            recommendations: vec![Recommendation {
                reason: deskgen::core::RecommendationReason::Missing,
                category: "mouse".into(),
                display_name: "마우스".into(),
                items: vec![Offer {
                    title: "무선 마우스".into(),
                    price: "21990원".into(),
                    mall: "네이버".into(),
                    category3: "마우스".into(),
                    category4: "무선마우스".into(),
                    link: "https://example.invalid/p/1".into(),
                    image: "https://example.invalid/p/1.jpg".into(),
                    price_won: 21990,
                }],
            }],
            prompt_used: Some(prompt),
            seed: request.seed,
            ..GenerateOutput::default()
        })
    }

    fn info(&self) -> PipelineInfo {
        PipelineInfo {
            models: vec![ModelInfo {
                id: "scripted".into(),
                path: "-".into(),
                sha256: "0".repeat(64),
                size_bytes: 0,
                execution_provider: "cpu".into(),
            }],
            sd_models: vec![SdModelInfo {
                name: "scripted".into(),
                variant: "sd".into(),
                path: "-".into(),
                native_size: 512,
                size_multiple: 8,
                schedulers: vec!["ddim".into(), "euler".into()],
                defaults: SdModelDefaults {
                    num_inference_steps: deskgen::core::request::DEFAULT_STEPS,
                    guidance_scale: deskgen::core::request::DEFAULT_GUIDANCE,
                    scheduler: "ddim".into(),
                    height: 512,
                    width: 512,
                },
                scheduler_max_steps: Default::default(),
                loras: vec![],
                controlnets: vec![],
                default_control: None,
                previews: "none".into(),
                inpainting: false,
            }],
            max_lora_weight: 2.0,
            negative_prompt: "blurry".into(),
            object_store: "file".into(),
            shopping_provider: "catalog".into(),
        }
    }

    fn loaded_models(&self) -> Vec<String> {
        vec!["scripted".into()]
    }
}

pub struct TestServer {
    pub base: String,
    pub addr: std::net::SocketAddr,
    pub server: Option<RunningServer>,
    pub config: ServeConfig,
}

impl TestServer {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub async fn stop(mut self) {
        if let Some(server) = self.server.take() {
            server.stop().await.expect("clean stop");
        }
    }

    pub async fn grpc_channel(&self) -> tonic::transport::Channel {
        tonic::transport::Endpoint::from_shared(self.base.clone()).unwrap().connect().await.unwrap()
    }
}

/// The serve configuration with `args` added, data under `data_dir`.
pub fn serve_config(data_dir: &std::path::Path, args: &[&str]) -> ServeConfig {
    let mut argv =
        vec!["deskgen", "serve", "--listen", "127.0.0.1:0", "--data-dir", data_dir.to_str().unwrap()];
    argv.extend_from_slice(args);
    match Cli::parse_from(argv).command {
        Command::Serve(config) => *config,
        other => panic!("not a serve command: {other:?}"),
    }
}

pub async fn start(config: ServeConfig, pipeline: Arc<ScriptedPipeline>) -> TestServer {
    let loader: PipelineLoader = Box::new(move |_store| Ok(pipeline as Arc<dyn Pipeline>));
    start_with_loader(config, loader).await
}

pub async fn start_with_loader(config: ServeConfig, loader: PipelineLoader) -> TestServer {
    let listener = tokio::net::TcpListener::bind(config.listen).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = deskgen::server::start(config.clone(), listener, loader).await.expect("server starts");
    let test = TestServer { base: format!("http://{addr}"), addr, server: Some(server), config };
    wait_ready(&test).await;
    test
}

pub async fn wait_ready(server: &TestServer) {
    let client = reqwest::Client::new();
    // Loading the real models takes seconds in debug builds, more when tests load them side by side.
    for _ in 0..2400 {
        if server.server.as_ref().is_some_and(|s| s.is_finished()) {
            panic!("the server stopped while starting (model loading failed?)");
        }
        if let Ok(r) = client.get(server.url("/healthcheck")).send().await
            && r.status() == 200
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("server never became ready");
}

/// POSTs raw bytes as JSON to /v1/generate (with `key` as bearer token, if any); the status and
/// the body as JSON (null when it is none).
pub async fn post_generate(
    server: &TestServer,
    body: impl Into<reqwest::Body>,
    key: Option<&str>,
) -> (u16, serde_json::Value) {
    let mut req =
        reqwest::Client::new().post(server.url("/v1/generate")).header("content-type", "application/json");
    if let Some(key) = key {
        req = req.bearer_auth(key);
    }
    let r = req.body(body).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(serde_json::Value::Null))
}

/// Reads a whole Server-Sent Events stream at `path`: each event's name and JSON data.
pub async fn sse_events(server: &TestServer, path: &str) -> Vec<(String, serde_json::Value)> {
    let text = reqwest::get(server.url(path)).await.unwrap().text().await.unwrap();
    text.split("\n\n")
        .filter(|chunk| chunk.contains("data:"))
        .map(|chunk| {
            let name = chunk.lines().find_map(|l| l.strip_prefix("event:")).unwrap().trim().to_string();
            let data = chunk.lines().find_map(|l| l.strip_prefix("data:")).unwrap().trim();
            (name, serde_json::from_str(data).unwrap())
        })
        .collect()
}

/// Polls REST until the task reaches a final state.
pub async fn poll_final(server: &TestServer, task_id: &str, key: Option<&str>) -> serde_json::Value {
    let client = reqwest::Client::new();
    for _ in 0..400 {
        let mut req = client.get(server.url(&format!("/v1/result/{task_id}")));
        if let Some(key) = key {
            req = req.bearer_auth(key);
        }
        let body: serde_json::Value = req.send().await.unwrap().json().await.unwrap();
        if matches!(body["status"].as_str(), Some("done" | "failed" | "canceled")) {
            return body;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("task {task_id} never finished");
}

/// A photo from Debian's darknet package, fetched by `make testdata`.
pub fn darknet(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/testdata/darknet").join(name);
    assert!(path.is_file(), "{} is missing: run `make testdata`", path.display());
    path
}

/// Serves files from memory on 127.0.0.1, as a photo host would.
pub async fn photo_host(files: Vec<(&'static str, Vec<u8>)>) -> String {
    let mut router = axum::Router::new();
    for (name, bytes) in files {
        router = router.route(
            &format!("/{name}"),
            axum::routing::get(move || {
                let bytes = bytes.clone();
                async move { ([("content-type", "image/jpeg")], bytes) }
            }),
        );
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    format!("http://{addr}")
}

/// The server with the real pipeline (vision models, tiny Stable Diffusion, file store, sample
/// catalog), allowed to fetch photos from 127.0.0.1 and serving its images at its own address.
pub async fn start_real(data_dir: &Path, extra: &[&str]) -> TestServer {
    let mut args = vec!["--fetch-allow", "127.0.0.1", "--fetch-allow-http"];
    args.extend_from_slice(extra);
    start_real_guarded(data_dir, &args).await
}

/// The same without the loopback allowance: the fetch policy is `args`' alone.
pub async fn start_real_guarded(data_dir: &Path, args: &[&str]) -> TestServer {
    let args = [&["--intra-threads", "1"], args].concat();
    let mut config = serve_config(data_dir, &args);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    config.listen = format!("127.0.0.1:{port}").parse().unwrap();
    config.pipeline.storage.image_base_url = Some(format!("http://127.0.0.1:{port}"));
    let pipeline_config = config.pipeline.clone();
    let loader: PipelineLoader = Box::new(move |services| {
        Ok(Arc::new(DeskPipeline::load(&pipeline_config, services)?) as Arc<dyn Pipeline>)
    });
    start_with_loader(config, loader).await
}

/// A black PNG of `width`×`height`.
pub fn png(width: u32, height: u32) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    image::DynamicImage::new_rgb8(width, height).write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// A `width`×`height` greyscale PNG of one `value`: a mask.
pub fn gray_png(width: u32, height: u32, value: u8) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    image::GrayImage::from_pixel(width, height, image::Luma([value]))
        .write_to(&mut out, image::ImageFormat::Png)
        .unwrap();
    out.into_inner()
}

/// A small PNG whose header claims `width`×`height`: what a header check reads, nothing more.
pub fn png_claiming(width: u32, height: u32) -> Vec<u8> {
    let mut png = png(64, 64);
    png[16..20].copy_from_slice(&width.to_be_bytes());
    png[20..24].copy_from_slice(&height.to_be_bytes());
    let mut crc = !0u32;
    for &byte in &png[12..29] {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
        }
    }
    png[29..33].copy_from_slice(&(!crc).to_be_bytes());
    png
}

/// The API keys [`priorities_and_turns`] needs: two that may ask for anything, one held to low.
pub const PRIORITY_KEYS: [&str; 3] = ["--api-key=flood,calm,lowly:low", "--starvation-bound", "10"];

/// Submits `body` with `key`; the task id.
async fn submit_as(server: &TestServer, key: &str, body: serde_json::Value) -> String {
    let (status, body) = post_generate(server, body.to_string(), Some(key)).await;
    assert_eq!(status, 202, "{body}");
    body["task_id"].as_str().unwrap().to_string()
}

async fn result_as(server: &TestServer, key: &str, task_id: &str) -> serde_json::Value {
    let url = server.url(&format!("/v1/result/{task_id}"));
    reqwest::Client::new().get(url).bearer_auth(key).send().await.unwrap().json().await.unwrap()
}

/// Starts a task that keeps the one worker busy until the gate opens; returns once it runs.
async fn occupy_the_worker(server: &TestServer, name: &str) -> String {
    let task_id = submit_as(server, "calm", serde_json::json!({"prompt": format!("hold {name}")})).await;
    for _ in 0..400 {
        if result_as(server, "calm", &task_id).await["status"] == "processing" {
            return task_id;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the holding task never started");
}

/// Opens the gate for the holding task and waits until every task has finished; the prompts in
/// the order they started, the holding task's taken off.
async fn run_them(server: &TestServer, pipeline: &ScriptedPipeline, tasks: &[String]) -> Vec<String> {
    let before = pipeline.started.lock().unwrap().len();
    pipeline.gate.add_permits(1);
    for task_id in tasks {
        assert_eq!(poll_final(server, task_id, Some("calm")).await["status"], "done");
    }
    let started = pipeline.started.lock().unwrap();
    assert_eq!(started.len(), before + tasks.len());
    started[before..].to_vec()
}

/// The proof of priorities and turns, the same for every queue backend, on a server with
/// [`PRIORITY_KEYS`] and one worker that runs `pipeline`.
pub async fn priorities_and_turns(server: &TestServer, pipeline: &ScriptedPipeline) {
    // A key held to low may not ask for more.
    let (status, body) =
        post_generate(server, r#"{"prompt": "a desk", "priority": "normal"}"#, Some("lowly")).await;
    assert_eq!((status, body["error_code"].as_str()), (403, Some("FORBIDDEN")), "{body}");
    assert!(body["message"].as_str().unwrap().contains("priority low at most"), "{body}");
    let (status, body) =
        post_generate(server, r#"{"prompt": "a desk", "priority": "urgent"}"#, Some("calm")).await;
    assert_eq!(status, 422, "{body}");

    // 20 low, then 5 high: the high ones run first.
    occupy_the_worker(server, "levels").await;
    let mut tasks = Vec::new();
    for n in 0..20 {
        let body = serde_json::json!({"prompt": format!("low {n}"), "priority": "low"});
        tasks.push(submit_as(server, "lowly", body).await);
    }
    for n in 0..5 {
        let body = serde_json::json!({"prompt": format!("high {n}"), "priority": "high"});
        tasks.push(submit_as(server, "calm", body).await);
    }
    let place = |body: serde_json::Value| body["queue_position"].as_u64();
    assert_eq!(place(result_as(server, "calm", &tasks[20]).await), Some(1), "the first high task is next");
    assert_eq!(
        place(result_as(server, "calm", &tasks[0]).await),
        Some(6),
        "the first low one after the high"
    );
    assert_eq!(place(result_as(server, "calm", &tasks[19]).await), Some(25));
    let mut results = deskgen::api::grpc::pb::result_client::ResultClient::new(server.grpc_channel().await);
    let mut request = tonic::Request::new(deskgen::api::grpc::pb::GetResultRequest {
        task_id: tasks[0].clone(),
        previews: false,
    });
    request.metadata_mut().insert("authorization", "Bearer calm".parse().unwrap());
    assert_eq!(results.get_result(request).await.unwrap().into_inner().queue_position, Some(6));
    let order = run_them(server, pipeline, &tasks).await;
    assert!(order[..5].iter().all(|p| p.starts_with("high")), "{order:?}");
    assert_eq!(order[5..], (0..20).map(|n| format!("low {n}")).collect::<Vec<_>>());

    // One key floods 50 tasks, another sends 5: they take turns, so the 5 are done early.
    occupy_the_worker(server, "turns").await;
    let mut tasks = Vec::new();
    for n in 0..50 {
        tasks.push(submit_as(server, "flood", serde_json::json!({"prompt": format!("flood {n}")})).await);
    }
    for n in 0..5 {
        tasks.push(submit_as(server, "calm", serde_json::json!({"prompt": format!("calm {n}")})).await);
    }
    assert_eq!(place(result_as(server, "calm", &tasks[52]).await), Some(6), "calm 2 after 3 turns each");
    let order = run_them(server, pipeline, &tasks).await;
    let calm: Vec<usize> =
        order.iter().enumerate().filter(|(_, p)| p.starts_with("calm")).map(|(i, _)| i + 1).collect();
    assert_eq!(calm, [2, 4, 6, 8, 10], "{order:?}");

    // A low task behind a stream of high ones still runs within the bound of 10.
    occupy_the_worker(server, "bound").await;
    let mut tasks =
        vec![submit_as(server, "calm", serde_json::json!({"prompt": "starved", "priority": "low"})).await];
    for n in 0..15 {
        let body = serde_json::json!({"prompt": format!("high {n}"), "priority": "high"});
        tasks.push(submit_as(server, "flood", body).await);
    }
    assert_eq!(place(result_as(server, "calm", &tasks[0]).await), Some(11));
    let order = run_them(server, pipeline, &tasks).await;
    assert_eq!(order.iter().position(|p| p == "starved"), Some(10), "{order:?}");
}
