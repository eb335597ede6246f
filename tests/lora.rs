//! LoRA adapters: the merge against diffusers' fused reference, the session cache and its memory,
//! every kind of bad adapter and request, and requests through the real server.

mod common;
#[allow(dead_code)]
#[path = "common/draws.rs"]
mod draws;
// Shared with tests/diffusion.rs, which reads integer tensors too.
#[allow(dead_code)]
#[path = "common/npy.rs"]
mod npy;

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Instant;

use common::{TestServer, poll_final, start_real_guarded};
use deskgen::inference::diffusion::lora::{LoraError, LoraOptions, extract_prompt_loras};
use deskgen::inference::diffusion::{DiffusionError, GenerateParams, SchedulerKind, StableDiffusion};
use deskgen::inference::{Runtime, RuntimeConfig};
use draws::Draws;
use ndarray::{Array4, Ix4};
use serde_json::{Value, json};

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn tiny_sd15() -> PathBuf {
    repo_path("onnx/fixtures/tiny-sd15")
}

fn runtime() -> Runtime {
    Runtime::init(&RuntimeConfig { intra_threads: 1, ..RuntimeConfig::default() })
        .expect("ONNX Runtime loads")
}

fn options(dir: &Path, cache_size: usize) -> LoraOptions {
    LoraOptions { dir: dir.to_path_buf(), cache_size, max_weight: 2.0 }
}

/// tiny-sd15 with the committed adapters.
fn pipeline(cache_size: usize) -> StableDiffusion {
    let mut sd = StableDiffusion::load(&runtime(), tiny_sd15()).expect("tiny-sd15 loads");
    let rejected = sd.load_loras(&options(&repo_path("onnx/loras"), cache_size)).expect("LoRA folder reads");
    assert!(rejected.is_empty(), "committed adapters must all load: {rejected:?}");
    sd
}

/// One pipeline for the tests that do not count cache entries; running it takes `&mut`, so tests
/// take turns.
fn shared_pipeline() -> MutexGuard<'static, StableDiffusion> {
    static PIPELINE: OnceLock<Mutex<StableDiffusion>> = OnceLock::new();
    PIPELINE.get_or_init(|| Mutex::new(pipeline(8))).lock().unwrap_or_else(PoisonError::into_inner)
}

fn max_abs_diff<'a>(a: impl IntoIterator<Item = &'a f32>, b: impl IntoIterator<Item = &'a f32>) -> f32 {
    a.into_iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn keep_going() -> impl FnMut(deskgen::inference::diffusion::Step<'_>) -> ControlFlow<()> {
    |_| ControlFlow::Continue(())
}

