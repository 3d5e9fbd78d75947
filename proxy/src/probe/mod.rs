//! Protocol probing: recognise what a client speaks from its first bytes, without consuming
//! them (the caller forwards the same bytes to the backend unchanged).
//!
//! Contract (used by the connection managers for routing):
//! - [`probe_tcp`]: called with everything the client has sent so far (the caller accumulates
//!   reads up to [`MAX_TCP_PROBE_BYTES`]). Returns [`TcpProbe::Incomplete`] while more bytes
//!   could change the answer, [`TcpProbe::Detected`] with the protocol and what was learnt
//!   (SNI / ALPN / HTTP Host), or [`TcpProbe::Unknown`].
//! - [`QuicInitialProbe::push`]: fed the first datagrams of a UDP session; detects QUIC v1/v2
//!   Initial packets, decrypts them (RFC 9001 §5, RFC 9369) and reassembles CRYPTO frames across
//!   packets and datagrams to read the ClientHello's SNI and ALPN. It also recognises a
//!   WireGuard handshake initiation as the first datagram.
//!
//! Parsers never panic on any input: every read goes through the bounds-checked [`Reader`].

mod http;
mod quic;
mod ssh;
mod tls;
mod wireguard;

pub use quic::{MAX_CRYPTO_BYTES, MAX_QUIC_PROBE_DATAGRAMS, QuicInitialProbe};

/// The most bytes a TCP probe looks at before giving up (a ClientHello larger than this, e.g.
/// with huge extensions, is Detected as TLS with whatever was parsed, or Unknown otherwise).
pub const MAX_TCP_PROBE_BYTES: usize = 16 * 1024;

/// A protocol [`probe_tcp`] can recognise.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TcpProbedProtocol {
    /// A TLS ClientHello.
    Tls,
    /// An HTTP/1.x request line (or the HTTP/2 prior-knowledge preface).
    Http,
    /// An SSH-2 identification banner.
    Ssh,
}

/// What a probe learnt about the client's intent, for routing.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ProbeInfo {
    /// TLS/QUIC SNI host name or HTTP Host (without port), lowercased.
    pub server_name: Option<String>,
    /// ALPN protocol ids offered by the client, in order (lossy UTF-8).
    pub alpn: Vec<String>,
}

/// The answer of [`probe_tcp`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TcpProbe {
    /// More bytes could change the answer; call again with more.
    Incomplete,
    /// The client speaks `protocol`.
    Detected { protocol: TcpProbedProtocol, info: ProbeInfo },
    /// Not a protocol we recognise (route to the default).
    Unknown,
}

/// A protocol [`QuicInitialProbe`] can recognise.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UdpProbedProtocol {
    /// QUIC v1 or v2 (an Initial packet that decrypted with the version's initial keys).
    Quic,
    /// A WireGuard handshake initiation.
    WireGuard,
}

/// The answer of [`QuicInitialProbe::push`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UdpProbe {
    /// More datagrams could change the answer; push the next one.
    Incomplete,
    /// The client speaks `protocol`.
    Detected { protocol: UdpProbedProtocol, info: ProbeInfo },
    /// Not a protocol we recognise (route to the default).
    Unknown,
}

/// One parser's opinion of the bytes, combined by [`probe_tcp`].
#[derive(Clone, Debug, PartialEq, Eq)]
enum Verdict {
    /// The bytes cannot be this protocol.
    NotThis,
    /// A prefix of this protocol; more bytes are needed to decide.
    Incomplete,
    /// This protocol, with what was learnt.
    Detected(ProbeInfo),
}

/// A TCP parser: the (capped) bytes so far, and whether no more bytes will be looked at.
type TcpParser = fn(&[u8], bool) -> Verdict;

/// Classifies the first bytes of a TCP connection.
///
/// `data` is everything the client has sent so far (the caller accumulates; each call re-parses
/// from the start, which is cheap at these sizes). Only the first [`MAX_TCP_PROBE_BYTES`] are
/// looked at; once that many have arrived, a still-incomplete ClientHello is reported with what
/// was parsed and anything else is `Unknown`, so the caller never waits forever.
pub fn probe_tcp(data: &[u8]) -> TcpProbe {
    let at_limit = data.len() >= MAX_TCP_PROBE_BYTES;
    let capped = data.get(..MAX_TCP_PROBE_BYTES).unwrap_or(data);
    let parsers: [(TcpProbedProtocol, TcpParser); 3] = [
        (TcpProbedProtocol::Tls, tls::probe),
        (TcpProbedProtocol::Http, http::probe),
        (TcpProbedProtocol::Ssh, ssh::probe),
    ];
    let mut incomplete = false;
    for (protocol, parse) in parsers {
        match parse(capped, at_limit) {
            Verdict::Detected(info) => return TcpProbe::Detected { protocol, info },
            Verdict::Incomplete => incomplete = true,
            Verdict::NotThis => {}
        }
    }
    if incomplete && !at_limit { TcpProbe::Incomplete } else { TcpProbe::Unknown }
}

/// Ran out of bytes, or the bytes are malformed: why a [`Reader`] read failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    /// The input ended before the field did (more bytes might complete it).
    Short,
    /// The field has an impossible value (more bytes will not help).
    Invalid,
}

