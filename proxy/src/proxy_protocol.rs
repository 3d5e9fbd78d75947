//! PROXY protocol v1 (text) and v2 (binary): parse a header from a trusted peer, and write one
//! towards a backend. See the HAProxy PROXY protocol specification (proxy-protocol.txt).
//!
//! - [`parse`] is incremental: it is handed everything received so far and says "need more"
//!   only while the bytes are still a prefix of some valid header, so a client that does not
//!   speak the protocol is rejected on its first byte instead of holding a slot until a timeout.
//! - [`read_header`] takes the header off a TCP stream without consuming a single byte after it,
//!   so the rest of the stream can be probed and forwarded unchanged.
//! - [`write_header`] and [`write_v2_datagram_header`] announce a client to a backend.
//!
//! Nothing here panics on any input: every access to received bytes is bounds-checked.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::TcpStream;

/// Longest v1 line the spec allows, CRLF included: `PROXY UNKNOWN` followed by two full-length
/// IPv6 addresses and two 5-digit ports. A sender that needs more is not speaking v1.
const V1_MAX_LEN: usize = 107;

/// The v1 header starts with this; a stream starting with anything else is not v1.
const V1_PREFIX: &[u8] = b"PROXY ";

/// The v2 signature. It contains a NUL and `\r\n\r\n`, so it can be neither a v1 line nor the
/// start of any common text protocol.
const V2_SIGNATURE: [u8; 12] = [0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A];

/// Signature, version/command, family/transport and the 2-byte length of what follows.
const V2_FIXED_LEN: usize = 16;

/// Most address + TLV bytes accepted after the v2 fixed part. The spec allows up to 65535, but
/// TLVs are skipped here, and every byte accepted is a byte held while waiting for the rest of a
/// header from a possibly slow peer; 512 leaves room for the TLVs real proxies send.
pub const MAX_V2_PAYLOAD: usize = 512;

/// Longest header accepted: the 107-byte v1 maximum, or a v2 header of 16 fixed bytes plus up to
/// [`MAX_V2_PAYLOAD`] bytes of addresses and TLVs (larger v2 headers are [`ParseError::V2TooLong`]).
pub const MAX_HEADER_LEN: usize = V2_FIXED_LEN + MAX_V2_PAYLOAD;

/// v2 transport nibble for a stream (TCP) connection.
const TRANSPORT_STREAM: u8 = 0x1;
/// v2 transport nibble for datagrams (UDP).
const TRANSPORT_DGRAM: u8 = 0x2;
/// v2 version 2 in the high nibble, PROXY command in the low one.
const V2_PROXY_COMMAND: u8 = 0x21;

/// Which version of the protocol a header uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    /// Human-readable text line.
    V1,
    /// Binary, with optional TLVs.
    V2,
}

/// What a header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Addresses {
    /// PROXY TCP4/TCP6 (v1) or PROXY command with INET/INET6 (v2): the real client and the
    /// address it connected to.
    Proxied { source: SocketAddr, destination: SocketAddr },
    /// v1 "UNKNOWN" or v2 LOCAL command or AF_UNSPEC: use the connection's own addresses.
    Local,
}

/// A complete, valid header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub version: Version,
    pub addresses: Addresses,
    /// Bytes the header occupies at the start of the stream (or datagram).
    pub len: usize,
    /// v2 only: true if the transport is DGRAM (UDP).
    pub datagram: bool,
}

