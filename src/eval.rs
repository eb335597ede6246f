//! `deskgen eval`: measures the desk decision on a folder of labelled photos.
//!
//! The folder holds `desk/` and `not_desk/`; every image in them is decoded and analysed like a
//! request's photo, and the report gives accuracy, the confusion table and, per file, the verdict
//! with its evidence and timings.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;

use crate::inference::vision::{ClassScore, Detection, Vision};

/// Extensions of the files evaluated; anything else in the folders (notes, licences) is skipped.
const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff"];

/// Counts of expected versus decided labels.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Confusion {
    /// Desk photos decided desk.
    pub desk_as_desk: usize,
    /// Desk photos decided not a desk.
    pub desk_as_not_desk: usize,
    /// Other photos decided desk.
    pub not_desk_as_desk: usize,
    /// Other photos decided not a desk.
    pub not_desk_as_not_desk: usize,
}

/// The verdict on one photo and the evidence behind it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FileVerdict {
    /// Path relative to the photos folder.
    pub file: String,
    /// The folder's label.
    pub expected_desk: bool,
    /// The decision; `None` when the photo could not be analysed.
    pub is_desk: Option<bool>,
    /// Whether the decision matches the label.
    pub correct: bool,
    /// Combined desk evidence.
    pub desk_score: f32,
    /// Desk items found.
    pub items: Vec<String>,
    /// The most probable ImageNet classes.
    pub top_classes: Vec<ClassScore>,
    /// Objects found.
    pub detections: Vec<Detection>,
    /// Time to decode the file, in milliseconds.
    pub decode_ms: f64,
    /// Time to run both models and decide, in milliseconds.
    pub analyze_ms: f64,
    /// Why the photo could not be analysed.
    pub error: Option<String>,
}

/// The result of an evaluation.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EvalReport {
    /// Photos evaluated.
    pub total: usize,
    /// Photos decided as labelled.
    pub correct: usize,
    /// `correct / total`.
    pub accuracy: f64,
    /// Expected versus decided.
    pub confusion: Confusion,
    /// Mean analysis time per photo, in milliseconds.
    pub mean_analyze_ms: f64,
    /// Every photo, desk ones first, in file-name order.
    pub files: Vec<FileVerdict>,
}

/// Analyses every photo under `photos` (its `desk/` and `not_desk/` folders) and collects the report.
pub fn run(photos: &Path, vision: &mut Vision) -> anyhow::Result<EvalReport> {
    let mut files = Vec::new();
    for (folder, expected_desk) in [("desk", true), ("not_desk", false)] {
        for path in images_in(&photos.join(folder))? {
            files.push(evaluate(vision, photos, &path, expected_desk));
        }
    }
    anyhow::ensure!(
        !files.is_empty(),
        "no photos under {}/desk or {}/not_desk",
        photos.display(),
        photos.display()
    );

    let mut confusion = Confusion::default();
    for f in &files {
        match (f.expected_desk, f.is_desk) {
            (true, Some(true)) => confusion.desk_as_desk += 1,
            (true, _) => confusion.desk_as_not_desk += 1,
            (false, Some(true)) => confusion.not_desk_as_desk += 1,
            (false, _) => confusion.not_desk_as_not_desk += 1,
        }
    }
    let correct = files.iter().filter(|f| f.correct).count();
    Ok(EvalReport {
        total: files.len(),
        correct,
        accuracy: correct as f64 / files.len() as f64,
        confusion,
        mean_analyze_ms: files.iter().map(|f| f.analyze_ms).sum::<f64>() / files.len() as f64,
        files,
    })
}

fn images_in(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| {
            path.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        })
        .collect();
    paths.sort();
    Ok(paths)
}

fn evaluate(vision: &mut Vision, root: &Path, path: &Path, expected_desk: bool) -> FileVerdict {
    let file = path.strip_prefix(root).unwrap_or(path).display().to_string();
    let mut verdict = FileVerdict {
        file,
        expected_desk,
        is_desk: None,
        correct: false,
        desk_score: 0.0,
        items: Vec::new(),
        top_classes: Vec::new(),
        detections: Vec::new(),
        decode_ms: 0.0,
        analyze_ms: 0.0,
        error: None,
    };
    let started = Instant::now();
    let image = match std::fs::read(path).map_err(anyhow::Error::from).and_then(|b| Ok(vision.decode(&b)?)) {
        Ok(image) => image,
        Err(e) => {
            verdict.error = Some(e.to_string());
            return verdict;
        }
    };
    verdict.decode_ms = started.elapsed().as_secs_f64() * 1e3;
    let started = Instant::now();
    match vision.analyze(&image) {
        Ok(analysis) => {
            verdict.analyze_ms = started.elapsed().as_secs_f64() * 1e3;
            verdict.is_desk = Some(analysis.is_desk);
            verdict.correct = analysis.is_desk == expected_desk;
            verdict.desk_score = analysis.desk_score;
            verdict.items = analysis.items;
            verdict.top_classes = analysis.top_classes;
            verdict.detections = analysis.detections;
        }
        Err(e) => verdict.error = Some(e.to_string()),
    }
    verdict
}

/// Writes the report: JSON, or accuracy, the confusion table and one line per file.
pub fn print(report: &EvalReport, json: bool, out: &mut impl Write) -> anyhow::Result<()> {
    if json {
        serde_json::to_writer_pretty(&mut *out, report)?;
        writeln!(out)?;
        return Ok(());
    }
    let c = &report.confusion;
    writeln!(out, "accuracy {:.1}% ({}/{})", report.accuracy * 100.0, report.correct, report.total)?;
    writeln!(out)?;
    writeln!(out, "{:<16}{:>10}{:>14}", "expected \\ got", "desk", "not desk")?;
    writeln!(out, "{:<16}{:>10}{:>14}", "desk", c.desk_as_desk, c.desk_as_not_desk)?;
    writeln!(out, "{:<16}{:>10}{:>14}", "not desk", c.not_desk_as_desk, c.not_desk_as_not_desk)?;
    writeln!(out)?;
    for f in &report.files {
        let mark = if f.correct { "ok " } else { "BAD" };
        let verdict = match f.is_desk {
            Some(true) => "desk",
            Some(false) => "not desk",
            None => "error",
        };
        writeln!(
            out,
            "{mark} {:<52} {:<8} score {:.2}  {:>6.0} ms  items [{}]",
            f.file,
            verdict,
            f.desk_score,
            f.decode_ms + f.analyze_ms,
            f.items.join(", ")
        )?;
        if let Some(error) = &f.error {
            writeln!(out, "      error: {error}")?;
            continue;
        }
        let classes: Vec<String> =
            f.top_classes.iter().take(3).map(|c| format!("{} {:.2}", c.name(), c.probability)).collect();
        let objects: Vec<String> =
            f.detections.iter().map(|d| format!("{} {:.2}", d.label, d.score)).collect();
        writeln!(out, "      classes: {}", classes.join(", "))?;
        writeln!(out, "      objects: {}", objects.join(", "))?;
    }
    writeln!(out)?;
    writeln!(out, "mean analysis time {:.0} ms per photo", report.mean_analyze_ms)?;
    Ok(())
}
