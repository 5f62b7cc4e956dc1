//! The JWKS URL (`--jwks-url`): one bounded HTTP/1.1 GET, over rustls for `https`.
//!
//! Fetched at start and again when a token names an unknown `kid` (key
//! rotation), at most once per [`MIN_REFRESH`], so tokens with made-up `kid`s
//! cannot make the gateway hammer the issuer.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::Uri;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Least time between two fetches.
pub(crate) const MIN_REFRESH: Duration = Duration::from_secs(30);
/// Whole-fetch timeout.
const TIMEOUT: Duration = Duration::from_secs(10);
/// Largest JWKS accepted.
const MAX_BYTES: usize = 1 << 20;

/// A parsed JWKS URL.
#[derive(Debug, Clone)]
pub(crate) struct JwksUrl {
    uri: Uri,
    tls: bool,
    host: String,
    port: u16,
}

impl std::fmt::Display for JwksUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.uri)
    }
}

fn tls_config() -> Arc<rustls::ClientConfig> {
    static CONFIG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    Arc::clone(CONFIG.get_or_init(|| {
        let roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        Arc::new(config)
    }))
}

impl JwksUrl {
    /// Parses `http://` or `https://` URLs.
    pub(crate) fn parse(text: &str) -> Result<JwksUrl, String> {
        let uri: Uri = text
            .parse()
            .map_err(|e| format!("--jwks-url {text:?}: {e}"))?;
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(format!("--jwks-url {text:?}: must be http:// or https://")),
        };
        let host = uri
            .host()
            .ok_or_else(|| format!("--jwks-url {text:?}: no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        Ok(JwksUrl {
            uri,
            tls,
            host,
            port,
        })
    }

    /// GETs the document (200 only, at most [`MAX_BYTES`], within [`TIMEOUT`]).
    pub(crate) async fn get(&self) -> Result<String, String> {
        tokio::time::timeout(TIMEOUT, self.get_inner())
            .await
            .map_err(|_| "timed out".to_owned())?
    }

    async fn get_inner(&self) -> Result<String, String> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let _ = tcp.set_nodelay(true);
        if self.tls {
            let name = rustls::pki_types::ServerName::try_from(self.host.clone())
                .map_err(|e| format!("server name: {e}"))?;
            let stream = tokio_rustls::TlsConnector::from(tls_config())
                .connect(name, tcp)
                .await
                .map_err(|e| format!("tls: {e}"))?;
            self.request(stream).await
        } else {
            self.request(tcp).await
        }
    }

    async fn request<S>(&self, stream: S) -> Result<String, String>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("http: {e}"))?;
        let driver = tokio::spawn(conn);
        let path = self.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let authority = self.uri.authority().map(|a| a.as_str()).unwrap_or_default();
        let req = hyper::Request::get(path)
            .header(hyper::header::HOST, authority)
            .header(hyper::header::ACCEPT, "application/json")
            .header(hyper::header::USER_AGENT, "realtime-gateway")
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("request: {e}"))?;
        let result = async {
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| format!("http: {e}"))?;
            if resp.status() != hyper::StatusCode::OK {
                return Err(format!("HTTP {}", resp.status()));
            }
            let body = Limited::new(resp.into_body(), MAX_BYTES)
                .collect()
                .await
                .map_err(|e| format!("body: {e}"))?
                .to_bytes();
            String::from_utf8(body.to_vec()).map_err(|_| "body is not UTF-8".to_owned())
        }
        .await;
        driver.abort();
        result
    }
}
