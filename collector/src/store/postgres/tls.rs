//! TLS to PostgreSQL, as libpq's `sslmode` and `sslrootcert` say (decision 0096).
//!
//! `tokio-postgres` knows `sslmode` `disable`, `prefer` and `require` and refuses the rest of
//! libpq's options, so [`parse`] takes `sslmode` and `sslrootcert` out of the URL (or key=value
//! string) first and builds a rustls connector (ring, as everywhere in Tally) for the rest:
//!
//! | `sslmode`            | TLS                   | server certificate checked            |
//! |----------------------|-----------------------|---------------------------------------|
//! | `disable`            | never                 | —                                     |
//! | `prefer` (default)   | if the server offers  | no (as libpq)                         |
//! | `require`            | always                | no, unless `sslrootcert` is given (then as `verify-ca`, as libpq) |
//! | `verify-ca`          | always                | chain to `sslrootcert` (or the system's roots) |
//! | `verify-full`        | always                | chain and host name                   |
//!
//! The handshake's signatures are always verified; "not checked" means any certificate is
//! accepted, which protects against eavesdropping only. Use `verify-full` across networks.

use crate::store::StoreError;
use postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// No TLS.
    Disable,
    /// TLS when the server offers it, certificate not checked.
    Prefer,
    /// TLS always, certificate not checked (unless a root certificate is given).
    Require,
    /// TLS always, chain checked.
    VerifyCa,
    /// TLS always, chain and host name checked.
    VerifyFull,
}

impl FromStr for SslMode {
    type Err = StoreError;
    fn from_str(s: &str) -> Result<Self, StoreError> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "prefer" | "allow" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(StoreError::Invariant(format!(
                    "sslmode {other:?}: expected disable, prefer, require, verify-ca or verify-full"
                )));
            }
        })
    }
}

/// How the pool and the listener connect.
#[derive(Clone)]
pub enum PgTls {
    /// Plain TCP (or a Unix socket).
    None,
    /// rustls.
    Rustls(MakeRustls),
}

impl std::fmt::Debug for PgTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PgTls::None => "PgTls::None",
            PgTls::Rustls(_) => "PgTls::Rustls",
        })
    }
}

impl PgTls {
    /// Opens a connection with this TLS setting.
    pub fn connect(&self, config: &postgres::Config) -> Result<postgres::Client, postgres::Error> {
        match self {
            PgTls::None => config.connect(postgres::NoTls),
            PgTls::Rustls(m) => config.connect(m.clone()),
        }
    }
}

/// A connection string's configuration and TLS, `sslmode`/`sslrootcert` honoured as libpq does.
pub fn parse(url: &str) -> Result<(postgres::Config, PgTls, SslMode), StoreError> {
    let mut mode = None;
    let mut root = None;
    let rest = strip_ssl_options(url, &mut |k, v| match k {
        "sslmode" => mode = Some(v.to_owned()),
        "sslrootcert" => root = Some(v.to_owned()),
        _ => {}
    });
    let mut config = postgres::Config::from_str(&rest)?;
    let mode = match mode {
        Some(m) => SslMode::from_str(&m)?,
        None => SslMode::Prefer,
    };
    config.ssl_mode(match mode {
        SslMode::Disable => postgres::config::SslMode::Disable,
        SslMode::Prefer => postgres::config::SslMode::Prefer,
        _ => postgres::config::SslMode::Require,
    });
    let roots = match &root {
        Some(path) => Some(read_roots(path)?),
        None => None,
    };
    let verify = match (mode, roots.is_some()) {
        (SslMode::Disable, _) => return Ok((config, PgTls::None, mode)),
        (SslMode::Prefer, _) | (SslMode::Require, false) => Verify::Nothing,
        (SslMode::Require | SslMode::VerifyCa, _) => Verify::Chain,
        (SslMode::VerifyFull, _) => Verify::Full,
    };
    let roots = match roots {
        Some(r) => r,
        None if verify == Verify::Nothing => rustls::RootCertStore::empty(),
        None => system_roots()?,
    };
    Ok((config, PgTls::Rustls(MakeRustls::new(verify, roots)?), mode))
}

