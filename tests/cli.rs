//! The `deskgen` binary's offline commands, run as a user runs them.

use std::path::Path;
use std::process::Command;

fn deskgen() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_deskgen"));
    command.current_dir(env!("CARGO_MANIFEST_DIR"));
    command
}

#[test]
fn models_lists_every_model_with_its_hash_and_signature() {
    let output = deskgen().args(["models", "--json"]).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let models: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let ids: Vec<&str> = models.as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    for id in ["ssd-mobilenet-v2-coco", "efficientnet-lite3", "sd-text_encoder", "sd-unet", "sd-vae_decoder"]
    {
        assert!(ids.contains(&id), "{id} missing from {ids:?}");
    }
    for model in models.as_array().unwrap() {
        assert_eq!(model["sha256"].as_str().unwrap().len(), 64);
        assert!(model["size_bytes"].as_u64().unwrap() > 0);
        assert_eq!(model["execution_provider"], "cpu");
        assert!(!model["inputs"].as_array().unwrap().is_empty());
    }
    let unet = models.as_array().unwrap().iter().find(|m| m["id"] == "sd-unet").unwrap();
    assert!(unet["inputs"].to_string().contains("encoder_hidden_states"), "{unet}");
}

#[test]
fn eval_scores_a_labelled_folder() {
    let photos = tempfile::tempdir().unwrap();
    let darknet = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/testdata/darknet");
    std::fs::create_dir_all(photos.path().join("desk")).unwrap();
    std::fs::create_dir_all(photos.path().join("not_desk")).unwrap();
    for name in ["dog.jpg", "horses.jpg", "giraffe.jpg"] {
        std::fs::copy(darknet.join(name), photos.path().join("not_desk").join(name)).unwrap();
    }
    let output = deskgen().args(["eval", "--json", "--photos"]).arg(photos.path()).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["total"], 3);
    assert_eq!(report["correct"], 3, "none of these is a desk: {report}");
    assert_eq!(report["confusion"]["not_desk_as_not_desk"], 3);
    // The table people read: one photo is enough.
    for name in ["horses.jpg", "giraffe.jpg"] {
        std::fs::remove_file(photos.path().join("not_desk").join(name)).unwrap();
    }
    let text = deskgen().args(["eval", "--photos"]).arg(photos.path()).output().unwrap();
    let text = String::from_utf8(text.stdout).unwrap();
    assert!(text.starts_with("accuracy 100.0% (1/1)"), "{text}");
    assert!(text.contains("ok  not_desk/dog.jpg"), "{text}");
}

#[test]
fn a_missing_model_is_a_clear_startup_error() {
    let data = tempfile::tempdir().unwrap();
    let output = deskgen()
        .args(["serve", "--listen", "127.0.0.1:0", "--detector", "/nonexistent/detector.onnx", "--data-dir"])
        .arg(data.path())
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let log = String::from_utf8_lossy(&output.stdout).to_string() + &String::from_utf8_lossy(&output.stderr);
    assert!(log.contains("/nonexistent/detector.onnx") && log.contains("make models"), "{log}");
}

