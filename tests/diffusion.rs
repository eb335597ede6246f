//! The Stable Diffusion engine on the committed tiny fixtures, against the Python reference
//! (optimum's ONNX Runtime pipelines on the same ONNX files, `onnx/fixtures/README.md`).

#[path = "common/draws.rs"]
mod draws;
#[path = "common/npy.rs"]
mod npy;

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};

use deskgen::inference::diffusion::lora::LoraOptions;
use deskgen::inference::diffusion::mask::gaussian_blur;
use deskgen::inference::diffusion::schedulers::{SchedulerConfig, img2img_start_index};
use deskgen::inference::diffusion::{
    ClipTokenizer, ControlUnit, Denoised, DiffusionError, GenerateParams, InpaintMask, SchedulerKind,
    StableDiffusion,
};
use deskgen::inference::{ModelOwner, Runtime, RuntimeConfig};
use ndarray::{Array4, ArrayD, Axis, Ix4, concatenate};
use serde_json::Value;

use draws::Draws;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("onnx/fixtures")
}

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn runtime() -> Runtime {
    Runtime::init(&RuntimeConfig { intra_threads: 1, ..RuntimeConfig::default() })
        .expect("ONNX Runtime loads")
}

/// One of the shared pipelines below.
type Shared = fn() -> MutexGuard<'static, StableDiffusion>;

/// The tiny SD 1.5 pipeline with the committed LoRA adapters, loaded once; running it takes
/// `&mut`, so tests take turns.
fn sd15() -> MutexGuard<'static, StableDiffusion> {
    static PIPELINE: OnceLock<Mutex<StableDiffusion>> = OnceLock::new();
    let pipeline = PIPELINE.get_or_init(|| {
        let mut sd =
            StableDiffusion::load(&runtime(), fixtures().join("tiny-sd15")).expect("tiny-sd15 loads");
        let loras = LoraOptions { dir: repo_path("onnx/loras"), cache_size: 2, max_weight: 2.0 };
        assert!(sd.load_loras(&loras).expect("the LoRA folder reads").is_empty());
        Mutex::new(sd)
    });
    pipeline.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The tiny SDXL pipeline, as [`sd15`].
fn sdxl() -> MutexGuard<'static, StableDiffusion> {
    static PIPELINE: OnceLock<Mutex<StableDiffusion>> = OnceLock::new();
    let pipeline = PIPELINE.get_or_init(|| {
        Mutex::new(StableDiffusion::load(&runtime(), fixtures().join("tiny-sdxl")).expect("tiny-sdxl loads"))
    });
    pipeline.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Python's json writes `-Infinity` (diffusers' `lambda_min_clipped`); strict JSON has no such token.
fn read_python_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).expect("reference JSON exists");
    serde_json::from_str(&text.replace("-Infinity", "null")).expect("reference JSON parses")
}

fn max_abs_diff<'a>(a: impl IntoIterator<Item = &'a f32>, b: impl IntoIterator<Item = &'a f32>) -> f32 {
    a.into_iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn as4(array: ArrayD<f32>) -> Array4<f32> {
    array.into_dimensionality::<Ix4>().expect("rank 4")
}

fn params(prompt: &str, scheduler: SchedulerKind) -> GenerateParams {
    GenerateParams {
        prompt: prompt.to_string(),
        negative_prompt: "blurry".to_string(),
        num_inference_steps: 4,
        guidance_scale: 7.5,
        width: 64,
        height: 64,
        strength: 0.75,
        seed: 42,
        scheduler,
        init_image: None,
        guidance_rescale: 0.0,
        loras: vec![],
        control: vec![],
        mask: None,
    }
}

fn keep_going() -> impl FnMut(deskgen::inference::diffusion::Step<'_>) -> ControlFlow<()> {
    |_| ControlFlow::Continue(())
}

fn png_bytes(image: &image::RgbImage) -> Vec<u8> {
    let mut bytes = Vec::new();
    image.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png).expect("PNG encodes");
    bytes
}

fn reference_cases(model: &str) -> Vec<Value> {
    read_python_json(&fixtures().join("reference/cases.json"))[model]["cases"]
        .as_array()
        .expect("cases")
        .clone()
}

fn assert_close(what: &str, got: f64, want: f64, rel: f64) {
    assert!((got - want).abs() <= rel * want.abs().max(1e-12), "{what}: got {got}, want {want}");
}

#[test]
fn scheduler_schedules_match_diffusers() {
    let table = read_python_json(&fixtures().join("reference/schedulers.json"));
    let entries = table["entries"].as_array().expect("entries");
    assert!(entries.len() >= 75);
    for entry in entries {
        let kind: SchedulerKind = match entry["scheduler"].as_str() {
            Some("euler_ancestral") => SchedulerKind::EulerAncestral,
            Some(id) => id.parse().expect("known scheduler"),
            None => panic!("entry without scheduler"),
        };
        let steps = entry["num_inference_steps"].as_u64().expect("steps") as usize;
        let name = format!("{kind} {} {steps}", entry["timestep_spacing"]);
        let config = SchedulerConfig::from_json(&entry["config"].to_string()).expect("config parses");
        let mut scheduler = kind.build(&config);
        scheduler.set_timesteps(steps);

        let want: Vec<f64> =
            entry["timesteps"].as_array().unwrap().iter().map(|t| t.as_f64().unwrap()).collect();
        let got: Vec<f64> = scheduler.timesteps().iter().map(|&t| f64::from(t)).collect();
        if entry["timesteps_dtype"] == "int64" {
            assert_eq!(got, want, "{name}: timesteps");
        } else {
            assert_eq!(got.len(), want.len(), "{name}: timesteps");
            for (g, w) in got.iter().zip(&want) {
                assert_close(&format!("{name}: timestep"), *g, *w, 1e-6);
            }
        }
        match entry["sigmas"].as_array() {
            Some(want) => {
                let got = scheduler.sigmas().expect("sigmas");
                assert_eq!(got.len(), want.len(), "{name}: sigmas");
                for (g, w) in got.iter().zip(want) {
                    assert_close(&format!("{name}: sigma"), f64::from(*g), w.as_f64().unwrap(), 1e-6);
                }
            }
            None => assert!(scheduler.sigmas().is_none(), "{name}: DDIM has no sigmas"),
        }
        assert_close(
            &format!("{name}: init_noise_sigma"),
            f64::from(scheduler.init_noise_sigma()),
            entry["init_noise_sigma"].as_f64().unwrap(),
            1e-6,
        );

        let img2img = &entry["img2img"];
        let start = img2img_start_index(steps, img2img["strength"].as_f64().unwrap() as f32);
        assert_eq!(start as u64, img2img["t_start"].as_u64().unwrap(), "{name}: img2img t_start");
        let remaining: Vec<f64> = got[start..].to_vec();
        let want_remaining: Vec<f64> =
            img2img["timesteps"].as_array().unwrap().iter().map(|t| t.as_f64().unwrap()).collect();
        assert_eq!(remaining.len(), want_remaining.len(), "{name}: img2img timesteps");
        for (g, w) in remaining.iter().zip(&want_remaining) {
            assert_close(&format!("{name}: img2img timestep"), *g, *w, 1e-6);
        }
        if let Some(sigma) = img2img["sigma_at_start"].as_f64() {
            let got = scheduler.sigmas().expect("sigmas")[start];
            assert_close(&format!("{name}: img2img start sigma"), f64::from(got), sigma, 1e-6);
        }
    }
}