/// Removes `sslmode=` and `sslrootcert=` from a URL's query or a key=value string, handing
/// each to `take`.
fn strip_ssl_options(url: &str, take: &mut dyn FnMut(&str, &str)) -> String {
    let ours = |k: &str| k == "sslmode" || k == "sslrootcert";
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let Some((base, query)) = url.split_once('?') else {
            return url.to_owned();
        };
        let kept: Vec<&str> = query
            .split('&')
            .filter(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                if ours(k) {
                    take(k, &percent_decode(v));
                    false
                } else {
                    true
                }
            })
            .collect();
        if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        }
    } else {
        url.split_whitespace()
            .filter(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                if ours(k.trim()) {
                    take(k.trim(), v.trim().trim_matches('\''));
                    false
                } else {
                    true
                }
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// `%XX` escapes of a URL's query value (a path in `sslrootcert`).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let Some(h) = s.get(i + 1..i + 3)
            && let Ok(v) = u8::from_str_radix(h, 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn read_roots(path: &str) -> Result<rustls::RootCertStore, StoreError> {
    let pem = std::fs::read(path)
        .map_err(|e| StoreError::Invariant(format!("sslrootcert {path}: {e}")))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| StoreError::Invariant(format!("sslrootcert {path}: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| StoreError::Invariant(format!("sslrootcert {path}: {e}")))?;
    }
    if roots.is_empty() {
        return Err(StoreError::Invariant(format!(
            "sslrootcert {path}: no certificate"
        )));
    }
    Ok(roots)
}

fn system_roots() -> Result<rustls::RootCertStore, StoreError> {
    let mut roots = rustls::RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    for cert in found.certs {
        // A system certificate rustls cannot use is skipped, as browsers do.
        let _ = roots.add(cert);
    }
    if roots.is_empty() {
        return Err(StoreError::Invariant(String::from(
            "sslmode verify-ca/verify-full: no system root certificates; set sslrootcert",
        )));
    }
    Ok(roots)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verify {
    Nothing,
    Chain,
    Full,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Checks what `Verify` asks; handshake signatures always.
#[derive(Debug)]
struct Verifier {
    verify: Verify,
    webpki: Option<Arc<rustls::client::WebPkiServerVerifier>>,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(w) = &self.webpki else {
            return Ok(ServerCertVerified::assertion());
        };
        match w.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. },
            )) if self.verify == Verify::Chain => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// `MakeTlsConnect` over rustls (what `tokio-postgres-rustls` does, in the few lines we need,
/// on the workspace's rustls and ring).
#[derive(Clone)]
pub struct MakeRustls {
    config: Arc<rustls::ClientConfig>,
}

impl MakeRustls {
    fn new(verify: Verify, roots: rustls::RootCertStore) -> Result<Self, StoreError> {
        let p = provider();
        let webpki = if verify == Verify::Nothing {
            None
        } else {
            Some(
                rustls::client::WebPkiServerVerifier::builder_with_provider(
                    Arc::new(roots),
                    p.clone(),
                )
                .build()
                .map_err(|e| StoreError::Invariant(format!("postgres tls: {e}")))?,
            )
        };
        let verifier = Verifier {
            verify,
            webpki,
            algs: p.signature_verification_algorithms,
        };
        let config = rustls::ClientConfig::builder_with_provider(p)
            .with_safe_default_protocol_versions()
            .map_err(|e| StoreError::Invariant(format!("postgres tls: {e}")))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        Ok(MakeRustls {
            config: Arc::new(config),
        })
    }
}

impl<S> MakeTlsConnect<S> for MakeRustls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = rustls::pki_types::InvalidDnsNameError;

    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnect, Self::Error> {
        Ok(RustlsConnect {
            name: ServerName::try_from(domain.to_owned())?,
            connector: tokio_rustls::TlsConnector::from(self.config.clone()),
        })
    }
}

/// One connection's TLS handshake.
pub struct RustlsConnect {
    name: ServerName<'static>,
    connector: tokio_rustls::TlsConnector,
}

impl<S> TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            self.connector
                .connect(self.name, stream)
                .await
                .map(|s| RustlsStream(Box::new(s)))
        })
    }
}

/// A TLS stream to PostgreSQL.
pub struct RustlsStream<S>(Box<tokio_rustls::client::TlsStream<S>>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
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

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for RustlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        // No tls-server-end-point binding: SCRAM runs without channel binding (the
        // certificate check above is what authenticates the server).
        ChannelBinding::none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslmode_and_sslrootcert_are_taken_out_and_honoured() {
        let (c, tls, m) = parse("postgres://u@h:5432/db?sslmode=disable").unwrap();
        assert_eq!(m, SslMode::Disable);
        assert!(matches!(tls, PgTls::None));
        assert_eq!(c.get_ssl_mode(), postgres::config::SslMode::Disable);
        assert_eq!(c.get_dbname(), Some("db"));

        let (c, tls, m) = parse("postgres://u@h/db?application_name=x&sslmode=require").unwrap();
        assert_eq!(m, SslMode::Require);
        assert!(matches!(tls, PgTls::Rustls(_)));
        assert_eq!(c.get_ssl_mode(), postgres::config::SslMode::Require);
        assert_eq!(c.get_application_name(), Some("x"));

        // The default is libpq's: prefer.
        let (c, _, m) = parse("postgres://u@h/db").unwrap();
        assert_eq!(m, SslMode::Prefer);
        assert_eq!(c.get_ssl_mode(), postgres::config::SslMode::Prefer);

        // key=value strings too.
        let (c, _, m) = parse("host=h user=u dbname=db sslmode=require").unwrap();
        assert_eq!(m, SslMode::Require);
        assert_eq!(c.get_dbname(), Some("db"));

        // Unknown modes and missing root files are refused, naming the setting.
        let e = parse("postgres://u@h/db?sslmode=sometimes").unwrap_err();
        assert!(e.to_string().contains("sslmode"), "{e}");
        let e = parse("postgres://u@h/db?sslmode=verify-full&sslrootcert=/nonexistent.pem")
            .unwrap_err();
        assert!(e.to_string().contains("sslrootcert"), "{e}");
    }

    #[test]
    fn a_root_certificate_path_is_read_and_percent_decoded() {
        let dir = tempfile::tempdir().unwrap();
        let ca = rcgen::generate_simple_self_signed(vec![String::from("db.example")]).unwrap();
        let path = dir.path().join("root ca.pem");
        std::fs::write(&path, ca.cert.pem()).unwrap();
        let url = format!(
            "postgres://u@h/db?sslmode=verify-full&sslrootcert={}",
            path.display().to_string().replace(' ', "%20")
        );
        let (c, tls, m) = parse(&url).unwrap();
        assert_eq!(m, SslMode::VerifyFull);
        assert!(matches!(tls, PgTls::Rustls(_)));
        assert_eq!(c.get_ssl_mode(), postgres::config::SslMode::Require);
    }
}
