//! Process limits and memory readings.

use std::path::Path;

use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
use serde::Serialize;

/// File-descriptor limits after raising the soft limit to the hard one.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct FdLimit {
    /// Soft limit before raising.
    pub soft_before: u64,
    /// Soft limit now (= hard, when raising worked).
    pub soft: u64,
    /// Hard limit (cannot be raised without privileges).
    pub hard: u64,
}

/// Raises `RLIMIT_NOFILE`'s soft limit to its hard limit. Children started
/// afterwards (the gateway, the ceiling server) inherit the raised limit.
pub fn raise_nofile() -> FdLimit {
    let lim = getrlimit(Resource::Nofile);
    let soft_before = lim.current.unwrap_or(u64::MAX);
    let hard = lim.maximum.unwrap_or(u64::MAX);
    let mut soft = soft_before;
    if soft_before < hard {
        let want = Rlimit {
            current: Some(hard),
            maximum: lim.maximum,
        };
        if setrlimit(Resource::Nofile, want).is_ok() {
            soft = hard;
        }
    }
    FdLimit {
        soft_before,
        soft,
        hard,
    }
}

/// Ephemeral ports available per (source address, destination) pair.
pub fn ephemeral_ports() -> u64 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().filter_map(|x| x.parse::<u64>().ok());
            let lo = it.next()?;
            let hi = it.next()?;
            Some(hi.saturating_sub(lo) + 1)
        })
        .unwrap_or(28_232)
}

/// `VmRSS` of a process in bytes, from `/proc/<pid>/status`.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    status_kb(Path::new(&format!("/proc/{pid}/status")), "VmRSS:").map(|kb| kb * 1024)
}

/// RSS of this process in bytes.
pub fn self_rss_bytes() -> Option<u64> {
    status_kb(Path::new("/proc/self/status"), "VmRSS:").map(|kb| kb * 1024)
}

fn status_kb(path: &Path, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    line[key.len()..]
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
}

/// The soft `Max open files` of another process, from `/proc/<pid>/limits`.
pub fn nofile_of(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
}

/// Sends SIGTERM to a process.
pub fn terminate(pid: u32) {
    if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
}

/// Logical CPUs of this machine.
pub fn cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// `TcpExt` counters `ListenOverflows` and `ListenDrops` (this network
/// namespace): SYNs dropped because an accept queue was full. A client then
/// retransmits its SYN after 1 s, which shows up as ~1 s connect latency.
pub fn listen_drops() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/net/netstat").ok()?;
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let names: Vec<&str> = lines.next()?.split_whitespace().collect();
    let values: Vec<&str> = lines.next()?.split_whitespace().collect();
    let get = |k: &str| -> Option<u64> {
        let i = names.iter().position(|n| *n == k)?;
        values.get(i)?.parse().ok()
    };
    Some((get("ListenOverflows")?, get("ListenDrops")?))
}

/// CPU seconds (user + system) a process has used, from `/proc/<pid>/stat`.
pub fn cpu_secs(pid: u32) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}
