//! Statistics, the printed table and `target/bench/report.json`.

use std::path::PathBuf;

use serde_json::{Value, json};

use crate::Settings;

/// Median and 95th percentile (nearest rank) of `samples`.
pub fn summary(samples: &[f64]) -> Value {
    json!({"median": percentile(samples, 50.0), "p95": percentile(samples, 95.0), "n": samples.len()})
}

/// The nearest-rank percentile `p` of `samples` (NaN when empty).
pub fn percentile(samples: &[f64], p: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Everything measured, section by section.
pub struct Report {
    /// `/proc/loadavg` when the run started.
    pub load_at_start: String,
    doc: serde_json::Map<String, Value>,
    lines: Vec<String>,
}

impl Report {
    pub fn new(settings: &Settings) -> Report {
        let load_at_start = load_average();
        let mut doc = serde_json::Map::new();
        doc.insert(
            "machine".into(),
            json!({
                "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
                "load_average_at_start": load_at_start,
                "threads": settings.threads,
                "runs": settings.runs,
                "load_seconds": settings.load_secs,
                "load_rounds": settings.load_rounds,
                "memory_tasks": settings.memory_tasks,
            }),
        );
        Report { load_at_start, doc, lines: Vec::new() }
    }

    /// Records a section's JSON and its lines for the table.
    pub fn section(&mut self, name: &str, value: Value, lines: Vec<String>) {
        self.doc.insert(name.into(), value);
        self.lines.push(format!("== {name}"));
        self.lines.extend(lines);
    }

    /// Records a part that failed as skipped, with the reason, instead of ending the run.
    pub fn attempt(&mut self, name: &str, outcome: anyhow::Result<()>) {
        if let Err(e) = outcome {
            let reason = format!("{e:#}");
            eprintln!("{name}: skipped: {reason}");
            let skipped = self.doc.entry("skipped").or_insert_with(|| json!({}));
            skipped[name] = json!(reason);
            self.lines.push(format!("== {name}: SKIPPED ({})", reason.lines().next().unwrap_or_default()));
        }
    }

    pub fn finish(&mut self) {
        self.doc.insert("machine_load_average_at_end".into(), json!(load_average()));
        self.doc.insert("finished_at".into(), json!(chrono::Utc::now().to_rfc3339()));
    }

    pub fn print(&self) {
        println!();
        println!("deskgen benchmark (load average at start: {})", self.load_at_start);
        for line in &self.lines {
            println!("{line}");
        }
    }

    pub fn write(&self) -> anyhow::Result<PathBuf> {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench");
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("report.json");
        std::fs::write(&path, serde_json::to_string_pretty(&Value::Object(self.doc.clone()))?)?;
        Ok(path)
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// "ok" or "MISSED" for a target.
pub fn verdict(met: bool) -> &'static str {
    if met { "ok" } else { "MISSED" }
}
