//! Image captioning with an ONNX vision-encoder-decoder in optimum's export layout.
//!
//! A directory holds `encoder_model.onnx` (`pixel_values` → `last_hidden_state`), the decoder
//! either merged (`decoder_model_merged.onnx`, whose `use_cache_branch` input picks the first step
//! or a cached step) or split (`decoder_model.onnx` + `decoder_with_past_model.onnx`), plus
//! `tokenizer.json`, `generation_config.json` and `preprocessor_config.json`. Decoding is greedy or
//! beam search with the key/value cache: each step feeds only the newest token and the previous
//! step's `present.*` outputs back as `past_key_values.*`. Beam search follows transformers'
//! `generate` (4.57) so that the same model picks the same tokens.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use image::RgbImage;
use image::imageops::FilterType;
use ndarray::{Array2, Array4, ArrayD, Axis, IxDyn};
use ort::session::{Session, SessionInputValue, SessionOutputs};
use ort::value::Tensor;
use serde::Deserialize;
use tokenizers::Tokenizer;

use super::ModelFile;
use crate::inference::{Runtime, RuntimeError};

const PAST_PREFIX: &str = "past_key_values.";
const PRESENT_PREFIX: &str = "present.";

/// Errors while loading a captioner or generating with it.
#[derive(Debug, thiserror::Error)]
pub enum CaptionError {
    /// A file of the layout is missing.
    #[error(
        "captioner file {path} not found (expected the optimum ONNX layout: encoder_model.onnx, decoder_model_merged.onnx or decoder_model.onnx + decoder_with_past_model.onnx, tokenizer.json, generation_config.json, preprocessor_config.json)"
    )]
    Missing {
        /// The missing file.
        path: PathBuf,
    },
    /// A JSON configuration file could not be read.
    #[error("cannot read {path}: {reason}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// ONNX Runtime could not build a session.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// The graphs do not have the inputs and outputs of the layout.
    #[error("captioner {model} does not fit: {reason}")]
    Model {
        /// Which graph.
        model: &'static str,
        /// What was wrong.
        reason: String,
    },
    /// ONNX Runtime failed while running a graph.
    #[error("captioner {model} failed: {reason}")]
    Inference {
        /// Which graph.
        model: &'static str,
        /// ONNX Runtime's message.
        reason: String,
    },
    /// Generation settings that cannot work.
    #[error("invalid generation options: {0}")]
    Options(String),
    /// The tokenizer could not turn tokens back into text.
    #[error("cannot decode caption tokens: {0}")]
    Tokenizer(String),
}

/// How tokens are chosen.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationOptions {
    /// 1 for greedy search, more for beam search.
    pub num_beams: usize,
    /// Most tokens generated after the start token (an end token included).
    pub max_new_tokens: usize,
    /// The end token is suppressed until this many tokens were generated.
    pub min_new_tokens: usize,
    /// Finished beams score `sum(log p) / length^length_penalty`.
    pub length_penalty: f32,
    /// Stop beam search as soon as `num_beams` beams have finished.
    pub early_stopping: bool,
}

/// The fields of `generation_config.json` (and their transformers defaults) that decoding uses.
#[derive(Debug, Deserialize)]
struct GenerationConfig {
    decoder_start_token_id: Option<i64>,
    bos_token_id: Option<i64>,
    #[serde(default)]
    eos_token_id: Option<OneOrMany>,
    max_length: Option<usize>,
    max_new_tokens: Option<usize>,
    min_new_tokens: Option<usize>,
    num_beams: Option<usize>,
    length_penalty: Option<f32>,
    early_stopping: Option<serde_json::Value>,
}

