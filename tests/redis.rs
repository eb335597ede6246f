//! Scale-out over a real Redis: API nodes and workers in one process, each worker in its own
//! runtime so a test can kill it mid-task.

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use common::{ScriptedPipeline, TestServer, poll_final, serve_config, sse_events};
use deskgen::api::grpc::pb;
use deskgen::config::{Cli, WorkerConfig};
use deskgen::core::WorkerDescription;
use deskgen::pipeline::Pipeline;
use deskgen::server::{PipelineLoader, RunningServer};
use deskgen::tasks::TaskRecord;
use futures::StreamExt;
use serde_json::{Value, json};

const PASSWORD: &str = "test-only-password";

/// A `redis-server` of its own for one test, on a free port, without persistence.
struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

impl RedisServer {
    async fn start() -> RedisServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut server = RedisServer { child: None, port, dir: tempfile::tempdir().unwrap() };
        server.spawn().await;
        server
    }

    async fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &self.port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
                "--requirepass",
                PASSWORD,
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start redis-server ({e}); `make test` installs it (apt-get install redis-server)"
                )
            });
        self.child = Some(child);
        let client = redis::Client::open(self.url()).unwrap();
        let mut last_error = None;
        for _ in 0..200 {
            match client.get_multiplexed_async_connection().await {
                Ok(mut conn) => match redis::cmd("PING").query_async::<String>(&mut conn).await {
                    Ok(_) => return,
                    Err(e) => last_error = Some(e),
                },
                Err(e) => last_error = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("redis-server did not answer on port {}: {last_error:?}", self.port);
    }

    /// The URL nodes use: password and database included, as in production.
    fn url(&self) -> String {
        format!("redis://:{PASSWORD}@127.0.0.1:{}/3", self.port)
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// Kills the server and starts an empty one on the same port.
    async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }

    async fn connection(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url()).unwrap().get_multiplexed_async_connection().await.unwrap()
    }

    /// The names of the work stream's consumers.
    async fn consumers(&self) -> Vec<String> {
        let reply: redis::streams::StreamInfoConsumersReply = redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg("deskgen:work")
            .arg("deskgen-workers")
            .query_async(&mut self.connection().await)
            .await
            .unwrap();
        reply.consumers.into_iter().map(|c| c.name).collect()
    }

    /// The stored record of a task, attempts included (the API does not show them).
    async fn record(&self, task_id: &str) -> TaskRecord {
        let json: String = redis::cmd("HGET")
            .arg(format!("deskgen:task:{task_id}"))
            .arg("record")
            .query_async(&mut self.connection().await)
            .await
            .unwrap();
        serde_json::from_str(&json).unwrap()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `deskgen worker` node in a runtime of its own: dropping that runtime kills it mid-task, the
/// way a crashed GPU host stops (no final state, no goodbye to Redis).
struct WorkerNode {
    base: String,
    _data: tempfile::TempDir,
    runtime: Option<tokio::runtime::Runtime>,
    server: Option<RunningServer>,
}

impl WorkerNode {
    async fn start(
        redis: &RedisServer,
        name: &str,
        args: &[&str],
        pipeline: Arc<ScriptedPipeline>,
    ) -> WorkerNode {
        let url = redis.url();
        let data = tempfile::tempdir().unwrap();
        let data_dir = data.path().to_str().unwrap().to_string();
        let mut argv = vec![
            "deskgen",
            "worker",
            "--queue",
            &url,
            "--name",
            name,
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            &data_dir,
        ];
        argv.extend_from_slice(args);
        let config: WorkerConfig = match Cli::parse_from(argv).command {
            deskgen::config::Command::Worker(config) => *config,
            other => panic!("not a worker command: {other:?}"),
        };
        let (runtime, server, base) = std::thread::spawn(move || {
            let runtime =
                tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            let (server, base) = runtime.block_on(async {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let base = format!("http://{}", listener.local_addr().unwrap());
                let loader: PipelineLoader = Box::new(move |_| Ok(pipeline as Arc<dyn Pipeline>));
                (deskgen::server::start_worker(config, listener, loader).await.unwrap(), base)
            });
            (runtime, server, base)
        })
        .join()
        .unwrap();
        let node = WorkerNode { base, _data: data, runtime: Some(runtime), server: Some(server) };
        wait_health(&node.base, 200).await;
        node
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// Stops the worker process dead: its tasks end without a final state or acknowledgement.
    fn kill(mut self) {
        self.server.take();
        self.runtime.take().unwrap().shutdown_background();
    }

    async fn stop(mut self) {
        self.server.take().unwrap().stop().await.unwrap();
        self.runtime.take().unwrap().shutdown_background();
    }
}

impl Drop for WorkerNode {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// An API-only node on `redis`: it loads no models (its loader fails if called, and its model
/// flags name no file), serving what the live workers announce; it answers once it listens, ready
/// or not.
async fn api_node(redis: &RedisServer, dir: &tempfile::TempDir, args: &[&str]) -> TestServer {
    let url = redis.url();
    let mut argv = vec!["--queue", &url, "--workers", "0", "--sd-model", "/no/such/model"];
    argv.extend_from_slice(&["--detector", "/no/such/detector.onnx", "--ocr", "on"]);
    argv.extend_from_slice(args);
    let config = serve_config(dir.path(), &argv);
    let listener = tokio::net::TcpListener::bind(config.listen).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let loader: PipelineLoader = Box::new(|_| panic!("an API node without workers loads no models"));
    let server = deskgen::server::start(config.clone(), listener, loader).await.expect("server starts");
    let node = TestServer { base: format!("http://{addr}"), addr, server: Some(server), config };
    for _ in 0..400 {
        if reqwest::get(node.url("/healthcheck")).await.is_ok() {
            return node;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{} never answered", node.base);
}

/// Writes a worker node's announcement straight into Redis, live for `ttl`: a worker that has
/// said what it serves but takes no task.
async fn announce_stand_in(redis: &RedisServer, name: &str, ttl: Duration) {
    let description = WorkerDescription {
        name: name.into(),
        version: env!("CARGO_PKG_VERSION").into(),
        execution_provider: "cpu".into(),
        slots: 1,
        max_side: 2048,
        max_images: 4,
        pipeline: ScriptedPipeline::new(1, 1).info(),
        loaded_models: vec!["scripted".into()],
    };
    let mut conn = redis.connection().await;
    let (seconds, micros): (u64, u64) = redis::cmd("TIME").query_async(&mut conn).await.unwrap();
    let until = seconds * 1000 + micros / 1000 + ttl.as_millis() as u64;
    let _: () = redis::pipe()
        .hset("deskgen:workers", name, serde_json::to_string(&description).unwrap())
        .zadd("deskgen:workers:expiry", name, until)
        .query_async(&mut conn)
        .await
        .unwrap();
}

async fn wait_health(base: &str, want: u16) {
    let client = reqwest::Client::new();
    for _ in 0..400 {
        if let Ok(r) = client.get(format!("{base}/healthcheck")).send().await
            && r.status() == want
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{base}/healthcheck never answered {want}");
}

async fn submit(server: &TestServer, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new().post(server.url("/v1/generate")).json(&body).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

async fn get(server: &TestServer, path: &str) -> Value {
    reqwest::get(server.url(path)).await.unwrap().json().await.unwrap()
}

/// Waits until the task is processing and has made `step` diffusion steps.
async fn wait_step(server: &TestServer, task_id: &str, step: u64) {
    for _ in 0..400 {
        let body = get(server, &format!("/v1/result/{task_id}")).await;
        if body["progress"]["step"].as_u64().is_some_and(|s| s >= step) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("task {task_id} never reached step {step}");
}

/// How many final states are published for `task_id`.
async fn count_final_updates(redis: &RedisServer, task_id: String) -> tokio::task::JoinHandle<usize> {
    let client = redis::Client::open(redis.url()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub.subscribe("deskgen:updates:3").await.unwrap();
    tokio::spawn(async move {
        let mut finals = 0;
        let mut messages = pubsub.into_on_message();
        // Quiet for a while after a final state: no second one is coming.
        let quiet = |finals| Duration::from_millis(if finals == 0 { 10_000 } else { 500 });
        while let Ok(Some(message)) = tokio::time::timeout(quiet(finals), messages.next()).await {
            let payload: String = message.get_payload().unwrap();
            let mut parts = payload.splitn(3, ' ');
            let (_, id, json) = (parts.next(), parts.next().unwrap(), parts.next().unwrap());
            let record: TaskRecord = serde_json::from_str(json).unwrap();
            if id == task_id && record.status.is_final() {
                finals += 1;
            }
        }
        finals
    })
}

#[tokio::test]
async fn submit_on_one_api_node_and_follow_it_on_another() {
    let redis = RedisServer::start().await;
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let node_a = api_node(&redis, &dir_a, &[]).await;
    let node_b = api_node(&redis, &dir_b, &[]).await;
    let pipeline = ScriptedPipeline::new(8, 25);
    let worker_1 = WorkerNode::start(&redis, "follow-1", &[], pipeline.clone()).await;
    let worker_2 = WorkerNode::start(&redis, "follow-2", &[], pipeline).await;
    assert_eq!(get(&node_a, "/info").await["queue_backend"], "redis");
    assert_eq!(get(&node_b, "/healthcheck").await["components"]["queue"]["backend"], "redis");

    let (status, body) = submit(&node_a, json!({"prompt": "desk", "task_id": "shared-1", "seed": 5})).await;
    assert_eq!((status, body["status"].as_str()), (202, Some("queued")), "{body}");
    let events = sse_events(&node_b, "/v1/result/shared-1/events").await;
    let steps: Vec<u64> = events
        .iter()
        .filter(|(name, e)| name == "progress" && e["progress"]["stage"] == "diffusion")
        .filter_map(|(_, e)| e["progress"]["step"].as_u64())
        .collect();
    assert!(!steps.is_empty() && steps.windows(2).all(|w| w[0] < w[1]), "{steps:?}");
    let (last_name, last) = events.last().unwrap();
    assert_eq!((last_name.as_str(), last["status"].as_str()), ("result", Some("done")), "{last}");

    let polled = poll_final(&node_b, "shared-1", None).await;
    assert_eq!(polled["processed_image_url"], last["processed_image_url"]);
    assert_eq!(polled["seed"], 5);
    // The same id on the other node is the same task.
    let (status, again) = submit(&node_b, json!({"prompt": "other", "task_id": "shared-1"})).await;
    assert_eq!((status, again["status"].as_str()), (202, Some("done")));

    // gRPC WatchResult on node B for a task submitted on node A.
    let (_, body) = submit(&node_a, json!({"prompt": "desk"})).await;
    let task_id = body["task_id"].as_str().unwrap().to_string();
    let mut results = pb::result_client::ResultClient::new(node_b.grpc_channel().await);
    let mut stream = results
        .watch_result(pb::GetResultRequest { task_id: task_id.clone(), previews: false })
        .await
        .unwrap()
        .into_inner();
    let mut events = Vec::new();
    while let Some(event) = stream.message().await.unwrap() {
        events.push(event);
    }
    assert!(events.iter().any(|e| e.progress.as_ref().is_some_and(|p| p.step > 0)), "{events:?}");
    assert_eq!(events.last().unwrap().status(), pb::TaskStatus::Done);
    let missing = reqwest::get(node_b.url("/v1/result/nope")).await.unwrap();
    assert_eq!(missing.status(), 404);

    worker_1.stop().await;
    worker_2.stop().await;
    node_a.stop().await;
    node_b.stop().await;
}

/// The previews of an SSE stream: (step, JPEG grey level), and whether the stream ended done.
async fn sse_previews(server: &TestServer, path: &str) -> (Vec<(u64, u8)>, bool) {
    use base64::Engine;
    let mut previews = Vec::new();
    let mut done = false;
    for (_, event) in sse_events(server, path).await {
        done |= event["status"] == "done";
        let Some(url) = event["progress"]["preview"].as_str() else { continue };
        let jpeg = base64::engine::general_purpose::STANDARD
            .decode(url.strip_prefix("data:image/jpeg;base64,").unwrap())
            .unwrap();
        let picture =
            image::load_from_memory_with_format(&jpeg, image::ImageFormat::Jpeg).unwrap().to_luma8();
        previews.push((event["progress"]["step"].as_u64().unwrap(), picture.get_pixel(4, 4).0[0]));
    }
    (previews, done)
}

#[tokio::test]
async fn previews_travel_from_the_worker_to_the_node_that_watches() {
    let redis = RedisServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let node = api_node(&redis, &dir, &[]).await;
    let pipeline = ScriptedPipeline::new(12, 40);
    let worker = WorkerNode::start(&redis, "previews", &[], pipeline.clone()).await;

    // Nobody watches: none is made.
    let (_, body) = submit(&node, json!({"prompt": "desk", "preview_every": 1})).await;
    assert_eq!(poll_final(&node, body["task_id"].as_str().unwrap(), None).await["status"], "done");
    assert_eq!(pipeline.previews_made.load(std::sync::atomic::Ordering::SeqCst), 0);

    // The task waits at the gate until both streams are open and the word has reached the worker.
    let (_, body) = submit(&node, json!({"prompt": "hold desk", "preview_every": 3})).await;
    let task_id = body["task_id"].as_str().unwrap().to_string();
    let (with_path, without_path) =
        (format!("/v1/result/{task_id}/events?previews=true"), format!("/v1/result/{task_id}/events"));
    let release = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        pipeline.gate.add_permits(1);
    };
    let ((with, with_done), (without, without_done), ()) =
        tokio::join!(sse_previews(&node, &with_path), sse_previews(&node, &without_path), release);
    assert!(with_done && without_done);
    let steps: Vec<u64> = with.iter().map(|&(step, _)| step).collect();
    assert_eq!(steps, [3, 6, 9, 12], "every preview, at the stated steps, from another process");
    for (step, grey) in &with {
        assert!((i64::from(*grey) - *step as i64 * 10).abs() <= 2, "the JPEG made at step {step}: {grey}");
    }
    assert!(without.is_empty(), "a stream that did not ask gets none");
    assert_eq!(pipeline.previews_made.load(std::sync::atomic::Ordering::SeqCst), 4);
    worker.stop().await;
    node.stop().await;
}

#[tokio::test]
async fn priorities_and_turns_hold_across_nodes() {
    let redis = RedisServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let node = api_node(&redis, &dir, &common::PRIORITY_KEYS).await;
    let pipeline = ScriptedPipeline::new(1, 1);
    let worker = WorkerNode::start(&redis, "fair", &["--workers", "1"], pipeline.clone()).await;
    common::priorities_and_turns(&node, &pipeline).await;
    worker.stop().await;
    node.stop().await;
}

#[tokio::test]
async fn a_killed_workers_task_is_taken_over_and_finishes_once() {
    let redis = RedisServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let node = api_node(&redis, &dir, &[]).await;
    let args = ["--visibility-timeout", "1s", "--max-attempts", "3", "--consumer-expiry", "1s"];
    let pipeline = ScriptedPipeline::new(30, 40);
    let doomed = WorkerNode::start(&redis, "doomed", &args, pipeline.clone()).await;

    let (_, body) = submit(&node, json!({"prompt": "desk", "task_id": "orphan"})).await;
    assert_eq!(body["status"], "queued");
    let finals = count_final_updates(&redis, "orphan".into()).await;
    wait_step(&node, "orphan", 3).await;
    let survivor = WorkerNode::start(&redis, "survivor", &args, pipeline).await;
    let killed_at = Instant::now();
    doomed.kill();

    let result = poll_final(&node, "orphan", None).await;
    assert_eq!(result["status"], "done", "{result}");
    let took = killed_at.elapsed();
    // Taken over no sooner than the visibility timeout after the last heartbeat (a third of it
    // before the kill at most), then run from the start (30 × 40 ms).
    assert!(took >= Duration::from_millis(1000 - 334 + 1200), "{took:?}");
    // Two starts: the survivor's own run outlasts the visibility timeout, so its heartbeats are
    // what kept it from being taken over a second time.
    let record = redis.record("orphan").await;
    assert_eq!(record.attempts, 2);
    assert_eq!(finals.await.unwrap(), 1, "exactly one final state");
    let metrics = reqwest::get(survivor.url("/metrics")).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("deskgen_tasks_reclaimed_total"), "{metrics}");
    assert!(metrics.contains("deskgen_worker_tasks_total{worker=\"survivor-0\"}"), "{metrics}");

    // The dead worker's consumer, its task taken over, leaves the group; the survivor's stays.
    let doomed_consumer = format!("doomed-{}", std::process::id());
    let mut consumers = Vec::new();
    for _ in 0..150 {
        consumers = redis.consumers().await;
        if !consumers.contains(&doomed_consumer) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!consumers.contains(&doomed_consumer), "{consumers:?}");
    assert!(consumers.contains(&format!("survivor-{}", std::process::id())), "{consumers:?}");
    let metrics = reqwest::get(survivor.url("/metrics")).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("deskgen_consumers_removed_total"), "{metrics}");
    survivor.stop().await;
    node.stop().await;
}

#[tokio::test]
async fn a_stopping_worker_hands_its_unfinished_task_back_at_once() {
    let redis = RedisServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let node = api_node(&redis, &dir, &[]).await;
    let pipeline = ScriptedPipeline::new(2, 1);
    let leaving =
        WorkerNode::start(&redis, "leaving", &["--shutdown-grace", "100ms"], pipeline.clone()).await;
    let (_, body) = submit(&node, json!({"prompt": "hold desk", "task_id": "handed"})).await;
    assert_eq!(body["status"], "queued");
    for _ in 0..400 {
        if get(&node, "/v1/result/handed").await["status"] == "processing" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let stopped_at = Instant::now();
    leaving.stop().await;
    assert_eq!(
        get(&node, "/v1/result/handed").await["status"],
        "queued",
        "queued again as the worker stopped"
    );

    // Another worker runs it long before the visibility timeout (30 s) would have let it.
    let staying = WorkerNode::start(&redis, "staying", &[], pipeline.clone()).await;
    pipeline.gate.add_permits(1);
    assert_eq!(poll_final(&node, "handed", None).await["status"], "done");
    assert!(stopped_at.elapsed() < Duration::from_secs(10), "{:?}", stopped_at.elapsed());
    assert_eq!(redis.record("handed").await.attempts, 2);
    staying.stop().await;
    node.stop().await;
}

#[tokio::test]
async fn a_task_that_outlives_max_attempts_fails_with_a_clear_error() {
    let redis = RedisServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let node = api_node(&redis, &dir, &[]).await;
    let args = ["--visibility-timeout", "500ms", "--max-attempts", "1"];
    let pipeline = ScriptedPipeline::new(100, 20);
    let doomed = WorkerNode::start(&redis, "once", &args, pipeline.clone()).await;
    let (_, body) = submit(&node, json!({"prompt": "desk"})).await;
    let task_id = body["task_id"].as_str().unwrap().to_string();
    wait_step(&node, &task_id, 1).await;
    doomed.kill();
    let survivor = WorkerNode::start(&redis, "twice", &args, pipeline).await;

    let result = poll_final(&node, &task_id, None).await;
    assert_eq!(
        (result["status"].as_str(), result["error_code"].as_str()),
        (Some("failed"), Some("INTERNAL"))
    );
    let message = result["message"].as_str().unwrap();
    assert!(message.contains("stopped 1 times") && message.contains("--max-attempts 1"), "{message}");
    assert_eq!(redis.record(&task_id).await.attempts, 1);
    survivor.stop().await;
    node.stop().await;
}

#[tokio::test]
async fn cancel_on_one_node_reaches_the_worker_running_a_task_from_another() {
    let redis = RedisServer::start().await;
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let node_a = api_node(&redis, &dir_a, &[]).await;
    let node_b = api_node(&redis, &dir_b, &[]).await;
    let worker = WorkerNode::start(&redis, "cancel", &[], ScriptedPipeline::new(500, 20)).await;

    let (_, running) = submit(&node_a, json!({"prompt": "long"})).await;
    let running = running["task_id"].as_str().unwrap().to_string();
    wait_step(&node_a, &running, 1).await;
    // The only worker is busy: this one waits, and a cancel ends it at once.
    let (_, queued) = submit(&node_a, json!({"prompt": "second"})).await;
    let queued = queued["task_id"].as_str().unwrap().to_string();
    let cancel = |id: &str| {
        reqwest::Client::new().post(node_b.url(&format!("/v1/result/{id}/cancel"))).json(&json!({})).send()
    };
    let r = cancel(&queued).await.unwrap();
    let body: Value = r.json().await.unwrap();
    assert_eq!((body["status"].as_str(), body["error_code"].as_str()), (Some("canceled"), Some("CANCELED")));

    let asked = Instant::now();
    let r = cancel(&running).await.unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["status"], "canceled", "{body}");
    // Through pub/sub, not the heartbeat's flag check (a third of the 30 s visibility timeout).
    assert!(asked.elapsed() < Duration::from_secs(3), "{:?}", asked.elapsed());
    let seen_on_a = poll_final(&node_a, &running, None).await;
    assert_eq!(
        (seen_on_a["status"].as_str(), seen_on_a["error_code"].as_str()),
        (Some("canceled"), Some("CANCELED"))
    );
    let again = cancel(&running).await.unwrap();
    assert_eq!(again.status(), 409);
    assert_eq!(get(&node_a, "/healthcheck").await["components"]["queue"]["depth"], 0);

    worker.stop().await;
    node_a.stop().await;
    node_b.stop().await;
}

#[tokio::test]
async fn nodes_ride_out_a_redis_restart() {
    let mut redis = RedisServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let node = api_node(&redis, &dir, &[]).await;
    let worker = WorkerNode::start(&redis, "restart", &[], ScriptedPipeline::new(2, 5)).await;
    let (_, body) = submit(&node, json!({"prompt": "before"})).await;
    let before = body["task_id"].as_str().unwrap().to_string();
    assert_eq!(poll_final(&node, &before, None).await["status"], "done");

    redis.kill();
    wait_health(&node.base, 503).await;
    wait_health(&worker.base, 503).await;
    let (status, body) = submit(&node, json!({"prompt": "while down"})).await;
    assert_eq!((status, body["error_code"].as_str()), (503, Some("NOT_READY")), "{body}");

    redis.restart().await;
    wait_health(&node.base, 200).await;
    wait_health(&worker.base, 200).await;
    // Prefer: wait answers from this node's subscription, so it proves that came back too.
    let r = reqwest::Client::new()
        .post(node.url("/v1/generate"))
        .header("prefer", "wait=20")
        .json(&json!({"prompt": "after"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "done");

    worker.stop().await;
    node.stop().await;
}

#[tokio::test]
async fn five_hundred_tasks_across_two_workers_under_a_global_queue_limit() {
    const TASKS: usize = 500;
    let redis = RedisServer::start().await;
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let limit = TASKS.to_string();
    let node_a = api_node(&redis, &dir_a, &["--max-queue-depth", &limit]).await;
    let node_b = api_node(&redis, &dir_b, &["--max-queue-depth", &limit]).await;

    // No worker takes tasks yet (one has announced itself): both nodes fill one queue.
    announce_stand_in(&redis, "stand-in", Duration::from_secs(60)).await;
    let submitted = Instant::now();
    let ids: Vec<String> = futures::stream::iter(0..TASKS)
        .map(|i| {
            let node = if i % 2 == 0 { &node_a } else { &node_b };
            async move {
                let (status, body) =
                    submit(node, json!({"prompt": "desk", "task_id": format!("load-{i}")})).await;
                assert_eq!(status, 202, "{body}");
                body["task_id"].as_str().unwrap().to_string()
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    let submit_secs = submitted.elapsed().as_secs_f64();
    let (status, body) = submit(&node_a, json!({"prompt": "one too many"})).await;
    assert_eq!((status, body["error_code"].as_str()), (429, Some("QUEUE_FULL")));
    let mut client = pb::generate_client::GenerateClient::new(node_b.grpc_channel().await);
    let refused = client
        .generate(pb::GenerateRequest { prompt: Some("desk".into()), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    assert_eq!(get(&node_b, "/healthcheck").await["components"]["queue"]["depth"], TASKS);

    let started = Instant::now();
    let pipeline = ScriptedPipeline::new(2, 1);
    let args = ["--workers", "4"];
    let worker_1 = WorkerNode::start(&redis, "load-1", &args, pipeline.clone()).await;
    let worker_2 = WorkerNode::start(&redis, "load-2", &args, pipeline).await;
    for id in &ids {
        assert_eq!(poll_final(&node_b, id, None).await["status"], "done");
    }
    let wall = started.elapsed().as_secs_f64();
    eprintln!(
        "{TASKS} tasks: submitted through 2 API nodes in {submit_secs:.2} s; run by 2 workers × 4 in {wall:.2} s ({:.0} tasks/s)",
        TASKS as f64 / wall
    );
    assert_eq!(get(&node_a, "/healthcheck").await["components"]["queue"]["depth"], 0);

    let metrics = reqwest::get(worker_1.url("/metrics")).await.unwrap().text().await.unwrap();
    let per_worker = |prefix: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(&format!("deskgen_worker_tasks_total{{worker=\"{prefix}-")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let (by_1, by_2) = (per_worker("load-1"), per_worker("load-2"));
    eprintln!("tasks run: load-1 {by_1}, load-2 {by_2}");
    assert_eq!(by_1 + by_2, TASKS as f64, "{metrics}");
    assert!(by_1 > 0.0 && by_2 > 0.0, "both workers took tasks: {by_1} / {by_2}");

    worker_1.stop().await;
    worker_2.stop().await;
    node_a.stop().await;
    node_b.stop().await;
}

/// Submits tasks `fleet-<i>` for each i of `range` on `node`, 16 at a time; each must be accepted.
async fn submit_range(node: &TestServer, range: std::ops::Range<usize>) {
    futures::stream::iter(range)
        .map(|i| async move {
            let (status, body) =
                submit(node, json!({"prompt": "desk", "task_id": format!("fleet-{i}")})).await;
            assert_eq!(status, 202, "{body}");
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
}

/// Every final state published from now on, counted by task id.
async fn count_all_finals(
    redis: &RedisServer,
) -> tokio::task::JoinHandle<std::collections::HashMap<String, usize>> {
    let client = redis::Client::open(redis.url()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub.subscribe("deskgen:updates:3").await.unwrap();
    tokio::spawn(async move {
        let mut finals = std::collections::HashMap::new();
        let mut messages = pubsub.into_on_message();
        while let Ok(Some(message)) = tokio::time::timeout(Duration::from_secs(3), messages.next()).await {
            let payload: String = message.get_payload().unwrap();
            let mut parts = payload.splitn(3, ' ');
            let (_, id, json) = (parts.next(), parts.next().unwrap(), parts.next().unwrap());
            let record: TaskRecord = serde_json::from_str(json).unwrap();
            if record.status.is_final() {
                *finals.entry(id.to_string()).or_insert(0) += 1;
            }
        }
        finals
    })
}

/// Two API nodes with no model files (their loader panics if called) serve what two worker nodes
/// announce: not ready and 503 before any worker, /info from the workers' description, 422 for a
/// model no worker serves; 200 tasks go in over both nodes while one worker is killed and one API
/// node restarted, and each acknowledged id ends exactly once, the killed worker's tasks in a
/// second attempt; the dead worker then leaves /info and the consumer group.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api_nodes_without_models_serve_the_workers_through_a_kill_and_a_restart() {
    const TASKS: usize = 200;
    let redis = RedisServer::start().await;
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let args = ["--max-queue-depth", "1000", "--min-workers", "2"];
    let node_a = api_node(&redis, &dir_a, &args).await;
    let mut node_b = api_node(&redis, &dir_b, &args).await;
    let health = reqwest::get(node_a.url("/healthcheck")).await.unwrap();
    assert_eq!(health.status(), 503);
    let health: Value = health.json().await.unwrap();
    assert_eq!(health["components"]["workers"], json!({"live": 0, "min": 2}), "{health}");
    let (status, body) = submit(&node_a, json!({"prompt": "desk"})).await;
    assert_eq!((status, body["error_code"].as_str()), (503, Some("NOT_READY")), "{body}");

    let pipeline = ScriptedPipeline::new(20, 10);
    let worker_args =
        ["--workers", "2", "--visibility-timeout", "1s", "--max-attempts", "3", "--consumer-expiry", "1s"];
    let steady = WorkerNode::start(&redis, "steady", &worker_args, pipeline.clone()).await;
    let doomed = WorkerNode::start(&redis, "doomed", &worker_args, pipeline.clone()).await;
    wait_health(&node_a.base, 200).await;
    wait_health(&node_b.base, 200).await;
    let described = serde_json::to_value(pipeline.info()).unwrap();
    for node in [&node_a, &node_b] {
        let info = get(node, "/info").await;
        assert_eq!(info["models"], described["models"], "{info}");
        let mut served = info["sd_models"][0].clone();
        assert_eq!(
            served.as_object_mut().unwrap().remove("loaded"),
            Some(json!(true)),
            "the workers hold it"
        );
        assert_eq!(served, described["sd_models"][0], "{info}");
        assert_eq!(info["schedulers"], described["sd_models"][0]["schedulers"]);
        let names: Vec<&str> =
            info["workers"].as_array().unwrap().iter().map(|w| w["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["doomed", "steady"], "{info}");
        assert_eq!(info["workers"][0]["slots"], 2);
    }
    let (status, body) = submit(&node_b, json!({"prompt": "desk", "model": "not-served"})).await;
    assert_eq!((status, body["error_code"].as_str()), (422, Some("INVALID_INPUT")), "{body}");

    let finals = count_all_finals(&redis).await;
    submit_range(&node_a, 0..TASKS / 4).await;
    submit_range(&node_b, TASKS / 4..TASKS / 2).await;
    wait_step(&node_a, "fleet-0", 2).await;
    doomed.kill();
    node_b.stop().await;
    node_b = api_node(&redis, &dir_b, &args).await;
    submit_range(&node_b, TASKS / 2..TASKS * 3 / 4).await;
    submit_range(&node_a, TASKS * 3 / 4..TASKS).await;
    let mut retried = 0;
    for i in 0..TASKS {
        let id = format!("fleet-{i}");
        assert_eq!(
            poll_final(if i % 2 == 0 { &node_a } else { &node_b }, &id, None).await["status"],
            "done",
            "{id}"
        );
        retried += usize::from(redis.record(&id).await.attempts == 2);
    }
    let finals = finals.await.unwrap();
    assert_eq!(finals.len(), TASKS, "every id ended");
    assert!(finals.values().all(|&n| n == 1), "exactly one final state each: {finals:?}");
    assert!(retried >= 1, "the killed worker's tasks ran again as their next attempt");
    eprintln!("{TASKS} tasks over 2 model-free API nodes: {retried} re-run after the kill");

    // The killed worker's announcement runs out and its consumer leaves the group.
    let doomed_consumer = format!("doomed-{}", std::process::id());
    let mut gone = false;
    for _ in 0..200 {
        let info = get(&node_a, "/info").await;
        let names: Vec<String> =
            info["workers"].as_array().unwrap().iter().map(|w| w["name"].as_str().unwrap().into()).collect();
        if names == ["steady"] && !redis.consumers().await.contains(&doomed_consumer) {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone, "the dead worker is still listed or still a consumer");
    let health: Value = get(&node_a, "/healthcheck").await;
    assert_eq!(health["components"]["workers"]["live"], 1, "{health}");
    assert_eq!(health["status"], "starting", "fewer than --min-workers live: {health}");
    steady.stop().await;
    node_a.stop().await;
    node_b.stop().await;
}

/// An OTLP trace collector: the collector's gRPC trace service, keeping every span with its
/// resource's attributes.
mod collector {
    use std::sync::{Arc, Mutex};

    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
        TraceService, TraceServiceServer,
    };
    use opentelemetry_proto::tonic::collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    };
    use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
    pub use opentelemetry_proto::tonic::trace::v1::Span;

    /// A span and its node's role (`deskgen.node.role`).
    pub type Received = Arc<Mutex<Vec<(String, Span)>>>;

    struct Service(Received);

    #[tonic::async_trait]
    impl TraceService for Service {
        async fn export(
            &self,
            request: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            let mut received = self.0.lock().unwrap();
            for resource_spans in request.into_inner().resource_spans {
                let role = resource_spans
                    .resource
                    .iter()
                    .flat_map(|r| &r.attributes)
                    .find(|kv| kv.key == "deskgen.node.role")
                    .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                        AnyValue::StringValue(role) => Some(role.clone()),
                        _ => None,
                    })
                    .unwrap_or_default();
                for scope in resource_spans.scope_spans {
                    received.extend(scope.spans.into_iter().map(|span| (role.clone(), span)));
                }
            }
            Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
        }
    }

    /// Serves on a free port until the test ends; returns its endpoint and what it receives.
    pub async fn start() -> (String, Received) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let received: Received = Default::default();
        let service = TraceServiceServer::new(Service(received.clone()));
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        tokio::spawn(tonic::transport::Server::builder().add_service(service).serve_with_incoming(incoming));
        (endpoint, received)
    }
}

/// A free port on 127.0.0.1.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A webhook receiver on a free port: its URL, and the `traceparent` header of each POST.
async fn webhook_receiver() -> (String, Arc<std::sync::Mutex<Vec<Option<String>>>>) {
    let seen: Arc<std::sync::Mutex<Vec<Option<String>>>> = Default::default();
    let keep = seen.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: axum::http::HeaderMap| {
            let keep = keep.clone();
            async move {
                let traceparent =
                    headers.get("traceparent").and_then(|v| v.to_str().ok()).map(str::to_string);
                keep.lock().unwrap().push(traceparent);
                axum::http::StatusCode::NO_CONTENT
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, seen)
}

/// The `deskgen` binary as a process of its own, killed when dropped.
struct Process(Child);

impl Process {
    fn spawn(args: &[&str]) -> Process {
        let child = Command::new(env!("CARGO_BIN_EXE_deskgen"))
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args(args)
            .env("OTEL_BSP_SCHEDULE_DELAY", "100")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("the deskgen binary starts");
        Process(child)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An API node and a worker, each its own process exporting to one collector: the client's
/// `traceparent` is the parent of the API node's request span, the task's spans on the worker
/// (queue wait, the task, each stage in order, the webhook) join that one trace, and the webhook
/// carries it on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_follows_a_task_from_the_api_node_to_the_worker_and_its_webhook() {
    let (endpoint, received) = collector::start().await;
    let redis = RedisServer::start().await;
    let (api_dir, worker_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (api_port, worker_port) = (free_port(), free_port());
    let (url, api_listen, worker_listen) =
        (redis.url(), format!("127.0.0.1:{api_port}"), format!("127.0.0.1:{worker_port}"));
    let allow = ["--fetch-allow", "127.0.0.1", "--fetch-allow-http", "--otlp-endpoint", &endpoint];
    let api_args = ["serve", "--queue", &url, "--workers", "0", "--listen", &api_listen];
    let _api =
        Process::spawn(&[&api_args[..], &["--data-dir", api_dir.path().to_str().unwrap()], &allow].concat());
    let worker_args =
        ["worker", "--queue", &url, "--name", "traced", "--listen", &worker_listen, "--intra-threads", "1"];
    let _worker = Process::spawn(
        &[&worker_args[..], &["--data-dir", worker_dir.path().to_str().unwrap()], &allow].concat(),
    );
    let base = format!("http://{api_listen}");
    let client = reqwest::Client::new();
    let mut ready = false;
    for _ in 0..2400 {
        if client.get(format!("{base}/healthcheck")).send().await.is_ok_and(|r| r.status() == 200) {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ready, "the API node never saw its worker");

    let (hook_url, hooks) = webhook_receiver().await;
    let (trace_id, client_span) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let response = client
        .post(format!("{base}/v1/generate"))
        .header("traceparent", format!("00-{trace_id}-{client_span}-01"))
        .json(&json!({"prompt": "a desk with a lamp", "num_inference_steps": 2, "width": 64, "height": 64,
                      "webhook_url": hook_url, "webhook_events": ["completed"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let task_id = response.json::<Value>().await.unwrap()["task_id"].as_str().unwrap().to_string();
    let mut result = Value::Null;
    for _ in 0..1200 {
        result =
            client.get(format!("{base}/v1/result/{task_id}")).send().await.unwrap().json().await.unwrap();
        if result["status"] == "done" || result["status"] == "failed" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(result["status"], "done", "{result}");

    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let wanted =
        ["request", "queue_wait", "task", "text_encode", "unet", "vae", "upload", "shopping", "webhook"];
    let mut spans: Vec<(String, collector::Span)> = Vec::new();
    for _ in 0..200 {
        spans =
            received.lock().unwrap().iter().filter(|(_, s)| hex(&s.trace_id) == trace_id).cloned().collect();
        if wanted.iter().all(|name| spans.iter().any(|(_, s)| s.name == *name)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let named = |name: &str| {
        spans.iter().find(|(_, s)| s.name == name).unwrap_or_else(|| {
            let all: Vec<(String, String, String)> = received
                .lock()
                .unwrap()
                .iter()
                .map(|(r, s)| (r.clone(), s.name.clone(), hex(&s.trace_id)))
                .collect();
            panic!(
                "no {name} span in the trace: {:?}; all: {all:?}",
                spans.iter().map(|(r, s)| (r, &s.name)).collect::<Vec<_>>()
            )
        })
    };
    let (role, request) = named("request");
    assert_eq!(
        (role.as_str(), hex(&request.parent_span_id).as_str()),
        ("api", client_span),
        "the client's span is the parent"
    );
    let (role, task) = named("task");
    assert_eq!(role, "worker");
    assert_eq!(task.parent_span_id, request.span_id, "the task continues the request that accepted it");
    for name in ["queue_wait", "text_encode", "unet", "vae", "upload", "shopping", "webhook"] {
        let (role, span) = named(name);
        assert_eq!((role.as_str(), &span.parent_span_id), ("worker", &task.span_id), "{name}");
    }
    assert!(spans.iter().all(|(_, s)| s.name != "lora"), "no adapter, no merge span");
    let starts: Vec<u64> = ["queue_wait", "text_encode", "unet", "vae", "upload"]
        .iter()
        .map(|n| named(n).1.start_time_unix_nano)
        .collect();
    assert!(starts.windows(2).all(|w| w[0] <= w[1]), "stages in order: {starts:?}");
    let traceparent =
        hooks.lock().unwrap().first().cloned().flatten().expect("the webhook came with a traceparent");

    // Over gRPC the trace comes in the request's metadata.
    let (grpc_trace, grpc_span) = ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331");
    let channel = tonic::transport::Endpoint::from_shared(base.clone()).unwrap().connect().await.unwrap();
    let mut request = tonic::Request::new(pb::GenerateRequest {
        prompt: Some("desk".into()),
        num_inference_steps: Some(1),
        ..Default::default()
    });
    request.metadata_mut().insert("traceparent", format!("00-{grpc_trace}-{grpc_span}-01").parse().unwrap());
    pb::generate_client::GenerateClient::new(channel).generate(request).await.unwrap();
    let mut parent = None;
    for _ in 0..200 {
        parent = received
            .lock()
            .unwrap()
            .iter()
            .find(|(_, s)| s.name == "request" && hex(&s.trace_id) == grpc_trace)
            .map(|(_, s)| hex(&s.parent_span_id));
        if parent.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(parent.as_deref(), Some(grpc_span), "the gRPC request span continues the client's trace");
    assert!(
        traceparent.starts_with(&format!("00-{trace_id}-{}", hex(&named("webhook").1.span_id))),
        "{traceparent}"
    );
}