/// Why bytes are not a valid PROXY header. [`ParseError::label`] groups the variants for metrics.
#[derive(Clone, Copy, Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    /// The stream starts with neither `PROXY ` nor the v2 signature.
    #[error("stream does not start with a PROXY protocol v1 or v2 signature")]
    Missing,
    /// A v1 line breaks the grammar; the text says where.
    #[error("malformed PROXY v1 header: {0}")]
    MalformedV1(&'static str),
    /// A v1 address does not parse as an address of the family the line announced.
    #[error("malformed PROXY v1 header: {field} is not a valid {family} address")]
    V1InvalidAddress { field: &'static str, family: &'static str },
    /// A v1 port is not plain decimal in 0..=65535.
    #[error("malformed PROXY v1 header: {0} is not a decimal number in 0..=65535 without sign or leading zero")]
    V1InvalidPort(&'static str),
    /// No CRLF within the longest line v1 allows.
    #[error("PROXY v1 header has no CRLF within its first {V1_MAX_LEN} bytes", V1_MAX_LEN = V1_MAX_LEN)]
    V1TooLong,
    /// The v2 command nibble is neither LOCAL (0) nor PROXY (1).
    #[error("malformed PROXY v2 header: unknown command {0:#x}")]
    V2InvalidCommand(u8),
    /// The v2 family/transport byte is not one the spec defines.
    #[error("malformed PROXY v2 header: unknown address family/transport byte {0:#04x}")]
    V2InvalidFamily(u8),
    /// The v2 length is too short for the addresses of the announced family.
    #[error("malformed PROXY v2 header: address block of {len} bytes is shorter than the {needed} {family} needs")]
    V2ShortAddresses { len: usize, needed: usize, family: &'static str },
    /// The v2 header is longer than [`MAX_HEADER_LEN`].
    #[error("PROXY v2 header is {0} bytes long, more than the {max} accepted", max = MAX_HEADER_LEN)]
    V2TooLong(usize),
    /// The v2 version nibble is not 2.
    #[error("PROXY v2 signature followed by unsupported protocol version {0}")]
    UnsupportedVersion(u8),
    /// A v2 TLV's length runs past the end of the header.
    #[error("malformed PROXY v2 header: the TLV at byte {at} of the address block claims {len} bytes, {left} are left")]
    V2TlvOverrun { at: usize, len: usize, left: usize },
    /// A v2 header for a datagram (UDP) transport on a stream (TCP) connection.
    #[error("malformed PROXY v2 header: it announces a datagram (UDP) transport on a TCP connection")]
    V2DatagramOnStream,
    /// v2 AF_UNIX addresses: a socket path cannot stand in for a client address.
    #[error("PROXY v2 header carries AF_UNIX addresses, which are not supported")]
    UnsupportedUnix,
}

impl ParseError {
    /// Short, fixed label for metrics (`reason="malformed"`).
    pub fn label(&self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::MalformedV1(_)
            | Self::V1InvalidAddress { .. }
            | Self::V1InvalidPort(_)
            | Self::V2InvalidCommand(_)
            | Self::V2InvalidFamily(_)
            | Self::V2ShortAddresses { .. }
            | Self::V2TlvOverrun { .. }
            | Self::V2DatagramOnStream => "malformed",
            Self::V1TooLong | Self::V2TooLong(_) => "too_long",
            Self::UnsupportedVersion(_) | Self::UnsupportedUnix => "unsupported",
        }
    }
}

/// Parses a header from `data`, the bytes received so far.
///
/// `Ok(None)`: incomplete, need more bytes (only while `data` is a proper prefix of a possible
/// header). `Ok(Some(header))`: complete; `header.len` bytes belong to it, the rest is payload.
/// `Err`: not a valid PROXY header, and no further bytes can make it one.
pub fn parse(data: &[u8]) -> Result<Option<Header>, ParseError> {
    if data.starts_with(&V2_SIGNATURE) {
        return parse_v2(data);
    }
    if data.starts_with(V1_PREFIX) {
        return parse_v1(data);
    }
    if V2_SIGNATURE.starts_with(data) || V1_PREFIX.starts_with(data) {
        return Ok(None);
    }
    Err(ParseError::Missing)
}

// ---------------------------------------------------------------------------------------------
// v1

/// Why v1 parsing stopped short of a complete header.
enum Stop {
    /// The bytes so far are a valid prefix; more are needed.
    NeedMore,
    /// The bytes so far can never become a valid header.
    Invalid(ParseError),
}

impl From<ParseError> for Stop {
    fn from(error: ParseError) -> Self {
        Self::Invalid(error)
    }
}

/// The protocol word of a v1 line.
#[derive(Clone, Copy)]
enum V1Family {
    Tcp4,
    Tcp6,
    Unknown,
}

/// Parses a v1 line; `data` starts with `PROXY `.
fn parse_v1(data: &[u8]) -> Result<Option<Header>, ParseError> {
    // Only the first 107 bytes can belong to the header; looking no further bounds the work.
    let window = data.get(..V1_MAX_LEN).unwrap_or(data);
    match v1_line(window) {
        Ok((addresses, len)) => Ok(Some(Header { version: Version::V1, addresses, len, datagram: false })),
        Err(Stop::Invalid(error)) => Err(error),
        Err(Stop::NeedMore) if data.len() >= V1_MAX_LEN => Err(ParseError::V1TooLong),
        Err(Stop::NeedMore) => Ok(None),
    }
}

/// Reads the whole line: the addresses it announces and its length including CRLF.
fn v1_line(window: &[u8]) -> Result<(Addresses, usize), Stop> {
    let mut cursor = Cursor { data: window, pos: 0 };
    cursor.literal(V1_PREFIX, "does not start with \"PROXY \"")?;
    let addresses = match v1_family(&mut cursor)? {
        V1Family::Unknown => {
            v1_unknown_tail(&mut cursor)?;
            Addresses::Local
        }
        V1Family::Tcp4 => v1_addresses(&mut cursor, V1Family::Tcp4)?,
        V1Family::Tcp6 => v1_addresses(&mut cursor, V1Family::Tcp6)?,
    };
    Ok((addresses, cursor.pos))
}

/// Reads the protocol word (with the space after TCP4/TCP6; UNKNOWN may end the line).
fn v1_family(cursor: &mut Cursor<'_>) -> Result<V1Family, Stop> {
    let words: [(&[u8], V1Family); 3] =
        [(b"TCP4 ", V1Family::Tcp4), (b"TCP6 ", V1Family::Tcp6), (b"UNKNOWN", V1Family::Unknown)];
    for (word, family) in words {
        let rest = cursor.rest();
        if rest.starts_with(word) {
            cursor.pos += word.len();
            return Ok(family);
        }
        if word.starts_with(rest) {
            return Err(Stop::NeedMore);
        }
    }
    Err(ParseError::MalformedV1("protocol is not TCP4, TCP6 or UNKNOWN followed by a space").into())
}

/// After UNKNOWN the spec says to ignore everything up to CRLF, so any bytes are accepted there.
fn v1_unknown_tail(cursor: &mut Cursor<'_>) -> Result<(), Stop> {
    let rest = cursor.rest();
    match rest.first() {
        None => Err(Stop::NeedMore),
        Some(b'\r') => cursor.literal(b"\r\n", "CR after UNKNOWN is not followed by LF"),
        Some(b' ') => match rest.windows(2).position(|pair| pair == b"\r\n") {
            Some(at) => {
                cursor.pos += at + 2;
                Ok(())
            }
            None => Err(Stop::NeedMore),
        },
        Some(_) => Err(ParseError::MalformedV1("UNKNOWN is not followed by a space or CRLF").into()),
    }
}

/// Reads `<src ip> <dst ip> <src port> <dst port>\r\n` for TCP4 or TCP6.
fn v1_addresses(cursor: &mut Cursor<'_>, family: V1Family) -> Result<Addresses, Stop> {
    let source_ip = v1_ip(cursor, family, "source address")?;
    cursor.literal(b" ", "source address is not followed by a single space")?;
    let destination_ip = v1_ip(cursor, family, "destination address")?;
    cursor.literal(b" ", "destination address is not followed by a single space")?;
    let source_port = v1_port(cursor, b' ', "source port")?;
    cursor.literal(b" ", "source port is not followed by a single space")?;
    let destination_port = v1_port(cursor, b'\r', "destination port")?;
    cursor.literal(b"\r\n", "destination port is not followed by CRLF")?;
    Ok(Addresses::Proxied {
        source: SocketAddr::new(source_ip, source_port),
        destination: SocketAddr::new(destination_ip, destination_port),
    })
}

/// Reads one address and checks it belongs to the announced family.
fn v1_ip(cursor: &mut Cursor<'_>, family: V1Family, field: &'static str) -> Result<IpAddr, Stop> {
    let (allowed, max, name): (fn(u8) -> bool, usize, &'static str) = match family {
        V1Family::Tcp6 => (|b| b.is_ascii_hexdigit() || b == b':' || b == b'.', 45, "IPv6"),
        _ => (|b| b.is_ascii_digit() || b == b'.', 15, "IPv4"),
    };
    let invalid = ParseError::V1InvalidAddress { field, family: name };
    let token = cursor.token(b' ', max, allowed, invalid)?;
    let text = std::str::from_utf8(token).map_err(|_| invalid)?;
    let ip = match family {
        V1Family::Tcp6 => text.parse::<Ipv6Addr>().map(IpAddr::V6),
        _ => text.parse::<Ipv4Addr>().map(IpAddr::V4),
    };
    ip.map_err(|_| invalid.into())
}

/// Reads one port: 1 to 5 decimal digits, no sign, no leading zero, at most 65535.
fn v1_port(cursor: &mut Cursor<'_>, end: u8, field: &'static str) -> Result<u16, Stop> {
    let invalid = ParseError::V1InvalidPort(field);
    let token = cursor.token(end, 5, |b| b.is_ascii_digit(), invalid)?;
    if token.len() > 1 && token.first() == Some(&b'0') {
        return Err(invalid.into());
    }
    let text = std::str::from_utf8(token).map_err(|_| invalid)?;
    text.parse::<u16>().map_err(|_| invalid.into())
}

/// A read position in a v1 line; running out of bytes is [`Stop::NeedMore`], not an error.
struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    /// The bytes not read yet.
    fn rest(&self) -> &'a [u8] {
        self.data.get(self.pos..).unwrap_or_default()
    }

    /// Consumes exactly `expected`; a partial match at the end of the data needs more bytes.
    fn literal(&mut self, expected: &[u8], problem: &'static str) -> Result<(), Stop> {
        let rest = self.rest();
        if rest.starts_with(expected) {
            self.pos += expected.len();
            Ok(())
        } else if expected.starts_with(rest) {
            Err(Stop::NeedMore)
        } else {
            Err(ParseError::MalformedV1(problem).into())
        }
    }

    /// Consumes a non-empty token of at most `max` bytes accepted by `allowed`, up to (not
    /// including) `end`. Checking each byte as it arrives rejects garbage without waiting.
    fn token(&mut self, end: u8, max: usize, allowed: fn(u8) -> bool, invalid: ParseError) -> Result<&'a [u8], Stop> {
        let rest = self.rest();
        for (at, &byte) in rest.iter().enumerate() {
            if byte == end && at > 0 {
                self.pos += at;
                return Ok(rest.get(..at).unwrap_or_default());
            }
            if at >= max || !allowed(byte) {
                return Err(invalid.into());
            }
        }
        Err(Stop::NeedMore)
    }
}