#[test]
fn scheduler_kinds_round_trip() {
    for kind in SchedulerKind::ALL {
        assert_eq!(kind.as_str().parse::<SchedulerKind>().unwrap(), kind);
    }
    assert_eq!("euler_a".parse::<SchedulerKind>().unwrap(), SchedulerKind::EulerAncestral);
    let error = "pndm".parse::<SchedulerKind>().unwrap_err();
    assert!(error.to_string().contains("dpmpp_2m_karras"), "{error}");
}

/// Each scheduler step, fed the reference's own guided predictions, lands on the reference's
/// latents: the scheduler arithmetic alone, separated from UNet numerics.
#[test]
fn scheduler_steps_match_reference_latents() {
    for (model, pipeline) in [("sd15", sd15()), ("sdxl", sdxl())] {
        for case in reference_cases(model) {
            let id = case["id"].as_str().unwrap();
            let file = |key: &str| as4(npy::read_f32(&repo_path(case["files"][key].as_str().unwrap())));
            let kind: SchedulerKind = case["scheduler"].as_str().unwrap().parse().unwrap();
            let mut scheduler = kind.build(&pipeline.config().scheduler);
            let steps = case["num_inference_steps"].as_u64().unwrap() as usize;
            scheduler.set_timesteps(steps);
            let want_timesteps = npy::read_as_f32(&repo_path(case["files"]["timesteps"].as_str().unwrap()));
            let start = steps - want_timesteps.len();
            assert_eq!(
                scheduler.timesteps()[start..],
                want_timesteps.as_slice().unwrap()[..],
                "{id}: timesteps"
            );

            let mut latents = file("latents_init");
            if case["mode"] == "img2img" {
                assert_eq!(start, img2img_start_index(steps, case["strength"].as_f64().unwrap() as f32));
                scheduler.set_begin_index(start);
                let shared =
                    |key: &str| as4(npy::read_f32(&repo_path(case["shared_files"][key].as_str().unwrap())));
                let mut noised = shared("init_latents");
                scheduler.add_noise(noised.view_mut(), shared("noise").view(), scheduler.timesteps()[start]);
                let diff = max_abs_diff(&noised, &latents);
                assert!(diff < 1e-5, "{id}: add_noise differs by {diff}");
            }
            let steps_file = |key: &str| npy::read_f32(&repo_path(case["files"][key].as_str().unwrap()));
            let (unet_sample, noise_pred, step_latents) =
                (steps_file("unet_sample"), steps_file("noise_pred"), steps_file("step_latents"));
            let mut no_draws = Draws::none();
            for (i, &timestep) in want_timesteps.iter().enumerate() {
                let mut sample = concatenate(Axis(0), &[latents.view(), latents.view()]).unwrap();
                scheduler.scale_model_input(sample.view_mut(), timestep);
                let diff = max_abs_diff(&sample, unet_sample.index_axis(Axis(0), i).iter());
                assert!(diff < 1e-5, "{id} step {i}: scale_model_input differs by {diff}");
                let pred = noise_pred.index_axis(Axis(0), i).into_dimensionality::<Ix4>().unwrap();
                scheduler.step(pred, timestep, latents.view_mut(), &mut no_draws);
                let diff = max_abs_diff(&latents, step_latents.index_axis(Axis(0), i).iter());
                assert!(diff < 1e-4, "{id} step {i}: latents differ by {diff}");
            }
        }
    }
}

#[test]
fn tokenizers_and_text_embeddings_match_reference() {
    let prompt = "a photo of a wooden desk with a laptop, soft light";
    let negative = "blurry, low quality";
    let models: [(_, Shared, _); 2] = [
        ("sd15", sd15, vec![("tokenizer", "input_ids")]),
        ("sdxl", sdxl, vec![("tokenizer", "input_ids"), ("tokenizer_2", "input_ids_2")]),
    ];
    for (model, pipeline, dirs) in models {
        let mut pipeline = pipeline();
        let reference = fixtures().join("reference").join(model);
        let model_dir = pipeline.config().dir.clone();
        for (dir, ids_file) in dirs {
            let tokenizer = ClipTokenizer::from_dir(&model_dir.join(dir)).unwrap();
            let want = npy::read_i64(&reference.join(format!("{ids_file}.npy")));
            assert_eq!(
                tokenizer.encode(negative).unwrap(),
                want.index_axis(Axis(0), 0).iter().copied().collect::<Vec<_>>(),
                "{model} {dir}"
            );
            assert_eq!(
                tokenizer.encode(prompt).unwrap(),
                want.index_axis(Axis(0), 1).iter().copied().collect::<Vec<_>>(),
                "{model} {dir}"
            );
        }
        let embeddings = pipeline.encode_prompt(prompt, negative, true).unwrap();
        let want = npy::read_f32(&reference.join("prompt_embeds.npy"));
        assert_eq!(embeddings.prompt_embeds.shape(), want.shape());
        let diff = max_abs_diff(&embeddings.prompt_embeds, &want);
        println!("{model}: prompt_embeds max abs diff {diff:e}");
        assert!(diff <= 1e-5, "{model}: prompt_embeds differ by {diff}");
        if model == "sdxl" {
            let pooled = embeddings.pooled_prompt_embeds.expect("SDXL pools");
            let want = npy::read_f32(&reference.join("pooled_prompt_embeds.npy"));
            let diff = max_abs_diff(&pooled, &want);
            println!("{model}: pooled_prompt_embeds max abs diff {diff:e}");
            assert!(diff <= 1e-5, "{model}: pooled embeddings differ by {diff}");
        } else {
            assert!(embeddings.pooled_prompt_embeds.is_none());
        }
    }
}

