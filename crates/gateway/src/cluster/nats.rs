//! The NATS engine of [`ClusterBus`], on the official `async-nats` client.
//!
//! - `no_echo`: the server never hands a replica its own messages back.
//! - Publishing never waits: messages go to a bounded outbox (a message count
//!   and a byte budget, `NATS_BUFFER_BYTES`) drained by one task into the
//!   client, so per-publisher order is kept. While NATS is unreachable the
//!   client stops taking messages, the outbox fills, and further messages are
//!   dropped and counted (`realtime_cluster_dropped_total{reason="buffer_full"}`);
//!   local delivery is unaffected.
//! - The client reconnects by itself (any server of the list, or one the
//!   cluster advertised) and re-sends every subscription; the link state
//!   (event callback, reconciled by a poll) tells the replica layer to resync.
//! - Each subscription's inbound queue is bounded; messages beyond it are
//!   dropped by the client and counted (`reason="slow_consumer"`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::connection::State;
use async_nats::{Client, ConnectOptions, Event};
use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use tokio::sync::{mpsc, watch};

use super::bus::{BusError, Class, ClusterBus, LinkState, Subscription};
use crate::metrics::{CLUSTER_DROPPED, CLUSTER_PUBLISHED};

/// Messages the outbox holds at most (whatever their size).
const OUTBOX_MESSAGES: usize = 65_536;
/// Inbound messages queued per subscribed subject before the client drops them.
const SUBSCRIPTION_CAPACITY: usize = 8_192;

/// What the NATS engine needs from the configuration.
#[derive(Clone, Debug)]
pub struct NatsOptions {
    /// Server URLs.
    pub urls: Vec<String>,
    /// A `.creds` file (JWT + NKey seed), if the server requires one.
    pub creds: Option<std::path::PathBuf>,
    /// Client name shown by the server (`realtime-gateway <node>`).
    pub name: String,
    /// Outbound byte budget.
    pub buffer_bytes: usize,
    /// How often the client pings the server (a dead server is noticed after two missed pongs).
    pub ping_interval: Duration,
}

/// The NATS engine.
#[derive(Debug)]
pub struct NatsBus {
    client: Client,
    outbox: mpsc::Sender<(String, Bytes)>,
    queued_bytes: Arc<AtomicUsize>,
    buffer_bytes: usize,
    link: watch::Receiver<LinkState>,
}

/// Parses `NATS_URL` (comma-separated) into a list, rejecting an empty one.
pub fn parse_urls(raw: &str) -> Result<Vec<String>, String> {
    let urls: Vec<String> = raw
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_owned)
        .collect();
    if urls.is_empty() {
        return Err("NATS_URL has no server address".into());
    }
    for u in &urls {
        u.parse::<async_nats::ServerAddr>()
            .map_err(|e| format!("NATS_URL entry {u:?} is not a server address: {e}"))?;
    }
    Ok(urls)
}

impl NatsBus {
    /// Creates the client and starts connecting. Does not wait for the server:
    /// a gateway starts (serving local clients) while NATS is unreachable.
    pub async fn connect(opts: NatsOptions) -> Result<NatsBus, BusError> {
        let (link_tx, link) = watch::channel(LinkState::default());
        let link_tx = Arc::new(link_tx);
        let events_link = Arc::clone(&link_tx);
        let mut options = ConnectOptions::new()
            .no_echo()
            .name(&opts.name)
            .retry_on_initial_connect()
            .ping_interval(opts.ping_interval)
            .subscription_capacity(SUBSCRIPTION_CAPACITY)
            .event_callback(move |event| {
                let link = Arc::clone(&events_link);
                async move { on_event(&link, event) }
            });
        if let Some(path) = &opts.creds {
            options = options
                .credentials_file(path)
                .await
                .map_err(|e| BusError(format!("reading NATS_CREDS {}: {e}", path.display())))?;
        }
        let client = options
            .connect(opts.urls.as_slice())
            .await
            .map_err(|e| BusError(format!("connecting to NATS: {e}")))?;

        let (outbox, rx) = mpsc::channel(OUTBOX_MESSAGES);
        let queued_bytes = Arc::new(AtomicUsize::new(0));
        tokio::spawn(publisher(client.clone(), rx, Arc::clone(&queued_bytes)));
        tokio::spawn(poll_state(client.clone(), link_tx));
        Ok(NatsBus {
            client,
            outbox,
            queued_bytes,
            buffer_bytes: opts.buffer_bytes,
            link,
        })
    }
}