// ---------------------------------------------------------------------------------------------
// v2

/// The v2 command nibble.
#[derive(Clone, Copy)]
enum Command {
    /// The proxy's own connection (e.g. a health check): addresses are ignored.
    Local,
    /// A relayed connection: addresses describe the real client.
    Proxy,
}

/// What the family/transport byte says to do with the address block.
#[derive(Clone, Copy)]
enum V2Family {
    /// LOCAL command or AF_UNSPEC: skip the block.
    Unspec,
    Inet,
    Inet6,
}

/// Parses a v2 header; `data` starts with the signature. The version/command and family bytes
/// are checked as soon as they arrive, so a bad header fails before its length is known.
fn parse_v2(data: &[u8]) -> Result<Option<Header>, ParseError> {
    let Some(&version_command) = data.get(12) else { return Ok(None) };
    let command = v2_command(version_command)?;
    let Some(&family_transport) = data.get(13) else { return Ok(None) };
    let family = v2_family(command, family_transport)?;
    let (Some(&high), Some(&low)) = (data.get(14), data.get(15)) else { return Ok(None) };
    let len = V2_FIXED_LEN + usize::from(u16::from_be_bytes([high, low]));
    if len > MAX_HEADER_LEN {
        return Err(ParseError::V2TooLong(len));
    }
    let Some(block) = data.get(V2_FIXED_LEN..len) else { return Ok(None) };
    let addresses = v2_addresses(family, block)?;
    let datagram = family_transport & 0x0F == TRANSPORT_DGRAM;
    Ok(Some(Header { version: Version::V2, addresses, len, datagram }))
}

/// Checks the version nibble (must be 2) and decodes the command nibble.
fn v2_command(byte: u8) -> Result<Command, ParseError> {
    match (byte >> 4, byte & 0x0F) {
        (2, 0) => Ok(Command::Local),
        (2, 1) => Ok(Command::Proxy),
        (2, command) => Err(ParseError::V2InvalidCommand(command)),
        (version, _) => Err(ParseError::UnsupportedVersion(version)),
    }
}

/// Decodes the family/transport byte. The spec says a LOCAL header's family is to be discarded,
/// so any byte is accepted there; a PROXY header must use one of the defined combinations.
fn v2_family(command: Command, byte: u8) -> Result<V2Family, ParseError> {
    match (command, byte) {
        (Command::Local, _) | (Command::Proxy, 0x00) => Ok(V2Family::Unspec),
        (Command::Proxy, 0x11 | 0x12) => Ok(V2Family::Inet),
        (Command::Proxy, 0x21 | 0x22) => Ok(V2Family::Inet6),
        (Command::Proxy, 0x31 | 0x32) => Err(ParseError::UnsupportedUnix),
        (Command::Proxy, other) => Err(ParseError::V2InvalidFamily(other)),
    }
}

/// Reads the addresses from the start of the block; whatever follows them is TLVs, which are
/// skipped once their lengths are checked to fit the block.
fn v2_addresses(family: V2Family, block: &[u8]) -> Result<Addresses, ParseError> {
    let (addresses, tlvs_at) = match family {
        V2Family::Unspec => return Ok(Addresses::Local),
        V2Family::Inet => (v2_inet::<4>(block, "INET", IpAddr::from)?, 12),
        V2Family::Inet6 => (v2_inet::<16>(block, "INET6", IpAddr::from)?, 36),
    };
    check_tlvs(block, tlvs_at)?;
    Ok(addresses)
}

/// Walks the TLVs from `at` to the end of `block`: each is a type byte, a 2-byte big-endian
/// length and that many bytes, and the last must end exactly where the block does.
fn check_tlvs(block: &[u8], mut at: usize) -> Result<(), ParseError> {
    while at < block.len() {
        let left = block.len() - at;
        let len = match block.get(at + 1..at + 3) {
            Some(&[high, low]) => usize::from(u16::from_be_bytes([high, low])),
            _ => return Err(ParseError::V2TlvOverrun { at, len: 3, left }),
        };
        if 3 + len > left {
            return Err(ParseError::V2TlvOverrun { at, len: 3 + len, left });
        }
        at += 3 + len;
    }
    Ok(())
}

/// Reads `src addr (N bytes), dst addr (N bytes), src port, dst port` (big-endian ports).
fn v2_inet<const N: usize>(
    block: &[u8],
    family: &'static str,
    to_ip: fn([u8; N]) -> IpAddr,
) -> Result<Addresses, ParseError> {
    let mut rest = block;
    let fields = (take::<N>(&mut rest), take::<N>(&mut rest), take::<2>(&mut rest), take::<2>(&mut rest));
    let (Some(source), Some(destination), Some(source_port), Some(destination_port)) = fields else {
        return Err(ParseError::V2ShortAddresses { len: block.len(), needed: 2 * N + 4, family });
    };
    Ok(Addresses::Proxied {
        source: SocketAddr::new(to_ip(source), u16::from_be_bytes(source_port)),
        destination: SocketAddr::new(to_ip(destination), u16::from_be_bytes(destination_port)),
    })
}

