//! The CLIP tokenizer, from the `tokenizer.json` saved next to a text encoder, or built from the
//! `vocab.json` and `merges.txt` that many exports ship instead.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::normalizers::{Lowercase, NFC, Replace, Sequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{
    AddedToken, PaddingDirection, PaddingParams, PaddingStrategy, SplitDelimiterBehavior, Tokenizer,
    TruncationParams,
};

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
    /// Loads `dir/tokenizer.json` (or, without it, CLIP's tokenizer from `dir/vocab.json` and
    /// `dir/merges.txt`), with the context length and pad token of `dir/tokenizer_config.json`
    /// (77 and `<|endoftext|>` when it does not say).
    pub fn from_dir(dir: &Path) -> Result<ClipTokenizer, DiffusionError> {
        let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
        let from_vocab = !dir.join("tokenizer.json").is_file() && vocab.is_file() && merges.is_file();
        let path = if from_vocab { vocab.clone() } else { required_file(dir, "tokenizer.json")? };
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
        let mut tokenizer = if from_vocab {
            clip_from_vocab(&vocab, &merges).map_err(fail)?
        } else {
            Tokenizer::from_file(&path).map_err(|e| fail(e.to_string()))?
        };
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

/// CLIP's start and end tokens.
const START_OF_TEXT: &str = "<|startoftext|>";
const END_OF_TEXT: &str = "<|endoftext|>";
/// Words CLIP's pre-tokenizer keeps: contractions, letter runs, single digits, symbol runs.
const CLIP_WORDS: &str = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
/// Merges CLIP's BPE uses; its `merges.txt` may list more, which CLIP itself never reads.
const CLIP_MERGES: usize = 49152 - 256 - 2;

/// The tokenizer `transformers` converts CLIP's `vocab.json` and `merges.txt` into (its
/// `CLIPConverter`), so that ids match those of the `tokenizer.json` it would save.
fn clip_from_vocab(vocab: &Path, merges: &Path) -> Result<Tokenizer, String> {
    let read = |path: &Path| std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()));
    let vocab: HashMap<String, u32> =
        serde_json::from_str(&read(vocab)?).map_err(|e| format!("vocab.json is not a token table: {e}"))?;
    let merges = parse_merges(&read(merges)?)?;
    let id = |token: &str| vocab.get(token).copied().ok_or_else(|| format!("{token} is not in vocab.json"));
    let (start, end) = (id(START_OF_TEXT)?, id(END_OF_TEXT)?);
    let bpe = BPE::builder()
        .vocab_and_merges(vocab.into_iter().collect::<Vocab>(), merges)
        .unk_token(END_OF_TEXT.into())
        .end_of_word_suffix("</w>".into())
        .build()
        .map_err(|e| e.to_string())?;
    let whitespace =
        Replace::new(tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()), " ")
            .map_err(|e| e.to_string())?;
    let words = Split::new(SplitPattern::Regex(CLIP_WORDS.into()), SplitDelimiterBehavior::Removed, true)
        .map_err(|e| e.to_string())?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer
        .with_normalizer(Some(Sequence::new(vec![NFC.into(), whitespace.into(), Lowercase.into()])))
        .with_pre_tokenizer(Some(PreSequence::new(vec![
            words.into(),
            ByteLevel::new(false, true, true).into(),
        ])))
        .with_post_processor(Some(
            RobertaProcessing::new((END_OF_TEXT.into(), end), (START_OF_TEXT.into(), start))
                .trim_offsets(false)
                .add_prefix_space(false),
        ))
        .with_decoder(Some(ByteLevel::default()));
    let special = |token: &str| AddedToken::from(token, true).normalized(true);
    tokenizer.add_special_tokens(&[special(START_OF_TEXT), special(END_OF_TEXT)]);
    Ok(tokenizer)
}

/// `merges.txt`: a `#version` line, then one `left right` pair a line, in rank order.
fn parse_merges(text: &str) -> Result<Vec<(String, String)>, String> {
    text.lines()
        .filter(|line| !line.starts_with("#version") && !line.is_empty())
        .take(CLIP_MERGES)
        .enumerate()
        .map(|(rank, line)| match line.split_once(' ') {
            Some((left, right)) if !right.contains(' ') => Ok((left.to_string(), right.to_string())),
            _ => Err(format!("merges.txt line {} is not a pair: {line:?}", rank + 2)),
        })
        .collect()
}