#[test]
fn tokenizer_pads_truncates_and_takes_any_script() {
    let tokenizer = ClipTokenizer::from_dir(&fixtures().join("tiny-sd15/tokenizer")).unwrap();
    assert_eq!(
        tokenizer.encode("a photo of a desk").unwrap()[..8],
        [49406, 320, 1125, 539, 320, 6550, 49407, 49407]
    );
    let long = "desk ".repeat(500);
    let ids = tokenizer.encode(&long).unwrap();
    assert_eq!(ids.len(), 77);
    assert_eq!((ids[0], ids[76]), (49406, 49407), "start and end tokens survive truncation");
    for text in ["", "책상 위의 노트북과 모니터 🖥️⌨️🌱", "\u{0}\t\n"] {
        let ids = tokenizer.encode(text).unwrap();
        assert_eq!(ids.len(), 77, "{text:?}");
        assert_eq!(ids[0], 49406);
    }
    let tokenizer_2 = ClipTokenizer::from_dir(&fixtures().join("tiny-sdxl/tokenizer_2")).unwrap();
    assert_eq!(tokenizer_2.encode("desk").unwrap()[3..], [0; 74], "SDXL's second tokenizer pads with '!'");
}

/// The generation a reference case describes, with the LoRA adapters it lists; without control.
fn case_params(case: &Value) -> GenerateParams {
    GenerateParams {
        prompt: case["prompt"].as_str().unwrap().to_string(),
        negative_prompt: case["negative_prompt"].as_str().unwrap().to_string(),
        num_inference_steps: case["num_inference_steps"].as_u64().unwrap() as u32,
        guidance_scale: case["guidance_scale"].as_f64().unwrap() as f32,
        width: case["width"].as_u64().unwrap() as u32,
        height: case["height"].as_u64().unwrap() as u32,
        strength: case["strength"].as_f64().unwrap_or(1.0) as f32,
        seed: 0,
        scheduler: case["scheduler"].as_str().unwrap().parse().unwrap(),
        init_image: case["init_image"]
            .as_str()
            .map(|path| image::open(repo_path(path)).expect("init image decodes").to_rgb8()),
        guidance_rescale: 0.0,
        loras: case["loras"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|l| (l["name"].as_str().unwrap().to_string(), l["weight"].as_f64().unwrap() as f32))
            .collect(),
        control: vec![],
        mask: None,
    }
}

/// Asserts that `denoised` matches the case's final latents and image within 1e-3; returns the
/// report line.
fn assert_matches_case(id: &str, case: &Value, denoised: &Denoised) -> String {
    let file = |key: &str| npy::read_f32(&repo_path(case["files"][key].as_str().unwrap()));
    let latents_diff = max_abs_diff(&denoised.latents, &file("final_latents"));
    let image_diff = max_abs_diff(&denoised.image, &file("image"));
    assert!(latents_diff <= 1e-3, "{id}: final latents differ by {latents_diff}");
    assert!(image_diff <= 1e-3, "{id}: image differs by {image_diff}");
    format!("{id}: final latents {latents_diff:.2e}, image {image_diff:.2e}")
}

#[test]
fn generations_match_reference_images() {
    let mut report = Vec::new();
    for (model, pipeline) in [("sd15", sd15 as Shared), ("sdxl", sdxl)] {
        let mut pipeline = pipeline();
        for case in reference_cases(model) {
            let id = case["id"].as_str().unwrap().to_string();
            let shared =
                |key: &str| as4(npy::read_f32(&repo_path(case["shared_files"][key].as_str().unwrap())));
            let mut draws = Draws::initial(shared("noise"));
            let denoised =
                pipeline.generate_with_noise(&case_params(&case), &mut draws, &mut keep_going()).unwrap();
            report.push(assert_matches_case(&id, &case, &denoised));
        }
    }
    assert_eq!(report.len(), 12);
    println!("max abs diff against the Python reference:\n{}", report.join("\n"));
}

fn fewstep_cases() -> Vec<Value> {
    read_python_json(&fixtures().join("reference/fewstep/cases.json"))["cases"]
        .as_array()
        .expect("cases")
        .clone()
}

/// The case's model with its scheduler config overrides written into a copy (a Turbo model's
/// config says "trailing"; the tiny models' say "leading").
fn model_for(case: &Value, scratch: &Path) -> Option<StableDiffusion> {
    let overrides = case["scheduler_config_overrides"].as_object().expect("overrides");
    if overrides.is_empty() {
        return None;
    }
    let dir = scratch.join(case["id"].as_str().unwrap().replace('/', "_"));
    copy_dir(&repo_path(case["model_dir"].as_str().unwrap()), &dir);
    let path = dir.join("scheduler/scheduler_config.json");
    let mut config = read_python_json(&path);
    for (key, value) in overrides {
        config[key] = value.clone();
    }
    std::fs::write(&path, config.to_string()).unwrap();
    Some(StableDiffusion::load(&runtime(), dir).expect("the copied model loads"))
}

/// LCM, trailing Euler ancestral, the conditional-only pass of guidance <= 1, and LCM-LoRA merged at
/// run time, each replaying every noise draw diffusers made.
#[test]
fn fewstep_generations_match_diffusers() {
    let scratch = tempfile::tempdir().unwrap();
    let mut report = Vec::new();
    let mut images = std::collections::HashMap::new();
    for case in fewstep_cases() {
        let id = case["id"].as_str().unwrap();
        let params = case_params(&case);
        let file = |key: &str| npy::read_f32(&repo_path(case["files"][key].as_str().unwrap()));
        let noise = as4(npy::read_f32(&repo_path(case["noise"].as_str().unwrap())));
        let mut draws = match case["files"].get("draws") {
            Some(_) => Draws::with_steps(noise, &file("draws")),
            None => Draws::initial(noise),
        };
        let denoised = match model_for(&case, scratch.path()) {
            Some(mut own) => own.generate_with_noise(&params, &mut draws, &mut keep_going()),
            None if case["model"] == "sd15" => {
                sd15().generate_with_noise(&params, &mut draws, &mut keep_going())
            }
            None => sdxl().generate_with_noise(&params, &mut draws, &mut keep_going()),
        }
        .unwrap();
        assert_eq!(draws.left(), 0, "{id}: every recorded draw is used");
        report.push(assert_matches_case(id, &case, &denoised));
        images.insert(id.to_string(), denoised.image);
    }
    assert_eq!(report.len(), 7);
    let lora_effect = max_abs_diff(&images["sd15/txt2img_lcm_lora"], &images["sd15/txt2img_lcm"]);
    assert!(lora_effect > 1e-2, "the LCM-LoRA changes the image ({lora_effect})");
    println!("max abs diff against diffusers, every draw replayed:\n{}", report.join("\n"));
}