fn reference() -> Value {
    let text = std::fs::read_to_string(repo_path("onnx/fixtures/reference/lora/cases.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn noise() -> Array4<f32> {
    npy::read_f32(&repo_path("onnx/fixtures/reference/sd15/noise.npy")).into_dimensionality::<Ix4>().unwrap()
}

/// The parameters of the `sd15/txt2img_euler` reference case, with `loras`.
fn reference_params(loras: Vec<(String, f32)>) -> GenerateParams {
    let case = &reference()["cases"][0];
    GenerateParams {
        prompt: case["prompt"].as_str().unwrap().to_string(),
        negative_prompt: case["negative_prompt"].as_str().unwrap().to_string(),
        num_inference_steps: case["num_inference_steps"].as_u64().unwrap() as u32,
        guidance_scale: case["guidance_scale"].as_f64().unwrap() as f32,
        width: case["width"].as_u64().unwrap() as u32,
        height: case["height"].as_u64().unwrap() as u32,
        strength: 1.0,
        seed: 0,
        scheduler: SchedulerKind::Euler,
        init_image: None,
        guidance_rescale: 0.0,
        loras,
        control: vec![],
        mask: None,
    }
}

fn vm_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn merged_generations_match_diffusers_fused_reference() {
    let mut sd = shared_pipeline();
    let base = sd
        .generate_with_noise(&reference_params(vec![]), &mut Draws::initial(noise()), &mut keep_going())
        .unwrap();
    let mut report = Vec::new();
    let mut latents_by_case = BTreeMap::new();
    for case in reference()["cases"].as_array().unwrap() {
        let id = case["id"].as_str().unwrap();
        let loras = case["loras"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| (l["name"].as_str().unwrap().to_string(), l["weight"].as_f64().unwrap() as f32))
            .collect();
        let file = |key: &str| npy::read_f32(&repo_path(case["files"][key].as_str().unwrap()));
        let got = sd
            .generate_with_noise(&reference_params(loras), &mut Draws::initial(noise()), &mut keep_going())
            .unwrap();
        let latents_diff = max_abs_diff(&got.latents, &file("final_latents"));
        let image_diff = max_abs_diff(&got.image, &file("image"));
        let moved = max_abs_diff(&got.latents, &base.latents);
        report.push(format!(
            "{id}: final latents {latents_diff:.2e}, image {image_diff:.2e} (LoRA moved latents by {moved:.3})"
        ));
        assert!(latents_diff <= 1e-3, "{id}: final latents differ by {latents_diff}");
        assert!(image_diff <= 1e-3, "{id}: image differs by {image_diff}");
        // The check means something only if the adapter changes the output far beyond tolerance.
        assert!(moved > 0.1, "{id}: LoRA barely changed the latents ({moved})");
        latents_by_case.insert(id.to_string(), got.latents);
    }
    assert_eq!(report.len(), 3);
    let stacked_vs_single = max_abs_diff(
        &latents_by_case["lora/stacked_minimal1.0_cozy0.5"],
        &latents_by_case["lora/minimal_w1.0"],
    );
    assert!(stacked_vs_single > 0.01, "the second adapter changed nothing ({stacked_vs_single})");
    println!("max abs diff against diffusers' fused LoRA reference:\n{}", report.join("\n"));
}

#[test]
fn weight_zero_is_the_base_model_exactly() {
    let mut sd = shared_pipeline();
    let base = sd
        .generate_with_noise(&reference_params(vec![]), &mut Draws::initial(noise()), &mut keep_going())
        .unwrap();
    let zero = vec![("minimal-desk".to_string(), 0.0), ("cozy-desk".to_string(), 0.0)];
    let got = sd
        .generate_with_noise(&reference_params(zero), &mut Draws::initial(noise()), &mut keep_going())
        .unwrap();
    assert_eq!(got.latents, base.latents);
    assert_eq!(got.image, base.image);
    assert!(got.timings.lora_ms < 5.0, "weight 0 must not build sessions ({} ms)", got.timings.lora_ms);
}

#[test]
fn merged_sessions_are_cached_bounded_and_leave_the_base_alone() {
    // RSS is per process: measure in a process of its own, where no other test allocates.
    const CHILD: &str = "DESKGEN_TEST_LORA_MEMORY_CHILD";
    if std::env::var_os(CHILD).is_none() {
        let name = "merged_sessions_are_cached_bounded_and_leave_the_base_alone";
        let output = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", name, "--nocapture", "--test-threads=1"])
            .env(CHILD, "1")
            .output()
            .unwrap();
        println!("{}", String::from_utf8_lossy(&output.stdout));
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        return;
    }
    let mut sd = pipeline(2);
    let params = |weight: f32| reference_params(vec![("minimal-desk".into(), weight)]);
    let base_before =
        sd.generate_with_noise(&params(0.0), &mut Draws::initial(noise()), &mut keep_going()).unwrap();
    let rss_start = vm_rss_kib();

    let started = Instant::now();
    let first =
        sd.generate_with_noise(&params(1.0), &mut Draws::initial(noise()), &mut keep_going()).unwrap();
    let build_ms = started.elapsed().as_secs_f64() * 1000.0;
    let rss_after_merge = vm_rss_kib();
    let started = Instant::now();
    let again =
        sd.generate_with_noise(&params(1.0), &mut Draws::initial(noise()), &mut keep_going()).unwrap();
    let hit_ms = started.elapsed().as_secs_f64() * 1000.0;
    assert_eq!(first.latents, again.latents);
    assert_eq!(sd.cached_lora_sets(), 1);
    assert!(
        again.timings.lora_ms < first.timings.lora_ms,
        "a cache hit ({} ms) must be cheaper than a merge ({} ms)",
        again.timings.lora_ms,
        first.timings.lora_ms
    );

    // Many distinct sets: the cache holds two, memory stops growing.
    let mut rss = Vec::new();
    for i in 0..12 {
        sd.generate_with_noise(
            &params(0.1 + 0.1 * i as f32),
            &mut Draws::initial(noise()),
            &mut keep_going(),
        )
        .unwrap();
        rss.push(vm_rss_kib());
        assert!(sd.cached_lora_sets() <= 2);
    }
    let base_after =
        sd.generate_with_noise(&params(0.0), &mut Draws::initial(noise()), &mut keep_going()).unwrap();
    assert_eq!(base_after.latents, base_before.latents, "merging must never change the base sessions");
    let growth_after_warmup = rss[11] as i64 - rss[3] as i64;
    println!(
        "tiny-sd15 (unet {} KiB, text_encoder {} KiB): RSS {rss_start} KiB before merging, {rss_after_merge} KiB \
         after the first merged set (+{} KiB); after 12 more sets with cache 2: {:?} KiB (4th to 12th: {growth_after_warmup:+} KiB)\n\
         first LoRA request {build_ms:.1} ms (merge + session build {:.1} ms), cache hit {hit_ms:.1} ms (lookup {:.3} ms)",
        std::fs::metadata(tiny_sd15().join("unet/model.onnx")).unwrap().len() / 1024,
        std::fs::metadata(tiny_sd15().join("text_encoder/model.onnx")).unwrap().len() / 1024,
        rss_after_merge as i64 - rss_start as i64,
        rss,
        first.timings.lora_ms,
        again.timings.lora_ms,
    );
    // Two cached sets of tiny sessions are a few tens of MiB; unbounded caching would add that per set.
    assert!(growth_after_warmup < 64 * 1024, "RSS kept growing: {rss:?}");
}

#[test]
fn cache_size_zero_merges_per_request() {
    let mut sd = pipeline(0);
    let params = reference_params(vec![("cozy-desk".into(), 0.5)]);
    let a = sd.generate_with_noise(&params, &mut Draws::initial(noise()), &mut keep_going()).unwrap();
    let b = sd.generate_with_noise(&params, &mut Draws::initial(noise()), &mut keep_going()).unwrap();
    assert_eq!(a.latents, b.latents);
    assert_eq!(sd.cached_lora_sets(), 0);
}

#[test]
fn library_lists_rank_targets_and_trigger_words() {
    let sd = shared_pipeline();
    let library = sd.lora_library().unwrap();
    let adapters: Vec<_> = library.adapters().collect();
    assert_eq!(
        adapters.iter().map(|a| a.name.as_str()).collect::<Vec<_>>(),
        ["cozy-desk", "lcm-desk", "minimal-desk"]
    );
    let (cozy, lcm, minimal) = (adapters[0], adapters[1], adapters[2]);
    assert_eq!(minimal.rank, 4);
    assert_eq!(
        minimal.target_modules,
        [
            "text_encoder.k_proj",
            "text_encoder.out_proj",
            "text_encoder.q_proj",
            "text_encoder.v_proj",
            "unet.to_k",
            "unet.to_out.0",
            "unet.to_q",
            "unet.to_v"
        ]
    );
    assert_eq!(minimal.trigger_words, ["minimal desk", "clean lines"]);
    assert_eq!(cozy.rank, 2);
    assert_eq!(
        cozy.target_modules,
        [
            "text_encoder.fc1",
            "text_encoder.fc2",
            "unet.conv1",
            "unet.net.2",
            "unet.proj_in",
            "unet.to_k",
            "unet.to_v"
        ]
    );
    assert_eq!(cozy.trigger_words, ["cozy desk", "warm light"]);
    assert_eq!(lcm.rank, 4);
    assert_eq!(
        lcm.target_modules,
        [
            "unet.conv",
            "unet.conv1",
            "unet.conv2",
            "unet.conv_shortcut",
            "unet.net.2",
            "unet.proj",
            "unet.proj_in",
            "unet.proj_out",
            "unet.time_emb_proj",
            "unet.to_k",
            "unet.to_out.0",
            "unet.to_q",
            "unet.to_v"
        ]
    );
    assert!(lcm.trigger_words.is_empty());
}

#[test]
fn prompt_tags_are_taken_out() {
    let tagged = extract_prompt_loras("a desk <lora:cozy-desk:0.5>, warm <lora:minimal-desk> light").unwrap();
    assert_eq!(tagged.text, "a desk , warm light");
    assert_eq!(tagged.loras, [("cozy-desk".to_string(), 0.5), ("minimal-desk".to_string(), 1.0)]);
    assert_eq!(extract_prompt_loras("no tags  here").unwrap().text, "no tags  here");
    assert!(extract_prompt_loras("<lora:cozy-desk:lots>").unwrap_err().contains("not a number"));
    assert!(extract_prompt_loras("a <lora:cozy-desk").unwrap_err().contains("not closed"));
    assert!(extract_prompt_loras("<lora::1>").unwrap_err().contains("names no adapter"));
}

// ----------------------------------------------------------------------------- bad adapters

/// Writes a safetensors file of float32 tensors (and metadata) for the bad-input cases.
fn write_safetensors(path: &Path, tensors: &[(&str, Vec<usize>, Vec<f32>)], metadata: &[(&str, &str)]) {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, shape, values) in tensors {
        let start = data.len();
        for v in values {
            data.extend_from_slice(&v.to_le_bytes());
        }
        header.insert(
            name.to_string(),
            json!({"dtype": "F32", "shape": shape, "data_offsets": [start, data.len()]}),
        );
    }
    if !metadata.is_empty() {
        let meta: serde_json::Map<String, Value> =
            metadata.iter().map(|(k, v)| (k.to_string(), Value::String(v.to_string()))).collect();
        header.insert("__metadata__".into(), Value::Object(meta));
    }
    let json = serde_json::to_vec(&header).unwrap();
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&json);
    bytes.extend_from_slice(&data);
    std::fs::write(path, bytes).unwrap();
}