/// Takes the first `N` bytes off `bytes`, if there are that many.
fn take<const N: usize>(bytes: &mut &[u8]) -> Option<[u8; N]> {
    let (head, rest) = bytes.split_first_chunk::<N>()?;
    *bytes = rest;
    Some(*head)
}

// ---------------------------------------------------------------------------------------------
// Writing

/// Addresses as they go on the wire: both of one family.
enum WireAddresses {
    V4(Ipv4Addr, Ipv4Addr),
    V6(Ipv6Addr, Ipv6Addr),
}

/// A header carries one family for both ends, so a mixed pair (a v4 client reaching a v6
/// listener, or the reverse) is sent as IPv6 with the v4 side as a v4-mapped address.
fn wire_addresses(source: IpAddr, destination: IpAddr) -> WireAddresses {
    match (source, destination) {
        (IpAddr::V4(source), IpAddr::V4(destination)) => WireAddresses::V4(source, destination),
        (source, destination) => WireAddresses::V6(as_ipv6(source), as_ipv6(destination)),
    }
}

/// The address itself if IPv6, else its v4-mapped form.
fn as_ipv6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// Appends a header to `out` announcing `source` → `destination` for a stream (TCP) connection.
/// Mixed families are sent as IPv6 (v1 `TCP6`, v2 INET6) with v4-mapped addresses.
pub fn write_header(version: Version, source: SocketAddr, destination: SocketAddr, out: &mut Vec<u8>) {
    match version {
        Version::V1 => write_v1(source, destination, out),
        Version::V2 => write_v2(TRANSPORT_STREAM, source, destination, out),
    }
}

/// v2 only (v1 has no datagram form): a DGRAM (UDP) header, to prefix each datagram sent to a
/// backend.
pub fn write_v2_datagram_header(source: SocketAddr, destination: SocketAddr, out: &mut Vec<u8>) {
    write_v2(TRANSPORT_DGRAM, source, destination, out);
}

/// Appends `PROXY TCP4|TCP6 <src> <dst> <sport> <dport>\r\n`.
fn write_v1(source: SocketAddr, destination: SocketAddr, out: &mut Vec<u8>) {
    let (family, source_ip, destination_ip) = match wire_addresses(source.ip(), destination.ip()) {
        WireAddresses::V4(s, d) => ("TCP4", IpAddr::V4(s), IpAddr::V4(d)),
        WireAddresses::V6(s, d) => ("TCP6", IpAddr::V6(s), IpAddr::V6(d)),
    };
    let line = format!("PROXY {family} {source_ip} {destination_ip} {} {}\r\n", source.port(), destination.port());
    out.extend_from_slice(line.as_bytes());
}

/// Appends a v2 PROXY header with no TLVs for the given transport nibble.
fn write_v2(transport: u8, source: SocketAddr, destination: SocketAddr, out: &mut Vec<u8>) {
    out.extend_from_slice(&V2_SIGNATURE);
    out.push(V2_PROXY_COMMAND);
    match wire_addresses(source.ip(), destination.ip()) {
        WireAddresses::V4(s, d) => {
            out.push(0x10 | transport);
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        WireAddresses::V6(s, d) => {
            out.push(0x20 | transport);
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
    }
    out.extend_from_slice(&source.port().to_be_bytes());
    out.extend_from_slice(&destination.port().to_be_bytes());
}

// ---------------------------------------------------------------------------------------------
// Reading from a stream

/// Why [`read_header`] failed. [`ReadError::label`] gives a short label for metrics.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The bytes received are not a valid header.
    #[error(transparent)]
    Parse(#[from] ParseError),
    /// No complete header arrived within the timeout.
    #[error("no complete PROXY protocol header received before the timeout")]
    Timeout,
    /// The peer closed the connection before sending a complete header.
    #[error("connection closed before a complete PROXY protocol header was received")]
    Closed,
    /// The socket failed.
    #[error("reading the PROXY protocol header failed")]
    Io(#[source] io::Error),
}

impl ReadError {
    /// Short, fixed label for metrics: the [`ParseError::label`] for parse errors, else
    /// `timeout`, `closed` or `io`.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Parse(error) => error.label(),
            Self::Timeout => "timeout",
            Self::Closed => "closed",
            Self::Io(_) => "io",
        }
    }
}

/// Reads a PROXY header from the start of a TCP stream without consuming any byte after it:
/// peeks until [`parse`] has an answer, then reads exactly `header.len` bytes. Bounded by
/// [`MAX_HEADER_LEN`] and by `timeout` (error on timeout or EOF).
pub async fn read_header(stream: &TcpStream, timeout: Duration) -> Result<Header, ReadError> {
    match tokio::time::timeout(timeout, read_header_unbounded(stream)).await {
        Ok(result) => result,
        Err(_elapsed) => Err(ReadError::Timeout),
    }
}

/// [`read_header`] without its time limit.
async fn read_header_unbounded(stream: &TcpStream) -> Result<Header, ReadError> {
    let header = peek_header(stream).await?;
    if header.datagram {
        return Err(ParseError::V2DatagramOnStream.into());
    }
    consume(stream, header.len).await?;
    Ok(header)
}

/// Peeks until the buffered bytes parse to a header or an error.
///
/// Why not `TcpStream::peek` in a loop: a successful peek leaves tokio's readiness set, so while
/// an incomplete header sits in the buffer, every wait for readability returns at once and the
/// loop would spin. Instead the peek runs inside `try_io` and reports `WouldBlock` when nothing
/// new arrived; tokio then clears readiness only if no new event came in meanwhile, so the next
/// wait sleeps until more bytes (or FIN) arrive and no wake-up is lost. The synchronous peek
/// needs a std socket; a duplicate of the descriptor provides one without `unsafe`.
async fn peek_header(stream: &TcpStream) -> Result<Header, ReadError> {
    let peeker = std::net::TcpStream::from(socket2::SockRef::from(stream).try_clone().map_err(ReadError::Io)?);
    let mut buffer = [0u8; MAX_HEADER_LEN];
    let mut seen = 0;
    loop {
        let ready = stream.ready(Interest::READABLE).await.map_err(ReadError::Io)?;
        let peeked = stream.try_io(Interest::READABLE, || peek_new_bytes(&peeker, &mut buffer, seen));
        match peeked {
            Ok(0) => return Err(ReadError::Closed),
            Ok(len) => {
                seen = len;
                if let Some(header) = parse(buffer.get(..len).unwrap_or_default())? {
                    return Ok(header);
                }
            }
            // Nothing new: after FIN nothing new ever comes, otherwise wait for the next event.
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                if ready.is_read_closed() {
                    return Err(ReadError::Closed);
                }
            }
            Err(error) => return Err(ReadError::Io(error)),
        }
    }
}

