//! The API under load on loopback with the workers off: REST through `wrk`, gRPC through a small
//! client here, submit and poll at 1, 16 and 64 connections, against deskgen on the embedded queue,
//! deskgen on the Redis queue, and the ceiling.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use deskgen::api::grpc::pb;
use serde_json::{Value, json};

use crate::Settings;
use crate::ceiling::ADDR_VAR;
use crate::report::{Report, percentile, verdict};
use crate::server::{Redis, Server, free_port};

const CONNECTIONS: [usize; 3] = [1, 16, 64];
const SUBMIT_BODY: &str = r#"{"prompt": "a tidy wooden desk"}"#;

/// One measurement: throughput and latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy)]
struct Measured {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
}

/// The ceiling server as a child process of this binary; killed when dropped.
struct Ceiling {
    child: Child,
    base: String,
}

impl Drop for Ceiling {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_ceiling() -> anyhow::Result<Ceiling> {
    let addr = format!("127.0.0.1:{}", free_port());
    let child = Command::new(std::env::current_exe()?)
        .env(ADDR_VAR, &addr)
        .stdout(Stdio::null())
        .spawn()
        .context("starting the ceiling server")?;
    let ceiling = Ceiling { child, base: format!("http://{addr}") };
    let client = reqwest::Client::new();
    for _ in 0..400 {
        if client.get(format!("{}/v1/result/x", ceiling.base)).send().await.is_ok() {
            return Ok(ceiling);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    bail!("the ceiling server never answered")
}

fn wrk_available() -> bool {
    Command::new("wrk").arg("--version").output().is_ok()
}

/// Parses wrk's "1.23ms" / "456.00us" / "1.02s" into milliseconds.
fn wrk_duration_ms(text: &str) -> Option<f64> {
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().ok()?;
    Some(match unit {
        "us" => value / 1000.0,
        "ms" => value,
        "s" => value * 1000.0,
        "m" => value * 60_000.0,
        _ => return None,
    })
}

/// Runs wrk against `url`: POSTs the submit body when `post`, GETs otherwise.
fn wrk(url: &str, post: bool, connections: usize, secs: u64) -> anyhow::Result<Measured> {
    let script = tempfile::NamedTempFile::new()?;
    if post {
        std::fs::write(
            script.path(),
            format!(
                "wrk.method = \"POST\"\nwrk.body = '{SUBMIT_BODY}'\nwrk.headers[\"Content-Type\"] = \"application/json\"\n"
            ),
        )?;
    }
    let threads = connections.min(2);
    let out = Command::new("wrk")
        .args([
            "-t",
            &threads.to_string(),
            "-c",
            &connections.to_string(),
            "-d",
            &format!("{secs}s"),
            "--latency",
        ])
        .args(["-s", script.path().to_str().context("temp path")?])
        .arg(url)
        .output()
        .context("running wrk")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("wrk failed: {text} {}", String::from_utf8_lossy(&out.stderr));
    }
    let field = |prefix: &str| {
        text.lines().find_map(|l| l.trim().strip_prefix(prefix).map(|rest| rest.trim().to_string()))
    };
    let rps = field("Requests/sec:").and_then(|v| v.parse().ok()).context("no Requests/sec")?;
    let p50 = field("50%").and_then(|v| wrk_duration_ms(&v)).context("no 50%")?;
    let p99 = field("99%").and_then(|v| wrk_duration_ms(&v)).context("no 99%")?;
    let non_2xx = field("Non-2xx or 3xx responses:").and_then(|v| v.parse().ok()).unwrap_or(0);
    let socket_errors = field("Socket errors:")
        .map(|v| v.split(',').filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok()).sum())
        .unwrap_or(0);
    Ok(Measured { rps, p50_ms: p50, p99_ms: p99, errors: non_2xx + socket_errors })
}

/// `connections` gRPC connections (one HTTP/2 connection each) calling in a loop for `secs`.
async fn grpc_load(
    base: &str,
    submit: bool,
    poll_id: &str,
    connections: usize,
    secs: u64,
) -> anyhow::Result<Measured> {
    let mut channels = Vec::new();
    for _ in 0..connections {
        channels.push(tonic::transport::Endpoint::from_shared(base.to_string())?.connect().await?);
    }
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut tasks = tokio::task::JoinSet::new();
    for channel in channels {
        let poll_id = poll_id.to_string();
        tasks.spawn(async move {
            let mut generate = pb::generate_client::GenerateClient::new(channel.clone());
            let mut results = pb::result_client::ResultClient::new(channel);
            let (mut latencies, mut errors) = (Vec::new(), 0u64);
            while Instant::now() < deadline {
                let started = Instant::now();
                let ok = if submit {
                    let request = pb::GenerateRequest {
                        prompt: Some("a tidy wooden desk".into()),
                        ..Default::default()
                    };
                    generate.generate(request).await.is_ok()
                } else {
                    results
                        .get_result(pb::GetResultRequest { task_id: poll_id.clone(), previews: false })
                        .await
                        .is_ok()
                };
                latencies.push(started.elapsed().as_secs_f64() * 1000.0);
                errors += u64::from(!ok);
            }
            (latencies, errors)
        });
    }
    let started = Instant::now();
    let (mut latencies, mut errors) = (Vec::new(), 0);
    while let Some(joined) = tasks.join_next().await {
        let (l, e) = joined?;
        latencies.extend(l);
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64().max(secs as f64);
    Ok(Measured {
        rps: latencies.len() as f64 / elapsed,
        p50_ms: percentile(&latencies, 50.0),
        p99_ms: percentile(&latencies, 99.0),
        errors,
    })
}

async fn measure(
    protocol: &str,
    base: &str,
    op: &str,
    poll_id: &str,
    connections: usize,
    secs: u64,
) -> anyhow::Result<Measured> {
    match (protocol, op) {
        ("rest", "submit") => {
            tokio::task::block_in_place(|| wrk(&format!("{base}/v1/generate"), true, connections, secs))
        }
        ("rest", _) => tokio::task::block_in_place(|| {
            wrk(&format!("{base}/v1/result/{poll_id}"), false, connections, secs)
        }),
        (_, op) => grpc_load(base, op == "submit", poll_id, connections, secs).await,
    }
}

/// A task id to poll on `server`, from one submission.
async fn created_task(server: &Server) -> anyhow::Result<String> {
    let created: Value = reqwest::Client::new()
        .post(server.url("/v1/generate"))
        .header("content-type", "application/json")
        .body(SUBMIT_BODY)
        .send()
        .await?
        .json()
        .await?;
    Ok(created["task_id"].as_str().context("no task id")?.to_string())
}

/// The median of each figure over the rounds, and of each round's share of the ceiling.
fn medians(rounds: &[Measured], ceiling: &[Measured]) -> (Measured, f64) {
    let median = |f: fn(&Measured) -> f64| percentile(&rounds.iter().map(f).collect::<Vec<_>>(), 50.0);
    let shares: Vec<f64> = rounds.iter().zip(ceiling).map(|(m, c)| m.rps / c.rps).collect();
    let errors = rounds.iter().map(|m| m.errors).sum();
    let measured = Measured {
        rps: median(|m| m.rps),
        p50_ms: median(|m| m.p50_ms),
        p99_ms: median(|m| m.p99_ms),
        errors,
    };
    (measured, percentile(&shares, 50.0))
}

fn row_json(measured: &Measured) -> Value {
    json!({"rps": measured.rps, "p50_ms": measured.p50_ms, "p99_ms": measured.p99_ms, "errors": measured.errors})
}

/// The API under load on the embedded queue (the figures the targets are about) and on the Redis
/// queue (an API node without models in front of `redis-server`, with a worker that announces what
/// it serves but runs nothing, `--workers 0`), each against the ceiling. Every cell is measured
/// `load_rounds` times, the servers taking turns, and reported as medians.
pub async fn run(settings: &Settings, report: &mut Report) -> anyhow::Result<()> {
    if !wrk_available() {
        bail!("wrk is not installed: `apt-get install -y wrk` (the Makefile's bench target does this)");
    }
    // Workers off and room for every submission: the API and the task store are what is measured.
    let unbounded = ["--workers", "0", "--max-queue-depth", "100000000"];
    let mut ours = Server::spawn(&unbounded)?;
    ours.wait_ready(Instant::now()).await?;
    let redis = Redis::start().await?;
    let mut announcer = Server::spawn_command("worker", &["--queue", &redis.url, "--workers", "0"])?;
    announcer.wait_healthy(Instant::now()).await?;
    let mut redis_node = Server::spawn(&[&unbounded[..], &["--queue", &redis.url]].concat())?;
    redis_node.wait_ready(Instant::now()).await?;
    let ceiling = start_ceiling().await?;
    let poll_id = created_task(&ours).await?;

    let (secs, rounds) = (settings.load_secs, settings.load_rounds);
    let mut rows = Vec::new();
    let mut lines = vec![format!(
        "{:<6} {:<7} {:>5} | {:>9} {:>8} {:>8} | {:>9} {:>8} {:>8} | {:>6} | {:>9} {:>8} {:>8} {:>6} | errors",
        "proto",
        "op",
        "conns",
        "ours rps",
        "p50 ms",
        "p99 ms",
        "ceil rps",
        "p50 ms",
        "p99 ms",
        "% ceil",
        "redis rps",
        "p50 ms",
        "p99 ms",
        "% ceil"
    )];
    let (mut worst_concurrent_submit, mut worst_share) = (f64::INFINITY, f64::INFINITY);
    let mut poll_p99_at_64 = 0.0_f64;
    for protocol in ["rest", "grpc"] {
        for op in ["submit", "poll"] {
            for connections in CONNECTIONS {
                let (mut mine, mut top, mut theirs) = (Vec::new(), Vec::new(), Vec::new());
                // The servers take turns, so each round sees them all on the same machine. The
                // Redis node is measured on submissions only: its poll of a queued task reads the
                // whole schedule to tell the task's place, and the submit cells leave it hundreds
                // of thousands of queued tasks.
                for _ in 0..rounds {
                    mine.push(measure(protocol, &ours.base, op, &poll_id, connections, secs).await?);
                    top.push(measure(protocol, &ceiling.base, op, &poll_id, connections, secs).await?);
                    if op == "submit" {
                        theirs.push(measure(protocol, &redis_node.base, op, "", connections, secs).await?);
                    }
                }
                let (mine, share) = medians(&mine, &top);
                let on_redis = (!theirs.is_empty()).then(|| medians(&theirs, &top));
                let (top, _) = medians(&top, &top);
                worst_share = worst_share.min(share);
                if op == "submit" && connections > 1 {
                    worst_concurrent_submit = worst_concurrent_submit.min(share);
                }
                if op == "poll" && connections == 64 {
                    poll_p99_at_64 = poll_p99_at_64.max(mine.p99_ms);
                }
                let redis_cells = match &on_redis {
                    Some((m, share)) => format!(
                        "{:>9.0} {:>8.2} {:>8.2} {:>5.0}% | {}/{}/{}",
                        m.rps,
                        m.p50_ms,
                        m.p99_ms,
                        share * 100.0,
                        mine.errors,
                        top.errors,
                        m.errors
                    ),
                    None => format!(
                        "{:>9} {:>8} {:>8} {:>6} | {}/{}",
                        "-", "-", "-", "-", mine.errors, top.errors
                    ),
                };
                lines.push(format!(
                    "{protocol:<6} {op:<7} {connections:>5} | {:>9.0} {:>8.2} {:>8.2} | {:>9.0} {:>8.2} {:>8.2} | {:>5.0}% | {redis_cells}",
                    mine.rps, mine.p50_ms, mine.p99_ms, top.rps, top.p50_ms, top.p99_ms, share * 100.0,
                ));
                rows.push(json!({
                    "protocol": protocol, "op": op, "connections": connections,
                    "ours": row_json(&mine), "ceiling": row_json(&top), "share_of_ceiling": share,
                    "redis": on_redis.as_ref().map(|(m, _)| row_json(m)),
                    "redis_share_of_ceiling": on_redis.as_ref().map(|(_, share)| *share),
                }));
            }
        }
    }
    drop((announcer, redis_node, redis));
    lines.push(format!(
        "concurrent submissions (16 and 64 connections): lowest share of the ceiling {:.0}% (target >= 60%: {}); \
         lowest share of any cell {:.0}%",
        worst_concurrent_submit * 100.0,
        verdict(worst_concurrent_submit >= 0.6),
        worst_share * 100.0
    ));
    lines.push(format!(
        "poll p99 at 64 connections {:.2} ms (target < 5 ms: {})",
        poll_p99_at_64,
        verdict(poll_p99_at_64 < 5.0)
    ));
    lines.push(format!(
        "(wrk for REST; {rounds} rounds of {secs} s per cell, medians; ours = embedded queue, deskgen --workers 0; \
         redis = API node without models, one worker announcing with --workers 0, submissions only; loopback; same machine runs the load)"
    ));
    report.section(
        "api_load",
        json!({
            "seconds_per_cell": secs, "rounds": rounds, "rows": rows,
            "lowest_concurrent_submit_share": worst_concurrent_submit,
            "lowest_share_of_ceiling": worst_share, "poll_p99_ms_at_64": poll_p99_at_64,
        }),
        lines,
    );
    Ok(())
}
