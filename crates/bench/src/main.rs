//! `realtime-bench`: load generator and benchmark workloads for realtime-gateway.
//!
//! Workloads (see `shared/BENCHMARKS.md`): `broadcast`, `ceiling`, `idle`,
//! `slow-consumers`, `rooms` (one replica and several over NATS), `flood` (one client floods, 1,000 others measure), and the Postgres ones `changes`, `writer-cost`, `large-rows`, `rls`. Each starts its own gateway (or takes `--gateway-url`),
//! drives real protocol clients, prints a table, and writes a JSON report plus
//! an SVG plot. `--quick` finishes in under a minute (CI smoke test): it fails
//! only when the tool itself fails (nothing joined, nothing delivered), never
//! on figures.

mod ceiling;
mod client;
mod clock;
mod flood;
mod monitor;
mod pg;
mod proto;
mod report;
mod rls;
mod rooms;
mod stats;
mod sys;
mod target;
mod workloads;
mod ws;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::proto::Vsn;
use crate::workloads::Env;

#[derive(Debug, Parser)]
#[command(
    name = "realtime-bench",
    version,
    about = "Benchmark workloads for realtime-gateway"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// Flags every workload takes.
#[derive(Debug, Clone, Args)]
pub struct Common {
    /// Short run (< 60 s) for CI: checks the tool works, not the figures.
    #[arg(long)]
    pub quick: bool,
    /// Client serializer: 2.0.0 (realtime-js default) or 1.0.0.
    #[arg(long, default_value = "2.0.0", value_parser = Vsn::parse)]
    pub vsn: Vsn,
    /// Gateway binary to start [default: realtime-gateway next to this executable].
    #[arg(long)]
    pub gateway_bin: Option<PathBuf>,
    /// Measure a running deployment instead, e.g. ws://127.0.0.1:4000 (path defaults to /socket/websocket).
    /// `rooms` takes it repeatedly (one per replica); the others use the first.
    #[arg(long)]
    pub gateway_url: Vec<String>,
    /// Pid of the gateway for RSS readings (with --gateway-url).
    #[arg(long)]
    pub gateway_pid: Option<u32>,
    /// Extra environment for the started gateway, KEY=VALUE (repeatable).
    #[arg(long = "gateway-env")]
    pub gateway_env: Vec<String>,
    /// `apikey` query parameter sent by every client (needed when the gateway verifies JWTs).
    #[arg(long, env = "BENCH_APIKEY")]
    pub apikey: Option<String>,
    /// JSON report path [default: bench-results/<workload>-<timestamp>.json]; the SVG goes next to it.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Topic name (clients join realtime:<topic>).
    #[arg(long, default_value = "bench")]
    pub topic: String,
    /// Size of a delivered broadcast frame in bytes.
    #[arg(long, default_value_t = 200)]
    pub msg_bytes: usize,
    /// Connects/joins in flight at once.
    #[arg(long, default_value_t = 256)]
    pub connect_concurrency: usize,
    /// Client heartbeat interval in seconds (realtime-js: 25).
    #[arg(long, default_value_t = 25)]
    pub heartbeat_secs: u64,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// S subscribers on one topic; a publisher ramps the rate until p99 > limit or loss.
    Broadcast {
        #[command(flatten)]
        c: Common,
        /// Subscribers [default: 10000; 500 with --quick].
        #[arg(long)]
        subscribers: Option<usize>,
        /// Seconds each rate is held [default: 5; 1 with --quick].
        #[arg(long)]
        step_secs: Option<f64>,
        /// A step fails when its p99 exceeds this (ms).
        #[arg(long, default_value_t = 100.0)]
        p99_limit_ms: f64,
        /// First rate in msgs/s [default: the 1-2-5 value near 20k deliveries/s ÷ subscribers].
        #[arg(long)]
        start_rate: Option<f64>,
        /// Highest rate tried, msgs/s.
        #[arg(long, default_value_t = 1_000_000.0)]
        max_rate: f64,
        /// Skip the ceiling probe.
        #[arg(long)]
        no_ceiling: bool,
        /// Frames per write syscall in the ceiling probe.
        #[arg(long, default_value_t = 32)]
        ceiling_batch: u64,
    },
    /// The physical reference: a minimal server writing pre-encoded frames to the same readers.
    Ceiling {
        #[command(flatten)]
        c: Common,
        /// Readers [default: 10000; 500 with --quick].
        #[arg(long)]
        subscribers: Option<usize>,
        /// Seconds to blast [default: 5; 2 with --quick].
        #[arg(long)]
        secs: Option<f64>,
        /// Frames per write syscall.
        #[arg(long, default_value_t = 32)]
        batch: u64,
    },
    /// C joined clients, heartbeating: RSS per connection and joins/s.
    Idle {
        #[command(flatten)]
        c: Common,
        /// Clients [default: as many as fit the fd limit less 1000; 2000 with --quick].
        #[arg(long)]
        clients: Option<usize>,
        /// Seconds to hold them [default: 30; 3 with --quick].
        #[arg(long)]
        hold_secs: Option<f64>,
    },
    /// A clean run, then the same rate with a fraction of subscribers not reading.
    SlowConsumers {
        #[command(flatten)]
        c: Common,
        /// Subscribers [default: 1000; 300 with --quick].
        #[arg(long)]
        subscribers: Option<usize>,
        /// msgs/s [default: 100k deliveries/s ÷ subscribers; 60k with --quick].
        #[arg(long)]
        rate: Option<f64>,
        /// Seconds per phase [default: 30; 4 with --quick].
        #[arg(long)]
        secs: Option<f64>,
        /// Fraction of subscribers that stop reading.
        #[arg(long, default_value_t = 0.1)]
        slow_fraction: f64,
        /// SO_RCVBUF of slow subscribers in bytes (small, so the gateway's per-client
        /// backlog is reached within the run); 0 = kernel default.
        #[arg(long, default_value_t = 4096)]
        slow_rcvbuf: u32,
    },
    /// Postgres Changes: S subscribers (binding mix), writers at Supabase's shape, then a ramp.
    Changes {
        #[command(flatten)]
        c: Common,
        /// Use this database instead of a throwaway embedded cluster.
        #[arg(long, env = "BENCH_DATABASE_URL")]
        database_url: Option<String>,
        /// Subscribers at the Supabase shape [default: 500].
        #[arg(long)]
        subscribers: Option<usize>,
        /// Changes/s at the Supabase shape.
        #[arg(long, default_value_t = 64.0)]
        rate: f64,
        /// Seconds at the Supabase shape [default: 30; 5 with --quick].
        #[arg(long)]
        hold_secs: Option<f64>,
        /// Writer connections (rows carry writer = 0..N-1).
        #[arg(long, default_value_t = 16)]
        writers: u32,
        /// Subscribers during the ramp (same binding mix).
        #[arg(long, default_value_t = 9)]
        ramp_subscribers: usize,
        /// Ramp rates in changes/s, comma-separated [default: 1k,2k,5k,10k,15k,20k,30k,50k; 1k,5k with --quick].
        #[arg(long, value_delimiter = ',')]
        ramp: Option<Vec<f64>>,
        /// Seconds per ramp step [default: 10; 2 with --quick].
        #[arg(long)]
        step_secs: Option<f64>,
        /// A ramp step fails when its p95 exceeds this (ms).
        #[arg(long, default_value_t = 100.0)]
        p95_limit_ms: f64,
        /// Bytes of the `pad` column per row.
        #[arg(long, default_value_t = 64)]
        pad: usize,
        /// Durable commits on the embedded cluster.
        #[arg(long)]
        durable: bool,
    },
    /// 1,000 well-behaved clients measure p99 before, during and after one client floods (default limits).
    Flood {
        #[command(flatten)]
        c: Common,
        /// Bystander rooms [default: 100; 20 with --quick].
        #[arg(long)]
        rooms: Option<usize>,
        /// Subscribers per room, one connection each [default: 10].
        #[arg(long, default_value_t = 10)]
        per_room: usize,
        /// Messages per second per room.
        #[arg(long, default_value_t = 5.0)]
        rate: f64,
        /// Seconds per phase [default: 20; 3 with --quick].
        #[arg(long)]
        secs: Option<f64>,
        /// Readers on the flooded topic.
        #[arg(long, default_value_t = 10)]
        flood_readers: usize,
    },
    /// Single-row INSERT tps on an enabled table ÷ a plain one, alternated, durable commits.
    WriterCost {
        #[command(flatten)]
        c: Common,
        /// Use this database instead of a throwaway embedded cluster.
        #[arg(long, env = "BENCH_DATABASE_URL")]
        database_url: Option<String>,
        /// Rounds of (plain, enabled) [default: 4; 2 with --quick].
        #[arg(long)]
        rounds: Option<u32>,
        /// Seconds per phase [default: 10; 4 with --quick].
        #[arg(long)]
        secs: Option<f64>,
        /// Client connections.
        #[arg(long, default_value_t = 16)]
        clients: u32,
        /// Non-durable embedded cluster (fsync off) instead of durable commits.
        #[arg(long)]
        no_durable: bool,
    },
    /// Rows of 10 KB, 100 KB and 1 MiB: delivered intact (or flagged 413), rows/s, latency.
    LargeRows {
        #[command(flatten)]
        c: Common,
        /// Use this database instead of a throwaway embedded cluster.
        #[arg(long, env = "BENCH_DATABASE_URL")]
        database_url: Option<String>,
        /// Row sizes in bytes of the text column, comma-separated (1,000,000 is just under the
        /// gateway's default MAX_RECORD_BYTES of 1 MiB of JSON; 1,048,576 is over it).
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "10000,100000,1000000,1048576"
        )]
        sizes: Vec<usize>,
        /// Seconds of paced inserts per size [default: 10; 2 with --quick].
        #[arg(long)]
        secs: Option<f64>,
        /// Paced rate in MiB/s of row data (rows/s = this ÷ size, 0.5..50).
        #[arg(long, default_value_t = 2.0)]
        mib_per_sec: f64,
        /// MiB written in the unpaced burst per size (4 writers).
        #[arg(long, default_value_t = 40.0)]
        burst_mib: f64,
    },
    /// Postgres Changes under row level security (team and owner policies) against
    /// the same deliveries without RLS (eq filters), each subscriber with its own JWT.
    Rls {
        #[command(flatten)]
        c: Common,
        /// Use this database instead of a throwaway embedded cluster.
        #[arg(long, env = "BENCH_DATABASE_URL")]
        database_url: Option<String>,
        /// Distinct users (role authenticated) [default: 1000; 100 with --quick].
        #[arg(long)]
        users: Option<usize>,
        /// Anon subscribers [default: 500; 50 with --quick].
        #[arg(long)]
        anon: Option<usize>,
        /// Users per team (readers of each row under the team policy) [default: 50; 10 with --quick].
        #[arg(long)]
        team_size: Option<usize>,
        /// Writer connections.
        #[arg(long, default_value_t = 8)]
        writers: u32,
        /// Seconds per ramp step [default: 8; 2 with --quick].
        #[arg(long)]
        step_secs: Option<f64>,
        /// Team-policy ramp in rows/s (× team size = deliveries/s) [default: 100,200,400,600,800,1000,1200,1600; 20,50 with --quick].
        #[arg(long, value_delimiter = ',')]
        team_ramp: Option<Vec<f64>>,
        /// Owner-policy ramp in rows/s [default: 500,1000,2000,3000,4000,6000,8000; 50,100 with --quick].
        #[arg(long, value_delimiter = ',')]
        owner_ramp: Option<Vec<f64>>,
        /// A step fails when its p95 exceeds this (ms).
        #[arg(long, default_value_t = 100.0)]
        p95_limit_ms: f64,
        /// Policies to measure, comma-separated: team, owner.
        #[arg(long, value_delimiter = ',', default_value = "team,owner")]
        policies: Vec<String>,
    },
    /// R rooms × S subscribers with a publisher per room: one replica, then N over NATS.
    Rooms {
        #[command(flatten)]
        c: Common,
        /// Rooms [default: 10000; 50 with --quick].
        #[arg(long)]
        rooms: Option<usize>,
        /// Subscribers per room.
        #[arg(long, default_value_t = 5)]
        per_room: usize,
        /// Channels per subscriber connection [default: the fewest that fit the open-files limit].
        #[arg(long)]
        channels_per_client: Option<usize>,
        /// Seconds per step [default: 5; 1 with --quick].
        #[arg(long)]
        step_secs: Option<f64>,
        /// A step fails when its p99 exceeds this (ms).
        #[arg(long, default_value_t = 100.0)]
        p99_limit_ms: f64,
        /// First per-room rate, msgs/s.
        #[arg(long, default_value_t = 1.0)]
        start_rate: f64,
        /// Highest per-room rate tried, msgs/s.
        #[arg(long, default_value_t = 10_000.0)]
        max_rate: f64,
        /// Replicas of the clustered phase (the tool starts nats-server); 1 = single only.
        #[arg(long, default_value_t = 3)]
        replicas: usize,
        /// Hold this per-room rate for one step instead of ramping (Supabase's shape: 2).
        #[arg(long)]
        hold_rate: Option<f64>,
    },
    /// (internal) The ceiling reference server, started by `ceiling`/`broadcast`.
    #[command(hide = true)]
    CeilingServer {
        #[arg(long)]
        port: u16,
        #[arg(long, default_value_t = 200)]
        frame_bytes: usize,
        #[arg(long, default_value = "bench")]
        topic: String,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let fd = sys::raise_nofile();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: building the tokio runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let res = rt.block_on(run(cli, fd));
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    match res {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli, fd: sys::FdLimit) -> anyhow::Result<()> {
    let (workload, c) = match &cli.cmd {
        Cmd::CeilingServer {
            port,
            frame_bytes,
            topic,
        } => return ceiling::serve(*port, *frame_bytes, topic.clone()).await,
        Cmd::Broadcast { c, .. } => ("broadcast", c.clone()),
        Cmd::Ceiling { c, .. } => ("ceiling", c.clone()),
        Cmd::Idle { c, .. } => ("idle", c.clone()),
        Cmd::SlowConsumers { c, .. } => ("slow-consumers", c.clone()),
        Cmd::Changes { c, .. } => ("changes", c.clone()),
        Cmd::WriterCost { c, .. } => ("writer-cost", c.clone()),
        Cmd::LargeRows { c, .. } => ("large-rows", c.clone()),
        Cmd::Rooms { c, .. } => ("rooms", c.clone()),
        Cmd::Flood { c, .. } => ("flood", c.clone()),
        Cmd::Rls { c, .. } => ("rls", c.clone()),
    };
    let (d, t) = report::utc_now();
    let stem = format!("{workload}-{}-{}", d.replace('-', ""), t.replace(':', ""));
    let out = c
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("bench-results").join(format!("{stem}.json")));
    let log_dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    std::fs::create_dir_all(&log_dir)?;
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or(stem);
    let mon = monitor::Monitor::start();
    if fd.soft < fd.hard || fd.soft_before < fd.soft {
        mon.note(format!(
            "RLIMIT_NOFILE raised {} → {} (hard {})",
            fd.soft_before, fd.soft, fd.hard
        ));
    }
    let slow_rcvbuf = match &cli.cmd {
        Cmd::SlowConsumers { slow_rcvbuf, .. } if *slow_rcvbuf > 0 => Some(*slow_rcvbuf),
        _ => None,
    };
    let env = Env {
        slow_rcvbuf,
        c,
        fd,
        mon: std::sync::Arc::clone(&mon),
        log_dir,
        stem,
    };
    let report = match cli.cmd {
        Cmd::Broadcast {
            subscribers,
            step_secs,
            p99_limit_ms,
            start_rate,
            max_rate,
            no_ceiling,
            ceiling_batch,
            ..
        } => {
            workloads::broadcast(
                &env,
                subscribers,
                step_secs,
                p99_limit_ms,
                start_rate,
                max_rate,
                no_ceiling,
                ceiling_batch,
            )
            .await
        }
        Cmd::Ceiling {
            subscribers,
            secs,
            batch,
            ..
        } => workloads::ceiling(&env, subscribers, secs, batch).await,
        Cmd::Idle {
            clients, hold_secs, ..
        } => workloads::idle(&env, clients, hold_secs).await,
        Cmd::SlowConsumers {
            subscribers,
            rate,
            secs,
            slow_fraction,
            ..
        } => workloads::slow_consumers(&env, subscribers, rate, secs, slow_fraction).await,
        Cmd::Changes {
            database_url,
            subscribers,
            rate,
            hold_secs,
            writers,
            ramp_subscribers,
            ramp,
            step_secs,
            p95_limit_ms,
            pad,
            durable,
            ..
        } => {
            pg::changes(
                &env,
                pg::ChangesOpts {
                    database_url,
                    subscribers,
                    rate,
                    hold_secs,
                    writers: writers.max(1),
                    ramp_subscribers: ramp_subscribers.max(1),
                    ramp,
                    step_secs,
                    p95_limit_ms,
                    pad,
                    durable,
                },
            )
            .await
        }
        Cmd::WriterCost {
            database_url,
            rounds,
            secs,
            clients,
            no_durable,
            ..
        } => {
            pg::writer_cost(
                &env,
                pg::WriterCostOpts {
                    database_url,
                    rounds,
                    secs,
                    clients: clients.max(1),
                    durable: !no_durable,
                },
            )
            .await
        }
        Cmd::LargeRows {
            database_url,
            sizes,
            secs,
            mib_per_sec,
            burst_mib,
            ..
        } => {
            pg::large_rows(
                &env,
                pg::LargeRowsOpts {
                    database_url,
                    sizes,
                    secs,
                    mib_per_sec,
                    burst_mib,
                },
            )
            .await
        }
        Cmd::Rooms {
            rooms: n,
            per_room,
            channels_per_client,
            step_secs,
            p99_limit_ms,
            start_rate,
            max_rate,
            replicas,
            hold_rate,
            ref c,
        } => {
            let quick = c.quick;
            rooms::rooms(
                &env,
                rooms::RoomsOpts {
                    rooms: n.unwrap_or(if quick { 50 } else { 10_000 }).max(1),
                    per_room: per_room.max(1),
                    channels_per_client,
                    step_secs: step_secs.unwrap_or(if quick { 1.0 } else { 5.0 }),
                    p99_limit_ms,
                    start_rate,
                    max_rate,
                    replicas: replicas.max(1),
                    urls: c.gateway_url.clone(),
                    hold_rate,
                },
            )
            .await
        }
        Cmd::Rls {
            database_url,
            users,
            anon,
            team_size,
            writers,
            step_secs,
            team_ramp,
            owner_ramp,
            p95_limit_ms,
            policies,
            ref c,
        } => {
            let quick = c.quick;
            rls::rls(
                &env,
                rls::RlsOpts {
                    database_url,
                    users: users.unwrap_or(if quick { 100 } else { 1000 }),
                    anon: anon.unwrap_or(if quick { 50 } else { 500 }),
                    team_size: team_size.unwrap_or(if quick { 10 } else { 50 }),
                    writers,
                    step_secs: step_secs.unwrap_or(if quick { 2.0 } else { 8.0 }),
                    team_ramp: team_ramp.unwrap_or_else(|| {
                        if quick {
                            vec![20.0, 50.0]
                        } else {
                            vec![100.0, 200.0, 400.0, 600.0, 800.0, 1000.0, 1200.0, 1600.0]
                        }
                    }),
                    owner_ramp: owner_ramp.unwrap_or_else(|| {
                        if quick {
                            vec![50.0, 100.0]
                        } else {
                            vec![500.0, 1000.0, 2000.0, 3000.0, 4000.0, 6000.0, 8000.0]
                        }
                    }),
                    p95_limit_ms,
                    policies,
                },
            )
            .await
        }
        Cmd::Flood {
            rooms,
            per_room,
            rate,
            secs,
            flood_readers,
            c,
        } => {
            flood::flood(
                &env,
                flood::FloodOpts {
                    rooms: rooms.unwrap_or(if c.quick { 20 } else { 100 }),
                    per_room: per_room.max(1),
                    rate,
                    secs: secs.unwrap_or(if c.quick { 3.0 } else { 20.0 }),
                    flood_readers,
                },
            )
            .await
        }
        Cmd::CeilingServer { .. } => unreachable!("handled above"),
    };
    mon.finish();
    let report = report?;
    report.print();
    let (json, svg) = report.save(&out)?;
    println!();
    println!("report: {}", json.display());
    if let Some(svg) = svg {
        println!("plot:   {}", svg.display());
    }
    Ok(())
}
