//! TLS to PostgreSQL (rustls, ring provider), with libpq's `sslmode` meanings:
//!
//! | `sslmode` | TLS | certificate checked |
//! |---|---|---|
//! | `disable` | never | — |
//! | `prefer` (default) | if the server offers it | no |
//! | `require` | always | no (like libpq without a root certificate) |
//! | `verify-ca` | always | chain to a trusted root |
//! | `verify-full` | always | chain and host name |
//!
//! Trusted roots are the PEM file named by `sslrootcert`, else the Mozilla roots
//! (`webpki-roots`). `tokio-postgres` itself knows only the first three modes, so the
//! `verify-*` modes and `sslrootcert` are taken out of the connection string here and
//! the rest is handed to it with `sslmode=require`.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};
use tokio_postgres::Socket;

use crate::IngestError;

/// How much of the server's certificate is checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verify {
    /// Encrypt only (`prefer`, `require`).
    None,
    /// The chain must lead to a trusted root (`verify-ca`).
    Ca,
    /// And the certificate must name the host (`verify-full`).
    Full,
}

/// The TLS part of a connection string.
#[derive(Clone, Debug)]
pub(crate) struct TlsSettings {
    pub(crate) verify: Verify,
    /// `sslrootcert`: a PEM file of trusted roots.
    pub(crate) root_cert: Option<String>,
}

/// Splits `url` (URL or `key=value` form) into what `tokio-postgres` parses and the
/// TLS settings it does not know.
pub(crate) fn split(url: &str) -> Result<(tokio_postgres::Config, TlsSettings), IngestError> {
    let mut settings = TlsSettings {
        verify: Verify::None,
        root_cert: None,
    };
    let mut take = |key: &str, value: String| -> Result<Option<String>, IngestError> {
        match key {
            "sslmode" => match value.as_str() {
                "verify-ca" | "verify-full" => {
                    settings.verify = if value == "verify-ca" {
                        Verify::Ca
                    } else {
                        Verify::Full
                    };
                    Ok(Some("require".to_owned()))
                }
                "disable" | "allow" | "prefer" | "require" => Ok(Some(
                    if value == "allow" { "prefer" } else { &value }.to_owned(),
                )),
                other => Err(IngestError::InvalidUrl(format!(
                    "sslmode={other}: expected disable, allow, prefer, require, verify-ca or verify-full"
                ))),
            },
            "sslrootcert" => {
                settings.root_cert = Some(value);
                Ok(None)
            }
            _ => Ok(Some(value)),
        }
    };
    let cleaned = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        match url.split_once('?') {
            None => url.to_owned(),
            Some((base, query)) => {
                let mut kept = Vec::new();
                for pair in query.split('&').filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    let value = percent_encoding::percent_decode_str(v)
                        .decode_utf8_lossy()
                        .into_owned();
                    if let Some(v) = take(k, value)? {
                        let v = percent_encoding::utf8_percent_encode(
                            &v,
                            percent_encoding::NON_ALPHANUMERIC,
                        );
                        kept.push(format!("{k}={v}"));
                    }
                }
                if kept.is_empty() {
                    base.to_owned()
                } else {
                    format!("{base}?{}", kept.join("&"))
                }
            }
        }
    } else {
        // key=value form: these keys' values never need quoting.
        let mut kept = Vec::new();
        for token in url.split_whitespace() {
            match token.split_once('=') {
                Some((k @ ("sslmode" | "sslrootcert"), v)) => {
                    if let Some(v) = take(k, v.trim_matches('\'').to_owned())? {
                        kept.push(format!("{k}={v}"));
                    }
                }
                _ => kept.push(token.to_owned()),
            }
        }
        kept.join(" ")
    };
    let config = tokio_postgres::Config::from_str(&cleaned)
        .map_err(|e| IngestError::InvalidUrl(crate::error::PgDisplay(&e).to_string()))?;
    Ok((config, settings))
}

