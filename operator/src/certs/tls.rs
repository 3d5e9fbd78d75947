//! The rustls side: a certificate resolver that presents the current serving certificate, and
//! the server config around it.

use std::{fmt, sync::Arc};

use arc_swap::ArcSwap;
use rustls::{
    ServerConfig,
    crypto::CryptoProvider,
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};

use super::Bundle;

/// Presents the serving certificate that is current when a handshake starts. A rotation reaches
/// the next handshake at once; one under way keeps the certificate it was handed (it holds its
/// own `Arc`), so a swap never disturbs it.
pub(super) struct Current(pub(super) Arc<ArcSwap<Bundle>>);

impl fmt::Debug for Current {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Current").field(&self.0.load().serving).finish()
    }
}

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load().serving.certified().clone())
    }
}

/// TLS 1.2 and 1.3 with `provider`, no client certificates (proxies authenticate with tokens).
/// ALPN offers h2 first, for gRPC, then http/1.1, so that an HTTP/1.1 client (a probe, curl)
/// still completes the handshake and gets an HTTP answer rather than a TLS alert.
pub(super) fn server_config(
    resolver: Arc<dyn ResolvesServerCert>,
    provider: Arc<CryptoProvider>,
) -> Result<ServerConfig, rustls::Error> {
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}