impl GenerationConfig {
    /// The decoding options this config asks for, transformers' defaults where it is silent.
    fn options(&self) -> GenerationOptions {
        GenerationOptions {
            num_beams: self.num_beams.unwrap_or(1),
            // transformers' max_length counts the start token; its default is 20.
            max_new_tokens: self.max_new_tokens.unwrap_or(self.max_length.unwrap_or(20).saturating_sub(1)),
            min_new_tokens: self.min_new_tokens.unwrap_or(0),
            length_penalty: self.length_penalty.unwrap_or(1.0),
            early_stopping: self
                .early_stopping
                .as_ref()
                .and_then(serde_json::Value::as_bool)
                .unwrap_or(false),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(i64),
    Many(Vec<i64>),
}

/// The fields of `preprocessor_config.json` (a ViT-style image processor) that preprocessing uses.
#[derive(Debug, Deserialize)]
struct PreprocessorConfig {
    #[serde(default = "yes")]
    do_resize: bool,
    size: Option<HashMap<String, u32>>,
    #[serde(default = "bilinear")]
    resample: u32,
    #[serde(default = "yes")]
    do_rescale: bool,
    #[serde(default = "one_255th")]
    rescale_factor: f32,
    #[serde(default = "yes")]
    do_normalize: bool,
    image_mean: Option<Vec<f32>>,
    image_std: Option<Vec<f32>>,
}

fn yes() -> bool {
    true
}
fn bilinear() -> u32 {
    2
}
fn one_255th() -> f32 {
    1.0 / 255.0
}

enum Decoder {
    /// One graph for both the first step and the cached steps.
    Merged(Session),
    /// A graph for the first step and one for the cached steps.
    Split { first: Session, with_past: Session },
}

/// Shape of one cache entry, with the batch and sequence axes left open.
struct CacheEntry {
    past: String,
    present: String,
    /// Dimensions; `None` for the batch (axis 0) and past sequence (axis 2) axes.
    dims: Vec<Option<usize>>,
}

/// A loaded captioner.
pub struct Captioner {
    encoder: Session,
    decoder: Decoder,
    tokenizer: Tokenizer,
    cache: Vec<CacheEntry>,
    start_token: i64,
    eos_tokens: Vec<i64>,
    defaults: GenerationOptions,
    preprocessor: PreprocessorConfig,
    models: Vec<ModelFile>,
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, CaptionError> {
    if !path.is_file() {
        return Err(CaptionError::Missing { path: path.to_path_buf() });
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| CaptionError::Config { path: path.to_path_buf(), reason: e.to_string() })?;
    serde_json::from_str(&text)
        .map_err(|e| CaptionError::Config { path: path.to_path_buf(), reason: e.to_string() })
}

fn session(
    runtime: &Runtime,
    dir: &Path,
    file: &str,
    models: &mut Vec<ModelFile>,
) -> Result<Session, CaptionError> {
    let path = dir.join(file);
    if !path.is_file() {
        return Err(CaptionError::Missing { path });
    }
    let session = runtime.session(&path)?;
    let id = format!("captioner-{}", file.trim_end_matches(".onnx").replace('_', "-"));
    models.push(super::describe(&id, &path, &session)?);
    Ok(session)
}

impl Captioner {
    /// Loads a captioner directory in optimum's layout.
    pub fn load(runtime: &Runtime, dir: &Path) -> Result<Captioner, CaptionError> {
        let generation: GenerationConfig = read_json(&dir.join("generation_config.json"))?;
        let preprocessor: PreprocessorConfig = read_json(&dir.join("preprocessor_config.json"))?;
        let tokenizer_path = dir.join("tokenizer.json");
        if !tokenizer_path.is_file() {
            return Err(CaptionError::Missing { path: tokenizer_path });
        }
        let tokenizer = Tokenizer::from_file(&tokenizer_path)
            .map_err(|e| CaptionError::Config { path: tokenizer_path.clone(), reason: e.to_string() })?;

        let mut models = Vec::new();
        let encoder = session(runtime, dir, "encoder_model.onnx", &mut models)?;
        let decoder = if dir.join("decoder_model_merged.onnx").is_file() {
            Decoder::Merged(session(runtime, dir, "decoder_model_merged.onnx", &mut models)?)
        } else {
            let first = session(runtime, dir, "decoder_model.onnx", &mut models)?;
            let with_past = session(runtime, dir, "decoder_with_past_model.onnx", &mut models)?;
            Decoder::Split { first, with_past }
        };

        if !encoder.inputs().iter().any(|o| o.name() == "pixel_values") {
            return Err(CaptionError::Model {
                model: "encoder",
                reason: "no input named pixel_values".into(),
            });
        }
        let cache = match &decoder {
            Decoder::Merged(s) | Decoder::Split { with_past: s, .. } => cache_entries(s)?,
        };

        let start_token = generation.decoder_start_token_id.or(generation.bos_token_id).ok_or_else(|| {
            CaptionError::Config {
                path: dir.join("generation_config.json"),
                reason: "neither decoder_start_token_id nor bos_token_id is set".into(),
            }
        })?;
        let eos_tokens = match &generation.eos_token_id {
            Some(OneOrMany::One(id)) => vec![*id],
            Some(OneOrMany::Many(ids)) => ids.clone(),
            None => Vec::new(),
        };
        let defaults = generation.options();
        Ok(Captioner {
            encoder,
            decoder,
            tokenizer,
            cache,
            start_token,
            eos_tokens,
            defaults,
            preprocessor,
            models,
        })
    }

    /// The options `generation_config.json` asks for.
    pub fn default_options(&self) -> GenerationOptions {
        self.defaults.clone()
    }

    /// The captioner's model files, for `/info`.
    pub fn models(&self) -> &[ModelFile] {
        &self.models
    }

    /// A caption for the image.
    pub fn caption(&mut self, image: &RgbImage, options: &GenerationOptions) -> Result<String, CaptionError> {
        let tokens = self.generate(&self.preprocess(image), options)?;
        let ids: Vec<u32> = tokens.iter().filter_map(|&t| u32::try_from(t).ok()).collect();
        let text = self.tokenizer.decode(&ids, true).map_err(|e| CaptionError::Tokenizer(e.to_string()))?;
        Ok(text.trim().to_string())
    }

    /// `pixel_values` `[1, 3, H, W]` as the image processor would make them.
    pub fn preprocess(&self, image: &RgbImage) -> Array4<f32> {
        let p = &self.preprocessor;
        let resized;
        let image = match (p.do_resize, target_size(p, image)) {
            (true, Some((width, height))) => {
                let filter = match p.resample {
                    0 => FilterType::Nearest,
                    3 => FilterType::CatmullRom,
                    1 => FilterType::Lanczos3,
                    _ => FilterType::Triangle,
                };
                resized = image::imageops::resize(image, width, height, filter);
                &resized
            }
            _ => image,
        };
        let mean = p.image_mean.clone().unwrap_or_else(|| vec![0.5; 3]);
        let std = p.image_std.clone().unwrap_or_else(|| vec![0.5; 3]);
        let (width, height) = image.dimensions();
        Array4::from_shape_fn((1, 3, height as usize, width as usize), |(_, c, y, x)| {
            let mut v = f32::from(image.get_pixel(x as u32, y as u32).0[c]);
            if p.do_rescale {
                v *= p.rescale_factor;
            }
            if p.do_normalize {
                v = (v - mean[c % mean.len()]) / std[c % std.len()];
            }
            v
        })
    }

    /// Generated token ids for `pixel_values`, starting with the decoder start token and ending
    /// with the end token when one was generated (transformers' `generate` output).
    pub fn generate(
        &mut self,
        pixel_values: &Array4<f32>,
        options: &GenerationOptions,
    ) -> Result<Vec<i64>, CaptionError> {
        if options.num_beams == 0 {
            return Err(CaptionError::Options("num_beams must be at least 1".into()));
        }
        if options.max_new_tokens == 0 {
            return Err(CaptionError::Options("max_new_tokens must be at least 1".into()));
        }
        let encoded = self.encode(pixel_values)?;
        if options.num_beams == 1 {
            self.greedy(&encoded, options)
        } else {
            self.beam_search(&encoded, options)
        }
    }

    fn encode(&mut self, pixel_values: &Array4<f32>) -> Result<ArrayD<f32>, CaptionError> {
        let fail = |e: ort::Error| CaptionError::Inference { model: "encoder", reason: e.to_string() };
        let input = Tensor::from_array(pixel_values.clone()).map_err(fail)?;
        let outputs = self.encoder.run(ort::inputs!["pixel_values" => input]).map_err(fail)?;
        let hidden = outputs.get("last_hidden_state").unwrap_or(&outputs[0]);
        Ok(hidden.try_extract_array::<f32>().map_err(fail)?.to_owned())
    }

    fn greedy(
        &mut self,
        encoded: &ArrayD<f32>,
        options: &GenerationOptions,
    ) -> Result<Vec<i64>, CaptionError> {
        let mut sequence = vec![self.start_token];
        let mut past: Option<Vec<ArrayD<f32>>> = None;
        for step in 0..options.max_new_tokens {
            let last = *sequence.last().expect("the sequence starts with the start token");
            let (logits, present) = self.step(&[last], encoded, past.as_deref(), sequence.len())?;
            let mut scores = logits.row(0).to_vec();
            self.suppress_eos(&mut scores, step, options);
            let next = argmax(&scores) as i64;
            sequence.push(next);
            past = Some(present);
            if self.eos_tokens.contains(&next) {
                break;
            }
        }
        Ok(sequence)
    }

    fn beam_search(
        &mut self,
        encoded: &ArrayD<f32>,
        options: &GenerationOptions,
    ) -> Result<Vec<i64>, CaptionError> {
        let beams = options.num_beams;
        let encoded = repeat_rows(encoded, &vec![0; beams]);
        // Only the first beam is live at first, so the beams do not all pick the same tokens.
        let mut running: Vec<Beam> = (0..beams)
            .map(|i| Beam { tokens: vec![self.start_token], score: if i == 0 { 0.0 } else { -1e9 } })
            .collect();
        let mut finished: Vec<Beam> = Vec::new();
        let mut improvable = true;
        let mut past: Option<Vec<ArrayD<f32>>> = None;
        let keep = beams * 2.max(1 + self.eos_tokens.len());
        let max_length = options.max_new_tokens + 1;

        for step in 0..options.max_new_tokens {
            let last: Vec<i64> =
                running.iter().map(|b| *b.tokens.last().expect("beams are never empty")).collect();
            let (logits, present) = self.step(&last, &encoded, past.as_deref(), step + 1)?;
            let candidates = self.ranked_candidates(&logits, &running, step, options, keep);

            let length = step + 2; // tokens after this step, the start token included
            let generated = (length - 1) as f32;
            let mut next_running: Vec<(Beam, usize)> = Vec::with_capacity(beams);
            let mut newly_finished = Vec::new();
            for (rank, &(score, b, token)) in candidates.iter().enumerate() {
                let mut tokens = running[b].tokens.clone();
                tokens.push(token);
                let stops = self.eos_tokens.contains(&token) || length >= max_length;
                if stops {
                    if rank < beams && improvable && !(options.early_stopping && finished.len() >= beams) {
                        newly_finished
                            .push(Beam { tokens, score: score / generated.powf(options.length_penalty) });
                    }
                } else if next_running.len() < beams {
                    next_running.push((Beam { tokens, score }, b));
                }
            }
            let all_stopped = next_running.is_empty();
            // Merge the finished beams, keeping the best `beams` of them (older ones win ties).
            finished.extend(newly_finished);
            finished.sort_by(|a, b| b.score.total_cmp(&a.score));
            finished.truncate(beams);
            if all_stopped {
                break;
            }
            pad_with_dead_beams(&mut next_running, beams);
            let origins: Vec<usize> = next_running.iter().map(|(_, o)| *o).collect();
            past = Some(present.iter().map(|p| repeat_rows(p, &origins)).collect());
            running = next_running.into_iter().map(|(beam, _)| beam).collect();

            // transformers' default heuristic: stop once the best running beam, scored at its
            // current length, cannot beat the worst finished one.
            if finished.len() == beams {
                let worst = finished.iter().map(|b| b.score).fold(f32::INFINITY, f32::min);
                let best_possible = running[0].score / generated.powf(options.length_penalty);
                improvable &= best_possible > worst;
                if !improvable || options.early_stopping {
                    break;
                }
            }
        }
        Ok(finished.into_iter().next().map_or_else(|| running.swap_remove(0).tokens, |b| b.tokens))
    }

    /// Every continuation of every running beam, best first, the best `keep` of them.
    fn ranked_candidates(
        &self,
        logits: &Array2<f32>,
        running: &[Beam],
        step: usize,
        options: &GenerationOptions,
        keep: usize,
    ) -> Vec<(f32, usize, i64)> {
        let vocab = logits.ncols();
        let mut candidates: Vec<(f32, usize, i64)> = Vec::with_capacity(running.len() * vocab);
        for (b, beam) in running.iter().enumerate() {
            let mut log_probs = log_softmax(logits.row(b).as_slice().expect("logits rows are contiguous"));
            self.suppress_eos(&mut log_probs, step, options);
            candidates.extend(log_probs.iter().enumerate().map(|(t, &lp)| (lp + beam.score, b, t as i64)));
        }
        // torch.topk order: by score, ties to the lower flat index.
        candidates.sort_by(|a, b| {
            b.0.total_cmp(&a.0).then((a.1 * vocab + a.2 as usize).cmp(&(b.1 * vocab + b.2 as usize)))
        });
        candidates.truncate(keep);
        candidates
    }

    fn suppress_eos(&self, scores: &mut [f32], generated: usize, options: &GenerationOptions) {
        if generated < options.min_new_tokens {
            for &eos in &self.eos_tokens {
                if let Some(s) = usize::try_from(eos).ok().and_then(|i| scores.get_mut(i)) {
                    *s = f32::NEG_INFINITY;
                }
            }
        }
    }

    /// Runs the decoder for the newest token of each row; returns the last position's logits
    /// `[rows, vocab]` and the updated cache.
    fn step(
        &mut self,
        last_tokens: &[i64],
        encoded: &ArrayD<f32>,
        past: Option<&[ArrayD<f32>]>,
        total_length: usize,
    ) -> Result<(Array2<f32>, Vec<ArrayD<f32>>), CaptionError> {
        let fail = |e: ort::Error| CaptionError::Inference { model: "decoder", reason: e.to_string() };
        let rows = last_tokens.len();
        let (session, merged) = match (&mut self.decoder, past) {
            (Decoder::Merged(s), _) => (s, true),
            (Decoder::Split { first, .. }, None) => (first, false),
            (Decoder::Split { with_past, .. }, Some(_)) => (with_past, false),
        };
        let names: Vec<String> = session.inputs().iter().map(|o| o.name().to_string()).collect();
        let mut inputs: Vec<(String, SessionInputValue<'_>)> = Vec::with_capacity(names.len());
        for name in names {
            let value: SessionInputValue<'_> = if name == "input_ids" {
                Tensor::from_array(Array2::from_shape_vec((rows, 1), last_tokens.to_vec()).expect("rows x 1"))
                    .map_err(fail)?
                    .into()
            } else if name == "encoder_hidden_states" {
                Tensor::from_array(encoded.clone()).map_err(fail)?.into()
            } else if name == "use_cache_branch" {
                Tensor::from_array(ndarray::arr1(&[past.is_some()])).map_err(fail)?.into()
            } else if name == "encoder_attention_mask" {
                Tensor::from_array(Array2::<i64>::ones((rows, encoded.shape()[1]))).map_err(fail)?.into()
            } else if name == "attention_mask" || name == "decoder_attention_mask" {
                Tensor::from_array(Array2::<i64>::ones((rows, total_length))).map_err(fail)?.into()
            } else if let Some(index) = self.cache.iter().position(|c| c.past == name) {
                match past {
                    Some(past) => Tensor::from_array(past[index].clone()).map_err(fail)?.into(),
                    // The merged graph's first-step branch ignores the cache but still takes it.
                    None if merged => {
                        let shape: Vec<usize> = self.cache[index]
                            .dims
                            .iter()
                            .enumerate()
                            .map(|(axis, d)| if axis == 0 { rows } else { d.unwrap_or(0) })
                            .collect();
                        Tensor::from_array(ArrayD::<f32>::zeros(IxDyn(&shape))).map_err(fail)?.into()
                    }
                    None => continue,
                }
            } else {
                return Err(CaptionError::Model {
                    model: "decoder",
                    reason: format!("unsupported input {name}"),
                });
            };
            inputs.push((name, value));
        }
        let outputs = session.run(inputs).map_err(fail)?;
        last_logits_and_cache(&outputs, &self.cache)
    }
}

/// Pads `running` with dead copies of its last beam when fewer than `beams` continuations were left.
fn pad_with_dead_beams(running: &mut Vec<(Beam, usize)>, beams: usize) {
    while running.len() < beams {
        let (beam, origin) = running.last().cloned().expect("at least one running beam");
        running.push((Beam { score: -1e9 * 2.0, ..beam }, origin));
    }
}

/// The decoder's logits at the last position, `[rows, vocab]`, and its `present.*` outputs in the
/// order of `cache`.
fn last_logits_and_cache(
    outputs: &SessionOutputs<'_>,
    cache: &[CacheEntry],
) -> Result<(Array2<f32>, Vec<ArrayD<f32>>), CaptionError> {
    let fail = |e: ort::Error| CaptionError::Inference { model: "decoder", reason: e.to_string() };
    let logits = outputs["logits"].try_extract_array::<f32>().map_err(fail)?;
    let last = logits.shape().get(1).copied().unwrap_or(1).saturating_sub(1);
    let logits = logits
        .index_axis(Axis(1), last)
        .into_dimensionality::<ndarray::Ix2>()
        .map_err(|e| CaptionError::Model { model: "decoder", reason: format!("logits: {e}") })?
        .to_owned();
    let present = cache
        .iter()
        .map(|c| Ok(outputs[c.present.as_str()].try_extract_array::<f32>().map_err(fail)?.to_owned()))
        .collect::<Result<Vec<_>, CaptionError>>()?;
    Ok((logits, present))
}

/// Each `past_key_values.*` input of the cached decoder paired with its `present.*` output.
fn cache_entries(session: &Session) -> Result<Vec<CacheEntry>, CaptionError> {
    session
        .inputs()
        .iter()
        .filter_map(|input| input.name().strip_prefix(PAST_PREFIX).map(|suffix| (input, suffix)))
        .map(|(input, suffix)| {
            let present = format!("{PRESENT_PREFIX}{suffix}");
            if !session.outputs().iter().any(|o| o.name() == present) {
                return Err(CaptionError::Model { model: "decoder", reason: format!("no output {present}") });
            }
            let shape = input.dtype().tensor_shape().ok_or_else(|| CaptionError::Model {
                model: "decoder",
                reason: format!("{} is not a tensor", input.name()),
            })?;
            let dims = shape
                .iter()
                .enumerate()
                .map(|(axis, &d)| if axis == 0 || axis == 2 { None } else { usize::try_from(d).ok() })
                .collect();
            Ok(CacheEntry { past: input.name().to_string(), present, dims })
        })
        .collect()
}

#[derive(Debug, Clone)]
struct Beam {
    tokens: Vec<i64>,
    score: f32,
}

/// `size` in `preprocessor_config.json` as (width, height).
fn target_size(p: &PreprocessorConfig, image: &RgbImage) -> Option<(u32, u32)> {
    let size = p.size.as_ref()?;
    match (size.get("width"), size.get("height"), size.get("shortest_edge")) {
        (Some(&w), Some(&h), _) => Some((w, h)),
        (_, _, Some(&edge)) => {
            let (w, h) = image.dimensions();
            let scale = f64::from(edge) / f64::from(w.min(h));
            Some(((f64::from(w) * scale).round() as u32, (f64::from(h) * scale).round() as u32))
        }
        _ => None,
    }
}

/// Rows of `array` (axis 0) in the order given.
fn repeat_rows(array: &ArrayD<f32>, rows: &[usize]) -> ArrayD<f32> {
    array.select(Axis(0), rows)
}

fn argmax(scores: &[f32]) -> usize {
    // The first maximum wins, as torch.argmax does.
    scores
        .iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &s)| if s > best.1 { (i, s) } else { best })
        .0
}

fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = logits.iter().map(|&l| (l - max).exp()).sum();
    let log_sum = sum.ln() + max;
    logits.iter().map(|&l| l - log_sum).collect()
}
