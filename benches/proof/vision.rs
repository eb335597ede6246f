//! The vision stage with both detectors against one: the COCO detector and the classifier alone,
//! then with the Open Images detector beside them, then with both detectors also on 2×2 and on 3×3
//! tiles (the default), on darknet's dog.jpg in this process; and reading the text of a 1024 px
//! photo (the OCR reference's kite-labels.png, four lines) against that default vision stage.

use anyhow::Context;
use deskgen::inference::vision::image::decode_image;
use deskgen::inference::vision::{OcrConfig, Vision, VisionConfig};
use deskgen::inference::{Runtime, RuntimeConfig};
use serde_json::json;

use crate::Settings;
use crate::report::{Report, percentile, summary};
use crate::server::repo_path;

pub fn run(settings: &Settings, report: &mut Report) -> anyhow::Result<()> {
    let runtime =
        Runtime::init(&RuntimeConfig { intra_threads: settings.threads, ..RuntimeConfig::default() })?;
    let photo = decode_image(&std::fs::read(repo_path("assets/testdata/darknet/dog.jpg"))?, 40_000_000)
        .context("decoding dog.jpg")?;
    let models = repo_path("assets/models");
    let config = |tiles: u32| VisionConfig {
        detector: models.join("detector.onnx"),
        oid_detector: models.join("oidv4_detector.onnx"),
        oid_labels: models.join("oidv4_labels.txt"),
        classifier: models.join("classifier.onnx"),
        classifier_labels: models.join("imagenet_labels.txt"),
        detector_tiles: tiles,
        ocr: None,
        ..VisionConfig::default()
    };
    let timed = |tiles: u32| -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
        let mut vision = Vision::load(&runtime, &config(tiles))?;
        vision.analyze_timed(&photo)?;
        let (mut one, mut all) = (Vec::new(), Vec::new());
        for _ in 0..settings.runs {
            let (_, [coco, oid, classify]) = vision.analyze_timed(&photo)?;
            one.push(coco + classify);
            all.push(coco + oid + classify);
        }
        Ok((one, all))
    };
    let (one, both) = timed(0)?;
    let (_, four) = timed(2)?;
    let (_, tiled) = timed(3)?;
    let ocr = read_times(settings, &runtime, VisionConfig { ocr: Some(ocr_config()), ..config(3) })?;
    let median = |v: &[f64]| percentile(v, 50.0);
    let ocr_share = median(&ocr) / (median(&ocr) + median(&tiled));
    let both_ratio = median(&both) / median(&one);
    let four_ratio = median(&four) / median(&one);
    let tiled_ratio = median(&tiled) / median(&one);
    let lines = vec![
        format!("COCO detector + classifier      median {:>8.1} ms", median(&one)),
        format!("+ Open Images detector          median {:>8.1} ms = {both_ratio:.2}x", median(&both)),
        format!("both detectors on 2x2 tiles too median {:>8.1} ms = {four_ratio:.2}x", median(&four)),
        format!(
            "both detectors on 3x3 tiles too median {:>8.1} ms = {tiled_ratio:.2}x (the default)",
            median(&tiled)
        ),
        format!(
            "OCR of a 1024x681 photo         median {:>8.1} ms = {:.0}% of vision + OCR",
            median(&ocr),
            ocr_share * 100.0
        ),
    ];
    let doc = json!({
        "one_detector_ms": summary(&one), "two_detectors_ms": summary(&both),
        "two_detectors_2x2_ms": summary(&four), "two_detectors_3x3_ms": summary(&tiled),
        "two_over_one": both_ratio, "2x2_over_one": four_ratio, "3x3_over_one": tiled_ratio,
        "ocr_1024_ms": summary(&ocr), "ocr_share_of_vision": ocr_share,
    });
    report.section("vision", doc, lines);
    Ok(())
}

fn ocr_config() -> OcrConfig {
    let models = repo_path("assets/models");
    OcrConfig {
        detector: models.join("ocr_det.onnx"),
        classifier: models.join("ocr_cls.onnx"),
        recognizer: models.join("ocr_rec.onnx"),
        ..OcrConfig::default()
    }
}

/// Milliseconds per reading of the 1024 px reference photo's text, after a first warm-up reading.
fn read_times(settings: &Settings, runtime: &Runtime, config: VisionConfig) -> anyhow::Result<Vec<f64>> {
    let path = repo_path("onnx/fixtures/reference/ocr/kite-labels.png");
    let photo = image::open(&path).with_context(|| format!("opening {}", path.display()))?.to_rgb8();
    let mut vision = Vision::load(runtime, &config)?;
    let mut times = Vec::new();
    for run in 0..=settings.runs {
        let started = std::time::Instant::now();
        let reading = vision.read_text(&photo).context("OCR is configured")??;
        anyhow::ensure!(reading.lines.len() >= 4, "the photo's four lines were not read: {reading:?}");
        if run > 0 {
            times.push(started.elapsed().as_secs_f64() * 1000.0);
        }
    }
    Ok(times)
}
