//! `deskgen eval`: measures the desk decision and the items found on a folder of labelled photos.
//!
//! The folder holds `desk/` and `not_desk/`; every image in them is decoded and analysed like a
//! request's photo, and the report gives accuracy, the confusion table, item recall and precision
//! against the labels, the time each model takes and, per file, the verdict with its evidence.
//!
//! Item labels come from a JSON file (`--labels`, default `labels.json` in the folder) mapping each
//! photo's path under the folder to the item names on it (`{"desk/a.jpg": ["monitor", "mug"]}`);
//! a photo it does not list is labelled by the item names in its file name
//! (`desk_laptop_mug_07.jpg` → laptop, mug).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use std::collections::BTreeMap;

use anyhow::Context;

use crate::inference::vision::{ClassScore, Detection, ItemTable, Vision};

/// Items no reachable model has a class for: reported apart from recall.
pub const UNDETECTABLE: &[&str] = &["lamp", "headphones", "microphone", "tablet", "speaker", "notebook"];

/// Words of file names that name an item, besides the item names themselves.
const FILE_NAME_ITEMS: &[(&str, &str)] = &[
    ("monitors", "monitor"),
    ("imac", "monitor"),
    ("laptops", "laptop"),
    ("mugs", "mug"),
    ("plants", "plant"),
    ("phones", "phone"),
];

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
    /// Time to run the models and decide, in milliseconds.
    pub analyze_ms: f64,
    /// Milliseconds per model: COCO detector, Open Images detector, classifier.
    pub model_ms: [f64; 3],
    /// The items the labels say are on the photo.
    pub expected_items: Vec<String>,
    /// Why the photo could not be analysed.
    pub error: Option<String>,
}

/// How often one item was found where labelled, and reported where not.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct ItemScore {
    /// Labelled and found.
    pub found: usize,
    /// Labelled.
    pub labelled: usize,
    /// Found on photos not labelled with it.
    pub false_finds: usize,
    /// `found / labelled`.
    pub recall: f64,
    /// `found / (found + false_finds)`.
    pub precision: f64,
}

impl ItemScore {
    fn add(&mut self, other: &ItemScore) {
        self.found += other.found;
        self.labelled += other.labelled;
        self.false_finds += other.false_finds;
    }

    fn finish(&mut self) {
        self.recall = ratio(self.found, self.labelled);
        self.precision = ratio(self.found, self.found + self.false_finds);
    }
}

fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
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
    /// Mean milliseconds per photo of each model, by its id.
    pub mean_model_ms: BTreeMap<String, f64>,
    /// Found against labelled, per item, over the labelled photos.
    pub items: BTreeMap<String, ItemScore>,
    /// The same summed over the items some model has a class for.
    pub detectable: ItemScore,
    /// Labelled items that were found, by the model whose box (or class) found them.
    pub found_by: BTreeMap<String, usize>,
    /// Every photo, desk ones first, in file-name order.
    pub files: Vec<FileVerdict>,
}

