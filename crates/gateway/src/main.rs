//! The `realtime-gateway` binary: parses the config, installs logging and
//! metrics, starts (or connects to) PostgreSQL, and serves until SIGTERM/Ctrl-C.
//!
//! Subcommands: `serve` (the default), `migrate`, `tables list|enable|disable`,
//! `healthcheck` (probe a running gateway: for container HEALTHCHECKs and exec probes).

use std::sync::Arc;

use anyhow::Context;
use change_ingest::embedded::EmbeddedPostgres;
use clap::{Parser, Subcommand};
use gateway::cluster::nats::{parse_urls, NatsBus, NatsOptions};
use gateway::cluster::Cluster;
use gateway::config::{Config, EmbeddedPostgres as EmbeddedMode};
use gateway::Shared;
use tokio::net::TcpListener;

#[derive(Parser)]
#[command(
    name = "realtime-gateway",
    version,
    about = "Supabase-compatible realtime server"
)]
struct Cli {
    #[command(flatten)]
    config: Config,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve WebSocket and REST (the default).
    Serve,
    /// Apply the `realtime_gateway` schema migrations and exit.
    Migrate,
    /// List, enable or disable tables for Postgres Changes.
    Tables {
        #[command(subcommand)]
        action: TablesAction,
    },
    /// Probe the gateway on this host (PORT, BIND_ADDR): exit 0 when the path
    /// answers 2xx. For Docker HEALTHCHECK and Kubernetes exec probes; needs no curl.
    Healthcheck {
        /// The path to probe: `/healthz` (alive) or `/readyz` (ready for clients).
        #[arg(long, default_value = "/healthz")]
        path: String,
        /// Give up after this many milliseconds.
        #[arg(long, default_value_t = 3000)]
        timeout_ms: u64,
    },
}

#[derive(Subcommand)]
enum TablesAction {
    /// Every eligible table, and whether it is enabled.
    List,
    /// Enable a table (`schema.table`; `table` means `public.table`).
    Enable {
        /// The table.
        table: String,
    },
    /// Disable a table.
    Disable {
        /// The table.
        table: String,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    cli.config
        .validate()
        .map_err(anyhow::Error::msg)
        .context("invalid configuration")?;
    gateway::logging::init(&cli.config).map_err(anyhow::Error::msg)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    runtime.block_on(async move {
        match cli.command.unwrap_or(Command::Serve) {
            Command::Serve => serve(cli.config).await,
            Command::Migrate => {
                let client = admin_client(&cli.config).await?;
                change_ingest::migrate(&client).await?;
                println!(
                    "realtime_gateway schema is at version {}",
                    change_ingest::SCHEMA_VERSION
                );
                Ok(())
            }
            Command::Tables { action } => tables(&cli.config, action).await,
            Command::Healthcheck { path, timeout_ms } => {
                // One blocking request (nothing else runs): an exit code, and a line on stderr if unhealthy.
                let timeout = std::time::Duration::from_millis(timeout_ms);
                if let Err(e) = gateway::health::probe(&cli.config, &path, timeout) {
                    eprintln!("unhealthy: {e}");
                    std::process::exit(1);
                }
                Ok(())
            }
        }
    })
}

async fn admin_client(config: &Config) -> anyhow::Result<tokio_postgres::Client> {
    let url = config
        .database_url()
        .context("no database configured: set DATABASE_URL (or DB_HOST, DB_USER, ...)")?;
    Ok(change_ingest::connect(&url).await?)
}

async fn tables(config: &Config, action: TablesAction) -> anyhow::Result<()> {
    let client = admin_client(config).await?;
    change_ingest::migrate(&client).await?;
    match action {
        TablesAction::List => {
            for t in change_ingest::list_tables(&client).await? {
                let mark = if t.enabled { "enabled " } else { "disabled" };
                println!("{mark}  {}.{}", t.schema, t.table);
            }
        }
        TablesAction::Enable { table } => {
            let info = change_ingest::enable_table(&client, &table).await?;
            println!("enabled {}.{}", info.schema, info.table);
        }
        TablesAction::Disable { table } => {
            let was = change_ingest::disable_table(&client, &table).await?;
            println!(
                "{} {table}",
                if was { "disabled" } else { "was not enabled:" }
            );
        }
    }
    Ok(())
}

/// Starts the throwaway database and its demo table; prints how to see an event.
async fn start_embedded(port: u16) -> anyhow::Result<EmbeddedPostgres> {
    let pg = EmbeddedPostgres::start().await?;
    let client = change_ingest::connect(pg.url()).await?;
    change_ingest::migrate(&client).await?;
    // Supabase's API roles, so tokens (and tokenless dev joins, as anon) have
    // a role to be judged as.
    client
        .batch_execute(change_ingest::authz::SUPABASE_ROLES_SQL)
        .await
        .context("creating the anon/authenticated/service_role roles")?;
    client
        .batch_execute(
            "create table if not exists public.messages (
               id bigint generated always as identity primary key,
               body text not null,
               created_at timestamptz not null default now())",
        )
        .await
        .context("creating the demo table")?;
    change_ingest::enable_table(&client, "public.messages").await?;
    println!(
        "\nNo DATABASE_URL: started a throwaway PostgreSQL (removed on exit) with table public.messages enabled.\n\
         Watch changes:   npx wscat -c 'ws://127.0.0.1:{port}/socket/websocket'\n\
         \x20 then send:    {{\"topic\":\"realtime:public:messages\",\"event\":\"phx_join\",\"payload\":{{}},\"ref\":\"1\"}}\n\
         Make a change:   psql '{}' -c \"insert into messages(body) values ('hello')\"\n",
        pg.url()
    );
    Ok(pg)
}