/// A kohya module with the given down / up shapes, filled with small values.
fn kohya(module: &str, down: Vec<usize>, up: Vec<usize>) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let fill = |shape: &Vec<usize>| vec![0.01; shape.iter().product()];
    vec![
        (format!("{module}.lora_down.weight"), down.clone(), fill(&down)),
        (format!("{module}.lora_up.weight"), up.clone(), fill(&up)),
        (format!("{module}.alpha"), vec![], vec![1.0]),
    ]
}

fn write_kohya(path: &Path, tensors: Vec<(String, Vec<usize>, Vec<f32>)>, metadata: &[(&str, &str)]) {
    let tensors: Vec<(&str, Vec<usize>, Vec<f32>)> =
        tensors.iter().map(|(n, s, v)| (n.as_str(), s.clone(), v.clone())).collect();
    write_safetensors(path, &tensors, metadata);
}

const TO_Q: &str = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q";

/// Scans `dir` with tiny-sd15 (or `model`) and returns the rejections by file name.
fn scan(dir: &Path, model: &Path) -> (Vec<String>, BTreeMap<String, LoraError>) {
    let mut sd = StableDiffusion::load(&runtime(), model).unwrap();
    let rejected = sd.load_loras(&options(dir, 1)).unwrap();
    let names = sd.lora_library().unwrap().adapters().map(|a| a.name.clone()).collect();
    let rejected = rejected
        .into_iter()
        .map(|r| (r.path.file_name().unwrap().to_string_lossy().into_owned(), r.error))
        .collect();
    (names, rejected)
}