/// A bounds-checked big-endian cursor: the only way the parsers read input, so that no input
/// can make them index out of bounds.
#[derive(Clone, Debug)]
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    /// Bytes not read yet.
    fn rest(&self) -> &'a [u8] {
        self.buf
    }

    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The next `n` bytes, or `Short` (consuming nothing) if fewer remain.
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], Stop> {
        let (head, tail) = self.buf.split_at_checked(n).ok_or(Stop::Short)?;
        self.buf = tail;
        Ok(head)
    }

    /// Up to `n` bytes: all of them if they are there, else whatever remains. Used to parse a
    /// length-prefixed block of which only a prefix may have arrived yet.
    fn up_to(&mut self, n: usize) -> &'a [u8] {
        let (head, tail) = self.buf.split_at(n.min(self.buf.len()));
        self.buf = tail;
        head
    }

    fn u8(&mut self) -> Result<u8, Stop> {
        let (&first, tail) = self.buf.split_first().ok_or(Stop::Short)?;
        self.buf = tail;
        Ok(first)
    }

    fn u16(&mut self) -> Result<u16, Stop> {
        let b = self.bytes(2)?;
        Ok(b.iter().fold(0u16, |acc, &x| (acc << 8) | u16::from(x)))
    }

    fn u24(&mut self) -> Result<usize, Stop> {
        let b = self.bytes(3)?;
        Ok(b.iter().fold(0usize, |acc, &x| (acc << 8) | usize::from(x)))
    }

    fn u32(&mut self) -> Result<u32, Stop> {
        let b = self.bytes(4)?;
        Ok(b.iter().fold(0u32, |acc, &x| (acc << 8) | u32::from(x)))
    }

    /// A QUIC variable-length integer (RFC 9000 §16): the two top bits of the first byte give
    /// its length (1, 2, 4 or 8 bytes).
    fn varint(&mut self) -> Result<u64, Stop> {
        let first = *self.buf.first().ok_or(Stop::Short)?;
        let len = 1usize << (first >> 6);
        let b = self.bytes(len)?;
        Ok(b.iter().fold(0u64, |acc, &x| (acc << 8) | u64::from(x)) & (u64::MAX >> (64 - 8 * len + 2)))
    }

    /// A varint used as a length or offset into memory.
    fn varint_usize(&mut self) -> Result<usize, Stop> {
        usize::try_from(self.varint()?).map_err(|_| Stop::Invalid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn empty_data_is_incomplete() {
        assert_eq!(probe_tcp(b""), TcpProbe::Incomplete);
    }

    #[test]
    fn unrecognised_bytes_are_unknown() {
        assert_eq!(probe_tcp(b"\x00\x01\x02 hello"), TcpProbe::Unknown);
        assert_eq!(probe_tcp(b"HELLO world\r\n"), TcpProbe::Unknown);
    }

    #[test]
    fn incomplete_prefix_reaching_the_byte_limit_is_unknown() {
        let mut data = b"GET /".to_vec();
        data.resize(MAX_TCP_PROBE_BYTES, b'a');
        assert_eq!(probe_tcp(&data), TcpProbe::Unknown);
    }

    #[test]
    fn reader_reports_short_without_consuming() {
        let mut r = Reader::new(&[1, 2, 3]);
        assert_eq!(r.u32(), Err(Stop::Short));
        assert_eq!(r.u16(), Ok(0x0102));
        assert_eq!(r.u16(), Err(Stop::Short));
        assert_eq!(r.u8(), Ok(3));
        assert!(r.is_empty());
    }

    #[test]
    fn reader_decodes_varints_of_every_length() {
        // RFC 9000 §A.1 examples.
        let mut r = Reader::new(&[0xc2, 0x19, 0x7c, 0x5e, 0xff, 0x14, 0xe8, 0x8c]);
        assert_eq!(r.varint(), Ok(151_288_809_941_952_652));
        let mut r = Reader::new(&[0x9d, 0x7f, 0x3e, 0x7d]);
        assert_eq!(r.varint(), Ok(494_878_333));
        let mut r = Reader::new(&[0x7b, 0xbd]);
        assert_eq!(r.varint(), Ok(15_293));
        let mut r = Reader::new(&[0x25]);
        assert_eq!(r.varint(), Ok(37));
        let mut r = Reader::new(&[0x40]);
        assert_eq!(r.varint(), Err(Stop::Short));
    }

    proptest! {
        /// Callers re-probe a growing buffer, so a definite answer for a prefix must not be
        /// contradicted by more bytes.
        #[test]
        fn growing_the_input_never_changes_a_definite_answer(
            seed in 0usize..4, tail in proptest::collection::vec(any::<u8>(), 0..64), cut in 0usize..128
        ) {
            let seeds: [&[u8]; 4] =
                [b"GET / HTTP/1.1\r\n", b"SSH-2.0-", &[22, 3, 1, 0, 50, 1, 0, 0, 46, 3, 3], b"PRI * HTTP/2.0"];
            let data = [seeds[seed], &tail].concat();
            let whole = probe_tcp(&data);
            match (probe_tcp(&data[..cut.min(data.len())]), &whole) {
                (TcpProbe::Incomplete, _) => {}
                (TcpProbe::Unknown, whole) => prop_assert_eq!(whole, &TcpProbe::Unknown),
                (TcpProbe::Detected { protocol, .. }, TcpProbe::Detected { protocol: p, .. }) => {
                    prop_assert_eq!(protocol, *p)
                }
                (prefix, whole) => prop_assert!(false, "prefix {:?} but whole {:?}", prefix, whole),
            }
        }
    }
}