/// The rustls connector for `settings` (reads `sslrootcert` when set).
pub(crate) fn connector(settings: &TlsSettings) -> Result<MakeRustls, IngestError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| IngestError::Tls(e.to_string()))?;
    let verifier: Arc<dyn ServerCertVerifier> = match settings.verify {
        Verify::None => Arc::new(AnyCertificate(provider)),
        Verify::Ca | Verify::Full => {
            let mut roots = rustls::RootCertStore::empty();
            match &settings.root_cert {
                Some(path) => {
                    let certs = CertificateDer::pem_file_iter(path)
                        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                        .map_err(|e| IngestError::Tls(format!("sslrootcert {path}: {e}")))?;
                    let (added, _) = roots.add_parsable_certificates(certs);
                    if added == 0 {
                        return Err(IngestError::Tls(format!(
                            "sslrootcert {path}: no usable certificate"
                        )));
                    }
                }
                None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
            }
            let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| IngestError::Tls(e.to_string()))?;
            Arc::new(Chain {
                inner: webpki,
                check_name: settings.verify == Verify::Full,
            })
        }
    };
    let config = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(MakeRustls(tokio_rustls::TlsConnector::from(Arc::new(
        config,
    ))))
}

/// `require`/`prefer`: encryption without authenticating the server (libpq's
/// meaning); handshake signatures are still checked.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca` / `verify-full`: webpki verification, the host name check left out
/// for `verify-ca`.
#[derive(Debug)]
struct Chain {
    inner: Arc<WebPkiServerVerifier>,
    check_name: bool,
}

impl ServerCertVerifier for Chain {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// `MakeTlsConnect` for tokio-postgres over tokio-rustls.
#[derive(Clone)]
pub(crate) struct MakeRustls(tokio_rustls::TlsConnector);

impl fmt::Debug for MakeRustls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MakeRustls")
    }
}

impl MakeTlsConnect<Socket> for MakeRustls {
    type Stream = RustlsStream;
    type TlsConnect = RustlsConnect;
    type Error = rustls::Error;

    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnect, rustls::Error> {
        // An IP address or a DNS name; the socket path of a Unix socket never gets here
        // with TLS (PostgreSQL does not offer it there).
        let name = ServerName::try_from(domain.to_owned())
            .map_err(|_| rustls::Error::General(format!("invalid server name {domain:?}")))?;
        Ok(RustlsConnect {
            connector: self.0.clone(),
            name,
        })
    }
}

/// One pending handshake.
pub(crate) struct RustlsConnect {
    connector: tokio_rustls::TlsConnector,
    name: ServerName<'static>,
}

impl TlsConnect<Socket> for RustlsConnect {
    type Stream = RustlsStream;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream>> + Send>>;

    fn connect(self, stream: Socket) -> Self::Future {
        Box::pin(async move {
            let tls = self.connector.connect(self.name, stream).await?;
            Ok(RustlsStream(Box::new(tls)))
        })
    }
}

/// An established TLS stream.
pub(crate) struct RustlsStream(Box<tokio_rustls::client::TlsStream<Socket>>);

impl tokio_postgres::tls::TlsStream for RustlsStream {
    fn channel_binding(&self) -> ChannelBinding {
        // SCRAM without channel binding (tokio-postgres' default `channel_binding=prefer`).
        ChannelBinding::none()
    }
}

impl AsyncRead for RustlsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for RustlsStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_modes_and_root_cert_are_taken_out() {
        let (c, s) =
            split("postgres://u:p@db.example.com:6543/app?sslmode=verify-full&sslrootcert=%2Ftmp%2Fca.pem&application_name=x")
                .unwrap();
        assert_eq!(s.verify, Verify::Full);
        assert_eq!(s.root_cert.as_deref(), Some("/tmp/ca.pem"));
        assert_eq!(c.get_ssl_mode(), tokio_postgres::config::SslMode::Require);
        assert_eq!(c.get_application_name(), Some("x"));
        let (c, s) = split("host=h user=u sslmode=verify-ca sslrootcert=/ca.pem").unwrap();
        assert_eq!(
            (s.verify, s.root_cert.as_deref()),
            (Verify::Ca, Some("/ca.pem"))
        );
        assert_eq!(c.get_ssl_mode(), tokio_postgres::config::SslMode::Require);
        let (c, s) = split("postgres://u@h/db?sslmode=disable").unwrap();
        assert_eq!(s.verify, Verify::None);
        assert_eq!(c.get_ssl_mode(), tokio_postgres::config::SslMode::Disable);
        let (c, _) = split("postgres://u@h/db").unwrap();
        assert_eq!(c.get_ssl_mode(), tokio_postgres::config::SslMode::Prefer);
        let e = split("postgres://u@h/db?sslmode=always").unwrap_err();
        assert!(e.to_string().contains("verify-full"), "{e}");
    }
}
