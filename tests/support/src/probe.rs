//! Minimal blocking HTTP(S) GET for readiness checks.
//!
//! Deliberately runtime-free: the control plane is started from test threads that each own a
//! different tokio runtime (or none), and a client bound to one of them must not leak into the
//! others. Only the status code matters, so a hand-written HTTP/1.1 request is enough.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

use crate::certs::AdminCredentials;

/// Bounds each probe so a half-started server cannot stall the deadline-based wait.
const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// GETs `path` from a plain-HTTP server on loopback and returns the status code.
pub(crate) fn http_status(port: u16, path: &str) -> io::Result<u16> {
    let mut stream = connect(port)?;
    request_status(&mut stream, port, path)
}

/// A TLS client that trusts the test CA and presents the admin client certificate.
pub(crate) struct TlsProbe {
    config: Arc<ClientConfig>,
}

impl TlsProbe {
    pub(crate) fn new(admin: &AdminCredentials) -> Result<TlsProbe> {
        let mut roots = RootCertStore::empty();
        roots.add(CertificateDer::from(admin.ca_cert_der.clone())).context("trusting the test CA")?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_client_auth_cert(
                vec![CertificateDer::from(admin.cert_der.clone())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(admin.key_der.clone())),
            )
            .context("configuring the admin client certificate")?;
        Ok(TlsProbe { config: Arc::new(config) })
    }

    /// GETs `path` from `https://127.0.0.1:port` and returns the status code.
    pub(crate) fn status(&self, host: Ipv4Addr, port: u16, path: &str) -> io::Result<u16> {
        let server_name = ServerName::IpAddress(host.into());
        let connection = ClientConnection::new(self.config.clone(), server_name).map_err(io::Error::other)?;
        let mut stream = StreamOwned::new(connection, connect_to(host, port)?);
        request_status(&mut stream, port, path)
    }
}

fn connect(port: u16) -> io::Result<TcpStream> {
    connect_to(Ipv4Addr::LOCALHOST, port)
}

fn connect_to(host: Ipv4Addr, port: u16) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&SocketAddr::from((host, port)), IO_TIMEOUT)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(stream)
}

/// Sends a GET and parses the status code out of the response's first line.
fn request_status(stream: &mut (impl Read + Write), port: u16, path: &str) -> io::Result<u16> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes())?;
    stream.flush()?;
    let mut head = Vec::new();
    let mut buf = [0u8; 512];
    while !head.windows(2).any(|pair| pair == b"\r\n") {
        let read = stream.read(&mut buf)?;
        if read == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed before the status line"));
        }
        head.extend_from_slice(&buf[..read]);
    }
    parse_status_line(&head)
}

/// `HTTP/1.1 200 OK` -> 200.
fn parse_status_line(head: &[u8]) -> io::Result<u16> {
    let text = String::from_utf8_lossy(head);
    text.split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("bad HTTP status line: {text:?}")))
}

#[cfg(test)]
mod tests {
    use super::parse_status_line;

    #[test]
    fn parses_status_codes() {
        assert_eq!(parse_status_line(b"HTTP/1.1 200 OK\r\n").unwrap(), 200);
        assert_eq!(parse_status_line(b"HTTP/1.1 500 Internal Server Error\r\nContent").unwrap(), 500);
        assert!(parse_status_line(b"garbage\r\n").is_err());
    }
}
