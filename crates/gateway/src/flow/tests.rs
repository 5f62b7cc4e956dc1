//! Flow control with the real writer task over in-memory sockets whose
//! reader reads, pauses or stops at the test's command. Time is paused (tokio's
//! test clock advances only when every task waits), so the grace is exact
//! and nothing depends on the machine's speed.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use phoenix_channel::{Ref, Vsn};
use serde_json::Value;
use tokio::io::{AsyncReadExt, DuplexStream};
use tokio::sync::mpsc;

use super::{Budget, Flow, ITEM_OVERHEAD};
use crate::config::LagPolicy;
use crate::metrics::Handles;
use crate::registry::{ChannelHandle, ConnHandle, Outbound};
use crate::socket::writer::{self, WriterSettings};

const GRACE: Duration = Duration::from_secs(5);

/// One connection: a real writer task writing into an in-memory socket.
struct Client {
    chan: Arc<ChannelHandle>,
    sock: DuplexStream,
}

fn client(flow: &Arc<Flow>, id: u64, policy: LagPolicy) -> Client {
    let (tx, rx) = mpsc::channel(16);
    let conn = Arc::new(ConnHandle::new(id, tx));
    let chan = Arc::new(ChannelHandle::new(
        id,
        Vsn::V2,
        Some(Ref::Str(format!("j{id}"))),
        format!("realtime:t{id}"),
        Arc::clone(&conn),
    ));
    // A small socket buffer: a reader that stops blocks the writer quickly.
    let (server, sock) = tokio::io::duplex(4096);
    let settings = WriterSettings {
        vsn: Vsn::V2,
        policy,
        write_timeout: Duration::from_secs(3600),
        flow: Arc::clone(flow),
    };
    tokio::spawn(writer::run(server, rx, conn, settings));
    Client { chan, sock }
}

/// Reads one server frame's payload (unmasked, unfragmented).
async fn read_frame(sock: &mut DuplexStream) -> Value {
    let mut head = [0u8; 2];
    sock.read_exact(&mut head).await.unwrap();
    let len = match head[1] {
        126 => u64::from(sock.read_u16().await.unwrap()),
        127 => sock.read_u64().await.unwrap(),
        n => u64::from(n),
    };
    let mut payload = vec![0; len as usize];
    sock.read_exact(&mut payload).await.unwrap();
    serde_json::from_slice(&payload).unwrap()
}

fn frame(n: usize) -> Outbound {
    // ~1 KiB per frame: a few fill the 4 KiB socket and the budget quickly.
    Outbound::Text(Bytes::from(format!(
        r#"[null,null,"t","postgres_changes",{{"n":{n},"pad":"{}"}}]"#,
        "x".repeat(1000)
    )))
}

fn flow(budget: usize, policy: LagPolicy) -> Arc<Flow> {
    Arc::new(Flow::new(budget, GRACE, Handles::new(), policy))
}

/// Offers frames 1..=n to every client, waiting for room before each, as the router does.
async fn produce(flow: &Flow, clients: &[Arc<ChannelHandle>], n: usize) {
    for i in 1..=n {
        flow.room().await;
        for chan in clients {
            flow.offer(chan, frame(i));
        }
    }
}

#[tokio::test]
async fn budget_is_all_or_nothing_and_wakes_waiters() {
    let budget = Arc::new(Budget::new(100));
    assert!(budget.try_take(60));
    assert!(!budget.try_take(41), "all or nothing");
    assert!(budget.try_take(40));
    assert!(budget.is_exhausted());
    let waiter = {
        let budget = Arc::clone(&budget);
        tokio::spawn(async move { budget.room().await })
    };
    tokio::task::yield_now().await;
    assert!(!waiter.is_finished());
    budget.release(1);
    tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("released budget wakes the waiter")
        .unwrap();
    budget.take(500); // unconditional: may pass the limit
    assert_eq!(budget.used(), 599);
    budget.release(599);
    assert_eq!(budget.used(), 0);
    budget.room().await;
}

