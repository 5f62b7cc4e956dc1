//! Progress display: an indicatif spinner with live counters, or plain
//! phase lines on stderr when it is not a terminal (CI).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use crate::stats::Stats;

/// Live state shown while a workload runs.
#[derive(Debug)]
pub struct Monitor {
    pb: ProgressBar,
    phase: Mutex<String>,
    stats: Mutex<Vec<Arc<Stats>>>,
    pid: Mutex<Option<u32>>,
    start: Instant,
}

impl Monitor {
    /// Starts the spinner and its ticker.
    pub fn start() -> Arc<Monitor> {
        let pb = ProgressBar::new_spinner();
        pb.set_style(
            ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        let m = Arc::new(Monitor {
            pb,
            phase: Mutex::new(String::new()),
            stats: Mutex::new(Vec::new()),
            pid: Mutex::new(None),
            start: Instant::now(),
        });
        let weak = Arc::downgrade(&m);
        tokio::spawn(async move {
            let mut last = (Instant::now(), 0u64);
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let Some(m) = weak.upgrade() else { break };
                let stats: Vec<Arc<Stats>> =
                    m.stats.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let joined: u64 = stats.iter().map(|s| Stats::get(&s.joined)).sum();
                let delivered: u64 = stats.iter().map(|s| s.delivered().0).sum();
                let now = Instant::now();
                let rate = (delivered.saturating_sub(last.1)) as f64
                    / now.duration_since(last.0).as_secs_f64().max(1e-3);
                last = (now, delivered);
                let rss = m
                    .pid
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .and_then(crate::sys::rss_bytes)
                    .map(|b| format!(" | server RSS {:.1} MiB", b as f64 / 1048576.0))
                    .unwrap_or_default();
                let phase = m.phase.lock().unwrap_or_else(|e| e.into_inner()).clone();
                m.pb.set_message(format!(
                    "{phase} | joined {joined} | {rate:.0} deliveries/s{rss}"
                ));
                m.pb.tick();
            }
        });
        m
    }

    /// Announces a phase.
    pub fn phase(&self, text: impl Into<String>) {
        let text = text.into();
        let line = format!("[{:>6.1}s] {text}", self.start.elapsed().as_secs_f64());
        if self.pb.is_hidden() {
            eprintln!("{line}");
        } else {
            self.pb.println(line);
        }
        *self.phase.lock().unwrap_or_else(|e| e.into_inner()) = text;
    }

    /// A note line (printed, not a phase).
    pub fn note(&self, text: impl AsRef<str>) {
        if self.pb.is_hidden() {
            eprintln!("  {}", text.as_ref());
        } else {
            self.pb.println(format!("  {}", text.as_ref()));
        }
    }

    /// Which stats and server the counters follow.
    pub fn watch(&self, stats: Vec<Arc<Stats>>, pid: Option<u32>) {
        *self.stats.lock().unwrap_or_else(|e| e.into_inner()) = stats;
        *self.pid.lock().unwrap_or_else(|e| e.into_inner()) = pid;
    }

    /// Removes the spinner.
    pub fn finish(&self) {
        self.pb.finish_and_clear();
    }
}
