//! The vision stage with both detectors against one: the COCO detector and the classifier alone,
//! then with the Open Images detector beside them, then with both detectors also on 2×2 and on 3×3
//! tiles (the default), on darknet's dog.jpg in this process.

use anyhow::Context;
use deskgen::inference::vision::image::decode_image;
use deskgen::inference::vision::{Vision, VisionConfig};
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
    let median = |v: &[f64]| percentile(v, 50.0);
    let both_ratio = median(&both) / median(&one);
    let four_ratio = median(&four) / median(&one);
    let tiled_ratio = median(&tiled) / median(&one);
    let lines = vec![
        format!("COCO detector + classifier      median {:>8.1} ms", median(&one)),
        format!("+ Open Images detector          median {:>8.1} ms = {both_ratio:.2}x", median(&both)),
        format!(
            "both detectors on 2x2 tiles too median {:>8.1} ms = {tiled_ratio:.2}x (the default)",
            median(&tiled)
        ),
    ];
    let doc = json!({
        "one_detector_ms": summary(&one), "two_detectors_ms": summary(&both),
        "two_detectors_2x2_ms": summary(&four), "two_detectors_3x3_ms": summary(&tiled),
        "two_over_one": both_ratio, "2x2_over_one": four_ratio, "3x3_over_one": tiled_ratio,
    });
    report.section("vision", doc, lines);
    Ok(())
}
