//! TLS to PostgreSQL: `sslmode` as libpq means it (rustls), `verify-ca`/`verify-full`
//! against `sslrootcert`, and the listener delivering over TLS. Own binary: its cluster
//! runs with `ssl = on` and a certificate made here by `openssl` (a test CA signing a
//! server certificate for `localhost` only).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use change_ingest::embedded::{EmbeddedOptions, EmbeddedPostgres};
use common::{record, Feed};
use serde_json::json;

const T: Duration = Duration::from_secs(30);

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A test CA and a server certificate for DNS name `localhost` (not 127.0.0.1),
/// readable by the server (owned by `postgres` when the tests run as root).
fn certificates() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("realtime-gateway-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    openssl(
        &dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=realtime-gateway test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ],
    );
    openssl(
        &dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ],
    );
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    openssl(
        &dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
            "-out",
            "server.pem",
        ],
    );
    let root = Command::new("id").arg("-u").output().unwrap().stdout == b"0\n";
    if root {
        let ok = Command::new("chown")
            .args(["-R", "postgres:"])
            .arg(&dir)
            .status()
            .unwrap();
        assert!(ok.success());
    }
    let ok = Command::new("chmod")
        .arg("600")
        .arg(dir.join("server.key"))
        .status()
        .unwrap();
    assert!(ok.success());
    dir
}

async fn uses_tls(url: &str) -> Result<bool, change_ingest::IngestError> {
    let c = change_ingest::connect(url).await?;
    Ok(c.query_one(
        "select ssl from pg_stat_ssl where pid = pg_backend_pid()",
        &[],
    )
    .await?
    .get(0))
}

#[tokio::test]
async fn sslmode_is_honoured_and_changes_arrive_over_tls() {
    let certs = certificates();
    let pg = EmbeddedPostgres::start_with(EmbeddedOptions {
        settings: vec![
            ("ssl".into(), "on".into()),
            (
                "ssl_cert_file".into(),
                certs.join("server.pem").display().to_string(),
            ),
            (
                "ssl_key_file".into(),
                certs.join("server.key").display().to_string(),
            ),
        ],
        ..Default::default()
    })
    .await
    .unwrap();
    let port = pg.port();
    let ca = certs.join("ca.pem").display().to_string();
    let at =
        |host: &str, query: &str| format!("postgres://postgres@{host}:{port}/postgres?{query}");

    assert!(uses_tls(&at("127.0.0.1", "sslmode=require")).await.unwrap());
    // libpq's default, `prefer`, encrypts when the server offers it.
    assert!(
        uses_tls(&format!("postgres://postgres@127.0.0.1:{port}/postgres"))
            .await
            .unwrap()
    );
    assert!(!uses_tls(&at("127.0.0.1", "sslmode=disable")).await.unwrap());
    // Verified: the test CA, and for verify-full the name the certificate carries.
    let full = at(
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    );
    assert!(uses_tls(&full).await.unwrap());
    assert!(uses_tls(&at(
        "127.0.0.1",
        &format!("sslmode=verify-ca&sslrootcert={ca}")
    ))
    .await
    .unwrap());
    let wrong_name = uses_tls(&at(
        "127.0.0.1",
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    ))
    .await
    .unwrap_err()
    .to_string();
    assert!(wrong_name.contains("certificate"), "{wrong_name}");
    // Without sslrootcert the public roots are used: a private CA is refused.
    let unknown = uses_tls(&at("localhost", "sslmode=verify-full"))
        .await
        .unwrap_err()
        .to_string();
    assert!(unknown.contains("UnknownIssuer"), "{unknown}");
    let missing = uses_tls(&at(
        "localhost",
        "sslmode=verify-ca&sslrootcert=/nonexistent.pem",
    ))
    .await
    .unwrap_err()
    .to_string();
    assert!(missing.contains("/nonexistent.pem"), "{missing}");

    // The listener and the maintenance connection work over a verified connection.
    let c = change_ingest::connect(&full).await.unwrap();
    change_ingest::migrate(&c).await.unwrap();
    c.batch_execute("create table t (id int primary key, v text)")
        .await
        .unwrap();
    change_ingest::enable_table(&c, "t").await.unwrap();
    let mut feed = Feed::start(&full, |_| {}).await;
    c.batch_execute("insert into t values (1, 'over tls')")
        .await
        .unwrap();
    let changes = feed.changes(1, T).await;
    assert_eq!(record(&changes[0]), json!({"id": 1, "v": "over tls"}));
    let listener_tls: bool = c
        .query_one(
            "select s.ssl from pg_stat_ssl s join pg_stat_activity a using (pid)
             where a.application_name = $1",
            &[&change_ingest::LISTENER_APPLICATION_NAME],
        )
        .await
        .unwrap()
        .get(0);
    assert!(listener_tls);
    feed.cancel.cancel();
    let _ = std::fs::remove_dir_all(&certs);
}
