//! The `deskgen` command: parses the configuration and hands over to the library.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use deskgen::config::{Cli, Command};
use deskgen::pipeline::{DeskPipeline, Pipeline, PipelineConfig};
use deskgen::server::{PipelineLoader, RunningServer};

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,ort=warn".into()),
        )
        .init();
    match run(Cli::parse()).await {
        Ok(status) => ExitCode::from(status),
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<u8> {
    match cli.command {
        Command::Serve(config) => {
            let listener = bind(config.listen).await?;
            let loader = pipeline_loader(config.pipeline.clone());
            let server = deskgen::server::start(*config, listener, loader).await?;
            until_signal(server).await.map(|()| 0)
        }
        Command::Worker(config) => {
            let listener = bind(config.listen).await?;
            let loader = pipeline_loader(config.pipeline.clone());
            let server = deskgen::server::start_worker(*config, listener, loader).await?;
            until_signal(server).await.map(|()| 0)
        }
        Command::Eval(command) => {
            deskgen::commands::eval(&command, &mut std::io::stdout().lock()).map(|()| 0)
        }
        Command::Models(command) => {
            deskgen::commands::models(&command, &mut std::io::stdout().lock()).map(|()| 0)
        }
        Command::Generate(command) => deskgen::commands::generate(*command, &mut std::io::stdout()).await,
        Command::Bench(command) => {
            deskgen::commands::bench(&command, &mut std::io::stdout().lock()).map(|()| 0)
        }
    }
}

async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    let listener =
        tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))?;
    tracing::info!(%addr, "listening");
    Ok(listener)
}

/// The real pipeline, loaded over the services the node opened.
fn pipeline_loader(config: PipelineConfig) -> PipelineLoader {
    Box::new(move |services| Ok(Arc::new(DeskPipeline::load(&config, services)?) as Arc<dyn Pipeline>))
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
