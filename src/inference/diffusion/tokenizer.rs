//! The CLIP tokenizer, from the `tokenizer.json` saved next to a text encoder.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use tokenizers::{PaddingDirection, PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use super::DiffusionError;
use super::config::{read_json, required_file};

/// CLIP's byte-level BPE, padded and truncated to the text encoder's fixed context length.
pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    path: PathBuf,
    max_length: usize,
}

#[derive(Deserialize)]
struct TokenizerConfig {
    model_max_length: Option<f64>,
    pad_token: Option<SpecialToken>,
}

/// `tokenizer_config.json` writes special tokens either as a string or as an added-token object.
#[derive(Deserialize)]
#[serde(untagged)]
enum SpecialToken {
    Text(String),
    Added { content: String },
}

impl ClipTokenizer {
    /// Loads `dir/tokenizer.json`, with the context length and pad token of
    /// `dir/tokenizer_config.json` (77 and `<|endoftext|>` when it does not say).
    pub fn from_dir(dir: &Path) -> Result<ClipTokenizer, DiffusionError> {
        let path = required_file(dir, "tokenizer.json")?;
        let config_path = dir.join("tokenizer_config.json");
        let config = if config_path.is_file() {
            read_json::<TokenizerConfig>(&config_path)?
        } else {
            TokenizerConfig { model_max_length: None, pad_token: None }
        };
        // Configs without a limit store a huge float; CLIP's position table has 77 entries.
        let max_length = match config.model_max_length {
            Some(n) if (1.0..=4096.0).contains(&n) => n as usize,
            _ => 77,
        };
        let pad_token = match config.pad_token {
            Some(SpecialToken::Text(t) | SpecialToken::Added { content: t }) => t,
            None => "<|endoftext|>".to_string(),
        };
        let fail = |reason: String| DiffusionError::Tokenizer { path: path.clone(), reason };
        let mut tokenizer = Tokenizer::from_file(&path).map_err(|e| fail(e.to_string()))?;
        let pad_id = tokenizer
            .token_to_id(&pad_token)
            .ok_or_else(|| fail(format!("pad token {pad_token:?} is not in the vocabulary")))?;
        tokenizer
            .with_truncation(Some(TruncationParams { max_length, ..TruncationParams::default() }))
            .map_err(|e| fail(e.to_string()))?;
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(max_length),
            direction: PaddingDirection::Right,
            pad_id,
            pad_token,
            ..PaddingParams::default()
        }));
        Ok(ClipTokenizer { tokenizer, path, max_length })
    }

    /// The fixed sequence length every prompt is padded or truncated to.
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// Token ids of `text` with start and end tokens, exactly `max_length()` long. Longer prompts
    /// are cut (keeping the end token) with a warning, as diffusers does.
    pub fn encode(&self, text: &str) -> Result<Vec<i64>, DiffusionError> {
        let encoding = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| DiffusionError::Tokenizer { path: self.path.clone(), reason: e.to_string() })?;
        if !encoding.get_overflowing().is_empty() {
            let dropped: usize = encoding.get_overflowing().iter().map(|o| o.get_ids().len()).sum();
            tracing::warn!(
                max_length = self.max_length,
                dropped_tokens = dropped,
                "prompt is longer than CLIP's context; the end was cut off"
            );
        }
        Ok(encoding.get_ids().iter().map(|&id| i64::from(id)).collect())
    }
}
