//! The offline subcommands: `deskgen eval` and `deskgen models`.

use std::io::Write;

use anyhow::Context;

use crate::config::{EvalCommand, ModelsCommand};
use crate::inference::Runtime;
use crate::inference::vision::{ModelInfo, Vision, describe};

/// Runs the vision models over a labelled folder and prints the report.
pub fn eval(command: &EvalCommand, out: &mut impl Write) -> anyhow::Result<()> {
    let runtime = Runtime::init(&command.runtime)?;
    let vision = Vision::load(&runtime, &command.vision)?;
    let report = crate::eval::run(&command.eval, &vision)?;
    crate::eval::print(&report, command.eval.json, out)
}

/// Loads every model the pipeline uses and prints what each one is.
pub fn models(command: &ModelsCommand, out: &mut impl Write) -> anyhow::Result<()> {
    let runtime = Runtime::init(&command.runtime)?;
    let mut models = Vision::load(&runtime, &command.vision)?.models();
    for part in ["text_encoder", "text_encoder_2", "unet", "vae_encoder", "vae_decoder"] {
        let path = command.sd_model.join(part).join("model.onnx");
        if part.ends_with("_2") && !path.exists() {
            continue;
        }
        let session = runtime.session(&path)?;
        models.push(describe(&format!("sd-{part}"), &path, &session)?);
    }
    let provider = runtime.provider().as_str();
    if command.json {
        let rows: Vec<serde_json::Value> = models
            .iter()
            .map(|m| {
                let mut row = serde_json::to_value(m).expect("model info serialises");
                row["execution_provider"] = provider.into();
                row
            })
            .collect();
        writeln!(out, "{}", serde_json::to_string_pretty(&rows)?)?;
        return Ok(());
    }
    for model in &models {
        print_model(model, provider, out).context("writing the model list")?;
    }
    Ok(())
}

fn print_model(model: &ModelInfo, provider: &str, out: &mut impl Write) -> std::io::Result<()> {
    writeln!(out, "{}  ({provider})", model.id)?;
    writeln!(out, "  path    {}", model.path.display())?;
    writeln!(out, "  sha256  {}", model.sha256)?;
    writeln!(out, "  size    {} bytes", model.size_bytes)?;
    writeln!(out, "  inputs  {}", model.inputs.join(", "))?;
    writeln!(out, "  outputs {}", model.outputs.join(", "))
}
