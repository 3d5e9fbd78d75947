//! QUIC Initial probing (stub while in progress).

use super::UdpProbe;

/// Most datagrams looked at.
pub const MAX_QUIC_PROBE_DATAGRAMS: usize = 4;
/// Most CRYPTO bytes reassembled.
pub const MAX_CRYPTO_BYTES: usize = 16 * 1024;

/// Per-UDP-session probe state.
#[derive(Default, Debug)]
pub struct QuicInitialProbe {}

impl QuicInitialProbe {
    /// Feeds the next datagram.
    pub fn push(&mut self, _datagram: &[u8]) -> UdpProbe {
        UdpProbe::Unknown
    }
}
