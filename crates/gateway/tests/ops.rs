//! Health, readiness and drain, in-process on 127.0.0.1:0 over real sockets.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use gateway::{config, Shared};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message as WsMessage;

const SECRET: &str = "super-secret-jwt-token-with-at-least-32-characters-long";

async fn start(extra: &[&str]) -> (Arc<Shared>, String, tokio::task::JoinHandle<()>) {
    let mut args = vec!["gw", "--embedded-postgres", "off"];
    args.extend_from_slice(extra);
    let shared = Shared::from_config(config::parse_from(args)).await.unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let server = tokio::spawn(gateway::server::serve(listener, Arc::clone(&shared)));
    (shared, addr, server)
}

/// One HTTP/1.1 request with `Connection: close`; returns (status, head, body).
async fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("response within 10 s")
        .unwrap();
    let text = String::from_utf8(out).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, head.to_owned(), body.to_owned())
}

fn token(claims: Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

#[tokio::test]
async fn health_endpoints_answer_get_and_head() {
    let (_shared, addr, _server) = start(&[]).await;
    for path in [
        "/healthz",
        "/healthcheck",
        "/readyz",
        "/realtime/v1/healthz",
        "/api/tenants/realtime-dev/health",
    ] {
        let (status, head, body) = http(&addr, "GET", path, &[]).await;
        assert_eq!(status, 200, "GET {path}: {head}\n{body}");
        assert!(!body.is_empty(), "GET {path} has a body");
        let (status, head, body) = http(&addr, "HEAD", path, &[]).await;
        assert_eq!(status, 200, "HEAD {path}: {head}");
        assert!(
            body.is_empty(),
            "HEAD {path} must not carry a body: {body:?}"
        );
    }
    let (_, _, body) = http(&addr, "GET", "/readyz", &[]).await;
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v,
        json!({"ready": true, "listening": true, "draining": false, "change_feed": "not_configured"})
    );
    let (_, _, body) = http(&addr, "GET", "/api/tenants/realtime-dev/health", &[]).await;
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["data"]["healthy"], true, "{v}");
    assert_eq!(v["data"]["db_connected"], false, "{v}");
    assert_eq!(v["data"]["connected_cluster"], 0, "{v}");
    let (status, _, _) = http(&addr, "POST", "/readyz", &[]).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn tenant_health_needs_a_valid_token_when_auth_is_on() {
    let (_shared, addr, _server) = start(&["--jwt-secret", SECRET]).await;
    let path = "/api/tenants/realtime-dev/health";
    let (status, _, body) = http(&addr, "HEAD", path, &[]).await;
    assert_eq!(
        (status, body.as_str()),
        (403, ""),
        "no token: 403 as upstream"
    );
    let bad = token(json!({"role": "anon", "exp": 1000}));
    let (status, _, _) = http(
        &addr,
        "GET",
        path,
        &[("authorization", &format!("Bearer {bad}"))],
    )
    .await;
    assert_eq!(status, 403, "expired token");
    let anon = token(json!({"role": "anon", "exp": 4_000_000_000u64}));
    let (status, _, body) = http(
        &addr,
        "GET",
        path,
        &[("authorization", &format!("Bearer {anon}"))],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    // Liveness and readiness never need a token.
    assert_eq!(http(&addr, "GET", "/healthz", &[]).await.0, 200);
    assert_eq!(http(&addr, "GET", "/readyz", &[]).await.0, 200);
}

#[tokio::test]
async fn drain_refuses_new_clients_then_closes_sockets_with_1001() {
    // A drain delay far longer than the test: the test ends it (the "second signal").
    let (shared, addr, server) = start(&[
        "--drain-delay-ms",
        "600000",
        "--shutdown-grace-ms",
        "900000",
    ])
    .await;
    let url = format!("ws://{addr}/socket/websocket?vsn=2.0.0");
    let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();

    let (end_delay, delay_ended) = tokio::sync::oneshot::channel::<()>();
    let drainer = {
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            gateway::shutdown::drain(&shared, async {
                let _ = delay_ended.await;
            })
            .await
        })
    };
    while !shared.health.draining() {
        tokio::task::yield_now().await;
    }

    // Unready at once; liveness unaffected.
    let (status, _, body) = http(&addr, "GET", "/readyz", &[]).await;
    assert_eq!(status, 503, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (v["ready"].clone(), v["draining"].clone()),
        (json!(false), json!(true))
    );
    assert_eq!(http(&addr, "GET", "/healthz", &[]).await.0, 200);
    // New upgrades get 503 (a load balancer retries them elsewhere).
    let err = tokio_tungstenite::connect_async(&url).await.unwrap_err();
    match err {
        tokio_tungstenite::tungstenite::Error::Http(resp) => assert_eq!(resp.status(), 503),
        other => panic!("expected HTTP 503, got {other:?}"),
    }
    // The existing socket still works during the drain.
    ws.send(WsMessage::Text(
        json!([null, "1", "phoenix", "heartbeat", {}])
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(reply.to_text().unwrap().contains("phx_reply"), "{reply:?}");

    // End of the drain delay: the socket is closed with 1001 and the server stops.
    end_delay.send(()).unwrap();
    let close = loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .unwrap()
        {
            Some(Ok(WsMessage::Close(frame))) => break frame,
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    assert_eq!(close.unwrap().code, CloseCode::Away);
    drainer.await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("server stops after the drain")
        .unwrap();
}
