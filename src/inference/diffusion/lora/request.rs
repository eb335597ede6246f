//! What a request may say about adapters: `<lora:name[:weight]>` tags in its prompt, and the
//! rule adapter names follow.

/// Adapter names are plain file names: letters, digits, `.`, `_`, `-`, not starting with `.`.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "LoRA name {name:?} must be 1 to 128 letters, digits, '.', '_' or '-' (no path separators), not starting with '.'"
        ))
    }
}

/// `<lora:name>` or `<lora:name:weight>` tags taken out of a prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptLoras {
    /// The prompt without the tags (whitespace collapsed where a tag was).
    pub text: String,
    /// (name, weight) per tag, in order; weight 1 when the tag gives none.
    pub loras: Vec<(String, f32)>,
}

/// Takes `<lora:name[:weight]>` tags out of `prompt`; `Err` names a malformed tag.
pub fn extract_prompt_loras(prompt: &str) -> Result<PromptLoras, String> {
    let mut text = String::with_capacity(prompt.len());
    let mut loras = Vec::new();
    let mut rest = prompt;
    while let Some(start) = rest.find("<lora:") {
        text.push_str(&rest[..start]);
        let after = &rest[start + "<lora:".len()..];
        let end =
            after.find('>').ok_or_else(|| format!("LoRA tag '{}' is not closed with '>'", &rest[start..]))?;
        let body = &after[..end];
        let tag = &rest[start..start + "<lora:".len() + end + 1];
        let (name, weight) = match body.rsplit_once(':') {
            Some((name, weight)) => {
                let weight = weight
                    .trim()
                    .parse::<f32>()
                    .map_err(|_| format!("LoRA tag '{tag}' has weight '{weight}', which is not a number"))?;
                (name.trim(), weight)
            }
            None => (body.trim(), 1.0),
        };
        if name.is_empty() {
            return Err(format!("LoRA tag '{tag}' names no adapter"));
        }
        loras.push((name.to_string(), weight));
        text.push(' ');
        rest = &after[end + 1..];
    }
    text.push_str(rest);
    let text = if loras.is_empty() { text } else { text.split_whitespace().collect::<Vec<_>>().join(" ") };
    Ok(PromptLoras { text, loras })
}
