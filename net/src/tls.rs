//! TLS 1.3 over QUIC with the `ring` provider and ALPN `tally/1`: the collector presents a
//! certificate of the deployment CA, the agent trusts that CA alone (decision 0005).

use quinn::{ClientConfig, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::sync::Arc;
use std::time::Duration;

/// The TLS exporter label that binds the handshake proof to one connection (SPEC §5).
pub const BINDING_LABEL: &[u8] = b"tally/1 handshake";

/// How often an idle connection is kept alive, and when it is given up. A collector that vanishes
/// without closing (SIGKILL, a lost host) is noticed only by this timeout, so it bounds how long
/// an agent waits before failing over: 30 s made a killed collector's agents wait ~35 s
/// (decision 0094). Five keep-alives fit in it, so a loaded peer is not dropped by mistake.
const KEEP_ALIVE: Duration = Duration::from_secs(2);
const IDLE_TIMEOUT_MS: u32 = 10_000;

/// Why a TLS or QUIC configuration could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The PEM does not hold a usable certificate or key.
    #[error("pem: {0}")]
    Pem(String),
    /// The CA PEM holds no certificate.
    #[error("no certificate in the CA PEM")]
    NoCertificate,
    /// rustls refused the configuration.
    #[error("tls: {0}")]
    Tls(#[from] rustls::Error),
    /// quinn refused the configuration.
    #[error("quic: {0}")]
    Quic(String),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn transport() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(KEEP_ALIVE));
    t.max_idle_timeout(Some(quinn::IdleTimeout::from(quinn::VarInt::from_u32(
        IDLE_TIMEOUT_MS,
    ))));
    t
}

/// The client configuration of agents, tests and benchmarks: trusts only `ca_pem`.
pub fn client_config(ca_pem: &[u8]) -> Result<ClientConfig, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(cert.map_err(|e| TlsError::Pem(e.to_string()))?)?;
    }
    if roots.is_empty() {
        return Err(TlsError::NoCertificate);
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![tally_protocol::ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut cfg = ClientConfig::new(Arc::new(quic));
    cfg.transport_config(Arc::new(transport()));
    Ok(cfg)
}

/// The collector's server configuration: one bidirectional stream per connection, no
/// unidirectional ones (SPEC §5, decision 0004).
pub fn server_config(cert_pem: &[u8], key_pem: &[u8]) -> Result<ServerConfig, TlsError> {
    let certs = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem(e.to_string()))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsError::Pem(e.to_string()))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    tls.alpn_protocols = vec![tally_protocol::ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut cfg = ServerConfig::with_crypto(Arc::new(quic));
    let mut t = transport();
    t.max_concurrent_bidi_streams(1u32.into());
    t.max_concurrent_uni_streams(0u32.into());
    cfg.transport_config(Arc::new(t));
    Ok(cfg)
}

/// The connection's handshake binding (SPEC §5): 32 bytes of the TLS exporter, equal on both
/// ends of one connection and different on every other.
pub fn binding(conn: &quinn::Connection) -> Option<[u8; 32]> {
    let mut b = [0u8; 32];
    conn.export_keying_material(&mut b, BINDING_LABEL, b"")
        .ok()
        .map(|()| b)
}

/// The host part of `host:port`, `[v6]:port` or a bare host: the TLS server name.
pub fn server_name(addr: &str) -> &str {
    if let Some(rest) = addr.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match addr.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') && port.parse::<u16>().is_ok() => host,
        _ => addr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names() {
        assert_eq!(server_name("127.0.0.1:7443"), "127.0.0.1");
        assert_eq!(server_name("localhost:7443"), "localhost");
        assert_eq!(server_name("[::1]:7443"), "::1");
        assert_eq!(server_name("collector.internal"), "collector.internal");
    }

    #[test]
    fn a_ca_without_a_certificate_is_refused() {
        assert!(matches!(client_config(b""), Err(TlsError::NoCertificate)));
        assert!(matches!(
            server_config(b"", b"not a key"),
            Err(TlsError::Pem(_))
        ));
    }
}
