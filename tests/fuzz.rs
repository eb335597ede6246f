//! Fuzzing on stable Rust: a seeded in-process mutation loop over the two paths that read
//! untrusted bytes — request validation (JSON → `GenerateInput` → `validate`, as the REST bridge
//! does it) and image decoding (`decode_image`). Every input must be answered without a panic,
//! and every accepted one must satisfy the rules.
//!
//! `make test` runs each target briefly; `make fuzz` runs them longer:
//! `DESKGEN_FUZZ_SECS` (per target, default 4), `DESKGEN_FUZZ_SEED` (default: from the clock,
//! printed so a failure can be replayed).

mod common;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::{Duration, Instant};

use deskgen::core::PipelineInfo;
use deskgen::core::request::{MAX_PROMPT_CHARS, MAX_STEPS};
use deskgen::core::validate::validate;
use deskgen::core::{GenerateInput, Invalid, Limits};
use deskgen::inference::vision::image::{ImageError, MIN_SIDE, decode_image};
use rand::seq::IndexedRandom;
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The LoRA weight limit the fuzzed pipeline reports.
const MAX_LORA_WEIGHT: f32 = 2.0;

fn budget() -> Duration {
    let secs = std::env::var("DESKGEN_FUZZ_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(4.0);
    Duration::from_secs_f64(secs)
}

fn seed() -> u64 {
    std::env::var("DESKGEN_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    })
}

/// Byte-level mutations: flips, interesting bytes, inserts, deletes, duplicated and spliced runs.
fn mutate(rng: &mut ChaCha8Rng, input: &mut Vec<u8>, corpus: &[Vec<u8>]) {
    const INTERESTING: [u8; 10] = [0, 1, 0x7f, 0x80, 0xff, b'"', b'\\', b'{', b'9', b'-'];
    for _ in 0..rng.random_range(1..=8) {
        let len = input.len();
        match rng.random_range(0..7) {
            0 if len > 0 => {
                let i = rng.random_range(0..len);
                input[i] ^= 1 << rng.random_range(0..8);
            }
            1 if len > 0 => {
                let i = rng.random_range(0..len);
                input[i] = *INTERESTING.choose(rng).unwrap();
            }
            2 => {
                let i = rng.random_range(0..=len);
                input.insert(i, rng.random());
            }
            3 if len > 0 => {
                let start = rng.random_range(0..len);
                let end = (start + rng.random_range(1..=16)).min(len);
                input.drain(start..end);
            }
            4 if len > 0 => {
                let start = rng.random_range(0..len);
                let end = (start + rng.random_range(1..=64)).min(len);
                let run = input[start..end].to_vec();
                let at = rng.random_range(0..=input.len());
                input.splice(at..at, run);
            }
            5 => {
                let other = corpus.choose(rng).unwrap();
                if !other.is_empty() {
                    let start = rng.random_range(0..other.len());
                    let end = (start + rng.random_range(1..=256)).min(other.len());
                    let at = rng.random_range(0..=input.len());
                    input.splice(at..at, other[start..end].iter().copied());
                }
            }
            _ if len > 0 => input.truncate(rng.random_range(0..len)),
            _ => {}
        }
    }
}

/// Runs `check` on mutated corpus entries until the budget is spent; returns the number of runs.
fn fuzz(name: &str, corpus: Vec<Vec<u8>>, mut check: impl FnMut(&[u8])) -> u64 {
    let seed = seed();
    eprintln!("fuzz {name}: seed {seed} (DESKGEN_FUZZ_SEED={seed} replays it), budget {:?}", budget());
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let deadline = Instant::now() + budget();
    let mut runs = 0u64;
    while Instant::now() < deadline {
        let mut input = corpus.choose(&mut rng).unwrap().clone();
        mutate(&mut rng, &mut input, &corpus);
        let outcome = catch_unwind(AssertUnwindSafe(|| check(&input)));
        if let Err(panic) = outcome {
            let shown: String = String::from_utf8_lossy(&input[..input.len().min(512)]).into_owned();
            panic!(
                "fuzz {name}: seed {seed}, run {runs}: {panic:?}\ninput ({} bytes): {shown:?}",
                input.len()
            );
        }
        runs += 1;
    }
    eprintln!("fuzz {name}: {runs} inputs, no failure");
    runs
}

fn info() -> PipelineInfo {
    PipelineInfo {
        models: vec![],
        sd_models: vec![deskgen::core::SdModelInfo {
            name: "tiny".into(),
            variant: "sd".into(),
            path: "-".into(),
            native_size: 512,
            size_multiple: 8,
            schedulers: vec!["ddim".into(), "euler".into()],
            defaults: deskgen::core::SdModelDefaults {
                num_inference_steps: deskgen::core::request::DEFAULT_STEPS,
                guidance_scale: deskgen::core::request::DEFAULT_GUIDANCE,
                scheduler: "ddim".into(),
                height: 512,
                width: 512,
            },
            scheduler_max_steps: Default::default(),
            loras: vec![deskgen::core::LoraInfo {
                name: "cozy".into(),
                rank: 4,
                target_modules: vec!["unet.to_q".into()],
                trigger_words: vec!["cozy".into()],
            }],
            controlnets: vec![deskgen::core::ControlNetInfo {
                control_type: "canny".into(),
                from_photo: true,
            }],
            default_control: None,
            previews: "linear".into(),
            inpainting: false,
        }],
        max_lora_weight: MAX_LORA_WEIGHT,
        negative_prompt: String::new(),
        object_store: "file".into(),
        shopping_provider: "catalog".into(),
    }
}

/// A random request object built from the fields' names and hostile values.
fn random_request(rng: &mut ChaCha8Rng) -> Vec<u8> {
    const FIELDS: [&str; 17] = [
        "initial_image_url",
        "prompt",
        "negative_prompt",
        "num_inference_steps",
        "guidance_scale",
        "height",
        "width",
        "strength",
        "seed",
        "scheduler",
        "model",
        "loras",
        "webhook_url",
        "webhook_events",
        "max_items_per_category",
        "task_id",
        "unknown",
    ];
    const VALUES: [&str; 28] = [
        "0",
        "1",
        "-1",
        "7.5",
        "150",
        "151",
        "512",
        "2048",
        "2056",
        "1e308",
        "-1e308",
        "9223372036854775807",
        "18446744073709551615",
        "18446744073709551616",
        "0.0000001",
        "true",
        "null",
        "\"\"",
        "\"  \"",
        "\"a desk\"",
        "\"\\u0000\"",
        "\"\\ud800\"",
        "\"https://example.com/desk.jpg\"",
        "\"s3://bucket/k.png\"",
        "\"file:///etc/passwd\"",
        "[\"start\", \"done\"]",
        "[{\"name\": \"cozy\", \"weight\": 1e9}]",
        "{}",
    ];
    let mut out = String::from("{");
    for i in 0..rng.random_range(0..6) {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&format!("\"{}\": {}", FIELDS.choose(rng).unwrap(), VALUES.choose(rng).unwrap()));
    }
    out.push('}');
    out.into_bytes()
}

/// What the REST bridge does with a body, then the rules every accepted request must satisfy.
fn check_request(bytes: &[u8]) {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(bytes) else { return };
    if !value.is_object() {
        return;
    }
    let Ok(input) = serde_json::from_slice::<GenerateInput>(bytes) else { return };
    let prompt = input.prompt.clone();
    match validate(input, &Limits { max_side: 2048, max_images: 4 }, &info()) {
        Err(Invalid::EmptyPrompt) => assert!(prompt.is_some_and(|p| p.trim().is_empty())),
        Err(Invalid::Rules(violations)) => assert!(!violations.is_empty()),
        Ok((task_id, request)) => {
            assert!(task_id.is_none_or(|id| (1..=128).contains(&id.len())));
            assert!((1..=MAX_STEPS).contains(&request.num_inference_steps));
            assert!((1..=4).contains(&request.num_images));
            assert!(request.guidance_scale.is_finite() && (0.0..=30.0).contains(&request.guidance_scale));
            assert!(request.strength.is_none_or(|s| s > 0.0 && s <= 1.0));
            for unit in request.control.iter().flatten() {
                assert!((0.0..=2.0).contains(&unit.scale) && unit.guidance_start < unit.guidance_end);
                assert!(unit.control_type == "canny" && unit.low_threshold <= unit.high_threshold);
            }
            for side in [request.height, request.width].into_iter().flatten() {
                assert!((64..=2048).contains(&side) && side % 8 == 0, "side {side}");
            }
            assert!((1..=10).contains(&request.max_items_per_category));
            assert!(request.prompt.is_some() || request.photo.is_some());
            for text in [&request.prompt, &request.negative_prompt].into_iter().flatten() {
                assert!(text.chars().count() <= MAX_PROMPT_CHARS);
                assert!(!text.chars().any(|c| c.is_control() && !matches!(c, '\n' | '\t' | '\r')));
            }
            for lora in &request.loras {
                assert!(lora.weight.is_finite() && lora.weight.abs() <= MAX_LORA_WEIGHT);
            }
        }
    }
}

#[test]
fn fuzz_request_validation() {
    let mut rng = ChaCha8Rng::seed_from_u64(seed());
    let mut corpus: Vec<Vec<u8>> = (0..64).map(|_| random_request(&mut rng)).collect();
    corpus.push(br#"{"prompt": "a desk", "num_inference_steps": 20, "guidance_scale": 7.5, "height": 512, "width": 512, "strength": 0.5, "seed": 1, "scheduler": "ddim", "loras": [{"name": "cozy", "weight": 0.8}], "webhook_url": "https://example.com/hook", "webhook_events": ["completed"], "max_items_per_category": 3, "task_id": "t-1"}"#.to_vec());
    let runs = fuzz("request validation", corpus, |bytes| {
        check_request(bytes);
        // Structure-aware inputs too, from the same stream of randomness.
        let mut local =
            ChaCha8Rng::seed_from_u64(bytes.len() as u64 ^ u64::from(bytes.first().copied().unwrap_or(0)));
        check_request(&random_request(&mut local));
    });
    assert!(runs > 100, "too few runs to mean anything: {runs}");
}

fn encoded(image: &image::DynamicImage, format: image::ImageFormat) -> Vec<u8> {
    let mut out = Vec::new();
    image.write_to(&mut std::io::Cursor::new(&mut out), format).unwrap();
    out
}

#[test]
fn fuzz_image_decoding() {
    const MAX_PIXELS: u64 = 2_000_000;
    let mut rng = ChaCha8Rng::seed_from_u64(seed());
    let mut pixels = vec![0u8; 64 * 48 * 3];
    rng.fill_bytes(&mut pixels);
    let small = image::DynamicImage::ImageRgb8(image::RgbImage::from_raw(64, 48, pixels).unwrap());
    let mut corpus = vec![std::fs::read(common::darknet("dog.jpg")).unwrap()];
    for format in [
        image::ImageFormat::Png,
        image::ImageFormat::Jpeg,
        image::ImageFormat::Gif,
        image::ImageFormat::Bmp,
        image::ImageFormat::Tiff,
        image::ImageFormat::WebP,
    ] {
        corpus.push(encoded(&small, format));
    }
    corpus.push(encoded(&image::DynamicImage::ImageRgba8(small.to_rgba8()), image::ImageFormat::Png));
    let mut slowest = Duration::ZERO;
    let runs = fuzz("image decoding", corpus, |bytes| {
        let started = Instant::now();
        match decode_image(bytes, MAX_PIXELS) {
            Ok(image) => {
                assert!(u64::from(image.width()) * u64::from(image.height()) <= MAX_PIXELS);
                assert!(image.width() >= MIN_SIDE && image.height() >= MIN_SIDE);
            }
            Err(
                ImageError::NotAnImage
                | ImageError::TooLarge { .. }
                | ImageError::TooSmall { .. }
                | ImageError::Corrupt { .. },
            ) => {}
        }
        slowest = slowest.max(started.elapsed());
    });
    eprintln!("slowest input decoded in {slowest:?}");
    assert!(runs > 50, "too few runs to mean anything: {runs}");
    // A pixel-capped decode of a few megapixels never takes seconds (no hang, no quadratic path).
    assert!(slowest < Duration::from_secs(5), "an input took {slowest:?}");
}
