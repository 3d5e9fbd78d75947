//! Protocol probing: recognise what a client speaks from its first bytes, without consuming
//! them (the caller forwards the same bytes to the backend unchanged).
//!
//! Contract (used by the connection managers for routing):
//! - `probe_tcp(&[u8]) -> TcpProbe`: called with everything the client has sent so far (the
//!   caller accumulates reads up to `MAX_TCP_PROBE_BYTES`). Returns `Incomplete` while more bytes
//!   could change the answer, `Detected { protocol, server_name, alpn }`, or `Unknown`.
//! - `QuicInitialProbe::push(&mut self, datagram: &[u8]) -> UdpProbe`: fed the first datagrams
//!   of a UDP session; detects QUIC v1/v2 Initial packets, decrypts them (RFC 9001 §5, RFC 9369)
//!   and reassembles CRYPTO frames across datagrams to read the ClientHello's SNI and ALPN.
//! - `is_wireguard_initiation(&[u8]) -> bool`.
//!
//! Parsers never panic on any input.