/// Analyses every photo under `photos` (its `desk/` and `not_desk/` folders) and collects the report.
pub fn run(
    photos: &Path,
    labels: Option<&Path>,
    vision: &mut Vision,
    table: &ItemTable,
) -> anyhow::Result<EvalReport> {
    let labels =
        read_labels(&labels.map_or_else(|| photos.join("labels.json"), Path::to_path_buf), labels.is_some())?;
    let known = table.item_names();
    let mut files = Vec::new();
    for (folder, expected_desk) in [("desk", true), ("not_desk", false)] {
        for path in images_in(&photos.join(folder))? {
            let mut verdict = evaluate(vision, photos, &path, expected_desk);
            verdict.expected_items =
                labels.get(&verdict.file).cloned().unwrap_or_else(|| items_in_name(&path, &known));
            files.push(verdict);
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
    let (items, detectable, found_by) = score_items(&files);
    let mean = |ms: fn(&FileVerdict) -> f64| files.iter().map(ms).sum::<f64>() / files.len() as f64;
    let mean_model_ms = BTreeMap::from([
        (crate::inference::vision::items::COCO.to_string(), mean(|f| f.model_ms[0])),
        (crate::inference::vision::items::OIDV4.to_string(), mean(|f| f.model_ms[1])),
        ("efficientnet-lite3".to_string(), mean(|f| f.model_ms[2])),
    ]);
    Ok(EvalReport {
        total: files.len(),
        correct,
        accuracy: correct as f64 / files.len() as f64,
        confusion,
        mean_analyze_ms: mean(|f| f.analyze_ms),
        mean_model_ms,
        items,
        detectable,
        found_by,
        files,
    })
}

/// The labels file: photo path → item names. A missing file is no labels, unless it was named.
fn read_labels(path: &Path, named: bool) -> anyhow::Result<BTreeMap<String, Vec<String>>> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text).with_context(|| format!("cannot parse {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !named => Ok(BTreeMap::new()),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// The item names in a file name's words (`desk_laptop_mug_07.jpg` → laptop, mug).
fn items_in_name(path: &Path, known: &[&str]) -> Vec<String> {
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_lowercase();
    let mut items: Vec<String> = Vec::new();
    for word in stem.split(|c: char| !c.is_ascii_alphanumeric()) {
        let item = FILE_NAME_ITEMS.iter().find(|(w, _)| *w == word).map_or(word, |(_, item)| item);
        if (known.contains(&item) || UNDETECTABLE.contains(&item)) && !items.iter().any(|i| i == item) {
            items.push(item.to_string());
        }
    }
    items
}

type Scores = (BTreeMap<String, ItemScore>, ItemScore, BTreeMap<String, usize>);

/// Per item: labelled, found where labelled, found where not; and who found the labelled ones.
fn score_items(files: &[FileVerdict]) -> Scores {
    let mut items: BTreeMap<String, ItemScore> = BTreeMap::new();
    let mut found_by: BTreeMap<String, usize> = BTreeMap::new();
    // The labels describe desk photos; what is found on other scenes is not scored.
    for f in files.iter().filter(|f| f.error.is_none() && f.expected_desk) {
        for item in &f.expected_items {
            let score = items.entry(item.clone()).or_default();
            score.labelled += 1;
            if f.items.contains(item) {
                score.found += 1;
                let by = f.detections.iter().find(|d| d.item.as_deref() == Some(item.as_str()));
                *found_by
                    .entry(by.map_or("efficientnet-lite3".to_string(), |d| d.source.clone()))
                    .or_default() += 1;
            }
        }
        for item in f.items.iter().filter(|i| !f.expected_items.contains(i)) {
            items.entry(item.clone()).or_default().false_finds += 1;
        }
    }
    let mut detectable = ItemScore::default();
    for (name, score) in &mut items {
        score.finish();
        if !UNDETECTABLE.contains(&name.as_str()) {
            detectable.add(score);
        }
    }
    detectable.finish();
    (items, detectable, found_by)
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
        model_ms: [0.0; 3],
        expected_items: Vec::new(),
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
    match vision.analyze_timed(&image) {
        Ok((analysis, model_ms)) => {
            verdict.analyze_ms = started.elapsed().as_secs_f64() * 1e3;
            verdict.model_ms = model_ms;
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

fn short(source: &str) -> &str {
    source.rsplit('-').next().unwrap_or(source)
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
        let objects: Vec<String> = f
            .detections
            .iter()
            .map(|d| format!("{} {:.2} ({})", d.label, d.score, short(&d.source)))
            .collect();
        writeln!(out, "      classes: {}", classes.join(", "))?;
        writeln!(out, "      objects: {}", objects.join(", "))?;
        if !f.expected_items.is_empty() {
            writeln!(out, "      labelled: {}", f.expected_items.join(", "))?;
        }
    }
    writeln!(out)?;
    writeln!(
        out,
        "{:<14}{:>8}{:>10}{:>8}{:>9}{:>11}",
        "item", "found", "labelled", "false", "recall", "precision"
    )?;
    for (name, s) in &report.items {
        let apart = if UNDETECTABLE.contains(&name.as_str()) { "  (no model has a class)" } else { "" };
        writeln!(
            out,
            "{name:<14}{:>8}{:>10}{:>8}{:>8.0}%{:>10.0}%{apart}",
            s.found,
            s.labelled,
            s.false_finds,
            s.recall * 100.0,
            s.precision * 100.0
        )?;
    }
    let d = &report.detectable;
    writeln!(
        out,
        "items some model knows: recall {:.0}% ({}/{}), precision {:.0}% ({} false)",
        d.recall * 100.0,
        d.found,
        d.labelled,
        d.precision * 100.0,
        d.false_finds
    )?;
    let by: Vec<String> = report.found_by.iter().map(|(model, n)| format!("{model} {n}")).collect();
    writeln!(out, "labelled items found by: {}", by.join(", "))?;
    writeln!(out)?;
    let per_model: Vec<String> =
        report.mean_model_ms.iter().map(|(m, ms)| format!("{m} {ms:.0} ms")).collect();
    writeln!(
        out,
        "mean analysis time {:.0} ms per photo ({})",
        report.mean_analyze_ms,
        per_model.join(", ")
    )?;
    Ok(())
}
