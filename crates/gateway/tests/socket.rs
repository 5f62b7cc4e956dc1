//! In-process gateway on 127.0.0.1:0, driven over real sockets with raw Phoenix frames.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use gateway::{config, Shared};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// How long a wait for something that must happen gives up after. Generous: it only
/// decides how long a broken gateway takes to fail, and the CI box may be very busy.
const WAIT: Duration = Duration::from_secs(30);

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn start(extra: &[&str]) -> (Arc<Shared>, String, tokio::task::JoinHandle<()>) {
    let mut args = vec![
        "gw",
        "--embedded-postgres",
        "off",
        "--channel-error-backoff-ms",
        "20",
        "--connect-error-backoff-ms",
        "20",
    ];
    args.extend_from_slice(extra);
    let shared = Shared::from_config(config::parse_from(args)).await.unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(gateway::server::serve(listener, Arc::clone(&shared)));
    (shared, format!("ws://{addr}/socket/websocket"), server)
}

async fn connect(url: &str, vsn: &str) -> Ws {
    let (ws, _) = tokio_tungstenite::connect_async(format!("{url}?vsn={vsn}&apikey=x"))
        .await
        .unwrap();
    ws
}

async fn send(ws: &mut Ws, v: Value) {
    ws.send(WsMessage::Text(v.to_string().into()))
        .await
        .unwrap();
}