/// Peeks into `buffer`; `WouldBlock` unless there are more than `seen` bytes (or EOF, `Ok(0)`).
fn peek_new_bytes(peeker: &std::net::TcpStream, buffer: &mut [u8], seen: usize) -> io::Result<usize> {
    let len = peeker.peek(buffer)?;
    if len == 0 || len > seen { Ok(len) } else { Err(io::ErrorKind::WouldBlock.into()) }
}

/// Reads and discards exactly `len` bytes (already known to be buffered) from the stream.
async fn consume(stream: &TcpStream, len: usize) -> Result<(), ReadError> {
    let mut scratch = [0u8; MAX_HEADER_LEN];
    let mut remaining = len;
    while remaining > 0 {
        stream.readable().await.map_err(ReadError::Io)?;
        let chunk = remaining.min(scratch.len());
        match stream.try_read(scratch.get_mut(..chunk).unwrap_or_default()) {
            Ok(0) => return Err(ReadError::Closed),
            Ok(read) => remaining = remaining.saturating_sub(read),
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
            Err(error) => return Err(ReadError::Io(error)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    fn addr(text: &str) -> SocketAddr {
        text.parse().expect("test address")
    }

    fn written(version: Version, source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
        let mut out = Vec::new();
        write_header(version, source, destination, &mut out);
        out
    }

    fn proxied(source: &str, destination: &str) -> Addresses {
        Addresses::Proxied { source: addr(source), destination: addr(destination) }
    }

    /// A v2 header with a raw family byte and address block, for byte-level cases.
    fn v2_raw(version_command: u8, family: u8, block: &[u8]) -> Vec<u8> {
        let mut out = V2_SIGNATURE.to_vec();
        out.push(version_command);
        out.push(family);
        out.extend_from_slice(&u16::try_from(block.len()).expect("test block").to_be_bytes());
        out.extend_from_slice(block);
        out
    }

    /// 12-byte INET block 10.0.0.1:1000 -> 10.0.0.2:2000.
    const INET_BLOCK: [u8; 12] = [10, 0, 0, 1, 10, 0, 0, 2, 0x03, 0xE8, 0x07, 0xD0];

    fn parsed(data: &[u8]) -> Header {
        parse(data).expect("valid header").expect("complete header")
    }

    fn round_trip(version: Version, source: &str, destination: &str) -> Header {
        let bytes = written(version, addr(source), addr(destination));
        let header = parsed(&bytes);
        assert_eq!(header.len, bytes.len());
        assert_eq!(header.version, version);
        assert!(!header.datagram);
        header
    }

    #[test]
    fn v1_tcp4_round_trip() {
        let header = round_trip(Version::V1, "192.0.2.1:56324", "198.51.100.7:443");
        assert_eq!(header.addresses, proxied("192.0.2.1:56324", "198.51.100.7:443"));
        assert_eq!(written(Version::V1, addr("1.2.3.4:5"), addr("6.7.8.9:10")), b"PROXY TCP4 1.2.3.4 6.7.8.9 5 10\r\n");
    }

    #[test]
    fn v1_tcp6_round_trip() {
        let header = round_trip(Version::V1, "[2001:db8::1]:65535", "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:0");
        assert_eq!(header.addresses, proxied("[2001:db8::1]:65535", "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:0"));
    }

    #[test]
    fn v1_mixed_families_are_written_as_tcp6_v4_mapped() {
        let bytes = written(Version::V1, addr("192.0.2.1:1000"), addr("[2001:db8::2]:80"));
        assert_eq!(bytes, b"PROXY TCP6 ::ffff:192.0.2.1 2001:db8::2 1000 80\r\n");
        let header = round_trip(Version::V1, "[2001:db8::1]:1000", "192.0.2.2:80");
        assert_eq!(header.addresses, proxied("[2001:db8::1]:1000", "[::ffff:192.0.2.2]:80"));
    }

    #[test]
    fn v2_tcp4_round_trip() {
        let header = round_trip(Version::V2, "10.0.0.1:1000", "10.0.0.2:2000");
        assert_eq!(header.addresses, proxied("10.0.0.1:1000", "10.0.0.2:2000"));
        assert_eq!(written(Version::V2, addr("10.0.0.1:1000"), addr("10.0.0.2:2000")), v2_raw(0x21, 0x11, &INET_BLOCK));
    }

    #[test]
    fn v2_tcp6_round_trip() {
        let header = round_trip(Version::V2, "[2001:db8::1]:1", "[::1]:65535");
        assert_eq!(header.addresses, proxied("[2001:db8::1]:1", "[::1]:65535"));
        assert_eq!(header.len, 16 + 36);
    }

    #[test]
    fn v2_mixed_families_are_written_as_inet6_v4_mapped() {
        let bytes = written(Version::V2, addr("192.0.2.1:1000"), addr("[2001:db8::2]:80"));
        assert_eq!(bytes.get(13), Some(&0x21));
        assert_eq!(parsed(&bytes).addresses, proxied("[::ffff:192.0.2.1]:1000", "[2001:db8::2]:80"));
    }

    #[test]
    fn v2_datagram_header_round_trips_with_datagram_flag() {
        let mut bytes = Vec::new();
        write_v2_datagram_header(addr("10.0.0.1:53"), addr("10.0.0.2:5353"), &mut bytes);
        assert_eq!(bytes.get(13), Some(&0x12));
        let header = parsed(&bytes);
        assert!(header.datagram);
        assert_eq!(header.addresses, proxied("10.0.0.1:53", "10.0.0.2:5353"));
        let mut bytes = Vec::new();
        write_v2_datagram_header(addr("[::1]:53"), addr("10.0.0.2:5353"), &mut bytes);
        assert_eq!(bytes.get(13), Some(&0x22));
        assert!(parsed(&bytes).datagram);
    }

    #[test]
    fn header_followed_by_payload_reports_only_its_own_len() {
        let mut bytes = written(Version::V1, addr("1.2.3.4:5"), addr("6.7.8.9:10"));
        let len = bytes.len();
        bytes.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!(parsed(&bytes).len, len);
    }

    fn every_kind_of_valid_header() -> Vec<Vec<u8>> {
        let mut with_tlvs = INET_BLOCK.to_vec();
        with_tlvs.extend_from_slice(&[0x01, 0x00, 0x02, b'h', b'2']);
        vec![
            written(Version::V1, addr("255.255.255.255:65535"), addr("1.2.3.4:0")),
            written(Version::V1, addr("[2001:db8::1]:443"), addr("[::1]:8443")),
            b"PROXY UNKNOWN\r\n".to_vec(),
            b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n".to_vec(),
            written(Version::V2, addr("10.0.0.1:1"), addr("10.0.0.2:2")),
            written(Version::V2, addr("[::1]:1"), addr("[::2]:2")),
            v2_raw(0x21, 0x11, &with_tlvs),
            v2_raw(0x20, 0x00, &[]),
            v2_raw(0x21, 0x00, &[1, 2, 3]),
        ]
    }

    #[test]
    fn every_strict_prefix_of_a_valid_header_is_incomplete() {
        for header in every_kind_of_valid_header() {
            for end in 0..header.len() {
                let prefix = header.get(..end).expect("prefix");
                assert_eq!(parse(prefix), Ok(None), "prefix {prefix:?} of {header:?}");
            }
            assert_eq!(parsed(&header).len, header.len());
        }
    }

    #[test]
    fn stream_without_signature_is_missing_from_the_first_byte() {
        for data in
            [&b"G"[..], b"GET / HTTP/1.1\r\n", b"\x16\x03\x01", b"PROXYX", b"proxy ", b"\r\n\r\n\x01", b" PROXY"]
        {
            assert_eq!(parse(data), Err(ParseError::Missing), "{data:?}");
        }
    }

    #[test]
    fn v1_unknown_short_form_is_local() {
        let header = parsed(b"PROXY UNKNOWN\r\nHELLO");
        assert_eq!(header, Header { version: Version::V1, addresses: Addresses::Local, len: 15, datagram: false });
    }

    #[test]
    fn v1_unknown_ignores_everything_up_to_crlf() {
        let header = parsed(b"PROXY UNKNOWN anything at all\r\nrest");
        assert_eq!(header.addresses, Addresses::Local);
        assert_eq!(header.len, 31);
    }

    #[test]
    fn v1_unknown_followed_by_other_text_is_malformed() {
        assert!(matches!(parse(b"PROXY UNKNOWNX\r\n"), Err(ParseError::MalformedV1(_))));
        assert!(matches!(parse(b"PROXY UNKNOWN\rX"), Err(ParseError::MalformedV1(_))));
    }

    #[test]
    fn v1_bad_family_is_malformed() {
        for data in [&b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n"[..], b"PROXY UDP4 ", b"PROXY TCP4\r\n", b"PROXY tcp4 "] {
            let error = parse(data).expect_err("bad family");
            assert!(matches!(error, ParseError::MalformedV1(_)), "{data:?}: {error:?}");
            assert_eq!(error.label(), "malformed");
        }
    }

    #[test]
    fn v1_address_of_the_wrong_family_is_malformed() {
        let v6_in_tcp4 = ParseError::V1InvalidAddress { field: "source address", family: "IPv4" };
        assert_eq!(parse(b"PROXY TCP4 ::1 "), Err(v6_in_tcp4));
        let v4_in_tcp6 = ParseError::V1InvalidAddress { field: "destination address", family: "IPv6" };
        assert_eq!(parse(b"PROXY TCP6 ::1 1.2.3.4 1 2\r\n"), Err(v4_in_tcp6));
    }

    #[test]
    fn v1_invalid_address_is_malformed() {
        let invalid = ParseError::V1InvalidAddress { field: "source address", family: "IPv4" };
        assert_eq!(parse(b"PROXY TCP4 256.1.1.1 "), Err(invalid));
        assert_eq!(parse(b"PROXY TCP4 1.2.3 "), Err(invalid));
        assert_eq!(parse(b"PROXY TCP4 1.2.3.4.5.6.7.8.9"), Err(invalid));
        assert_eq!(
            parse(b"PROXY TCP6 fe80::1%eth0 "),
            Err(ParseError::V1InvalidAddress { field: "source address", family: "IPv6" })
        );
    }

    #[test]
    fn v1_bad_port_is_malformed() {
        let cases: [(&[u8], &str); 6] = [
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 1\r\n", "source port"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 1\r\n", "source port"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 1\r\n", "source port"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 -1\r\n", "destination port"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 123456\r\n", "destination port"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "destination port"),
        ];
        for (data, field) in cases {
            assert_eq!(parse(data), Err(ParseError::V1InvalidPort(field)), "{data:?}");
        }
        assert_eq!(parsed(b"PROXY TCP4 1.2.3.4 5.6.7.8 0 65535\r\n").addresses, proxied("1.2.3.4:0", "5.6.7.8:65535"));
    }

    #[test]
    fn v1_extra_spaces_or_cr_without_lf_are_malformed() {
        for data in [
            &b"PROXY  TCP4"[..],
            b"PROXY TCP4  1.2.3.4",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n",
        ] {
            assert!(parse(data).is_err(), "{data:?}");
        }
    }

    #[test]
    fn v1_without_crlf_within_107_bytes_is_too_long() {
        let mut data = b"PROXY UNKNOWN ".to_vec();
        data.resize(V1_MAX_LEN, b'x');
        assert_eq!(parse(data.get(..V1_MAX_LEN - 1).expect("prefix")), Ok(None));
        assert_eq!(parse(&data), Err(ParseError::V1TooLong));
        data.extend_from_slice(b"\r\n");
        assert_eq!(parse(&data), Err(ParseError::V1TooLong));
        assert_eq!(ParseError::V1TooLong.label(), "too_long");
    }

    #[test]
    fn v1_header_of_exactly_107_bytes_is_accepted() {
        let mut data = b"PROXY UNKNOWN ".to_vec();
        data.resize(V1_MAX_LEN - 2, b'x');
        data.extend_from_slice(b"\r\n");
        assert_eq!(parsed(&data).len, V1_MAX_LEN);
    }

    #[test]
    fn v2_wrong_signature_is_missing() {
        let mut bytes = written(Version::V2, addr("10.0.0.1:1"), addr("10.0.0.2:2"));
        if let Some(last) = bytes.get_mut(11) {
            *last = b'X';
        }
        assert_eq!(parse(&bytes), Err(ParseError::Missing));
        assert_eq!(parse(bytes.get(..11).expect("prefix")), Ok(None));
    }

    #[test]
    fn v2_version_other_than_2_is_unsupported() {
        assert_eq!(parse(&v2_raw(0x11, 0x11, &INET_BLOCK)), Err(ParseError::UnsupportedVersion(1)));
        let error = parse(&v2_raw(0x31, 0x11, &INET_BLOCK)).expect_err("version 3");
        assert_eq!(error.label(), "unsupported");
    }

    #[test]
    fn v2_unknown_command_is_malformed() {
        assert_eq!(parse(&v2_raw(0x22, 0x11, &INET_BLOCK)), Err(ParseError::V2InvalidCommand(2)));
    }

    #[test]
    fn v2_bad_fixed_part_fails_before_the_length_arrives() {
        let bytes = v2_raw(0x2F, 0x11, &INET_BLOCK);
        assert_eq!(parse(bytes.get(..13).expect("prefix")), Err(ParseError::V2InvalidCommand(0xF)));
        let bytes = v2_raw(0x21, 0x41, &INET_BLOCK);
        assert_eq!(parse(bytes.get(..14).expect("prefix")), Err(ParseError::V2InvalidFamily(0x41)));
    }

    #[test]
    fn v2_unix_family_is_unsupported() {
        let error = parse(&v2_raw(0x21, 0x31, &[0; 216])).expect_err("AF_UNIX");
        assert_eq!(error, ParseError::UnsupportedUnix);
        assert_eq!(error.label(), "unsupported");
    }

    #[test]
    fn v2_unknown_family_or_transport_is_malformed() {
        for family in [0x10, 0x13, 0x01, 0x41, 0xFF] {
            assert_eq!(parse(&v2_raw(0x21, family, &INET_BLOCK)), Err(ParseError::V2InvalidFamily(family)));
        }
    }

    #[test]
    fn v2_local_command_is_local_whatever_its_family() {
        for family in [0x00, 0x11, 0x31, 0xFF] {
            let header = parsed(&v2_raw(0x20, family, &INET_BLOCK));
            assert_eq!(header.addresses, Addresses::Local);
            assert_eq!(header.len, 28);
        }
    }

    #[test]
    fn v2_unspec_family_is_local() {
        let header = parsed(&v2_raw(0x21, 0x00, &[]));
        assert_eq!(header, Header { version: Version::V2, addresses: Addresses::Local, len: 16, datagram: false });
    }

    #[test]
    fn v2_length_beyond_limit_is_too_long_once_the_length_is_known() {
        let mut bytes = v2_raw(0x21, 0x11, &INET_BLOCK);
        let too_long = u16::try_from(MAX_V2_PAYLOAD + 1).expect("fits").to_be_bytes();
        bytes.splice(14..16, too_long);
        let error = parse(bytes.get(..16).expect("fixed part")).expect_err("too long");
        assert_eq!(error, ParseError::V2TooLong(MAX_HEADER_LEN + 1));
        assert_eq!(error.label(), "too_long");
        // Addresses, then one NOOP TLV filling the rest.
        let noop_len = MAX_V2_PAYLOAD - INET_BLOCK.len() - 3;
        let mut block = INET_BLOCK.to_vec();
        block.push(0x04);
        block.extend_from_slice(&u16::try_from(noop_len).expect("fits").to_be_bytes());
        block.resize(MAX_V2_PAYLOAD, 0);
        assert_eq!(parsed(&v2_raw(0x21, 0x11, &block)).len, MAX_HEADER_LEN);
    }

    #[test]
    fn v2_address_block_shorter_than_its_family_needs_is_malformed() {
        let short = ParseError::V2ShortAddresses { len: 11, needed: 12, family: "INET" };
        assert_eq!(parse(&v2_raw(0x21, 0x11, INET_BLOCK.get(..11).expect("prefix"))), Err(short));
        let short6 = ParseError::V2ShortAddresses { len: 12, needed: 36, family: "INET6" };
        assert_eq!(parse(&v2_raw(0x21, 0x21, &INET_BLOCK)), Err(short6));
    }

    #[test]
    fn v2_tlvs_are_skipped() {
        let mut block = INET_BLOCK.to_vec();
        block.extend_from_slice(&[0x01, 0x00, 0x02, b'h', b'2', 0x04, 0x00, 0x00]);
        let mut bytes = v2_raw(0x21, 0x11, &block);
        bytes.extend_from_slice(b"payload");
        let header = parsed(&bytes);
        assert_eq!(header.len, 16 + block.len());
        assert_eq!(header.addresses, proxied("10.0.0.1:1000", "10.0.0.2:2000"));
    }

    #[test]
    fn v2_tlv_whose_length_runs_past_the_header_is_refused() {
        let mut block = INET_BLOCK.to_vec();
        block.extend_from_slice(&[0x01, 0x00, 0x09, b'h', b'2']);
        let overrun = ParseError::V2TlvOverrun { at: 12, len: 12, left: 5 };
        assert_eq!(parse(&v2_raw(0x21, 0x11, &block)), Err(overrun));
        // Two bytes where a TLV needs at least three.
        let mut block = INET_BLOCK.to_vec();
        block.extend_from_slice(&[0x01, 0x00]);
        assert_eq!(parse(&v2_raw(0x21, 0x11, &block)), Err(ParseError::V2TlvOverrun { at: 12, len: 3, left: 2 }));
        assert_eq!(overrun.label(), "malformed");
    }

    #[test]
    fn parse_error_labels_are_short_and_fixed() {
        assert_eq!(ParseError::Missing.label(), "missing");
        assert_eq!(ParseError::V1InvalidPort("source port").label(), "malformed");
        assert_eq!(ParseError::V2TooLong(600).label(), "too_long");
        assert_eq!(ParseError::UnsupportedUnix.label(), "unsupported");
        assert!(ParseError::V2InvalidFamily(0x41).to_string().contains("0x41"));
        assert!(ParseError::V1InvalidPort("destination port").to_string().contains("destination port"));
    }

    #[test]
    fn read_error_labels_are_short_and_fixed() {
        assert_eq!(ReadError::Timeout.label(), "timeout");
        assert_eq!(ReadError::Closed.label(), "closed");
        assert_eq!(ReadError::Io(io::ErrorKind::ConnectionReset.into()).label(), "io");
        assert_eq!(ReadError::from(ParseError::Missing).label(), "missing");
    }

    async fn connected_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("local addr")).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        (client, server)
    }

    /// Writes `parts` one at a time, letting the reader run between them.
    async fn write_in_parts(client: &mut TcpStream, parts: &[&[u8]]) {
        for part in parts {
            client.write_all(part).await.expect("write");
            client.flush().await.expect("flush");
            for _ in 0..3 {
                tokio::task::yield_now().await;
            }
        }
    }

    async fn assert_split_header_is_read_and_payload_kept(header: Vec<u8>) {
        let (mut client, mut server) = connected_pair().await;
        let reader = tokio::spawn(async move {
            let result = read_header(&server, Duration::from_secs(5)).await;
            let mut payload = Vec::new();
            server.read_to_end(&mut payload).await.expect("read payload");
            (result.expect("header"), payload)
        });
        let (first, rest) = header.split_at(5);
        let (second, third) = rest.split_at(rest.len() / 2);
        write_in_parts(&mut client, &[first, second, third]).await;
        client.write_all(b"payload after the header").await.expect("write payload");
        client.shutdown().await.expect("shutdown");
        let (parsed, payload) = reader.await.expect("reader task");
        assert_eq!(parsed.len, header.len());
        assert_eq!(payload, b"payload after the header");
    }

    #[tokio::test]
    async fn read_header_v2_split_across_writes_leaves_payload_unread() {
        assert_split_header_is_read_and_payload_kept(written(Version::V2, addr("10.0.0.1:1"), addr("[::1]:2"))).await;
    }

    #[tokio::test]
    async fn read_header_v1_split_across_writes_leaves_payload_unread() {
        assert_split_header_is_read_and_payload_kept(written(Version::V1, addr("10.0.0.1:1"), addr("10.0.0.2:2")))
            .await;
    }

    #[tokio::test]
    async fn read_header_with_payload_in_the_same_write_leaves_payload_unread() {
        let (mut client, mut server) = connected_pair().await;
        let mut bytes = written(Version::V1, addr("10.0.0.1:1"), addr("10.0.0.2:2"));
        let len = bytes.len();
        bytes.extend_from_slice(b"hello");
        client.write_all(&bytes).await.expect("write");
        let header = read_header(&server, Duration::from_secs(5)).await.expect("header");
        assert_eq!(header.len, len);
        let mut payload = [0u8; 5];
        server.read_exact(&mut payload).await.expect("payload");
        assert_eq!(&payload, b"hello");
    }

    #[tokio::test]
    async fn read_header_times_out_when_client_sends_nothing() {
        let (_client, server) = connected_pair().await;
        let error = read_header(&server, Duration::from_millis(100)).await.expect_err("timeout");
        assert!(matches!(error, ReadError::Timeout), "{error:?}");
    }

    #[tokio::test]
    async fn read_header_times_out_when_client_stops_mid_header() {
        let (mut client, server) = connected_pair().await;
        client.write_all(b"PROXY TCP4 1.2").await.expect("write");
        let error = read_header(&server, Duration::from_millis(100)).await.expect_err("timeout");
        assert!(matches!(error, ReadError::Timeout), "{error:?}");
    }

    #[tokio::test]
    async fn read_header_reports_closed_when_client_hangs_up_mid_header() {
        let (mut client, server) = connected_pair().await;
        client.write_all(b"PROXY TCP4 1.2").await.expect("write");
        client.shutdown().await.expect("shutdown");
        let error = read_header(&server, Duration::from_secs(5)).await.expect_err("closed");
        assert!(matches!(error, ReadError::Closed), "{error:?}");
    }

    #[tokio::test]
    async fn read_header_reports_closed_when_client_hangs_up_at_once() {
        let (client, server) = connected_pair().await;
        drop(client);
        let error = read_header(&server, Duration::from_secs(5)).await.expect_err("closed");
        assert!(matches!(error, ReadError::Closed), "{error:?}");
    }

    #[tokio::test]
    async fn read_header_rejects_a_stream_without_header_and_consumes_nothing() {
        let (mut client, mut server) = connected_pair().await;
        client.write_all(b"GET / HTTP/1.1\r\n").await.expect("write");
        let error = read_header(&server, Duration::from_secs(5)).await.expect_err("missing");
        assert_eq!(error.label(), "missing");
        let mut first = [0u8; 3];
        server.read_exact(&mut first).await.expect("read");
        assert_eq!(&first, b"GET");
    }

    /// Any socket address; v6 without flow info or scope, which headers do not carry.
    fn any_socket_addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::new(IpAddr::from(ip), port)),
            (any::<[u8; 16]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::new(IpAddr::from(ip), port)),
        ]
    }

    /// What a header written for `source` → `destination` reads back as.
    fn expected_addresses(source: SocketAddr, destination: SocketAddr) -> Addresses {
        match wire_addresses(source.ip(), destination.ip()) {
            WireAddresses::V4(..) => Addresses::Proxied { source, destination },
            WireAddresses::V6(s, d) => Addresses::Proxied {
                source: SocketAddr::new(IpAddr::V6(s), source.port()),
                destination: SocketAddr::new(IpAddr::V6(d), destination.port()),
            },
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..700)) {
            let _ = parse(&data);
        }

        #[test]
        fn arbitrary_bytes_after_a_signature_never_panic(v2 in any::<bool>(), data in proptest::collection::vec(any::<u8>(), 0..700)) {
            let mut bytes = if v2 { V2_SIGNATURE.to_vec() } else { V1_PREFIX.to_vec() };
            bytes.extend_from_slice(&data);
            if let Ok(Some(header)) = parse(&bytes) {
                prop_assert!(header.len <= bytes.len() && header.len <= MAX_HEADER_LEN);
            }
        }

        #[test]
        fn input_of_max_header_len_is_never_incomplete(v2 in any::<bool>(), data in proptest::collection::vec(any::<u8>(), MAX_HEADER_LEN..MAX_HEADER_LEN + 8)) {
            let mut bytes = if v2 { V2_SIGNATURE.to_vec() } else { V1_PREFIX.to_vec() };
            bytes.extend_from_slice(&data);
            prop_assert_ne!(parse(&bytes), Ok(None));
        }

        #[test]
        fn valid_header_followed_by_arbitrary_bytes_parses_to_its_len(
            v2 in any::<bool>(),
            source in any_socket_addr(),
            destination in any_socket_addr(),
            tail in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            let version = if v2 { Version::V2 } else { Version::V1 };
            let mut bytes = written(version, source, destination);
            let len = bytes.len();
            bytes.extend_from_slice(&tail);
            let header = parse(&bytes);
            prop_assert_eq!(header, Ok(Some(Header { version, addresses: expected_addresses(source, destination), len, datagram: false })));
        }
    }
}