#[test]
fn generate_runs_the_pipeline_locally_and_writes_the_png() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("result.png");
    let photo = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/testdata/darknet/dog.jpg");
    let output = deskgen()
        .args(["generate", "--desk-threshold", "0", "--steps", "4", "--seed", "5", "--json", "--image"])
        .arg(&photo)
        .arg("--out")
        .arg(&out)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let result: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(result["status"], "done");
    assert_eq!(result["processed_image_url"], out.display().to_string());
    let png = image::open(&out).unwrap();
    assert_eq!((png.width(), png.height()), (288, 224), "the 4:3 photo's shape at the native area");
    let progress = String::from_utf8_lossy(&output.stderr);
    // The desk's default control comes with strength 0.9: img2img runs int(4 × 0.9) = 3 steps,
    // and progress says so from the start.
    assert!(progress.contains("diffusion 0/3\n") && progress.contains("diffusion 3/3\n"), "{progress}");
    assert_eq!(result["control"], serde_json::json!([{"type": "canny", "scale": 0.8}]));

    let plain = deskgen()
        .args(["generate", "--desk-threshold", "0", "--steps", "4", "--seed", "5", "--no-control"])
        .args(["--num-images", "2", "--image"])
        .arg(&photo)
        .arg("--out")
        .arg(dir.path().join("plain.png"))
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    assert!(plain.status.success(), "{}", String::from_utf8_lossy(&plain.stderr));
    let summary = String::from_utf8_lossy(&plain.stdout);
    assert!(!summary.contains("control:"), "{summary}");
    let second = dir.path().join("plain-2.png");
    assert!(summary.contains(&format!("image: {}\n", second.display())), "{summary}");
    assert_ne!(std::fs::read(&second).unwrap(), std::fs::read(dir.path().join("plain.png")).unwrap());
    // Strength 0.75 without control: 3 of 4 steps too, but another image.
    assert_ne!(std::fs::read(&out).unwrap(), std::fs::read(dir.path().join("plain.png")).unwrap());

    // A mask file: the left half repainted, the right half given back as the photo's.
    let mask = dir.path().join("mask.png");
    image::GrayImage::from_fn(64, 48, |x, _| image::Luma([if x < 32 { 255 } else { 0 }]))
        .save(&mask)
        .unwrap();
    let masked = deskgen()
        .args(["generate", "--desk-threshold", "0", "--steps", "2", "--seed", "5", "--json"])
        .args(["--preserve-unmasked", "--mask-blur", "2", "--image"])
        .arg(&photo)
        .arg("--mask")
        .arg(&mask)
        .arg("--out")
        .arg(dir.path().join("masked.png"))
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    assert!(masked.status.success(), "{}", String::from_utf8_lossy(&masked.stderr));
    let result: serde_json::Value = serde_json::from_slice(&masked.stdout).unwrap();
    assert!(result["mask_url"].as_str().is_some_and(|url| url.ends_with("-mask.png")), "{result}");
    let masked = image::open(dir.path().join("masked.png")).unwrap().to_rgb8();
    let plain = image::open(dir.path().join("plain.png")).unwrap().to_rgb8();
    assert_eq!(masked.dimensions(), (288, 224));
    // Far from the blurred edge the right half is the photo's, the left half drawn anew.
    let photo_pixels = deskgen::pipeline::shape::shape_photo(
        &deskgen::inference::vision::decode_image(&std::fs::read(&photo).unwrap(), u64::MAX).unwrap(),
        deskgen::core::ResizeMode::Fit,
        288,
        224,
    );
    for y in 0..224 {
        for x in 160..288 {
            assert_eq!(masked.get_pixel(x, y), photo_pixels.get_pixel(x, y), "({x}, {y})");
        }
    }
    assert!((0..224).any(|y| masked.get_pixel(20, y) != plain.get_pixel(20, y)));
}

#[test]
fn generate_exit_codes_tell_bad_input_from_failure() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        deskgen().arg("generate").args(args).arg("--data-dir").arg(dir.path()).output().unwrap()
    };
    let missing = run(&["--image", "/nonexistent/desk.jpg"]);
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/desk.jpg"));
    let blank = run(&["--prompt", " "]);
    assert_eq!(blank.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&blank.stderr).contains("Prompt must not be empty."));
    let steps = run(&["--prompt", "desk", "--steps", "0"]);
    assert_eq!(steps.status.code(), Some(2));
    let control = run(&["--prompt", "desk", "--control", "softedge:0.5"]);
    assert_eq!(control.status.code(), Some(2));
    let said = String::from_utf8_lossy(&control.stderr);
    assert!(said.contains("Control 'softedge' needs a photo or an image_url"), "{said}");
    let not_image = dir.path().join("notes.jpg");
    std::fs::write(&not_image, b"plain text, not a photo").unwrap();
    let invalid = run(&["--image", not_image.to_str().unwrap()]);
    assert_eq!(invalid.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&invalid.stdout).contains("INVALID_IMAGE"));
}
