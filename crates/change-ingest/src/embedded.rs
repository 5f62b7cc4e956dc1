//! A throwaway local PostgreSQL: the zero-config default of `realtime-gateway`
//! and the database of this crate's tests.
//!
//! Binaries come from `pg_config --bindir`, else the highest
//! `/usr/lib/postgresql/<version>/bin`, else `PATH`. When running as root the
//! server runs as the `postgres` user (`runuser -u postgres --`), because
//! `initdb` refuses root. Data and the Unix socket live in a temp directory;
//! the server listens on `127.0.0.1` on a free port, trusts local connections
//! and is stopped (and the directory removed) on [`EmbeddedPostgres::stop`], on
//! drop, and — through a small watchdog process — when this process exits
//! without dropping it (statics in tests, `kill -9`).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};

use tokio::process::Command;

use crate::IngestError;

/// Options for [`EmbeddedPostgres::start_with`].
#[derive(Clone, Debug)]
pub struct EmbeddedOptions {
    /// Durable commits (`fsync`, `synchronous_commit`, `full_page_writes` on), as in
    /// production. `false` (the default) is much faster for tests and demos.
    pub durable: bool,
    /// `max_connections` (default 200).
    pub max_connections: u32,
    /// More server settings (`-c name=value`), e.g. `max_prepared_transactions`.
    pub settings: Vec<(String, String)>,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        EmbeddedOptions {
            durable: false,
            max_connections: 200,
            settings: Vec::new(),
        }
    }
}

/// A running throwaway PostgreSQL cluster. Stopped on drop.
#[derive(Debug)]
pub struct EmbeddedPostgres {
    bindir: PathBuf,
    /// Temp directory holding `data/`, the socket and `server.log`.
    base: PathBuf,
    port: u16,
    url: String,
    server_options: String,
    as_postgres_user: bool,
    stopped: bool,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

impl EmbeddedPostgres {
    /// Starts a fast, non-durable cluster (see [`EmbeddedOptions`]).
    pub async fn start() -> Result<Self, IngestError> {
        Self::start_with(EmbeddedOptions::default()).await
    }

    /// Starts a cluster with the given options.
    pub async fn start_with(options: EmbeddedOptions) -> Result<Self, IngestError> {
        let bindir = find_bindir().await?;
        let as_postgres_user = is_root().await;
        let mut pg = Self::empty(bindir, as_postgres_user)?;
        if as_postgres_user {
            run(Command::new("chown").arg("postgres:").arg(&pg.base)).await?;
        }
        let data = pg.data_dir();
        let mut initdb = pg.command("initdb");
        run(initdb.arg("-D").arg(&data).args([
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--no-locale",
            "-N",
        ]))
        .await?;
        pg.launch(&options).await?;
        Ok(pg)
    }

    /// A streaming standby of `primary` (`pg_basebackup -R`, asynchronous replication),
    /// started with `options`: promote it with [`EmbeddedPostgres::promote`].
    pub async fn standby_of(
        primary: &EmbeddedPostgres,
        options: EmbeddedOptions,
    ) -> Result<Self, IngestError> {
        let mut pg = Self::empty(primary.bindir.clone(), primary.as_postgres_user)?;
        if pg.as_postgres_user {
            run(Command::new("chown").arg("postgres:").arg(&pg.base)).await?;
        }
        let mut backup = pg.command("pg_basebackup");
        run(backup
            .arg("-D")
            .arg(pg.data_dir())
            .args([
                "-R",
                "-X",
                "stream",
                "-c",
                "fast",
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
            ])
            .arg("-p")
            .arg(primary.port.to_string()))
        .await?;
        pg.launch(&options).await?;
        Ok(pg)
    }