#[test]
fn same_seed_same_png_and_different_seed_differs() {
    for kind in SchedulerKind::ALL {
        let run = |seed: u64| {
            let params = GenerateParams { seed, ..params("a tidy desk", kind) };
            png_bytes(&sd15().generate(&params, &mut keep_going()).unwrap().image)
        };
        let first = run(7);
        assert_eq!(first, run(7), "{kind}: same seed, same bytes");
        assert_ne!(first, run(8), "{kind}: different seeds, different images");
    }
}

#[test]
fn sdxl_text_and_image_to_image_run_at_other_sizes() {
    let photo = image::RgbImage::from_fn(100, 70, |x, y| image::Rgb([x as u8, y as u8, 128]));
    let params = GenerateParams {
        width: 96,
        height: 48,
        init_image: Some(photo),
        negative_prompt: String::new(),
        ..params("a desk with a lamp", SchedulerKind::DpmPp2mKarras)
    };
    let generated = sdxl().generate(&params, &mut keep_going()).unwrap();
    assert_eq!(generated.image.dimensions(), (96, 48));
    let text_only = GenerateParams { init_image: None, ..params };
    assert_eq!(sdxl().generate(&text_only, &mut keep_going()).unwrap().image.dimensions(), (96, 48));
    assert_eq!(sdxl().native_size(), (256, 256));
    assert_eq!(sd15().native_size(), (256, 256));
    assert_eq!(sdxl().default_scheduler(), SchedulerKind::Euler);
}

#[test]
fn progress_once_per_step_and_cancel_after_two() {
    let mut calls = Vec::new();
    let params = params("a desk", SchedulerKind::Euler);
    sd15()
        .generate(&params, &mut |step| {
            assert_eq!(step.latents.dim(), (1, 4, 8, 8), "the batch's latents after the step");
            calls.push((step.done, step.total, step.sigma.unwrap()));
            ControlFlow::Continue(())
        })
        .unwrap();
    let steps: Vec<_> = calls.iter().map(|&(done, total, _)| (done, total)).collect();
    assert_eq!(steps, [(1, 4), (2, 4), (3, 4), (4, 4)]);
    let sigmas: Vec<f32> = calls.iter().map(|&(_, _, sigma)| sigma).collect();
    assert!(sigmas.windows(2).all(|w| w[0] > w[1]) && sigmas[3] == 0.0, "Euler's falling noise: {sigmas:?}");
    let ddim = GenerateParams { scheduler: SchedulerKind::Ddim, ..params.clone() };
    sd15()
        .generate(&ddim, &mut |step| {
            assert_eq!(step.sigma, None, "DDIM's samples are variance-preserving");
            ControlFlow::Continue(())
        })
        .unwrap();

    let photo = image::RgbImage::from_pixel(64, 64, image::Rgb([90, 60, 30]));
    let img2img = GenerateParams { init_image: Some(photo), num_inference_steps: 8, ..params.clone() };
    let mut steps_seen = 0;
    let result = sd15().generate(&img2img, &mut |step| {
        assert_eq!(step.total, 6, "strength 0.75 of 8 steps runs 6");
        steps_seen = step.done;
        if step.done == 2 { ControlFlow::Break(()) } else { ControlFlow::Continue(()) }
    });
    assert!(matches!(result, Err(DiffusionError::Canceled)), "{result:?}");
    assert_eq!(steps_seen, 2, "no step runs after the cancel");
}

#[test]
fn bad_parameters_are_refused_with_the_field_named() {
    let base = params("a desk", SchedulerKind::Ddim);
    let photo = image::RgbImage::from_pixel(64, 64, image::Rgb([10, 200, 30]));
    let cases = [
        ("width", GenerateParams { width: 60, ..base.clone() }),
        ("height", GenerateParams { height: 0, ..base.clone() }),
        ("width", GenerateParams { width: 72, ..base.clone() }),
        ("num_inference_steps", GenerateParams { num_inference_steps: 0, ..base.clone() }),
        ("num_inference_steps", GenerateParams { num_inference_steps: 151, ..base.clone() }),
        ("guidance_scale", GenerateParams { guidance_scale: -1.0, ..base.clone() }),
        ("guidance_scale", GenerateParams { guidance_scale: f32::NAN, ..base.clone() }),
        ("guidance_rescale", GenerateParams { guidance_rescale: 1.5, ..base.clone() }),
        ("strength", GenerateParams { strength: 0.0, init_image: Some(photo.clone()), ..base.clone() }),
        ("strength", GenerateParams { strength: 1.01, init_image: Some(photo.clone()), ..base.clone() }),
    ];
    for (field, params) in cases {
        match sd15().generate(&params, &mut keep_going()) {
            Err(DiffusionError::InvalidParams { field: got, reason }) => {
                assert_eq!(got, field, "{reason}");
                assert!(!reason.is_empty());
            }
            other => panic!("{field}: expected InvalidParams, got {other:?}"),
        }
    }
}