#[test]
fn bad_adapter_files_are_skipped_with_clear_reasons() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::copy(repo_path("onnx/loras/cozy-desk.safetensors"), d.join("good.safetensors")).unwrap();
    std::fs::write(d.join("garbage.safetensors"), b"this is not a safetensors file at all").unwrap();
    let whole = std::fs::read(repo_path("onnx/loras/minimal-desk.safetensors")).unwrap();
    std::fs::write(d.join("truncated.safetensors"), &whole[..whole.len() / 2]).unwrap();
    let mut bad_json = 20u64.to_le_bytes().to_vec();
    bad_json.extend_from_slice(b"{\"a\": not json at al");
    std::fs::write(d.join("bad-header.safetensors"), bad_json).unwrap();
    write_kohya(&d.join("rank-mismatch.safetensors"), kohya(TO_Q, vec![4, 64], vec![64, 2]), &[]);
    write_kohya(&d.join("shape-mismatch.safetensors"), kohya(TO_Q, vec![2, 99], vec![64, 2]), &[]);
    write_kohya(&d.join("wrong-out.safetensors"), kohya(TO_Q, vec![2, 64], vec![32, 2]), &[]);
    write_kohya(
        &d.join("sdxl-keys.safetensors"),
        kohya("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", vec![2, 32], vec![32, 2]),
        &[],
    );
    write_kohya(
        &d.join("sdxl-metadata.safetensors"),
        kohya(TO_Q, vec![2, 64], vec![64, 2]),
        &[("ss_base_model_version", "sdxl_base_v1-0")],
    );
    write_kohya(
        &d.join("unknown-module.safetensors"),
        kohya("lora_unet_not_a_module", vec![2, 64], vec![64, 2]),
        &[],
    );
    write_kohya(&d.join("bad name.safetensors"), kohya(TO_Q, vec![2, 64], vec![64, 2]), &[]);
    write_safetensors(
        &d.join("dora.safetensors"),
        &[
            ("unet.x.lora_A.weight", vec![2, 4], vec![0.0; 8]),
            ("unet.x.lora_magnitude_vector", vec![4], vec![1.0; 4]),
        ],
        &[],
    );
    write_safetensors(&d.join("no-lora.safetensors"), &[("model.weight", vec![2, 2], vec![0.0; 4])], &[]);

    let (names, rejected) = scan(d, &tiny_sd15());
    assert_eq!(names, ["good"], "only the good adapter is listed");
    let reason =
        |file: &str| rejected.get(file).unwrap_or_else(|| panic!("{file} was not rejected")).to_string();
    let expect = |file: &str, matches: fn(&LoraError) -> bool, words: &str| {
        let error = &rejected[file];
        assert!(matches(error), "{file}: unexpected error {error:?}");
        assert!(reason(file).contains(words), "{file}: {:?} lacks {words:?}", reason(file));
    };
    expect("garbage.safetensors", |e| matches!(e, LoraError::Corrupt { .. }), "is corrupt");
    expect("truncated.safetensors", |e| matches!(e, LoraError::Corrupt { .. }), "does not fit");
    expect("bad-header.safetensors", |e| matches!(e, LoraError::Corrupt { .. }), "not valid JSON");
    expect("rank-mismatch.safetensors", |e| matches!(e, LoraError::Shape { .. }), "rank mismatch");
    expect("shape-mismatch.safetensors", |e| matches!(e, LoraError::Shape { .. }), "[64, 64]");
    expect(
        "wrong-out.safetensors",
        |e| matches!(e, LoraError::Shape { .. }),
        "does not give the weight's shape",
    );
    expect("sdxl-keys.safetensors", |e| matches!(e, LoraError::WrongFamily { .. }), "is for SDXL");
    expect("sdxl-metadata.safetensors", |e| matches!(e, LoraError::WrongFamily { .. }), "is for SDXL");
    expect("unknown-module.safetensors", |e| matches!(e, LoraError::UnknownTarget { .. }), "not_a_module");
    expect("bad name.safetensors", |e| matches!(e, LoraError::Format { .. }), "no path separators");
    expect("dora.safetensors", |e| matches!(e, LoraError::Format { .. }), "DoRA");
    expect("no-lora.safetensors", |e| matches!(e, LoraError::Format { .. }), "unexpected tensor");
    assert_eq!(rejected.len(), 12);
}

