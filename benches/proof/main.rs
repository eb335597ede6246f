//! `make bench`: the service's figures on this machine, printed as a table and written to
//! `target/bench/report.json`.
//!
//! - cold start of the release binary to ready (health SERVING) with the default models, and of an
//!   API node that loads none (Redis queue, `--workers 0`) until it answers, with its RSS;
//! - per-stage latency of one task on the embedded defaults (median and p95);
//! - the vision stage with both detectors (and their tiles) against the COCO detector alone;
//! - the Rust diffusion pipeline against the Python reference (optimum's ORTStableDiffusionPipeline)
//!   on the same ONNX files and thread count, and the denoising loop's cost outside `session.run`;
//! - the API under load with the workers off (`--workers 0`): REST through `wrk`, gRPC through a
//!   small client here, at 1, 16 and 64 connections, on the embedded queue and on the Redis queue,
//!   against a minimal axum/tonic server built here (the machine's ceiling), in rounds (medians);
//! - resident memory idle and after each of three rounds of 1,000 tasks.
//!
//! Knobs (environment): BENCH_ONLY (comma list of cold,stages,vision,diffusion,api,memory,uploads), BENCH_RUNS
//! (20), BENCH_THREADS (2), BENCH_LOAD_SECS (5), BENCH_LOAD_ROUNDS (3), BENCH_MEMORY_TASKS (1000 per round),
//! BENCH_MEMORY_PHASES (3 rounds), BENCH_PYTHON (the reference's interpreter; default: the export
//! venv, created by onnx/ensure_venv.sh).

mod ceiling;
mod diffusion;
mod load;
mod report;
mod server;
mod stages;
mod uploads;
mod vision;

use std::time::Duration;

use report::Report;

/// Benchmark settings from the environment.
pub struct Settings {
    only: Option<Vec<String>>,
    runs: usize,
    threads: usize,
    load_secs: u64,
    load_rounds: usize,
    memory_tasks: usize,
    memory_phases: usize,
}

impl Settings {
    fn from_env() -> Settings {
        let number = |name: &str, default: usize| {
            std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
        };
        Settings {
            only: std::env::var("BENCH_ONLY")
                .ok()
                .map(|v| v.split(',').map(|s| s.trim().to_string()).collect()),
            runs: number("BENCH_RUNS", 20).max(1),
            threads: number("BENCH_THREADS", 2).max(1),
            load_secs: number("BENCH_LOAD_SECS", 5).max(1) as u64,
            load_rounds: number("BENCH_LOAD_ROUNDS", 3).max(1),
            memory_tasks: number("BENCH_MEMORY_TASKS", 1000).max(1),
            memory_phases: number("BENCH_MEMORY_PHASES", 3).max(2),
        }
    }

    fn wants(&self, part: &str) -> bool {
        self.only.as_ref().is_none_or(|only| only.iter().any(|p| p == part))
    }
}

fn main() -> anyhow::Result<()> {
    if let Ok(addr) = std::env::var(ceiling::ADDR_VAR) {
        return ceiling::serve(&addr);
    }
    // `cargo test --all-targets` (make test) runs bench targets too, without `--bench`: stay out.
    if !std::env::args().any(|a| a == "--bench") {
        println!("benchmark skipped: run it with `make bench` (cargo bench --bench proof)");
        return Ok(());
    }
    let settings = Settings::from_env();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(run(settings))
}

async fn run(settings: Settings) -> anyhow::Result<()> {
    let mut report = Report::new(&settings);
    eprintln!("load average at start: {}", report.load_at_start);
    // One part that cannot run (a missing interpreter, say) leaves the others measured; the report
    // says what was skipped and why.
    if settings.wants("cold") {
        let outcome = server::cold_start(&settings, &mut report).await;
        report.attempt("cold_start", outcome);
        let outcome = server::model_free_cold_start(&mut report).await;
        report.attempt("api_node_cold_start", outcome);
    }
    if settings.wants("stages") || settings.wants("memory") {
        let outcome = stages::run(&settings, &mut report).await;
        report.attempt("stages", outcome);
    }
    if settings.wants("vision") {
        let outcome = vision::run(&settings, &mut report);
        report.attempt("vision", outcome);
    }
    if settings.wants("diffusion") {
        let outcome = diffusion::run(&settings, &mut report).await;
        report.attempt("diffusion", outcome);
    }
    if settings.wants("api") {
        let outcome = load::run(&settings, &mut report).await;
        report.attempt("api", outcome);
    }
    if settings.wants("uploads") {
        let outcome = uploads::run(&settings, &mut report).await;
        report.attempt("uploads", outcome);
    }
    report.finish();
    report.print();
    let path = report.write()?;
    eprintln!("report written to {}", path.display());
    tokio::time::sleep(Duration::from_millis(10)).await;
    Ok(())
}