/// Next text frame as JSON (skipping pings/pongs), within [`WAIT`].
async fn next_json(ws: &mut Ws) -> Value {
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("timed out waiting for a frame")
            .expect("socket ended")
            .unwrap();
        match msg {
            WsMessage::Text(t) => return serde_json::from_str(&t).unwrap(),
            WsMessage::Ping(_) | WsMessage::Pong(_) => continue,
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

async fn join_v2(ws: &mut Ws, topic: &str, config: Value) {
    send(ws, json!(["1", "1", topic, "phx_join", {"config": config}])).await;
    let reply = next_json(ws).await;
    assert_eq!(reply[3], "phx_reply");
    assert_eq!(reply[4]["status"], "ok", "{reply}");
}

#[tokio::test]
async fn heartbeat_join_broadcast_self_and_ack() {
    let (_shared, url, _server) = start(&[]).await;
    let mut a = connect(&url, "2.0.0").await;
    let mut b = connect(&url, "2.0.0").await;
    send(&mut a, json!([null, "7", "phoenix", "heartbeat", {}])).await;
    assert_eq!(
        next_json(&mut a).await,
        json!([null, "7", "phoenix", "phx_reply", {"status": "ok", "response": {}}])
    );
    join_v2(
        &mut a,
        "realtime:r",
        json!({"broadcast": {"self": false, "ack": true}}),
    )
    .await;
    join_v2(&mut b, "realtime:r", json!({"broadcast": {"self": true}})).await;

    send(&mut a, json!(["1", "2", "realtime:r", "broadcast", {"type": "broadcast", "event": "e", "payload": {"n": 1}}])).await;
    // A gets only the ack (self: false); B gets the message.
    assert_eq!(
        next_json(&mut a).await,
        json!(["1", "2", "realtime:r", "phx_reply", {"status": "ok", "response": {}}])
    );
    assert_eq!(
        next_json(&mut b).await,
        json!([null, null, "realtime:r", "broadcast", {"type": "broadcast", "event": "e", "payload": {"n": 1}}])
    );
    // B has self: true and no ack: it gets its own message and no reply.
    send(&mut b, json!(["1", "3", "realtime:r", "broadcast", {"type": "broadcast", "event": "e", "payload": {"n": 2}}])).await;
    assert_eq!(next_json(&mut b).await[4]["payload"]["n"], 2);
    assert_eq!(next_json(&mut a).await[4]["payload"]["n"], 2);
}

#[tokio::test]
async fn binary_broadcast_reaches_v2_as_kind4_and_v1_as_json() {
    let (_shared, url, _server) = start(&[]).await;
    let mut pubr = connect(&url, "2.0.0").await;
    let mut v2 = connect(&url, "2.0.0").await;
    let mut v1 = connect(&url, "1.0.0").await;
    join_v2(&mut pubr, "realtime:room1", json!({})).await;
    join_v2(&mut v2, "realtime:room1", json!({})).await;
    send(&mut v1, json!({"topic": "realtime:room1", "event": "phx_join", "payload": {"config": {}}, "ref": "1", "join_ref": "1"})).await;
    assert_eq!(next_json(&mut v1).await["payload"]["status"], "ok");

    let mut frame = vec![3u8, 1, 1, 14, 6, 0, 1];
    frame.extend_from_slice(b"11realtime:room1cursor{\"x\":3}");
    pubr.send(WsMessage::Binary(frame.into())).await.unwrap();

    let got = tokio::time::timeout(WAIT, v2.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let WsMessage::Binary(bytes) = got else {
        panic!("expected binary, got {got:?}")
    };
    let mut expected = vec![4u8, 14, 6, 0, 1];
    expected.extend_from_slice(b"realtime:room1cursor{\"x\":3}");
    assert_eq!(&bytes[..], &expected[..]);
    assert_eq!(
        next_json(&mut v1).await,
        json!({"topic": "realtime:room1", "event": "broadcast", "payload": {"type": "broadcast", "event": "cursor", "payload": {"x": 3}}, "ref": null})
    );
}

#[tokio::test]
async fn malformed_input_keeps_the_socket_open() {
    let (_shared, url, _server) = start(&[]).await;
    let mut ws = connect(&url, "2.0.0").await;
    ws.send(WsMessage::Text("{not json".into())).await.unwrap();
    ws.send(WsMessage::Text("{\"an\":\"object\"}".into()))
        .await
        .unwrap();
    ws.send(WsMessage::Binary(vec![9, 9, 9].into()))
        .await
        .unwrap();
    ws.send(WsMessage::Binary(vec![].into())).await.unwrap();
    send(&mut ws, json!(["1", "2", "nope", "phx_join", {}])).await;
    assert_eq!(
        next_json(&mut ws).await[4],
        json!({"status": "error", "response": {"reason": "unmatched topic"}})
    );
    send(
        &mut ws,
        json!(["1", "3", "realtime:not-joined", "broadcast", {}]),
    )
    .await;
    assert_eq!(
        next_json(&mut ws).await[4]["response"]["reason"],
        "unmatched topic"
    );
    send(&mut ws, json!([null, "4", "phoenix", "heartbeat", {}])).await;
    assert_eq!(next_json(&mut ws).await[1], "4");
}

#[tokio::test]
async fn oversized_message_closes_only_that_socket() {
    let (_shared, url, _server) = start(&["--max-frame-size", "4096"]).await;
    let mut big = connect(&url, "2.0.0").await;
    let mut other = connect(&url, "2.0.0").await;
    let _ = big.send(WsMessage::Text("x".repeat(10_000).into())).await;
    let closed = tokio::time::timeout(WAIT, async {
        while let Some(Ok(m)) = big.next().await {
            if let WsMessage::Close(frame) = m {
                return frame.map(|f| f.code);
            }
        }
        None
    })
    .await
    .unwrap();
    assert_eq!(closed, Some(CloseCode::Size));
    send(&mut other, json!([null, "1", "phoenix", "heartbeat", {}])).await;
    assert_eq!(next_json(&mut other).await[3], "phx_reply");
}

#[tokio::test]
async fn fragmented_messages_are_reassembled() {
    use tokio_tungstenite::tungstenite::protocol::frame::{
        coding::{Data, OpCode},
        Frame, FrameHeader,
    };
    let (_shared, url, _server) = start(&[]).await;
    let mut ws = connect(&url, "2.0.0").await;
    let text = json!([null, "5", "phoenix", "heartbeat", {}]).to_string();
    let (first, second) = text.split_at(10);
    let h1 = FrameHeader {
        is_final: false,
        opcode: OpCode::Data(Data::Text),
        ..FrameHeader::default()
    };
    ws.send(WsMessage::Frame(Frame::from_payload(
        h1,
        first.as_bytes().to_vec().into(),
    )))
    .await
    .unwrap();
    let h2 = FrameHeader {
        opcode: OpCode::Data(Data::Continue),
        ..FrameHeader::default()
    };
    ws.send(WsMessage::Frame(Frame::from_payload(
        h2,
        second.as_bytes().to_vec().into(),
    )))
    .await
    .unwrap();
    assert_eq!(next_json(&mut ws).await[1], "5");
}

#[tokio::test]
async fn idle_socket_is_closed() {
    let (_shared, url, _server) = start(&["--idle-timeout-ms", "300"]).await;
    let mut ws = connect(&url, "2.0.0").await;
    let end = tokio::time::timeout(WAIT, async {
        while let Some(Ok(m)) = ws.next().await {
            if let WsMessage::Close(f) = m {
                return f.map(|f| f.code);
            }
        }
        None
    })
    .await
    .expect("idle socket was not closed");
    assert_eq!(end, Some(CloseCode::Normal));
}

#[tokio::test]
async fn shutdown_closes_sockets_with_1001() {
    let (shared, url, server) = start(&["--shutdown-grace-ms", "3000"]).await;
    let mut ws = connect(&url, "2.0.0").await;
    join_v2(&mut ws, "realtime:r", json!({})).await;
    shared.shutdown.cancel();
    let code = tokio::time::timeout(WAIT, async {
        while let Some(Ok(m)) = ws.next().await {
            if let WsMessage::Close(f) = m {
                return f.map(|f| f.code);
            }
        }
        None
    })
    .await
    .unwrap();
    assert_eq!(code, Some(CloseCode::Away));
    // The grace period forces the exit; the bound only catches a server that never stops.
    tokio::time::timeout(WAIT, server)
        .await
        .expect("server did not stop")
        .unwrap();
    assert!(
        tokio_tungstenite::connect_async(url).await.is_err(),
        "still accepting after shutdown"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_client_gets_system_notice_and_phx_error_others_unaffected() {
    // The slow client stays silent and unread for as long as publishing takes on this
    // machine: the idle timeout and the write-stall cut must not end it first.
    let (shared, url, _server) = start(&[
        "--client-backlog",
        "64",
        "--idle-timeout-ms",
        "3600000",
        "--write-timeout-ms",
        "3600000",
    ])
    .await;
    // The slow client: joined, then never read until the end.
    let mut slow = connect(&url, "2.0.0").await;
    join_v2(&mut slow, "realtime:lag", json!({})).await;
    let mut fast = connect(&url, "2.0.0").await;
    join_v2(&mut fast, "realtime:lag", json!({})).await;
    let topic = shared.registry.get(false, "realtime:lag").unwrap();
    let big = "y".repeat(8192);
    let total = 3000;
    let seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen2 = Arc::clone(&seen);
    let reader = tokio::spawn(async move {
        for n in 0..total {
            let v = next_json(&mut fast).await;
            assert_eq!(v[4]["payload"]["n"], n, "fast subscriber saw a gap");
            seen2.store(n + 1, std::sync::atomic::Ordering::Relaxed);
        }
    });
    for n in 0..total {
        // Keep the fast reader within half its backlog, however loaded the
        // machine is; the publisher itself never waits for the slow one.
        while n - seen.load(std::sync::atomic::Ordering::Relaxed) > 32 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let payload = json!({"type": "broadcast", "event": "e", "payload": {"n": n, "pad": big}});
        gateway::channel::broadcast::deliver_json(&shared, &topic, &payload, None);
    }
    reader.await.unwrap();
    // Now drain the slow one: somewhere after its backlog there is the notice and phx_error.
    let mut saw_system = false;
    let found = tokio::time::timeout(WAIT, async {
        loop {
            let v = next_json(&mut slow).await;
            if v[3] == "system" {
                assert_eq!(v[0], "1");
                assert_eq!(v[4]["status"], "error");
                let text = v[4]["message"].as_str().unwrap();
                let n: u64 = text.split(' ').next().unwrap().parse().unwrap();
                assert!(
                    n > 16 && text.contains("dropped"),
                    "drop count must cover every missed frame: {text}"
                );
                saw_system = true;
            }
            if v[3] == "phx_error" {
                assert_eq!(v[0], "1");
                assert_eq!(v[1], "1", "phx_error must carry ref = join_ref");
                return saw_system;
            }
        }
    })
    .await
    .expect("no phx_error for the lagging channel");
    assert!(found, "system notice must precede phx_error");
}

const SECRET: &str = "super-secret-jwt-token-with-at-least-32-characters-long";

fn jwt(claims: Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

#[tokio::test]
async fn jwt_is_checked_at_connect_and_join() {
    let (_shared, url, _server) = start(&["--jwt-secret", SECRET]).await;
    // No apikey: HTTP 401 with Supabase's JSON error, before the upgrade.
    match tokio_tungstenite::connect_async(format!("{url}?vsn=2.0.0")).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 401);
            let body: Value = serde_json::from_slice(resp.body().as_deref().unwrap()).unwrap();
            assert_eq!(body, json!({"error": "API key is missing"}));
        }
        other => panic!("expected a 401, got {other:?}"),
    }
    let good = jwt(json!({"role": "anon", "exp": 4_000_000_000u64}));
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("{url}?vsn=2.0.0&apikey={good}"))
        .await
        .unwrap();
    // First join without access_token falls back to the apikey.
    join_v2(&mut ws, "realtime:a", json!({})).await;
    // An expired access_token on the join is refused with Realtime's code.
    let expired = jwt(json!({"role": "anon", "exp": 1000}));
    send(
        &mut ws,
        json!(["2", "2", "realtime:b", "phx_join", {"config": {}, "access_token": expired}]),
    )
    .await;
    let reply = next_json(&mut ws).await;
    assert_eq!(reply[4]["status"], "error");
    let reason = reply[4]["response"]["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("InvalidJWTToken: Token has expired"),
        "{reason}"
    );
    // A bad token refresh on a joined channel: system error, then phx_close.
    send(
        &mut ws,
        json!(["1", "3", "realtime:a", "access_token", {"access_token": "garbage"}]),
    )
    .await;
    let sys = next_json(&mut ws).await;
    assert_eq!(sys[3], "system");
    assert_eq!(sys[4]["message"], "The token provided is not a valid JWT");
    assert_eq!(
        next_json(&mut ws).await,
        json!(["1", "1", "realtime:a", "phx_close", {}])
    );
}