#[test]
fn sd15_adapters_do_not_fit_sdxl() {
    let (names, rejected) = scan(&repo_path("onnx/loras"), &repo_path("onnx/fixtures/tiny-sdxl"));
    // lcm-desk names no base model and the two tiny UNets share their block widths, so every
    // module it adapts exists in the tiny SDXL with the same shape: it loads there too.
    assert_eq!(names, ["lcm-desk"]);
    // cozy-desk declares sd_v1; minimal-desk's shapes give it away.
    assert!(matches!(rejected["cozy-desk.safetensors"], LoraError::WrongFamily { .. }));
    assert!(matches!(rejected["minimal-desk.safetensors"], LoraError::Shape { .. }), "{:?}", rejected);
}

/// A copy of tiny-sd15 made of links, with `unet/weights_map.json` replaced by `map` (or removed).
fn model_with_unet_map(root: &Path, map: Option<&str>) -> PathBuf {
    let model = root.join("model");
    for entry in walk(&tiny_sd15()) {
        let relative = entry.strip_prefix(tiny_sd15()).unwrap();
        let target = model.join(relative);
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        if relative == Path::new("unet/weights_map.json") {
            if let Some(map) = map {
                std::fs::write(&target, map).unwrap();
            }
        } else {
            std::os::unix::fs::symlink(&entry, &target).unwrap();
        }
    }
    model
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() { files.extend(walk(&path)) } else { files.push(path) }
    }
    files
}