#[test]
fn edge_parameters_still_generate() {
    let base = params("a desk", SchedulerKind::DpmPp2m);
    let photo = image::RgbImage::from_pixel(30, 90, image::Rgb([10, 200, 30]));
    let long_prompt = "a minimalist wooden desk with a monitor and plants ".repeat(60);
    assert!(long_prompt.split_whitespace().count() >= 500);
    let cases = [
        GenerateParams { num_inference_steps: 1, ..base.clone() },
        GenerateParams { num_inference_steps: 150, width: 16, height: 16, ..base.clone() },
        GenerateParams { strength: 1.0, init_image: Some(photo.clone()), ..base.clone() },
        GenerateParams { strength: 0.01, init_image: Some(photo.clone()), ..base.clone() },
        GenerateParams { num_inference_steps: 1, strength: 0.5, init_image: Some(photo), ..base.clone() },
        GenerateParams { negative_prompt: String::new(), ..base.clone() },
        GenerateParams { prompt: String::new(), ..base.clone() },
        GenerateParams { prompt: long_prompt, ..base.clone() },
        GenerateParams {
            prompt: "햇살이 드는 책상 위의 노트북 ☕️🪴 and a lamp".into(), ..base.clone()
        },
        GenerateParams { guidance_scale: 1.0, ..base.clone() },
        GenerateParams { guidance_scale: 0.0, scheduler: SchedulerKind::EulerAncestral, ..base.clone() },
        GenerateParams { guidance_rescale: 0.7, ..base.clone() },
    ];
    for params in cases {
        let generated =
            sd15().generate(&params, &mut keep_going()).unwrap_or_else(|e| panic!("{params:?}: {e}"));
        assert_eq!(generated.image.dimensions(), (params.width, params.height));
        assert_eq!(generated.seed, params.seed);
    }
    let sdxl_empty_negative = GenerateParams { negative_prompt: String::new(), ..base };
    sdxl().generate(&sdxl_empty_negative, &mut keep_going()).unwrap();
}

