//! The server under test: a gateway this tool starts, a running deployment
//! (`--gateway-url`), or the ceiling server (this binary, `ceiling-server`).

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

use crate::proto::Vsn;
use crate::ws::Endpoint;

/// A running server.
#[derive(Debug)]
pub struct Target {
    /// What it is, for reports.
    pub label: String,
    /// `host:port` of its HTTP/WebSocket listener.
    pub addr: SocketAddr,
    /// `Host` header.
    pub host: String,
    /// WebSocket path without the query.
    pub ws_path: String,
    /// Its pid when known (RSS readings).
    pub pid: Option<u32>,
    /// Its log file when this tool started it.
    pub log: Option<PathBuf>,
    child: Option<Child>,
}

/// Picks a free loopback port.
fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// The default gateway binary: `realtime-gateway` next to this executable,
/// else the other profile's (release ↔ debug).
pub fn default_gateway_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    let here = dir.join("realtime-gateway");
    if here.exists() {
        return here;
    }
    for other in ["release", "debug"] {
        let p = dir.parent().map(|t| t.join(other).join("realtime-gateway"));
        if let Some(p) = p.filter(|p| p.exists()) {
            return p;
        }
    }
    here
}

impl Target {
    /// Starts the gateway binary on a free port and waits for `/healthz`.
    pub async fn spawn_gateway(
        bin: &Path,
        log: &Path,
        extra_env: &[(String, String)],
    ) -> anyhow::Result<Target> {
        if !bin.exists() {
            bail!(
                "gateway binary {} not found (build it with `cargo build --release -p gateway`, or pass --gateway-bin / --gateway-url)",
                bin.display()
            );
        }
        let port = free_port()?;
        let logf =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = Command::new(bin);
        cmd.env("PORT", port.to_string())
            .env("BIND_ADDR", "127.0.0.1")
            .env("EMBEDDED_POSTGRES", "off")
            .env("RUST_LOG", "warn")
            .env_remove("DATABASE_URL")
            .env_remove("DB_HOST")
            .stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf)
            .kill_on_drop(true);
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let mut t = Target {
            label: format!("gateway {}", bin.display()),
            addr,
            host: format!("127.0.0.1:{port}"),
            ws_path: "/socket/websocket".into(),
            pid: child.id(),
            log: Some(log.to_path_buf()),
            child: Some(child),
        };
        t.wait_healthy(Duration::from_secs(60)).await?;
        Ok(t)
    }

    /// Starts this binary's `ceiling-server` on a free port.
    pub async fn spawn_ceiling(
        log: &Path,
        frame_bytes: usize,
        topic: &str,
    ) -> anyhow::Result<Target> {
        let exe = std::env::current_exe().context("locating this executable")?;
        let port = free_port()?;
        let logf = std::fs::File::create(log)?;
        let child = Command::new(&exe)
            .args([
                "ceiling-server",
                "--port",
                &port.to_string(),
                "--frame-bytes",
                &frame_bytes.to_string(),
                "--topic",
                topic,
            ])
            .stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf)
            .kill_on_drop(true)
            .spawn()
            .context("starting the ceiling server")?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let mut t = Target {
            label: "ceiling (minimal pre-encoded writer)".into(),
            addr,
            host: format!("127.0.0.1:{port}"),
            ws_path: "/socket/websocket".into(),
            pid: child.id(),
            log: Some(log.to_path_buf()),
            child: Some(child),
        };
        t.wait_healthy(Duration::from_secs(20)).await?;
        Ok(t)
    }

    /// A running deployment at `ws://host:port[/path]`.
    pub async fn external(url: &str, pid: Option<u32>) -> anyhow::Result<Target> {
        let rest = url
            .strip_prefix("ws://")
            .or_else(|| url.strip_prefix("http://"))
            .with_context(|| {
                format!("--gateway-url must be ws://host:port[/path] (wss is not supported): {url}")
            })?;
        let (hostport, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let path = path.split('?').next().unwrap_or("");
        let ws_path = if path.is_empty() || path == "/" {
            "/socket/websocket".to_owned()
        } else if path.ends_with("/websocket") {
            path.to_owned()
        } else {
            format!("{}/websocket", path.trim_end_matches('/'))
        };
        let hp = if hostport.contains(':') {
            hostport.to_owned()
        } else {
            format!("{hostport}:80")
        };
        let addr = hp
            .to_socket_addrs()
            .with_context(|| format!("resolving {hp}"))?
            .next()
            .with_context(|| format!("no address for {hp}"))?;
        let mut t = Target {
            label: format!("deployment {url}"),
            addr,
            host: hostport.to_owned(),
            ws_path,
            pid,
            log: None,
            child: None,
        };
        // A deployment behind a proxy may not expose /healthz; only warn.
        if let Err(e) = t.wait_healthy(Duration::from_secs(3)).await {
            eprintln!("note: {url}: /healthz not answering 200 ({e:#}); going on");
        }
        Ok(t)
    }

    /// The WebSocket endpoint for `vsn` (+ `apikey` when given).
    pub fn endpoint(&self, vsn: Vsn, apikey: Option<&str>) -> Endpoint {
        let mut path = format!("{}?vsn={}", self.ws_path, vsn.param());
        if let Some(k) = apikey {
            path.push_str("&apikey=");
            path.push_str(k);
        }
        Endpoint {
            addr: self.addr,
            host: self.host.clone(),
            path,
        }
    }

    /// Plain HTTP GET; returns (status, body).
    pub async fn http_get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        let mut s = TcpStream::connect(self.addr).await?;
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.host
        );
        s.write_all(req.as_bytes()).await?;
        let mut resp = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut resp))
            .await
            .context("HTTP response timed out")??;
        let text = String::from_utf8_lossy(&resp).into_owned();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .context("no HTTP status")?;
        let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
        Ok((status, body))
    }

    async fn wait_healthy(&mut self, limit: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        let mut last = String::new();
        while start.elapsed() < limit {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!(
                        "{} exited with {status} before answering /healthz; log tail:\n{}",
                        self.label,
                        self.log_tail(20)
                    );
                }
            }
            match self.http_get("/healthz").await {
                Ok((200, _)) => return Ok(()),
                Ok((s, b)) => last = format!("HTTP {s} {b}"),
                Err(e) => last = format!("{e:#}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("{} not healthy after {limit:?}: {last}", self.label)
    }

    /// The last lines of its log.
    pub fn log_tail(&self, n: usize) -> String {
        let Some(p) = &self.log else {
            return String::new();
        };
        let text = std::fs::read_to_string(p).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Whether a child this tool started has exited (and how).
    pub fn exited(&mut self) -> Option<String> {
        let child = self.child.as_mut()?;
        match child.try_wait() {
            Ok(Some(s)) => Some(s.to_string()),
            _ => None,
        }
    }

    /// Its RSS in bytes.
    pub fn rss(&self) -> Option<u64> {
        self.pid.and_then(crate::sys::rss_bytes)
    }

    /// Stops a child this tool started (SIGTERM, then kill).
    pub async fn stop(mut self) {
        if let Some(mut child) = self.child.take() {
            if let Some(pid) = child.id() {
                crate::sys::terminate(pid);
            }
            if tokio::time::timeout(Duration::from_secs(3), child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
            }
        }
    }
}