#[test]
fn a_model_without_a_matching_weights_map_takes_no_unet_adapters() {
    let root = tempfile::tempdir().unwrap();
    let model = model_with_unet_map(root.path(), None);
    let (names, rejected) = scan(&repo_path("onnx/loras"), &model);
    assert!(names.is_empty());
    let reason = rejected["minimal-desk.safetensors"].to_string();
    assert!(reason.contains("weights_map.json is missing") && reason.contains("export_sd.sh"), "{reason}");

    let root = tempfile::tempdir().unwrap();
    let stale = std::fs::read_to_string(tiny_sd15().join("unet/weights_map.json"))
        .unwrap()
        .replace("\"onnx_sha256\": \"", "\"onnx_sha256\": \"00");
    let model = model_with_unet_map(root.path(), Some(&stale));
    let (_, rejected) = scan(&repo_path("onnx/loras"), &model);
    assert!(rejected["cozy-desk.safetensors"].to_string().contains("another export"), "{rejected:?}");
}

#[test]
fn bad_requests_name_the_problem_and_leave_the_pipeline_working() {
    let mut sd = shared_pipeline();
    let mut run = |loras: Vec<(&str, f32)>| {
        let loras = loras.into_iter().map(|(n, w)| (n.to_string(), w)).collect();
        let params = GenerateParams { num_inference_steps: 1, ..reference_params(loras) };
        sd.generate(&params, &mut keep_going())
    };
    let unknown = run(vec![("../minimal-desk", 1.0)]).unwrap_err();
    assert!(
        matches!(&unknown, DiffusionError::Lora(LoraError::Unknown { known, .. }) if known == &["cozy-desk", "lcm-desk", "minimal-desk"]),
        "{unknown:?}"
    );
    assert!(unknown.to_string().contains("known: cozy-desk, lcm-desk, minimal-desk"));
    for weight in [100.0, -5.0, f32::NAN, f32::INFINITY] {
        let error = run(vec![("minimal-desk", weight)]).unwrap_err();
        assert!(matches!(error, DiffusionError::Lora(LoraError::Weight { .. })), "{weight}: {error:?}");
    }
    // Negative weights inside the bound are a known technique (subtracting a style): allowed.
    run(vec![("minimal-desk", -0.5)]).expect("negative weight within the bound works");
    run(vec![]).expect("requests without LoRA still work");
}