#[test]
fn sdxl_empty_negative_prompt_is_zeroed() {
    let embeddings = sdxl().encode_prompt("a desk", "", true).unwrap();
    assert_eq!(embeddings.prompt_embeds.shape(), [2, 77, 32]);
    assert!(embeddings.prompt_embeds.index_axis(Axis(0), 0).iter().all(|&v| v == 0.0));
    assert!(embeddings.pooled_prompt_embeds.unwrap().index_axis(Axis(0), 0).iter().all(|&v| v == 0.0));
    let unguided = sd15().encode_prompt("a desk", "", false).unwrap();
    assert_eq!(unguided.prompt_embeds.shape(), [1, 77, 32]);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[test]
fn broken_model_directories_name_the_file() {
    let runtime = runtime();
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().join("model");
    copy_dir(&fixtures().join("tiny-sd15"), &dir);

    std::fs::remove_file(dir.join("unet/model.onnx")).unwrap();
    let error = StableDiffusion::load(&runtime, &dir).err().expect("loading fails");
    assert!(
        matches!(&error, DiffusionError::MissingFile { path } if path.ends_with("unet/model.onnx")),
        "{error}"
    );
    assert!(error.to_string().contains("unet/model.onnx"), "{error}");
    std::fs::copy(fixtures().join("tiny-sd15/unet/model.onnx"), dir.join("unet/model.onnx")).unwrap();

    let unet_config = dir.join("unet/config.json");
    let original = std::fs::read_to_string(&unet_config).unwrap();
    std::fs::write(
        &unet_config,
        original.replace("\"cross_attention_dim\": 32", "\"cross_attention_dim\": 64"),
    )
    .unwrap();
    let error = StableDiffusion::load(&runtime, &dir).err().expect("loading fails");
    assert!(
        error.to_string().contains("unet/config.json") && error.to_string().contains("cross_attention_dim"),
        "{error}"
    );
    std::fs::write(&unet_config, original).unwrap();

    std::fs::write(dir.join("scheduler/scheduler_config.json"), "{\"thresholding\": true}").unwrap();
    let error = StableDiffusion::load(&runtime, &dir).err().expect("loading fails");
    assert!(
        error.to_string().contains("scheduler_config.json") && error.to_string().contains("thresholding"),
        "{error}"
    );
    std::fs::remove_file(dir.join("scheduler/scheduler_config.json")).unwrap();
    let error = StableDiffusion::load(&runtime, &dir).err().expect("loading fails");
    assert!(error.to_string().contains("scheduler/scheduler_config.json"), "{error}");
    std::fs::copy(
        fixtures().join("tiny-sd15/scheduler/scheduler_config.json"),
        dir.join("scheduler/scheduler_config.json"),
    )
    .unwrap();

    std::fs::remove_file(dir.join("vae_encoder/model.onnx")).unwrap();
    let mut text_only = StableDiffusion::load(&runtime, &dir).unwrap();
    assert!(!text_only.supports_img2img());
    let photo = image::RgbImage::from_pixel(64, 64, image::Rgb([1, 2, 3]));
    let img2img = GenerateParams { init_image: Some(photo), ..params("a desk", SchedulerKind::Ddim) };
    let error = text_only.generate(&img2img, &mut keep_going()).unwrap_err();
    assert!(error.to_string().contains("vae_encoder/model.onnx"), "{error}");
}

#[tokio::test]
async fn a_pipeline_on_its_owner_thread_serves_concurrent_requests() {
    let owner = ModelOwner::spawn(
        "diffusion",
        StableDiffusion::load(&runtime(), fixtures().join("tiny-sd15")).unwrap(),
    )
    .unwrap();
    let generate = || {
        owner.run(|pipeline| {
            let generated = pipeline.generate(&params("a desk", SchedulerKind::Euler), &mut keep_going());
            png_bytes(&generated.unwrap().image)
        })
    };
    let (first, second) = tokio::join!(generate(), generate());
    assert_eq!(first.unwrap(), second.unwrap());
}

#[test]
fn lcm_refuses_more_steps_than_the_model_was_distilled_on() {
    let params = GenerateParams { num_inference_steps: 51, ..params("a desk", SchedulerKind::Lcm) };
    let error = sd15().generate(&params, &mut keep_going()).unwrap_err();
    assert!(matches!(error, DiffusionError::InvalidParams { field: "num_inference_steps", .. }), "{error}");
    assert!(error.to_string().contains("at most 50"), "{error}");
}

fn controlnet_cases() -> Vec<Value> {
    read_python_json(&fixtures().join("reference/controlnet/cases.json"))["cases"]
        .as_array()
        .expect("cases")
        .clone()
}

fn control_unit(unit: &Value) -> ControlUnit {
    ControlUnit {
        control_type: unit["type"].as_str().unwrap().to_string(),
        image: image::open(repo_path(unit["image"].as_str().unwrap()))
            .expect("control image decodes")
            .to_rgb8(),
        scale: unit["scale"].as_f64().unwrap() as f32,
        guidance_start: unit["guidance_start"].as_f64().unwrap() as f32,
        guidance_end: unit["guidance_end"].as_f64().unwrap() as f32,
    }
}

#[test]
fn controlnet_generations_match_diffusers() {
    let mut report = Vec::new();
    for case in controlnet_cases() {
        let id = case["id"].as_str().unwrap();
        let mut pipeline = if case["model"] == "sd15" { sd15() } else { sdxl() };
        let params = GenerateParams {
            control: case["units"].as_array().unwrap().iter().map(control_unit).collect(),
            ..case_params(&case)
        };
        let mut draws = Draws::initial(as4(npy::read_f32(&repo_path(case["noise"].as_str().unwrap()))));
        let denoised = pipeline.generate_with_noise(&params, &mut draws, &mut keep_going()).unwrap();
        assert!(denoised.timings.controlnet_ms > 0.0, "{id}: the ControlNets ran");
        report.push(assert_matches_case(id, &case, &denoised));
    }
    assert_eq!(report.len(), 9);
    println!("max abs diff against diffusers' ControlNet pipelines:\n{}", report.join("\n"));
}

#[test]
fn control_steers_the_image_and_bad_control_is_refused() {
    let mut pipeline = sd15();
    assert_eq!(pipeline.control_types(), ["canny", "softedge"]);
    let lines = image::open(fixtures().join("reference/controlnet/control_canny.png")).unwrap().to_rgb8();
    let unit = ControlUnit {
        control_type: "canny".into(),
        image: lines,
        scale: 1.0,
        guidance_start: 0.0,
        guidance_end: 1.0,
    };
    let plain = pipeline.generate(&params("a desk", SchedulerKind::Ddim), &mut keep_going()).unwrap();
    let steered = GenerateParams { control: vec![unit.clone()], ..params("a desk", SchedulerKind::Ddim) };
    let controlled = pipeline.generate(&steered, &mut keep_going()).unwrap();
    assert_ne!(plain.image, controlled.image, "control changes the image");
    let off = GenerateParams { control: vec![ControlUnit { scale: 0.0, ..unit.clone() }], ..steered.clone() };
    assert_eq!(
        pipeline.generate(&off, &mut keep_going()).unwrap().image,
        plain.image,
        "scale 0 is no control"
    );

    let refused = |pipeline: &mut StableDiffusion, unit: ControlUnit| {
        let params = GenerateParams { control: vec![unit], ..steered.clone() };
        pipeline.generate(&params, &mut keep_going()).unwrap_err().to_string()
    };
    let error = refused(&mut pipeline, ControlUnit { control_type: "depth".into(), ..unit.clone() });
    assert!(
        error.contains("control") && error.contains("\"depth\"") && error.contains("canny, softedge"),
        "{error}"
    );
    let error = refused(&mut pipeline, ControlUnit { scale: 2.5, ..unit.clone() });
    assert!(error.contains("scale must be between 0 and 2"), "{error}");
    let error = refused(&mut pipeline, ControlUnit { guidance_start: 0.6, guidance_end: 0.5, ..unit });
    assert!(error.contains("guidance_start"), "{error}");
}

#[test]
fn a_controlnet_of_another_family_is_refused_at_load() {
    let runtime = runtime();
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().join("model");
    copy_dir(&fixtures().join("tiny-sd15"), &dir);
    copy_dir(&fixtures().join("tiny-sdxl/controlnet/canny"), &dir.join("controlnet/xl-canny"));
    let error = StableDiffusion::load(&runtime, &dir).err().expect("loading fails").to_string();
    assert!(error.contains("controlnet/xl-canny/model.onnx") && error.contains("SDXL ControlNet"), "{error}");

    std::fs::remove_dir_all(dir.join("controlnet/xl-canny")).unwrap();
    std::fs::remove_dir_all(dir.join("unet_controlnet")).unwrap();
    let error = StableDiffusion::load(&runtime, &dir).err().expect("loading fails").to_string();
    assert!(error.contains("unet_controlnet/model.onnx"), "{error}");

    std::fs::remove_dir_all(dir.join("controlnet")).unwrap();
    let mut plain = StableDiffusion::load(&runtime, &dir).expect("loads without control");
    assert!(plain.control_types().is_empty());
    let error = plain.load_controlnet("canny", &fixtures().join("tiny-sd15/controlnet/canny")).unwrap_err();
    assert!(error.to_string().contains("unet_controlnet/model.onnx"), "{error}");
}

/// A batch of images is the images a generation of one makes from each seed: image `i` of a batch
/// from seed `s` equals one image from seed `s + i` (within 1e-3 on [0, 1] pixels), with guidance
/// (unconditional rows before conditional ones), with fresh noise every step (each image its own
/// stream), without guidance, from a photo with control, and on SDXL (pooled embeddings and size
/// conditioning per row).
#[test]
fn a_batch_draws_what_one_image_per_seed_draws() {
    let photo = image::open(fixtures().join("reference/controlnet/control_canny.png")).unwrap().to_rgb8();
    let canny = ControlUnit {
        control_type: "canny".into(),
        image: photo.clone(),
        scale: 0.8,
        guidance_start: 0.0,
        guidance_end: 1.0,
    };
    let cases: [(&str, Shared, GenerateParams); 4] = [
        (
            "sd15 euler_a, guidance 7.5 with rescale",
            sd15,
            GenerateParams { guidance_rescale: 0.7, ..params("a desk", SchedulerKind::EulerAncestral) },
        ),
        (
            "sd15 lcm, guidance 1",
            sd15,
            GenerateParams { guidance_scale: 1.0, ..params("a desk", SchedulerKind::Lcm) },
        ),
        (
            "sd15 img2img with canny, dpm++ 2m",
            sd15,
            GenerateParams {
                init_image: Some(photo),
                control: vec![canny],
                ..params("a desk", SchedulerKind::DpmPp2m)
            },
        ),
        ("sdxl euler_a", sdxl, params("a desk", SchedulerKind::EulerAncestral)),
    ];
    let mut report = Vec::new();
    for (name, pipeline, params) in cases {
        let mut sd = pipeline();
        let batch = sd.denoise_batch(&params, 3, &mut keep_going()).unwrap();
        assert_eq!(batch.image.dim().0, 3, "{name}");
        let mut worst = 0.0f32;
        for i in 0..3 {
            let alone = GenerateParams { seed: params.seed + i as u64, ..params.clone() };
            let one = sd.denoise_batch(&alone, 1, &mut keep_going()).unwrap();
            let row = batch.image.index_axis(ndarray::Axis(0), i);
            let diff = max_abs_diff(row.iter(), one.image.iter());
            assert!(diff <= 1e-3, "{name}: image {i} differs from seed {} alone by {diff}", alone.seed);
            worst = worst.max(diff);
        }
        let (first, second) =
            (batch.image.index_axis(ndarray::Axis(0), 0), batch.image.index_axis(ndarray::Axis(0), 1));
        let apart = max_abs_diff(first.iter(), second.iter());
        assert!(apart > 0.1, "{name}: two seeds drew nearly the same image ({apart})");
        report.push(format!("{name}: {worst:.1e} (images apart by {apart:.2})"));
        let generated = sd.generate_batch(&params, 2, &mut keep_going()).unwrap();
        assert_eq!(generated.iter().map(|g| g.seed).collect::<Vec<_>>(), [params.seed, params.seed + 1]);
    }
    let error =
        sd15().generate_batch(&params("a desk", SchedulerKind::Ddim), 5, &mut keep_going()).unwrap_err();
    assert!(error.to_string().contains("num_images"), "{error}");
    println!("batch of 3 against one image per seed, max abs diff on [0, 1] pixels:\n{}", report.join("\n"));
}

#[test]
fn the_preview_decoder_decodes_as_diffusers_autoencoder_tiny_does() {
    use deskgen::inference::diffusion::PreviewDecoder;
    let reference = fixtures().join("reference/preview");
    let latents = as4(npy::read_f32(&reference.join("latents.npy")));
    let want = as4(npy::read_f32(&reference.join("image.npy")));
    let mut decoder = PreviewDecoder::load(&runtime(), &fixtures().join("tiny-taesd")).unwrap();
    let got = decoder.decode(latents.view()).unwrap();
    assert_eq!(got.dim(), (1, 3, 64, 96), "eight times the latents' size");
    let diff = max_abs_diff(&got, &want);
    // Tolerance 1e-4 on [-1, 1] pixels; the outputs span most of that range.
    assert!(diff < 1e-4, "max |ORT - diffusers| = {diff}");
    assert!(want.iter().fold(0.0f32, |m, v| m.max(v.abs())) > 0.1, "a decode that is not all zeros");
}

#[test]
fn steps_draw_previews_with_the_model_s_decoder_or_the_linear_map() {
    let params = params("a desk", SchedulerKind::Euler);
    let previews = |sd: &mut StableDiffusion| {
        let mut pictures = Vec::new();
        sd.generate(&params, &mut |mut step| {
            if step.done == 2 {
                pictures.push(step.preview(48, 32).unwrap().unwrap());
            }
            ControlFlow::Continue(())
        })
        .unwrap();
        pictures.remove(0)
    };
    let linear = previews(&mut sd15());
    let mut decoded = StableDiffusion::load(&runtime(), fixtures().join("tiny-sd15")).unwrap();
    assert_eq!(decoded.preview_kind(), "linear");
    decoded.load_preview_decoder(&fixtures().join("tiny-taesd")).unwrap();
    assert_eq!(decoded.preview_kind(), "decoder");
    let with_decoder = previews(&mut decoded);
    assert_eq!((linear.dimensions(), with_decoder.dimensions()), ((48, 32), (48, 32)));
    assert_ne!(linear.as_raw(), with_decoder.as_raw(), "the decoder draws its own picture");
}

fn inpaint_reference() -> Value {
    read_python_json(&fixtures().join("reference/inpaint/cases.json"))
}

fn gray(path: &str) -> image::GrayImage {
    image::open(repo_path(path)).expect("mask decodes").to_luma8()
}

/// PIL's GaussianBlur (the box-blur approximation diffusers' `mask_processor.blur` calls), at
/// whole and fractional radii, small and larger than the shapes.
#[test]
fn mask_blur_is_pils_gaussian_blur_byte_for_byte() {
    let reference = inpaint_reference();
    let mask = gray("onnx/fixtures/reference/inpaint/mask.png");
    let files = reference["mask_blur_files"].as_array().unwrap();
    assert_eq!(files.len(), 4);
    for entry in files {
        let radius = entry["radius"].as_f64().unwrap() as f32;
        let want = gray(entry["file"].as_str().unwrap());
        let got = gaussian_blur(&mask, radius);
        let differing = got.pixels().zip(want.pixels()).filter(|(a, b)| a != b).count();
        assert_eq!(differing, 0, "radius {radius}: {differing} pixels differ from PIL's");
    }
}

/// The 9-channel inpainting UNet (tiny-sd15-inpaint), loaded once.
fn sd15_inpaint() -> MutexGuard<'static, StableDiffusion> {
    static PIPELINE: OnceLock<Mutex<StableDiffusion>> = OnceLock::new();
    let pipeline = PIPELINE.get_or_init(|| {
        let sd = StableDiffusion::load(&runtime(), fixtures().join("tiny-sd15-inpaint"))
            .expect("tiny-sd15-inpaint loads");
        assert!(sd.config().is_inpainting());
        Mutex::new(sd)
    });
    pipeline.lock().unwrap_or_else(PoisonError::into_inner)
}

