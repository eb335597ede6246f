//! The release `deskgen` binary as a child process: start, readiness, resident memory.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::json;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::Settings;
use crate::report::{Report, summary};

/// A running server; killed when dropped.
pub struct Server {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    _data: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `redis-server` on a free port without persistence; killed when dropped.
pub struct Redis {
    child: Child,
    /// `redis://127.0.0.1:PORT/0`.
    pub url: String,
}

impl Redis {
    /// Starts it and waits until it accepts connections.
    pub async fn start() -> anyhow::Result<Redis> {
        let port = free_port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .context("starting redis-server (apt-get install redis-server)")?;
        let redis = Redis { child, url: format!("redis://127.0.0.1:{port}/0") };
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(redis);
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        bail!("redis-server never accepted connections")
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(0)
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

impl Server {
    /// Starts `deskgen serve` on a free port with a fresh data directory and `args`, from the
    /// repository root so the default model paths resolve.
    pub fn spawn(args: &[&str]) -> anyhow::Result<Server> {
        Server::spawn_command("serve", args)
    }

    /// Starts `deskgen <command>` (`serve` or `worker`) like [`Server::spawn`].
    pub fn spawn_command(command: &str, args: &[&str]) -> anyhow::Result<Server> {
        let data = tempfile::tempdir()?;
        let port = free_port();
        let base = format!("http://127.0.0.1:{port}");
        let child = Command::new(env!("CARGO_BIN_EXE_deskgen"))
            .current_dir(repo())
            .args([
                command,
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--image-base-url",
                &base,
                "--data-dir",
            ])
            .arg(data.path())
            .args(args)
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the deskgen binary")?;
        Ok(Server { child, base, _data: data })
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// Waits until `/healthcheck` answers 200 and gRPC health says SERVING; returns the time since
    /// `since`.
    pub async fn wait_ready(&mut self, since: Instant) -> anyhow::Result<Duration> {
        let ready = self.wait_healthy(since).await?;
        let channel = tonic::transport::Endpoint::from_shared(self.base.clone())?.connect().await?;
        let health = HealthClient::new(channel)
            .check(tonic_health::pb::HealthCheckRequest { service: "deskgen.v1.Generate".into() })
            .await?
            .into_inner();
        if health.status() != ServingStatus::Serving {
            bail!("HTTP health says ready but gRPC health says {:?}", health.status());
        }
        Ok(ready)
    }

    /// Waits until `/healthcheck` answers 200 (all a worker serves); returns the time since `since`.
    pub async fn wait_healthy(&mut self, since: Instant) -> anyhow::Result<Duration> {
        let client = reqwest::Client::new();
        let deadline = since + Duration::from_secs(120);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("deskgen exited while starting: {status}");
            }
            if let Ok(r) = client.get(self.url("/healthcheck")).send().await
                && r.status() == 200
            {
                break;
            }
            if Instant::now() > deadline {
                bail!("deskgen was not ready within 120 s");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(since.elapsed())
    }

    /// Resident set size in MiB (VmRSS).
    pub fn rss_mib(&self) -> anyhow::Result<f64> {
        rss_mib(self.child.id())
    }
}

/// VmRSS of `pid` in MiB.
pub fn rss_mib(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")?;
    Ok(kib / 1024.0)
}

/// The default models' paths exist (made by `make models`).
pub fn check_assets() -> anyhow::Result<()> {
    for path in
        ["assets/models/detector.onnx", "assets/models/classifier.onnx", "assets/testdata/darknet/dog.jpg"]
    {
        if !repo().join(path).is_file() {
            bail!("{path} is missing: run `make models testdata` first");
        }
    }
    Ok(())
}

/// Cold start to ready, five times on fresh data directories.
pub async fn cold_start(settings: &Settings, report: &mut Report) -> anyhow::Result<()> {
    check_assets()?;
    let threads = settings.threads.to_string();
    let mut samples = Vec::new();
    let mut rss = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        let mut server = Server::spawn(&["--intra-threads", &threads])?;
        samples.push(server.wait_ready(started).await?.as_secs_f64() * 1000.0);
        tokio::time::sleep(Duration::from_millis(500)).await;
        rss.push(server.rss_mib()?);
        // The API answers at once; the models decide readiness.
        let info: serde_json::Value = reqwest::get(server.url("/info")).await?.json().await?;
        anyhow::ensure!(!info["models"].as_array().is_none_or(|m| m.is_empty()), "no models in /info");
    }
    let cold = summary(&samples);
    let idle = summary(&rss);
    let lines = vec![
        format!(
            "cold start to ready (health SERVING)  median {:>8.0} ms   p95 {:>8.0} ms   (n={})",
            cold["median"].as_f64().unwrap_or(f64::NAN),
            cold["p95"].as_f64().unwrap_or(f64::NAN),
            samples.len()
        ),
        format!(
            "RSS idle after ready                  median {:>8.1} MiB",
            idle["median"].as_f64().unwrap_or(f64::NAN)
        ),
    ];
    report.section(
        "cold_start",
        json!({"ready_ms": cold, "samples_ms": samples, "rss_idle_mib": idle}),
        lines,
    );
    Ok(())
}

/// Cold start of an API node that loads no models (the Redis queue, `--workers 0`, model flags
/// naming no file), five times: until `/healthcheck` answers (503 "no live workers": none is
/// started), and its RSS then. Needs `redis-server` on the PATH.
pub async fn model_free_cold_start(report: &mut Report) -> anyhow::Result<()> {
    let redis = Redis::start().await?;
    let (mut samples, mut rss) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        let started = Instant::now();
        let server =
            Server::spawn(&["--queue", &redis.url, "--workers", "0", "--sd-model", "/no/such/model"])?;
        let client = reqwest::Client::new();
        loop {
            if client.get(server.url("/healthcheck")).send().await.is_ok_and(|r| r.status() == 503) {
                break;
            }
            anyhow::ensure!(started.elapsed() < Duration::from_secs(30), "the API node never answered");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        samples.push(started.elapsed().as_secs_f64() * 1000.0);
        tokio::time::sleep(Duration::from_millis(500)).await;
        rss.push(server.rss_mib()?);
    }
    drop(redis);
    let (cold, idle) = (summary(&samples), summary(&rss));
    let lines = vec![
        format!(
            "API node without models: answering  median {:>8.0} ms   p95 {:>8.0} ms   (n={})",
            cold["median"].as_f64().unwrap_or(f64::NAN),
            cold["p95"].as_f64().unwrap_or(f64::NAN),
            samples.len()
        ),
        format!(
            "RSS of that API node                  median {:>8.1} MiB",
            idle["median"].as_f64().unwrap_or(f64::NAN)
        ),
    ];
    report.section("api_node_cold_start", json!({"answering_ms": cold, "rss_mib": idle}), lines);
    Ok(())
}

/// Whether `path` exists relative to the repository.
pub fn repo_path(path: &str) -> PathBuf {
    repo().join(path)
}