/// Applies a client event to the link state (and counts slow-consumer drops).
fn on_event(link: &watch::Sender<LinkState>, event: Event) {
    match event {
        Event::Connected => link.send_modify(|s| {
            s.up = true;
            s.connects += 1;
        }),
        Event::Disconnected | Event::Closed => link.send_modify(|s| s.up = false),
        Event::SlowConsumer(_) => {
            metrics::counter!(CLUSTER_DROPPED, "reason" => "slow_consumer").increment(1);
        }
        other => tracing::debug!(event = %other, "nats event"),
    }
}

/// Reconciles the link state with the client's own (events can be dropped
/// when the client's event queue is full).
async fn poll_state(client: Client, link: Arc<watch::Sender<LinkState>>) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tick.tick().await;
        let up = client.connection_state() == State::Connected;
        link.send_if_modified(|s| {
            if s.up == up {
                return false;
            }
            s.up = up;
            if up {
                s.connects += 1;
            }
            true
        });
        if link.is_closed() {
            return;
        }
    }
}

/// Drains the outbox into the client, one message at a time (order kept).
async fn publisher(
    client: Client,
    mut rx: mpsc::Receiver<(String, Bytes)>,
    queued: Arc<AtomicUsize>,
) {
    let published = metrics::counter!(CLUSTER_PUBLISHED);
    while let Some((subject, payload)) = rx.recv().await {
        queued.fetch_sub(payload.len(), Ordering::Relaxed);
        match client.publish(subject, payload).await {
            Ok(()) => published.increment(1),
            Err(e) => {
                let reason = match e.kind() {
                    async_nats::client::PublishErrorKind::MaxPayloadExceeded => "too_large",
                    _ => "publish_error",
                };
                metrics::counter!(CLUSTER_DROPPED, "reason" => reason).increment(1);
                tracing::warn!(cause = %e, "cluster message not published");
            }
        }
    }
}

impl ClusterBus for NatsBus {
    fn engine(&self) -> &'static str {
        "nats"
    }

    fn publish(&self, subject: String, payload: Bytes, class: Class) -> bool {
        let len = payload.len();
        if class == Class::Data {
            let queued = self.queued_bytes.load(Ordering::Relaxed);
            if queued + len > self.buffer_bytes {
                metrics::counter!(CLUSTER_DROPPED, "reason" => "buffer_full").increment(1);
                return false;
            }
        }
        self.queued_bytes.fetch_add(len, Ordering::Relaxed);
        match self.outbox.try_send((subject, payload)) {
            Ok(()) => true,
            Err(_) => {
                self.queued_bytes.fetch_sub(len, Ordering::Relaxed);
                metrics::counter!(CLUSTER_DROPPED, "reason" => "buffer_full").increment(1);
                false
            }
        }
    }

    fn subscribe(&self, subject: String) -> BoxFuture<'static, Result<Subscription, BusError>> {
        let client = self.client.clone();
        Box::pin(async move {
            let sub = client
                .subscribe(subject)
                .await
                .map_err(|e| BusError(format!("subscribing: {e}")))?;
            // The SUB is on the wire before anything this replica publishes next.
            client
                .flush()
                .await
                .map_err(|e| BusError(format!("flushing: {e}")))?;
            Ok(Box::pin(sub.map(|m| m.payload)) as Subscription)
        })
    }

    fn link(&self) -> watch::Receiver<LinkState> {
        self.link.clone()
    }

    fn close(&self) -> BoxFuture<'static, ()> {
        let client = self.client.clone();
        let outbox = self.outbox.clone();
        Box::pin(async move {
            // Let the publisher drain what is queued (bounded), then flush the socket.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
            while outbox.capacity() < outbox.max_capacity()
                && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), client.flush()).await;
        })
    }
}