fn inpaint_params(case: &Value) -> GenerateParams {
    GenerateParams {
        mask: Some(InpaintMask {
            image: gray(case["mask"].as_str().unwrap()),
            blur: case["mask_blur"].as_f64().unwrap() as f32,
            padding_crop: None,
            preserve_unmasked: false,
        }),
        ..case_params(case)
    }
}

/// Both kinds of inpainting against diffusers' inpaint pipelines: the 9-channel UNet and latent
/// blending with an ordinary UNet (SD 1.x and SDXL), DDIM and Euler, strength 1 and 0.6, with and
/// without mask blur; final latents and image within 1e-3.
#[test]
fn inpainting_matches_diffusers() {
    let mut report = Vec::new();
    for case in inpaint_reference()["cases"].as_array().unwrap() {
        let id = case["id"].as_str().unwrap();
        let mut pipeline = match (case["model"].as_str().unwrap(), case["unet_channels"].as_u64().unwrap()) {
            ("sd15", 9) => sd15_inpaint(),
            ("sd15", _) => sd15(),
            _ => sdxl(),
        };
        let mut draws = Draws::initial(as4(npy::read_f32(&repo_path(case["noise"].as_str().unwrap()))));
        let denoised =
            pipeline.generate_with_noise(&inpaint_params(case), &mut draws, &mut keep_going()).unwrap();
        report.push(assert_matches_case(id, case, &denoised));
    }
    assert_eq!(report.len(), 18);
    println!("max abs diff against diffusers' inpaint pipelines:\n{}", report.join("\n"));
}