#[tokio::test(start_paused = true)]
async fn a_slow_reader_gets_everything_in_order_and_paces_the_producer() {
    const N: usize = 2000; // ~2 MB of frames through a 64 KiB budget
    let flow = flow(64 * 1024, LagPolicy::Error);
    let mut c = client(&flow, 1, LagPolicy::Error);
    let producer = {
        let (flow, chan) = (Arc::clone(&flow), Arc::clone(&c.chan));
        tokio::spawn(async move { produce(&flow, &[chan], N).await })
    };
    let watchdog = {
        let flow = Arc::clone(&flow);
        tokio::spawn(async move { flow.watch(Default::default()).await })
    };
    for i in 1..=N {
        // A slow reader: a pause well under the grace every 100 frames.
        if i % 100 == 0 {
            tokio::time::sleep(GRACE / 2).await;
        }
        let f = read_frame(&mut c.sock).await;
        assert_eq!(f[4]["n"], i, "frame {i} in order");
        assert!(
            flow.budget.used() <= 64 * 1024 + 1024 + ITEM_OVERHEAD,
            "the budget bounds what is queued"
        );
    }
    producer.await.unwrap();
    watchdog.abort();
    assert!(!c.chan.dead.load(Ordering::Relaxed), "never cut");
    assert_eq!(c.chan.dropped.load(Ordering::Relaxed), 0);
    assert_eq!(flow.budget.used(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_stalled_reader_is_cut_after_the_grace_and_holds_nobody_back() {
    const N: usize = 1000;
    let flow = flow(32 * 1024, LagPolicy::Error);
    let mut fast = client(&flow, 1, LagPolicy::Error);
    let mut stalled = client(&flow, 2, LagPolicy::Error);
    let started = tokio::time::Instant::now();
    let producer = {
        let flow = Arc::clone(&flow);
        let chans = [Arc::clone(&fast.chan), Arc::clone(&stalled.chan)];
        tokio::spawn(async move { produce(&flow, &chans, N).await })
    };
    let watchdog = {
        let flow = Arc::clone(&flow);
        tokio::spawn(async move { flow.watch(Default::default()).await })
    };
    let mut cut_seen_at = None;
    for i in 1..=N {
        let f = read_frame(&mut fast.sock).await;
        assert_eq!(f[4]["n"], i, "fast reader: frame {i} in order");
        if cut_seen_at.is_none() && stalled.chan.dead.load(Ordering::Relaxed) {
            cut_seen_at = Some(started.elapsed());
        }
    }
    producer.await.unwrap();
    let waited = cut_seen_at.expect("the stalled reader was cut");
    assert!(waited >= GRACE, "cut after {waited:?}, before the grace");
    assert!(
        waited <= GRACE + Duration::from_secs(1),
        "cut {waited:?} after the start"
    );
    assert!(flow.budget.used() <= ITEM_OVERHEAD + 1100);

    // Resumed: what the socket held, in order, then the notice counting the rest, then phx_error.
    let mut got = 0;
    let notice = loop {
        let f = read_frame(&mut stalled.sock).await;
        if f[3] == "postgres_changes" {
            got += 1;
            assert_eq!(f[4]["n"], got);
        } else {
            break f;
        }
    };
    assert!(got < N);
    assert_eq!(notice[3], "system");
    let message = notice[4]["message"].as_str().unwrap().to_owned();
    assert!(
        message.starts_with(&format!("{} messages were dropped", N - got)),
        "{message} (received {got})"
    );
    let err = read_frame(&mut stalled.sock).await;
    assert_eq!(err[3], "phx_error");
    assert_eq!(err[1], "j2", "ref = join_ref");
    watchdog.abort();
}

#[tokio::test(start_paused = true)]
async fn skip_policy_drops_while_stalled_and_paces_again_after_progress() {
    let flow = flow(16 * 1024, LagPolicy::Skip);
    let mut c = client(&flow, 1, LagPolicy::Skip);
    // Fill the socket, the writer's hands (64 KiB) and the budget; then wait out the grace.
    for i in 1..=100 {
        flow.offer(&c.chan, frame(i));
        tokio::task::yield_now().await;
    }
    assert!(flow.budget.is_exhausted());
    tokio::time::sleep(GRACE + Duration::from_millis(1)).await;
    assert_eq!(flow.cut_stalled(), 1);
    assert_eq!(flow.budget.used(), 0, "the cut released the budget");
    assert!(
        !c.chan.dead.load(Ordering::Relaxed),
        "skip keeps the channel"
    );
    let dropped = c.chan.dropped.load(Ordering::Relaxed);
    assert!(dropped > 0, "the queued frames count as dropped");
    assert!(
        !flow.offer(&c.chan, frame(99)),
        "dropped until the reader progresses"
    );
    assert_eq!(c.chan.dropped.load(Ordering::Relaxed), dropped + 1);
    // The reader drains what the socket held; the writer progresses; frames queue again.
    let mut last = 0;
    while let Ok(f) = tokio::time::timeout(Duration::from_millis(10), read_frame(&mut c.sock)).await
    {
        last = f[4]["n"].as_u64().unwrap();
    }
    assert!(last > 0 && last < 100, "read {last}");
    assert!(flow.offer(&c.chan, frame(100)));
    assert_eq!(read_frame(&mut c.sock).await[4]["n"], 100);
}

#[tokio::test]
async fn a_closing_connection_returns_its_budget_and_takes_nothing_more() {
    let flow = flow(1 << 20, LagPolicy::Error);
    let (tx, _rx) = mpsc::channel(4);
    let conn = Arc::new(ConnHandle::new(7, tx));
    let chan = Arc::new(ChannelHandle::new(
        7,
        Vsn::V2,
        None,
        "realtime:x".into(),
        Arc::clone(&conn),
    ));
    assert!(flow.offer(&chan, frame(1)));
    assert!(flow.budget.used() > 1000);
    flow.forget(&conn);
    assert_eq!(flow.budget.used(), 0);
    assert!(conn.paced.is_empty());
    assert!(!flow.offer(&chan, frame(2)));
    assert_eq!(flow.budget.used(), 0);
    assert_eq!(Arc::strong_count(&chan), 1, "no reference cycle left");
}