async fn serve(config: Config) -> anyhow::Result<()> {
    // Commit→delivery latency as a real histogram (aggregatable across replicas).
    let latency =
        metrics_exporter_prometheus::Matcher::Full(gateway::metrics::CHANGE_LATENCY.into());
    // Flow control's waits for slow readers and RLS round trips: the same 1 ms … 10 s buckets.
    let paced = metrics_exporter_prometheus::Matcher::Full(gateway::metrics::CHANGES_PACED.into());
    let rls =
        metrics_exporter_prometheus::Matcher::Full(gateway::metrics::RLS_CHECK_SECONDS.into());
    let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets_for_metric(latency, gateway::metrics::LATENCY_BUCKETS)
        .context("configuring histogram buckets")?
        .set_buckets_for_metric(paced, gateway::metrics::LATENCY_BUCKETS)
        .context("configuring histogram buckets")?
        .set_buckets_for_metric(rls, gateway::metrics::LATENCY_BUCKETS)
        .context("configuring histogram buckets")?
        .install_recorder()
        .context("installing the metrics recorder")?;
    gateway::metrics::describe();
    change_ingest::metrics::describe();
    let auth = gateway::auth::Auth::new(config.auth_settings())
        .await
        .map_err(anyhow::Error::msg)
        .context("invalid authentication configuration")?;
    let ip = config
        .bind_addr(auth.enabled())
        .map_err(anyhow::Error::msg)?;
    if !auth.enabled() {
        if ip.is_loopback() {
            tracing::warn!(
                %ip,
                "no authentication configured (API_JWT_SECRET, API_JWT_JWKS or --jwks-url): \
                 serving on loopback only, tokens are not verified"
            );
        } else {
            tracing::warn!(
                %ip,
                "INSECURE: serving on a non-loopback address without authentication; \
                 anyone who can reach it may join any channel and manage tables"
            );
        }
    }
    let addr = std::net::SocketAddr::new(ip, config.port);
    let listener = listen(addr).with_context(|| format!("binding {addr}"))?;
    let port = listener.local_addr()?.port();

    let mut embedded = None;
    let mut url = config.database_url();
    if url.is_none() && config.embedded_postgres == EmbeddedMode::Auto {
        match start_embedded(port).await {
            Ok(pg) => {
                url = Some(pg.url().to_owned());
                embedded = Some(pg);
            }
            Err(e) => tracing::warn!(
                cause = %e,
                "no database: serving Broadcast and Presence only (Postgres Changes unavailable)"
            ),
        }
    }

    let cluster = cluster(&config).await?;
    let shared = Shared::with_cluster(config, auth, cluster);
    let _ = shared.prometheus.set(prometheus);
    Cluster::start(&shared);
    let router = match &url {
        Some(url) => {
            // A bad URL or TLS setting is a startup error; an unreachable server is retried.
            change_ingest::check_url(url).context("DATABASE_URL")?;
            Some(gateway::database::attach_with_retry(&shared, url.clone()).await)
        }
        None => None,
    };
    tracing::info!(addr = %listener.local_addr()?, database = url.is_some(), "realtime-gateway listening");

    let shared2 = Arc::clone(&shared);
    tokio::spawn(async move { gateway::shutdown::on_signal(&shared2).await });
    gateway::server::serve(listener, Arc::clone(&shared)).await;
    shared.cluster.close().await;
    if let Some(router) = router {
        // Ingest stops on the shutdown token; give it what is left of the grace period.
        let deadline = shared
            .health
            .shutdown_deadline(shared.config.shutdown_grace());
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let wait = left.clamp(
            std::time::Duration::from_millis(100),
            std::time::Duration::from_secs(2),
        );
        let _ = tokio::time::timeout(wait, router).await;
    }
    if let Some(mut pg) = embedded {
        pg.stop().await;
    }
    tracing::info!("stopped");
    Ok(())
}

/// The cluster bus: NATS when `NATS_URL` is set (connecting in the background:
/// the gateway serves local clients while NATS is unreachable), else none.
async fn cluster(config: &Config) -> anyhow::Result<Cluster> {
    let Some(url) = config.nats_url.as_deref().filter(|u| !u.is_empty()) else {
        return Ok(Cluster::local());
    };
    let options = config.cluster_options();
    let bus = NatsBus::connect(NatsOptions {
        urls: parse_urls(url).map_err(anyhow::Error::msg)?,
        creds: config.nats_creds.clone(),
        name: "realtime-gateway".to_owned(),
        buffer_bytes: config.nats_buffer_bytes,
        ping_interval: (options.node_timeout / 2).max(std::time::Duration::from_secs(1)),
    })
    .await?;
    let cluster = Cluster::replicated(Arc::new(bus), options);
    tracing::info!(node = %cluster.status().node, prefix = %config.nats_subject_prefix, "cluster bus: nats");
    Ok(cluster)
}

/// Binds with a deep accept queue: tokio's default backlog of 128 drops SYNs
/// when thousands of clients reconnect at once (after a deploy, say).
fn listen(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(8192)
}