fn masked(preserve_unmasked: bool, padding_crop: Option<u32>) -> GenerateParams {
    let photo = image::open(fixtures().join("reference/init_image.png")).unwrap().to_rgb8();
    GenerateParams {
        init_image: Some(photo),
        strength: 1.0,
        mask: Some(InpaintMask {
            image: gray("onnx/fixtures/reference/inpaint/mask.png"),
            blur: 2.0,
            padding_crop,
            preserve_unmasked,
        }),
        ..params("a lamp on a desk", SchedulerKind::Ddim)
    }
}

#[test]
fn preserve_unmasked_gives_back_the_photo_outside_the_mask() {
    let photo = image::open(fixtures().join("reference/init_image.png")).unwrap().to_rgb8();
    let mut pipeline = sd15();
    let kept = pipeline.generate(&masked(true, None), &mut keep_going()).unwrap();
    let plain = pipeline.generate(&masked(false, None), &mut keep_going()).unwrap();
    let mask = kept.mask.clone().expect("the mask used comes back");
    assert_eq!(mask.dimensions(), (64, 64));
    let outside: Vec<(u32, u32)> =
        mask.enumerate_pixels().filter(|(_, _, m)| m[0] == 0).map(|(x, y, _)| (x, y)).collect();
    assert!(outside.len() > 1000, "the mask keeps most of the photo");
    for &(x, y) in &outside {
        assert_eq!(kept.image.get_pixel(x, y), photo.get_pixel(x, y), "pixel ({x}, {y}) is the photo's");
    }
    let changed =
        outside.iter().filter(|&&(x, y)| plain.image.get_pixel(x, y) != photo.get_pixel(x, y)).count();
    assert!(changed > outside.len() / 2, "without it the VAE round trip changes them ({changed})");
    let inside = (20, 30);
    assert_eq!(kept.image.get_pixel(inside.0, inside.1), plain.image.get_pixel(inside.0, inside.1));
}

#[test]
fn padding_mask_crop_repaints_only_the_masked_region() {
    let photo = image::open(fixtures().join("reference/init_image.png")).unwrap().to_rgb8();
    let mut pipeline = sd15();
    let small = GenerateParams {
        mask: Some(InpaintMask {
            image: image::GrayImage::from_fn(64, 64, |x, y| {
                image::Luma([if (40..52).contains(&x) && (8..20).contains(&y) { 255 } else { 0 }])
            }),
            blur: 0.0,
            padding_crop: Some(4),
            preserve_unmasked: false,
        }),
        ..masked(false, None)
    };
    let cropped = pipeline.generate(&small, &mut keep_going()).unwrap();
    let whole = pipeline
        .generate(
            &GenerateParams {
                mask: small.mask.clone().map(|m| InpaintMask { padding_crop: None, ..m }),
                ..small.clone()
            },
            &mut keep_going(),
        )
        .unwrap();
    assert_eq!(cropped.image.dimensions(), (64, 64));
    for (x, y, pixel) in cropped.image.enumerate_pixels() {
        if !(36..56).contains(&x) || !(4..24).contains(&y) {
            assert_eq!(pixel, photo.get_pixel(x, y), "({x}, {y}) lies outside the crop and is the photo's");
        }
    }
    let region = |image: &image::RgbImage| image.get_pixel(46, 14).0;
    assert_ne!(region(&cropped.image), region(&whole.image), "the crop is generated at a larger scale");
}

#[test]
fn masks_that_cannot_be_used_are_refused_and_a_full_mask_repaints_everything() {
    let mut pipeline = sd15();
    let black = GenerateParams {
        mask: Some(InpaintMask { image: image::GrayImage::new(16, 16), ..masked(false, None).mask.unwrap() }),
        ..masked(false, None)
    };
    let error = pipeline.generate(&black, &mut keep_going()).unwrap_err();
    assert!(matches!(error, DiffusionError::InvalidParams { field: "mask_image", .. }), "{error}");
    assert!(error.to_string().contains("nothing to repaint"), "{error}");
    let no_photo = GenerateParams { init_image: None, ..masked(false, None) };
    let error = pipeline.generate(&no_photo, &mut keep_going()).unwrap_err();
    assert!(error.to_string().contains("needs a photo"), "{error}");
    let with_control = GenerateParams {
        control: vec![control_unit(
            &serde_json::json!({"type": "canny", "scale": 1.0, "guidance_start": 0.0,
            "guidance_end": 1.0, "image": "onnx/fixtures/reference/controlnet/control_canny.png"}),
        )],
        ..masked(false, None)
    };
    let error = pipeline.generate(&with_control, &mut keep_going()).unwrap_err();
    assert!(matches!(error, DiffusionError::InvalidParams { field: "control", .. }), "{error}");
    let blur = GenerateParams {
        mask: Some(InpaintMask { blur: 65.0, ..masked(false, None).mask.unwrap() }),
        ..masked(false, None)
    };
    assert!(matches!(
        pipeline.generate(&blur, &mut keep_going()),
        Err(DiffusionError::InvalidParams { field: "mask_blur", .. })
    ));

    // White everywhere, a tiny mask of another size: the whole photo is repainted.
    let full = GenerateParams {
        mask: Some(InpaintMask {
            image: image::GrayImage::from_pixel(3, 5, image::Luma([255])),
            ..masked(false, None).mask.unwrap()
        }),
        ..masked(false, None)
    };
    let repainted = pipeline.generate(&full, &mut keep_going()).unwrap();
    assert!(repainted.mask.unwrap().pixels().all(|m| m[0] == 255));
    // With nothing kept and strength 1 an ordinary UNet starts from noise and blends nothing back:
    // text-to-image from the same seed.
    let text_only = GenerateParams { mask: None, init_image: None, ..full };
    let drawn = pipeline.generate(&text_only, &mut keep_going()).unwrap();
    assert_eq!(repainted.image, drawn.image, "a full mask at strength 1 draws what text-to-image draws");
}
