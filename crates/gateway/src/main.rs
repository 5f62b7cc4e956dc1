//! The `realtime-gateway` binary: parses the config, installs logging and
//! metrics, starts (or connects to) PostgreSQL, and serves until SIGTERM/Ctrl-C.

use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use gateway::config::Config;
use gateway::Shared;
use tokio::net::TcpListener;

#[derive(Parser)]
#[command(name = "realtime-gateway", version, about = "Supabase-compatible realtime server")]
struct Cli {
    #[command(flatten)]
    config: Config,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve (the default).
    Serve,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,realtime_gateway=info,gateway=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    cli.config
        .validate()
        .map_err(anyhow::Error::msg)
        .context("invalid configuration")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    runtime.block_on(async move {
        match cli.command.unwrap_or(Command::Serve) {
            Command::Serve => serve(cli.config).await,
        }
    })
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .context("installing the metrics recorder")?;
    gateway::metrics::describe();
    let addr = std::net::SocketAddr::new(config.bind_addr, config.port);
    let shared = Shared::new(config);
    let _ = shared.prometheus.set(prometheus);
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    tracing::info!(addr = %listener.local_addr()?, "realtime-gateway listening");

    let shutdown = shared.shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down");
        shutdown.cancel();
    });
    gateway::server::serve(listener, Arc::clone(&shared)).await;
    tracing::info!("stopped");
    Ok(())
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = ctrl_c => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