#[test]
fn an_adapter_broken_after_listing_fails_that_request_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fragile.safetensors");
    let module = kohya(TO_Q, vec![2, 64], vec![64, 2]);
    write_kohya(&path, module.clone(), &[]);
    let mut sd = StableDiffusion::load(&runtime(), tiny_sd15()).unwrap();
    assert!(sd.load_loras(&options(dir.path(), 2)).unwrap().is_empty());
    // Same header, NaN values: found only when the values are read for a merge.
    let poisoned: Vec<_> =
        module.into_iter().map(|(n, s, v)| (n, s, v.iter().map(|_| f32::NAN).collect())).collect();
    write_kohya(&path, poisoned, &[]);
    let params = GenerateParams { num_inference_steps: 1, ..reference_params(vec![("fragile".into(), 1.0)]) };
    let error = sd.generate(&params, &mut keep_going()).unwrap_err();
    assert!(error.to_string().contains("NaN"), "{error}");
    std::fs::write(&path, b"gone").unwrap();
    let error = sd.generate(&params, &mut keep_going()).unwrap_err();
    assert!(matches!(error, DiffusionError::Lora(LoraError::Corrupt { .. })), "{error:?}");
    let plain = GenerateParams { loras: vec![], ..params };
    sd.generate(&plain, &mut keep_going()).expect("the base model is unaffected");
}

// ----------------------------------------------------------------------------- real server