    fn empty(bindir: PathBuf, as_postgres_user: bool) -> Result<Self, IngestError> {
        let base = std::env::temp_dir().join(format!(
            "realtime-gateway-pg-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        if base.exists() {
            std::fs::remove_dir_all(&base)?;
        }
        std::fs::create_dir_all(&base)?;
        Ok(EmbeddedPostgres {
            bindir,
            base,
            port: 0,
            url: String::new(),
            server_options: String::new(),
            as_postgres_user,
            stopped: true,
        })
    }

    /// Starts the server on a free port (retried: a port found free may be taken
    /// before the server binds it).
    async fn launch(&mut self, options: &EmbeddedOptions) -> Result<(), IngestError> {
        let mut last_err = None;
        for _ in 0..5 {
            self.port = free_port()?;
            self.server_options = server_options(&self.base, self.port, options);
            self.url = format!("postgres://postgres@127.0.0.1:{}/postgres", self.port);
            match self.pg_ctl(&["start"]).await {
                Ok(()) => {
                    self.stopped = false;
                    self.spawn_watchdog();
                    tracing::info!(port = self.port, dir = %self.base.display(), "embedded PostgreSQL started");
                    return Ok(());
                }
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| IngestError::Embedded("could not start".into())))
    }

    /// `pg_ctl stop -m immediate`: a crash, as far as the database is concerned (no
    /// shutdown checkpoint; asynchronously committed transactions not yet flushed are
    /// lost). [`EmbeddedPostgres::start_again`] runs crash recovery.
    pub async fn stop_immediate(&self) -> Result<(), IngestError> {
        self.pg_ctl(&["stop", "-m", "immediate"]).await
    }

    /// Starts the server again after [`EmbeddedPostgres::stop_immediate`]: same port, same data.
    pub async fn start_again(&self) -> Result<(), IngestError> {
        self.pg_ctl(&["start"]).await
    }

    /// `pg_ctl promote`: a standby becomes a primary (on a new timeline).
    pub async fn promote(&self) -> Result<(), IngestError> {
        self.pg_ctl(&["promote"]).await
    }

    /// `postgres://postgres@127.0.0.1:<port>/postgres`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// URL of another database on this cluster.
    pub fn database_url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// The directory holding the data directory, the socket and `server.log`.
    pub fn dir(&self) -> &Path {
        &self.base
    }

    /// `pg_ctl restart -m fast`: same port, same data; every connection is dropped.
    pub async fn restart(&self) -> Result<(), IngestError> {
        self.pg_ctl(&["restart", "-m", "fast"]).await
    }

    /// Stops the server (`-m fast`) and removes its directory.
    pub async fn stop(&mut self) {
        if !self.stopped {
            if let Err(e) = self.pg_ctl(&["stop", "-m", "fast"]).await {
                tracing::warn!(error = %e, "stopping embedded PostgreSQL failed");
            }
            self.stopped = true;
        }
        let _ = std::fs::remove_dir_all(&self.base);
    }

    fn data_dir(&self) -> PathBuf {
        self.base.join("data")
    }

    /// A command for a server binary, run as `postgres` when we are root.
    fn command(&self, program: &str) -> Command {
        let path = self.bindir.join(program);
        let mut cmd = if self.as_postgres_user {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        };
        // The server user may not be allowed into our working directory.
        cmd.current_dir(&self.base);
        cmd
    }

    async fn pg_ctl(&self, action: &[&str]) -> Result<(), IngestError> {
        let mut cmd = self.command("pg_ctl");
        cmd.arg("-D")
            .arg(self.data_dir())
            .arg("-l")
            .arg(self.base.join("server.log"))
            .args(["-w", "-t", "60"])
            .args(action);
        if matches!(action[0], "start" | "restart") {
            cmd.arg("-o").arg(&self.server_options);
        }
        run(&mut cmd).await.map_err(|e| {
            let log = std::fs::read_to_string(self.base.join("server.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(5).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            IngestError::Embedded(format!("{e}; server.log: {}", tail.join(" | ")))
        })
    }

    /// A detached shell that stops the server and removes the directory once this
    /// process is gone, so nothing leaks when `Drop` never runs.
    fn spawn_watchdog(&self) {
        let pg_ctl = self.bindir.join("pg_ctl");
        let prefix = if self.as_postgres_user {
            "runuser -u postgres -- "
        } else {
            ""
        };
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; \
             [ -d '{data}' ] && {prefix}'{pg_ctl}' -D '{data}' stop -m immediate >/dev/null 2>&1; \
             rm -rf '{base}'",
            pid = std::process::id(),
            data = self.data_dir().display(),
            pg_ctl = pg_ctl.display(),
            base = self.base.display(),
        );
        let spawned = std::process::Command::new("sh")
            .arg("-c")
            .arg(script)
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "could not start the embedded PostgreSQL watchdog");
        }
    }
}

impl Drop for EmbeddedPostgres {
    fn drop(&mut self) {
        if !self.stopped {
            let mut cmd = if self.as_postgres_user {
                let mut c = std::process::Command::new("runuser");
                c.args(["-u", "postgres", "--"])
                    .arg(self.bindir.join("pg_ctl"));
                c
            } else {
                std::process::Command::new(self.bindir.join("pg_ctl"))
            };
            let _ = cmd
                .arg("-D")
                .arg(self.data_dir())
                .args(["stop", "-m", "immediate", "-w"])
                .current_dir("/")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            self.stopped = true;
        }
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

fn server_options(base: &Path, port: u16, options: &EmbeddedOptions) -> String {
    let mut o = format!(
        "-p {port} -k {} -c listen_addresses=127.0.0.1 -c max_connections={}",
        base.display(),
        options.max_connections
    );
    if !options.durable {
        o.push_str(" -c fsync=off -c synchronous_commit=off -c full_page_writes=off");
    }
    for (name, value) in &options.settings {
        o.push_str(&format!(" -c {name}={value}"));
    }
    o
}

fn free_port() -> Result<u16, IngestError> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

async fn is_root() -> bool {
    match Command::new("id").arg("-u").output().await {
        Ok(out) => String::from_utf8_lossy(&out.stdout).trim() == "0",
        Err(_) => false,
    }
}

/// Runs a command to completion; a non-zero exit is an error carrying its stderr.
async fn run(cmd: &mut Command) -> Result<(), IngestError> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| IngestError::Embedded(format!("could not run {cmd:?}: {e}")))?;
    if out.status.success() {
        return Ok(());
    }
    Err(IngestError::Embedded(format!(
        "{:?} failed ({}): {}",
        cmd.as_std().get_program(),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    )))
}

/// Where `initdb` and `pg_ctl` live.
async fn find_bindir() -> Result<PathBuf, IngestError> {
    let has_server = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output().await {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && has_server(&dir) {
            return Ok(dir);
        }
    }
    if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut versions: Vec<(u32, PathBuf)> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let version = e.file_name().to_str()?.parse::<u32>().ok()?;
                Some((version, e.path().join("bin")))
            })
            .filter(|(_, bin)| has_server(bin))
            .collect();
        versions.sort();
        if let Some((_, bin)) = versions.pop() {
            return Ok(bin);
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if has_server(&dir) {
                return Ok(dir);
            }
        }
    }
    Err(IngestError::PostgresNotInstalled(
        "looked in `pg_config --bindir`, /usr/lib/postgresql/*/bin and PATH".into(),
    ))
}
