//! The `deskgen` command: parses the configuration and hands over to the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use deskgen::config::{Cli, Command, ModelsAction};
use deskgen::hub::{HubModel, HubSettings};
use deskgen::pipeline::{DeskPipeline, Pipeline, PipelineConfig, SdModelSpec};
use deskgen::server::{PipelineLoader, RunningServer};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let _telemetry = match deskgen::telemetry::init(exporting(&cli)) {
        Ok(telemetry) => telemetry,
        Err(e) => {
            eprintln!("cannot set up trace export: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    match run(cli).await {
        Ok(status) => ExitCode::from(status),
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Where a node's spans go (`--otlp-endpoint`), and the name they carry; none for other commands.
fn exporting(cli: &Cli) -> Option<deskgen::telemetry::Exporting<'_>> {
    let host = || deskgen::server::host_name();
    let (endpoint, role, node) = match &cli.command {
        Command::Serve(c) => {
            (c.otlp_endpoint.as_deref()?, "api", format!("{}-api-{}", host(), std::process::id()))
        }
        Command::Worker(c) => (c.otlp_endpoint.as_deref()?, "worker", c.name.clone().unwrap_or_else(host)),
        _ => return None,
    };
    Some(deskgen::telemetry::Exporting { endpoint, role, node })
}

async fn run(cli: Cli) -> anyhow::Result<u8> {
    let hub = HubSettings::from_env();
    match cli.command {
        Command::Serve(config) => {
            let listener = bind(config.listen).await?;
            let loader = pipeline_loader(config.pipeline.clone(), hub)?;
            let server = deskgen::server::start(*config, listener, loader).await?;
            until_signal(server).await.map(|()| 0)
        }
        Command::Worker(config) => {
            let listener = bind(config.listen).await?;
            let loader = pipeline_loader(config.pipeline.clone(), hub)?;
            let server = deskgen::server::start_worker(*config, listener, loader).await?;
            until_signal(server).await.map(|()| 0)
        }
        Command::Eval(command) => {
            deskgen::commands::eval(&command, &mut std::io::stdout().lock()).map(|()| 0)
        }
        Command::Models(command) => match &command.action {
            Some(ModelsAction::Pull(pull)) => {
                deskgen::commands::models_pull(pull, &hub, &mut std::io::stdout()).await.map(|()| 0)
            }
            None => {
                let mut command = command;
                pull_sd_model(&mut command.sd_model, &hub).await?;
                deskgen::commands::models(&command, &mut std::io::stdout().lock()).map(|()| 0)
            }
        },
        Command::Generate(mut command) => {
            for model in &mut command.pipeline.sd_models {
                pull_sd_model(&mut model.source, &hub).await?;
            }
            deskgen::commands::generate(*command, &mut std::io::stdout()).await
        }
        Command::Bench(mut command) => {
            pull_sd_model(&mut command.sd_model, &hub).await?;
            deskgen::commands::bench(&command, &mut std::io::stdout().lock()).map(|()| 0)
        }
    }
}

/// The hub model an `--sd-model hf:REPO[@REVISION][:SUBFOLDER]` names; `None` for a folder.
fn hub_model(sd_model: &std::path::Path) -> anyhow::Result<Option<HubModel>> {
    deskgen::hub::hub_model(sd_model).map(|spec| spec.parse().context("--sd-model")).transpose()
}

/// Replaces an `--sd-model hf:…` by the folder it pulls to, with progress on stderr.
async fn pull_sd_model(sd_model: &mut PathBuf, hub: &HubSettings) -> anyhow::Result<()> {
    if let Some(model) = hub_model(sd_model)? {
        *sd_model =
            deskgen::commands::pull_with_progress(hub, &model.repo, model.subfolder.as_deref()).await?;
    }
    Ok(())
}

async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    let listener =
        tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))?;
    tracing::info!(%addr, "listening");
    Ok(listener)
}

/// The real pipeline, loaded over the services the node opened; hub models are pulled first, one
/// after the other, each one's progress in the health document while it downloads.
fn pipeline_loader(mut config: PipelineConfig, hub: HubSettings) -> anyhow::Result<PipelineLoader> {
    let pulls: Vec<(usize, HubModel)> = (config.sd_models.iter().enumerate())
        .filter_map(|(index, spec)| Some(hub_model(&spec.source).transpose()?.map(|model| (index, model))))
        .collect::<anyhow::Result<_>>()?;
    Ok(Box::new(move |services| {
        for (index, model) in pulls {
            let spec: &mut SdModelSpec = &mut config.sd_models[index];
            let status = services.downloads.start(&spec.name, model.to_string());
            tracing::info!(model = %spec.name, repo = %model, cache = %hub.cache_dir.display(), "pulling a Stable Diffusion model from the hub");
            // The loader runs on a blocking thread of the runtime, which may wait on it.
            let pulled = tokio::runtime::Handle::current().block_on(deskgen::hub::pull(
                &hub,
                &model.repo,
                model.subfolder.as_deref(),
                status.as_ref(),
            ));
            spec.source = pulled.with_context(|| format!("pulling {model} from the hub"))?;
        }
        Ok(Arc::new(DeskPipeline::load(&config, services)?) as Arc<dyn Pipeline>)
    }))
}

/// Runs `server` until it stops, or stops it gracefully on Ctrl-C / SIGTERM.
async fn until_signal(server: RunningServer) -> anyhow::Result<()> {
    let token = server.shutdown_token();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down");
        token.cancel();
    });
    server.wait().await
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler installs");
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
}