async fn post(server: &TestServer, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new().post(server.url("/v1/generate")).json(&body).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_lists_and_applies_adapters() {
    let data = tempfile::tempdir().unwrap();
    let loras = tempfile::tempdir().unwrap();
    for file in ["minimal-desk.safetensors", "minimal-desk.json", "cozy-desk.safetensors", "cozy-desk.txt"] {
        std::fs::copy(repo_path("onnx/loras").join(file), loras.path().join(file)).unwrap();
    }
    std::fs::write(loras.path().join("corrupt.safetensors"), b"\x10\x00\x00\x00\x00\x00\x00\x00{}").unwrap();
    let server = start_real_guarded(
        data.path(),
        &["--lora-dir", loras.path().to_str().unwrap(), "--max-lora-weight", "1.5", "--lora-cache-size", "1"],
    )
    .await;

    let info: Value = reqwest::get(server.url("/info")).await.unwrap().json().await.unwrap();
    assert_eq!(info["limits"]["max_lora_weight"], 1.5);
    let listed = info["loras"].as_array().unwrap();
    assert_eq!(listed.len(), 2, "the corrupt file is skipped: {listed:?}");
    assert_eq!(listed[0]["name"], "cozy-desk");
    assert_eq!(listed[0]["rank"], 2);
    assert_eq!(listed[0]["trigger_words"], json!(["cozy desk", "warm light"]));
    assert_eq!(listed[1]["name"], "minimal-desk");
    assert_eq!(listed[1]["rank"], 4);
    assert!(listed[1]["target_modules"].as_array().unwrap().contains(&json!("unet.to_q")));

    use deskgen::api::grpc::pb;
    let mut client = pb::info_client::InfoClient::new(server.grpc_channel().await);
    let grpc = client.get_info(pb::GetInfoRequest {}).await.unwrap().into_inner();
    let minimal = grpc.loras.iter().find(|l| l.name == "minimal-desk").unwrap();
    assert_eq!(
        (minimal.rank, minimal.trigger_words.clone()),
        (4, vec!["minimal desk".into(), "clean lines".into()])
    );
    assert!(minimal.target_modules.contains(&"text_encoder.q_proj".to_string()));
    assert_eq!(grpc.limits.unwrap().max_lora_weight, 1.5);

    let small = json!({"num_inference_steps": 2, "width": 64, "height": 64, "seed": 7});
    let with = |extra: Value| {
        let mut body = small.clone();
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        body
    };
    // By field, by prompt tag, and both at once.
    let requests = [
        with(json!({"prompt": "a tidy desk", "loras": [{"name": "minimal-desk", "weight": 0.8}]})),
        with(json!({"prompt": "a tidy desk <lora:cozy-desk:0.5>"})),
        with(json!({"prompt": "<lora:cozy-desk:1.2> a tidy desk", "loras": [{"name": "minimal-desk"}]})),
    ];
    let mut results = Vec::new();
    for body in requests {
        let (status, accepted) = post(&server, body.clone()).await;
        assert_eq!(status, 202, "{body}: {accepted}");
        let result = poll_final(&server, accepted["task_id"].as_str().unwrap(), None).await;
        assert_eq!(result["status"], "done", "{result}");
        assert!(result["processed_image_url"].is_string(), "{result}");
        assert!(result["warnings"].as_array().is_none_or(|w| w.is_empty()), "{result}");
        let prompt = result["prompt_used"].as_str().unwrap().to_string();
        assert!(!prompt.contains("<lora"), "tags leave the prompt: {prompt}");
        assert!(result["timings_ms"]["lora"].as_f64().is_some(), "{result}");
        results.push(prompt);
    }
    assert!(results[0].contains("minimal desk, clean lines"), "{}", results[0]);
    assert!(
        results[1].contains("cozy desk, warm light") && !results[1].contains("minimal desk"),
        "{}",
        results[1]
    );
    assert!(results[2].contains("minimal desk") && results[2].contains("cozy desk"), "{}", results[2]);

    // Refusals: unknown names list the known ones; path-like names; bounds; malformed tags.
    let refusals = [
        (
            json!({"prompt": "d", "loras": [{"name": "vintage"}]}),
            "Unknown LoRA 'vintage'; known: cozy-desk, minimal-desk.",
        ),
        (json!({"prompt": "d <lora:vintage:1>"}), "Unknown LoRA 'vintage'; known: cozy-desk, minimal-desk."),
        (json!({"prompt": "d", "loras": [{"name": "../minimal-desk"}]}), "no path separators"),
        (
            json!({"prompt": "d", "loras": [{"name": "minimal-desk", "weight": 100.0}]}),
            "between -1.5 and 1.5",
        ),
        (json!({"prompt": "d", "loras": [{"name": "minimal-desk", "weight": -2.0}]}), "between -1.5 and 1.5"),
        (json!({"prompt": "d <lora:cozy-desk:9>"}), "between -1.5 and 1.5"),
        (json!({"prompt": "d <lora:cozy-desk:heavy>"}), "not a number"),
        (json!({"prompt": "d", "loras": [{"name": "corrupt"}]}), "Unknown LoRA 'corrupt'"),
    ];
    for (body, message) in refusals {
        let (status, answer) = post(&server, body.clone()).await;
        assert_eq!(status, 422, "{body}: {answer}");
        assert!(answer.to_string().contains(message), "{body}: {answer} lacks {message:?}");
    }
    // gRPC: an unset weight means 1, as in REST; unknown names are INVALID_ARGUMENT.
    let mut generate = pb::generate_client::GenerateClient::new(server.grpc_channel().await);
    let request = |name: &str| pb::GenerateRequest {
        prompt: Some("a tidy desk".into()),
        num_inference_steps: Some(2),
        width: Some(64),
        height: Some(64),
        loras: vec![pb::LoraWeight { name: name.into(), weight: None }],
        ..Default::default()
    };
    let accepted = generate.generate(request("cozy-desk")).await.unwrap().into_inner();
    let result = poll_final(&server, &accepted.task_id, None).await;
    assert_eq!(result["status"], "done", "{result}");
    assert!(result["prompt_used"].as_str().unwrap().contains("cozy desk"), "{result}");
    let refused = generate.generate(request("vintage")).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(
        refused.message().contains("known: cozy-desk, lcm-desk, minimal-desk")
            || format!("{refused:?}").contains("known: cozy-desk")
    );

    let (status, _) = post(&server, with(json!({"prompt": "still fine"}))).await;
    assert_eq!(status, 202, "the service keeps working after refusals");
    server.stop().await;
}
