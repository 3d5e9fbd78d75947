//! QUIC Initial probing: QUIC v1 (RFC 9000, RFC 9001) and v2 (RFC 9369).
//!
//! A client's Initial packets are encrypted, but with keys anyone can derive from the
//! Destination Connection ID of its first Initial (RFC 9001 §5.2), so an on-path proxy can read
//! the TLS ClientHello they carry in CRYPTO frames. Modern ClientHellos (e.g. with post-quantum
//! key shares) span several Initial packets and datagrams, so [`QuicInitialProbe`] keeps the
//! keys and a bounded CRYPTO reassembly buffer across the session's first datagrams.

use std::collections::BTreeMap;
use std::fmt;

use ring::aead::{self, quic};
use ring::hkdf;

use super::tls::{HelloParse, parse_client_hello};
use super::wireguard::is_wireguard_initiation;
use super::{ProbeInfo, Reader, Stop, UdpProbe, UdpProbedProtocol};

/// The most datagrams of a session looked at before answering with what is known: a real
/// client's ClientHello fits in far fewer, and the caller must not buffer a session forever.
pub const MAX_QUIC_PROBE_DATAGRAMS: usize = 4;
/// The most CRYPTO bytes reassembled (from offset 0); beyond it, the ClientHello is reported
/// with whatever was parsed, bounding memory per probed session.
pub const MAX_CRYPTO_BYTES: usize = 16 * 1024;

/// QUIC v1 initial salt (RFC 9001 §5.2).
const V1_SALT: [u8; 20] = [
    0x38, 0x76, 0x2c, 0xf7, 0xf5, 0x59, 0x34, 0xb3, 0x4d, 0x17, 0x9a, 0xe6, 0xa4, 0xc8, 0x0c, 0xad, 0xcc, 0xbb, 0x7f,
    0x0a,
];
/// QUIC v2 initial salt (RFC 9369 §3.3.1).
const V2_SALT: [u8; 20] = [
    0x0d, 0xed, 0xe3, 0xde, 0xf7, 0x00, 0xa6, 0xdb, 0x81, 0x93, 0x81, 0xbe, 0x6e, 0x26, 0x9d, 0xcb, 0xf9, 0xbd, 0x2e,
    0xd9,
];
/// Connection IDs in v1/v2 long headers are at most 20 bytes (RFC 9000 §17.2).
const MAX_CID_LEN: usize = 20;
/// Header protection samples 16 bytes starting 4 bytes after the packet number offset.
const SAMPLE_LEN: usize = 16;
/// AES-128-GCM key, IV and header-protection key sizes; the initial secret is SHA-256 sized.
const KEY_LEN: usize = 16;
const IV_LEN: usize = 12;
const SECRET_LEN: usize = 32;

/// The QUIC versions whose Initial packets we can decrypt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Version {
    V1,
    V2,
}

/// Long-header packet types (their wire encoding differs between versions).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LongType {
    Initial,
    ZeroRtt,
    Handshake,
    Retry,
}

impl Version {
    fn from_wire(version: u32) -> Option<Self> {
        match version {
            0x0000_0001 => Some(Self::V1),
            0x6b33_43cf => Some(Self::V2),
            _ => None,
        }
    }

    fn salt(self) -> &'static [u8] {
        match self {
            Self::V1 => &V1_SALT,
            Self::V2 => &V2_SALT,
        }
    }

    /// HKDF-Expand-Label labels (without the "tls13 " prefix) for key, IV and header protection.
    fn labels(self) -> [&'static [u8]; 3] {
        match self {
            Self::V1 => [b"quic key", b"quic iv", b"quic hp"],
            Self::V2 => [b"quicv2 key", b"quicv2 iv", b"quicv2 hp"],
        }
    }

    /// The packet type from the first byte's type bits; v2 rotates the codes (RFC 9369 §3.2).
    fn long_type(self, first: u8) -> LongType {
        let bits = (first >> 4) & 0b11;
        let v1_bits = match self {
            Self::V1 => bits,
            Self::V2 => bits.wrapping_sub(1) & 0b11,
        };
        match v1_bits {
            0 => LongType::Initial,
            1 => LongType::ZeroRtt,
            2 => LongType::Handshake,
            _ => LongType::Retry,
        }
    }
}

/// Raw client Initial key material, kept as bytes so it can be checked against the RFC vectors.
#[derive(Debug, PartialEq, Eq)]
struct KeyMaterial {
    key: [u8; KEY_LEN],
    iv: [u8; IV_LEN],
    hp: [u8; KEY_LEN],
}

/// An HKDF output length (ring wants a `KeyType` rather than a number).
struct OutLen(usize);

impl hkdf::KeyType for OutLen {
    fn len(&self) -> usize {
        self.0
    }
}

/// TLS 1.3 HKDF-Expand-Label with an empty context (RFC 8446 §7.1), filling `out`.
fn hkdf_expand_label(prk: &hkdf::Prk, label: &[u8], out: &mut [u8]) -> Option<()> {
    let out_len = u16::try_from(out.len()).ok()?.to_be_bytes();
    let label_len = [u8::try_from(b"tls13 ".len() + label.len()).ok()?];
    let info: [&[u8]; 5] = [&out_len, &label_len, b"tls13 ", label, &[0]];
    prk.expand(&info, OutLen(out.len())).ok()?.fill(out).ok()
}

/// The client Initial secret for a version and first Destination Connection ID.
fn client_initial_secret(version: Version, dcid: &[u8]) -> Option<[u8; SECRET_LEN]> {
    let initial = hkdf::Salt::new(hkdf::HKDF_SHA256, version.salt()).extract(dcid);
    let mut secret = [0; SECRET_LEN];
    hkdf_expand_label(&initial, b"client in", &mut secret)?;
    Some(secret)
}

/// The client Initial key, IV and header-protection key (RFC 9001 §5.2, RFC 9369 §3.3).
fn client_key_material(version: Version, dcid: &[u8]) -> Option<KeyMaterial> {
    let secret = hkdf::Prk::new_less_safe(hkdf::HKDF_SHA256, &client_initial_secret(version, dcid)?);
    let [key_label, iv_label, hp_label] = version.labels();
    let mut material = KeyMaterial { key: [0; KEY_LEN], iv: [0; IV_LEN], hp: [0; KEY_LEN] };
    hkdf_expand_label(&secret, key_label, &mut material.key)?;
    hkdf_expand_label(&secret, iv_label, &mut material.iv)?;
    hkdf_expand_label(&secret, hp_label, &mut material.hp)?;
    Some(material)
}

/// Ready-to-use client Initial keys for one version.
struct InitialKeys {
    version: Version,
    packet: aead::LessSafeKey,
    iv: [u8; IV_LEN],
    header: quic::HeaderProtectionKey,
}

impl InitialKeys {
    fn derive(version: Version, dcid: &[u8]) -> Option<Self> {
        let material = client_key_material(version, dcid)?;
        let packet = aead::LessSafeKey::new(aead::UnboundKey::new(&aead::AES_128_GCM, &material.key).ok()?);
        let header = quic::HeaderProtectionKey::new(&quic::AES_128, &material.hp).ok()?;
        Some(Self { version, packet, iv: material.iv, header })
    }

    /// The AEAD nonce for a packet number: the IV XORed with the number, right-aligned.
    fn nonce(&self, packet_number: u64) -> aead::Nonce {
        let mut nonce = self.iv;
        let pn = packet_number.to_be_bytes();
        for (n, p) in nonce.iter_mut().rev().zip(pn.iter().rev()) {
            *n ^= p;
        }
        aead::Nonce::assume_unique_for_key(nonce)
    }
}

/// The parts of a long header needed to find and open a packet, as offsets into the packet.
#[derive(Debug)]
struct LongHeader<'a> {
    version: Version,
    long_type: LongType,
    dcid: &'a [u8],
    /// Where the (protected) packet number starts.
    pn_offset: usize,
    /// Where this packet ends (the next coalesced packet, if any, starts here).
    end: usize,
}

/// Parses a v1/v2 long header at the start of `packet` (RFC 9000 §17.2). `None` for short
/// headers, other versions, Retry packets (no length) and anything that does not fit.
fn parse_long_header(packet: &[u8]) -> Option<LongHeader<'_>> {
    let mut r = Reader::new(packet);
    let first = r.u8().ok()?;
    if first & 0x80 == 0 {
        return None;
    }
    let version = Version::from_wire(r.u32().ok()?)?;
    let long_type = version.long_type(first);
    let dcid = connection_id(&mut r)?;
    connection_id(&mut r)?; // source connection id
    match long_type {
        LongType::Initial => {
            let token_len = r.varint_usize().ok()?;
            r.bytes(token_len).ok()?;
        }
        LongType::Retry => return None,
        LongType::ZeroRtt | LongType::Handshake => {}
    }
    let length = r.varint_usize().ok()?;
    let pn_offset = packet.len() - r.rest().len();
    r.bytes(length).ok()?;
    Some(LongHeader { version, long_type, dcid, pn_offset, end: pn_offset.checked_add(length)? })
}

/// A length-prefixed connection ID of at most 20 bytes.
fn connection_id<'a>(r: &mut Reader<'a>) -> Option<&'a [u8]> {
    let len = usize::from(r.u8().ok()?);
    if len > MAX_CID_LEN {
        return None;
    }
    r.bytes(len).ok()
}

/// Recovers a full packet number from its truncated encoding (RFC 9000 §A.3).
fn decode_packet_number(largest: Option<u64>, truncated: u64, bits: u32) -> u64 {
    let expected = largest.map_or(0, |pn| pn.saturating_add(1));
    let window = 1u64 << bits;
    let half = window / 2;
    let candidate = (expected & !(window - 1)) | truncated;
    if candidate.saturating_add(half) <= expected && candidate < (1u64 << 62) - window {
        candidate + window
    } else if candidate > expected.saturating_add(half) && candidate >= window {
        candidate - window
    } else {
        candidate
    }
}

/// Removes header protection and decrypts one Initial packet (exactly `packet`), returning its
/// packet number and plaintext payload, or `None` if it does not authenticate.
fn open_packet(keys: &InitialKeys, packet: &[u8], pn_offset: usize, largest: Option<u64>) -> Option<(u64, Vec<u8>)> {
    let sample_start = pn_offset.checked_add(4)?;
    let sample = packet.get(sample_start..sample_start.checked_add(SAMPLE_LEN)?)?;
    let mask = keys.header.new_mask(sample).ok()?;
    let mut header = packet.get(..sample_start)?.to_vec();
    let first = header.first_mut()?;
    *first ^= mask[0] & 0x0f;
    let pn_len = usize::from(*first & 0x03) + 1;
    header.truncate(pn_offset + pn_len);
    let pn_bytes = header.get_mut(pn_offset..)?;
    let mut truncated = 0u64;
    for (byte, m) in pn_bytes.iter_mut().zip(&mask[1..]) {
        *byte ^= m;
        truncated = (truncated << 8) | u64::from(*byte);
    }
    let packet_number = decode_packet_number(largest, truncated, 8 * u32::try_from(pn_len).ok()?);
    let mut payload = packet.get(pn_offset + pn_len..)?.to_vec();
    let plain_len =
        keys.packet.open_in_place(keys.nonce(packet_number), aead::Aad::from(&header), &mut payload).ok()?.len();
    payload.truncate(plain_len);
    Some((packet_number, payload))
}

/// The CRYPTO frames of a decrypted Initial payload as (offset, data), skipping the other
/// frames allowed in Initial packets; parsing stops at a frame type we cannot skip.
fn crypto_frames(payload: &[u8]) -> Vec<(u64, &[u8])> {
    let mut r = Reader::new(payload);
    let mut frames = Vec::new();
    while !r.is_empty() {
        match next_frame(&mut r) {
            Ok(Some(frame)) => frames.push(frame),
            Ok(None) => {}
            Err(_) => break,
        }
    }
    frames
}

/// Reads one frame: `Some` for CRYPTO, `None` for a frame skipped, `Err` to stop.
fn next_frame<'a>(r: &mut Reader<'a>) -> Result<Option<(u64, &'a [u8])>, Stop> {
    match r.varint()? {
        0x00 | 0x01 => Ok(None), // PADDING, PING
        frame_type @ (0x02 | 0x03) => skip_ack(r, frame_type == 0x03).map(|()| None),
        0x06 => {
            let offset = r.varint()?;
            let len = r.varint_usize()?;
            Ok(Some((offset, r.bytes(len)?)))
        }
        frame_type @ (0x1c | 0x1d) => skip_connection_close(r, frame_type == 0x1c).map(|()| None),
        _ => Err(Stop::Invalid),
    }
}

/// Skips an ACK frame body (RFC 9000 §19.3).
fn skip_ack(r: &mut Reader<'_>, ecn: bool) -> Result<(), Stop> {
    r.varint()?; // largest acknowledged
    r.varint()?; // ack delay
    let ranges = r.varint()?;
    r.varint()?; // first ack range
    for _ in 0..ranges {
        r.varint()?; // gap
        r.varint()?; // ack range length
    }
    if ecn {
        for _ in 0..3 {
            r.varint()?;
        }
    }
    Ok(())
}

/// Skips a CONNECTION_CLOSE frame body (RFC 9000 §19.19).
fn skip_connection_close(r: &mut Reader<'_>, transport: bool) -> Result<(), Stop> {
    r.varint()?; // error code
    if transport {
        r.varint()?; // frame type
    }
    let reason_len = r.varint_usize()?;
    r.bytes(reason_len).map(|_| ())
}

/// The CRYPTO stream reassembled from offset 0, with out-of-order segments held until the gap
/// before them fills. Everything at or beyond [`MAX_CRYPTO_BYTES`] is dropped.
#[derive(Default)]
struct CryptoStream {
    contiguous: Vec<u8>,
    pending: BTreeMap<u64, Vec<u8>>,
}

impl CryptoStream {
    fn insert(&mut self, offset: u64, data: &[u8]) {
        let Ok(start) = usize::try_from(offset) else { return };
        let room = MAX_CRYPTO_BYTES.saturating_sub(start);
        let data = data.get(..room.min(data.len())).unwrap_or_default();
        if data.is_empty() {
            return;
        }
        if start <= self.contiguous.len() {
            self.append_at(start, data);
            self.drain_pending();
        } else {
            let held = self.pending.entry(offset).or_default();
            if held.len() < data.len() {
                *held = data.to_vec();
            }
        }
    }

    /// Appends the part of a segment starting at `start` (≤ the contiguous length) that is new.
    fn append_at(&mut self, start: usize, data: &[u8]) {
        let already = self.contiguous.len().saturating_sub(start);
        self.contiguous.extend_from_slice(data.get(already..).unwrap_or_default());
    }

    /// Moves held segments that now touch the contiguous prefix into it.
    fn drain_pending(&mut self) {
        while let Some(entry) = self.pending.first_entry() {
            let Ok(start) = usize::try_from(*entry.key()) else { break };
            if start > self.contiguous.len() {
                break;
            }
            let data = entry.remove();
            self.append_at(start, &data);
        }
    }

    fn is_full(&self) -> bool {
        self.contiguous.len() >= MAX_CRYPTO_BYTES
    }
}

/// Per-UDP-session probe state, fed the session's first client datagrams in order.
///
/// Bounded: it looks at no more than [`MAX_QUIC_PROBE_DATAGRAMS`] datagrams and reassembles no
/// more than [`MAX_CRYPTO_BYTES`] of CRYPTO data; past either limit a session that proved to be
/// QUIC is reported as QUIC with whatever the ClientHello prefix contained. Once it has
/// answered, further pushes return the same answer.
#[derive(Default)]
pub struct QuicInitialProbe {
    datagrams: usize,
    keys: Option<InitialKeys>,
    largest_packet_number: Option<u64>,
    crypto: CryptoStream,
    verdict: Option<UdpProbe>,
}

impl fmt::Debug for QuicInitialProbe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuicInitialProbe")
            .field("datagrams", &self.datagrams)
            .field("version", &self.keys.as_ref().map(|k| k.version))
            .field("crypto_bytes", &self.crypto.contiguous.len())
            .field("verdict", &self.verdict)
            .finish()
    }
}

impl QuicInitialProbe {
    /// Feeds the session's next client datagram and answers what the session speaks so far.
    pub fn push(&mut self, datagram: &[u8]) -> UdpProbe {
        if let Some(verdict) = &self.verdict {
            return verdict.clone();
        }
        self.datagrams += 1;
        if self.datagrams == 1 && is_wireguard_initiation(datagram) {
            return self
                .settle(UdpProbe::Detected { protocol: UdpProbedProtocol::WireGuard, info: ProbeInfo::default() });
        }
        self.absorb_datagram(datagram);
        let verdict = self.judge();
        if verdict == UdpProbe::Incomplete && self.datagrams < MAX_QUIC_PROBE_DATAGRAMS {
            return verdict;
        }
        let verdict = if verdict == UdpProbe::Incomplete { self.give_up() } else { verdict };
        self.settle(verdict)
    }

    /// Records a final answer so later pushes repeat it.
    fn settle(&mut self, verdict: UdpProbe) -> UdpProbe {
        self.verdict = Some(verdict.clone());
        verdict
    }

    /// Opens every Initial packet coalesced in the datagram and collects its CRYPTO data.
    fn absorb_datagram(&mut self, datagram: &[u8]) {
        let mut rest = datagram;
        while let Some(header) = parse_long_header(rest) {
            let Some((packet, tail)) = rest.split_at_checked(header.end) else { break };
            if header.long_type == LongType::Initial {
                self.absorb_initial(&header, packet);
            }
            rest = tail;
        }
    }

    /// Decrypts one Initial packet with the session's keys (derived from the first Initial that
    /// authenticates) and feeds its CRYPTO frames to the reassembly buffer.
    fn absorb_initial(&mut self, header: &LongHeader<'_>, packet: &[u8]) {
        let keys = match self.keys.take() {
            Some(keys) if keys.version == header.version => keys,
            Some(keys) => {
                self.keys = Some(keys);
                return;
            }
            None => match InitialKeys::derive(header.version, header.dcid) {
                Some(keys) => keys,
                None => return,
            },
        };
        if let Some((packet_number, payload)) = open_packet(&keys, packet, header.pn_offset, self.largest_packet_number)
        {
            self.largest_packet_number = self.largest_packet_number.max(Some(packet_number));
            for (offset, data) in crypto_frames(&payload) {
                self.crypto.insert(offset, data);
            }
            self.keys = Some(keys);
        } else if self.largest_packet_number.is_some() {
            // Keep keys that already opened a packet; a bad packet later changes nothing.
            self.keys = Some(keys);
        }
    }

    /// The answer from what has been reassembled so far.
    fn judge(&self) -> UdpProbe {
        if self.largest_packet_number.is_none() {
            // No Initial has authenticated: nothing says this is QUIC.
            return UdpProbe::Unknown;
        }
        match parse_client_hello(&self.crypto.contiguous) {
            HelloParse::Complete(info) => quic(info),
            HelloParse::Partial(info) if self.crypto.is_full() => quic(info),
            HelloParse::Partial(_) => UdpProbe::Incomplete,
            HelloParse::NotClientHello => quic(ProbeInfo::default()),
        }
    }

    /// The answer once the datagram budget is spent: QUIC with whatever the ClientHello prefix
    /// held (the packets authenticated, so it is QUIC even if the hello never completed).
    fn give_up(&self) -> UdpProbe {
        match parse_client_hello(&self.crypto.contiguous) {
            HelloParse::Complete(info) | HelloParse::Partial(info) => quic(info),
            HelloParse::NotClientHello => quic(ProbeInfo::default()),
        }
    }
}

fn quic(info: ProbeInfo) -> UdpProbe {
    UdpProbe::Detected { protocol: UdpProbedProtocol::Quic, info }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::tls::tests::{handshake_bytes, rustls_client_hello};
    use proptest::prelude::*;
    use std::sync::Arc;
    use std::time::Duration;

    fn unhex(s: &str) -> Vec<u8> {
        let digits: Vec<u8> = s.bytes().filter(u8::is_ascii_hexdigit).collect();
        digits
            .chunks(2)
            .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).expect("ascii"), 16).expect("hex"))
            .collect()
    }

    const RFC_DCID: &str = "8394c8f03e515708";

    fn rfc9001_packet() -> Vec<u8> {
        unhex(include_str!("testdata/rfc9001_a2_client_initial.hex"))
    }

    fn rfc9369_packet() -> Vec<u8> {
        unhex(include_str!("testdata/rfc9369_a2_client_initial.hex"))
    }

    fn example_com() -> UdpProbe {
        quic(ProbeInfo { server_name: Some("example.com".into()), alpn: vec!["alpn".into()] })
    }

    fn wire_version(version: Version) -> u32 {
        match version {
            Version::V1 => 1,
            Version::V2 => 0x6b33_43cf,
        }
    }

    /// Builds a protected client Initial packet (2-byte packet number), the inverse of
    /// `open_packet`, so tests can split ClientHellos across packets and datagrams at will.
    fn seal_initial(version: Version, dcid: &[u8], packet_number: u16, payload: &[u8]) -> Vec<u8> {
        let keys = InitialKeys::derive(version, dcid).expect("keys");
        let type_bits = if version == Version::V1 { 0 } else { 1 };
        let mut packet = vec![0xc0 | (type_bits << 4) | 0x01];
        packet.extend_from_slice(&wire_version(version).to_be_bytes());
        packet.push(u8::try_from(dcid.len()).expect("dcid"));
        packet.extend_from_slice(dcid);
        packet.extend_from_slice(&[0, 0]); // empty SCID, empty token
        let length = u16::try_from(2 + payload.len() + 16).expect("length");
        packet.extend_from_slice(&(0x4000 | length).to_be_bytes());
        let pn_offset = packet.len();
        packet.extend_from_slice(&packet_number.to_be_bytes());
        let mut body = payload.to_vec();
        let nonce = keys.nonce(u64::from(packet_number));
        let tag = keys.packet.seal_in_place_separate_tag(nonce, aead::Aad::from(&packet), &mut body).expect("seal");
        packet.extend_from_slice(&body);
        packet.extend_from_slice(tag.as_ref());
        let mask = keys.header.new_mask(&packet[pn_offset + 4..pn_offset + 20]).expect("mask");
        packet[0] ^= mask[0] & 0x0f;
        packet[pn_offset] ^= mask[1];
        packet[pn_offset + 1] ^= mask[2];
        packet
    }

    fn crypto_frame(offset: u64, data: &[u8]) -> Vec<u8> {
        let mut frame = vec![0x06, 0x80];
        frame.extend_from_slice(&u32::try_from(offset).expect("offset").to_be_bytes()[1..]);
        frame.extend_from_slice(&(0x4000 | u16::try_from(data.len()).expect("len")).to_be_bytes());
        frame.extend_from_slice(data);
        frame
    }

    /// A real rustls ClientHello as bare handshake bytes (what QUIC carries in CRYPTO frames).
    fn client_hello(server_name: &str, alpn: &[&str]) -> Vec<u8> {
        handshake_bytes(&rustls_client_hello(server_name, alpn))
    }

    fn detected(server_name: &str, alpn: &[&str]) -> UdpProbe {
        quic(ProbeInfo { server_name: Some(server_name.into()), alpn: alpn.iter().map(|p| p.to_string()).collect() })
    }

    #[test]
    fn v1_initial_keys_match_rfc9001_appendix_a1() {
        let dcid = unhex(RFC_DCID);
        let secret = client_initial_secret(Version::V1, &dcid).expect("secret");
        assert_eq!(secret.to_vec(), unhex("c00cf151ca5be075ed0ebfb5c80323c42d6b7db67881289af4008f1f6c357aea"));
        let material = client_key_material(Version::V1, &dcid).expect("material");
        assert_eq!(material.key.to_vec(), unhex("1f369613dd76d5467730efcbe3b1a22d"));
        assert_eq!(material.iv.to_vec(), unhex("fa044b2f42a3fd3b46fb255c"));
        assert_eq!(material.hp.to_vec(), unhex("9f50449e04a0e810283a1e9933adedd2"));
    }

    #[test]
    fn v2_initial_keys_match_rfc9369_appendix_a1() {
        let material = client_key_material(Version::V2, &unhex(RFC_DCID)).expect("material");
        assert_eq!(material.key.to_vec(), unhex("8b1a0bc121284290a29e0971b5cd045d"));
        assert_eq!(material.iv.to_vec(), unhex("91f73e2351d8fa91660e909f"));
        assert_eq!(material.hp.to_vec(), unhex("45b95e15235d6f45a6b19cbcb0294ba9"));
    }

    #[test]
    fn rfc9001_client_initial_yields_sni_and_alpn() {
        assert_eq!(QuicInitialProbe::default().push(&rfc9001_packet()), example_com());
    }

    #[test]
    fn rfc9369_v2_client_initial_yields_sni_and_alpn() {
        assert_eq!(QuicInitialProbe::default().push(&rfc9369_packet()), example_com());
    }

    #[test]
    fn v2_type_bits_are_rotated() {
        assert_eq!(Version::V1.long_type(0xc0), LongType::Initial);
        assert_eq!(Version::V2.long_type(0xd0), LongType::Initial);
        assert_eq!(Version::V2.long_type(0xc0), LongType::Retry);
        assert_eq!(Version::V2.long_type(0xf0), LongType::Handshake);
    }

    #[test]
    fn tampered_initial_is_unknown() {
        let mut packet = rfc9001_packet();
        if let Some(last) = packet.last_mut() {
            *last ^= 1;
        }
        assert_eq!(QuicInitialProbe::default().push(&packet), UdpProbe::Unknown);
    }

    #[test]
    fn unsupported_version_or_short_header_is_unknown() {
        let mut packet = rfc9001_packet();
        packet[1..5].copy_from_slice(&[0xff, 0, 0, 0x1d]);
        assert_eq!(QuicInitialProbe::default().push(&packet), UdpProbe::Unknown);
        assert_eq!(QuicInitialProbe::default().push(&[0x40, 1, 2, 3]), UdpProbe::Unknown);
        assert_eq!(QuicInitialProbe::default().push(&[]), UdpProbe::Unknown);
    }

    #[test]
    fn wireguard_initiation_as_first_datagram_is_wireguard() {
        let mut datagram = vec![0; 148];
        datagram[0] = 1;
        let expected = UdpProbe::Detected { protocol: UdpProbedProtocol::WireGuard, info: ProbeInfo::default() };
        assert_eq!(QuicInitialProbe::default().push(&datagram), expected);
    }

    #[test]
    fn client_hello_split_across_two_datagrams_is_reassembled() {
        let dcid = [9; 8];
        let hello = client_hello("split.example.com", &["h3"]);
        let (a, b) = hello.split_at(hello.len() / 2);
        let mut probe = QuicInitialProbe::default();
        assert_eq!(probe.push(&seal_initial(Version::V1, &dcid, 0, &crypto_frame(0, a))), UdpProbe::Incomplete);
        let second = seal_initial(Version::V1, &dcid, 1, &crypto_frame(a.len() as u64, b));
        assert_eq!(probe.push(&second), detected("split.example.com", &["h3"]));
    }

    #[test]
    fn out_of_order_crypto_frames_are_reassembled() {
        let dcid = [3; 12];
        let hello = client_hello("order.example.com", &["h3"]);
        let (a, b) = hello.split_at(100);
        let mut probe = QuicInitialProbe::default();
        let mut payload = crypto_frame(100, b);
        payload.extend_from_slice(&[0, 0, 1]); // PADDING, PADDING, PING
        payload.extend_from_slice(&crypto_frame(0, a));
        assert_eq!(probe.push(&seal_initial(Version::V2, &dcid, 0, &payload)), detected("order.example.com", &["h3"]));
    }

    #[test]
    fn coalesced_initial_packets_in_one_datagram_are_all_read() {
        let dcid = [5; 20];
        let hello = client_hello("coalesced.example.com", &["h3"]);
        let (a, b) = hello.split_at(hello.len() / 3);
        let mut datagram = seal_initial(Version::V1, &dcid, 0, &crypto_frame(0, a));
        datagram.extend_from_slice(&seal_initial(Version::V1, &dcid, 1, &crypto_frame(a.len() as u64, b)));
        let expected = detected("coalesced.example.com", &["h3"]);
        assert_eq!(QuicInitialProbe::default().push(&datagram), expected);
    }

    #[test]
    fn ack_and_connection_close_frames_are_skipped() {
        let dcid = [1; 8];
        let hello = client_hello("frames.example.com", &[]);
        let mut payload = vec![0x02, 0x05, 0x00, 0x01, 0x00, 0x01, 0x00]; // ACK with one extra range
        payload.extend_from_slice(&[0x03, 0x05, 0x00, 0x00, 0x00, 0x01, 0x02, 0x03]); // ACK_ECN
        payload.extend_from_slice(&[0x1c, 0x00, 0x06, 0x02, b'h', b'i']); // CONNECTION_CLOSE
        payload.extend_from_slice(&crypto_frame(0, &hello));
        let expected = quic(ProbeInfo { server_name: Some("frames.example.com".into()), alpn: Vec::new() });
        assert_eq!(QuicInitialProbe::default().push(&seal_initial(Version::V1, &dcid, 0, &payload)), expected);
    }

    #[test]
    fn unknown_frame_stops_frame_parsing() {
        let hello = client_hello("stop.example.com", &[]);
        let mut payload = vec![0x08, 0x00]; // STREAM: not allowed in Initial, not skippable
        payload.extend_from_slice(&crypto_frame(0, &hello));
        assert!(crypto_frames(&payload).is_empty());
    }

    #[test]
    fn datagram_budget_spent_without_complete_hello_is_quic_with_what_was_parsed() {
        let dcid = [2; 8];
        let hello = client_hello("budget.example.com", &[]);
        let mut probe = QuicInitialProbe::default();
        for pn in 0..MAX_QUIC_PROBE_DATAGRAMS - 1 {
            let packet = seal_initial(Version::V1, &dcid, pn as u16, &crypto_frame(0, &hello[..10]));
            assert_eq!(probe.push(&packet), UdpProbe::Incomplete);
        }
        assert_eq!(probe.push(&[0xff; 50]), quic(ProbeInfo::default()));
        assert_eq!(probe.push(&rfc9001_packet()), quic(ProbeInfo::default()), "the answer is final");
    }

    #[test]
    fn crypto_stream_is_bounded_by_max_crypto_bytes() {
        let mut stream = CryptoStream::default();
        stream.insert(0, &[7; 1000]);
        stream.insert(MAX_CRYPTO_BYTES as u64 - 10, &[1; 100]);
        stream.insert(1000, &vec![8; MAX_CRYPTO_BYTES]);
        assert_eq!(stream.contiguous.len(), MAX_CRYPTO_BYTES);
        assert!(stream.is_full());
        assert!(stream.pending.is_empty());
    }

    #[test]
    fn crypto_stream_ignores_duplicates_and_fills_gaps() {
        let mut stream = CryptoStream::default();
        stream.insert(4, b"efgh");
        stream.insert(0, b"ab");
        stream.insert(0, b"abcd");
        stream.insert(2, b"cd");
        assert_eq!(stream.contiguous, b"abcdefgh");
        assert!(stream.pending.is_empty());
    }

    #[test]
    fn packet_numbers_are_decoded_relative_to_the_largest_seen() {
        // RFC 9000 §A.3 example.
        assert_eq!(decode_packet_number(Some(0xa82f30ea), 0x9b32, 16), 0xa82f9b32);
        assert_eq!(decode_packet_number(None, 0, 16), 0);
        assert_eq!(decode_packet_number(Some(1), 2, 8), 2);
    }

    /// A rustls config for quinn that offers `alpn` and trusts nothing (the handshake never
    /// completes; only the client's first flight matters).
    fn quinn_client_config(alpn: &[String]) -> quinn::ClientConfig {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("tls13")
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        tls.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("quic config");
        quinn::ClientConfig::new(Arc::new(quic))
    }

    /// Connects a real quinn client to a plain UDP socket standing in for the server, and feeds
    /// the datagrams it receives to a probe until it answers. Returns the answer and how many
    /// datagrams it took.
    async fn probe_quinn_client(server_name: &str, alpn: &[String]) -> (UdpProbe, usize) {
        let server = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let server_addr = server.local_addr().expect("addr");
        let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
        let connecting = endpoint.connect_with(quinn_client_config(alpn), server_addr, server_name).expect("connect");
        let handshake = tokio::spawn(async move { connecting.await.err() });
        let mut probe = QuicInitialProbe::default();
        let mut buf = vec![0; 65_536];
        let mut verdict = UdpProbe::Incomplete;
        let mut datagrams = 0;
        while verdict == UdpProbe::Incomplete {
            let received = tokio::time::timeout(Duration::from_secs(10), server.recv_from(&mut buf)).await;
            let (len, _) = received.expect("datagram in time").expect("recv");
            datagrams += 1;
            verdict = probe.push(&buf[..len]);
        }
        handshake.abort();
        endpoint.close(0u32.into(), b"");
        (verdict, datagrams)
    }

    #[tokio::test]
    async fn quinn_client_initial_datagrams_yield_sni_and_alpn() {
        let (verdict, _) = probe_quinn_client("quic.example.com", &["h3".to_owned()]).await;
        assert_eq!(verdict, detected("quic.example.com", &["h3"]));
    }

    #[tokio::test]
    async fn quinn_client_hello_spanning_two_datagrams_yields_sni_and_alpn() {
        // A long ALPN list pushes the ClientHello past one 1200-byte Initial datagram, as
        // post-quantum key shares do for modern clients.
        let alpn: Vec<String> =
            std::iter::once("h3".to_owned()).chain((0..150).map(|i| format!("proto-{i:03}"))).collect();
        let (verdict, datagrams) = probe_quinn_client("QUIC.example.com", &alpn).await;
        let alpn: Vec<&str> = alpn.iter().map(String::as_str).collect();
        assert_eq!(verdict, detected("quic.example.com", &alpn));
        assert!(datagrams >= 2, "took {datagrams} datagram(s)");
    }

    proptest! {
        #[test]
        fn arbitrary_datagrams_never_panic(datagrams in proptest::collection::vec(
            proptest::collection::vec(any::<u8>(), 0..1500), 1..6
        )) {
            let mut probe = QuicInitialProbe::default();
            for datagram in &datagrams {
                let _ = probe.push(datagram);
            }
        }

        #[test]
        fn arbitrary_bytes_behind_a_v1_long_header_never_panic(
            first in any::<u8>(), body in proptest::collection::vec(any::<u8>(), 0..1300)
        ) {
            let mut datagram = vec![first | 0x80, 0, 0, 0, 1];
            datagram.extend_from_slice(&body);
            let _ = QuicInitialProbe::default().push(&datagram);
            let _ = crypto_frames(&body);
        }

        #[test]
        fn any_prefix_of_the_crypto_stream_is_incomplete_or_correct(cut in 0usize..2000) {
            let dcid = [4; 8];
            let hello = client_hello("prefix.example.com", &["h3"]);
            let part = &hello[..cut.min(hello.len())];
            let mut probe = QuicInitialProbe::default();
            let got = probe.push(&seal_initial(Version::V1, &dcid, 0, &[crypto_frame(0, part), vec![0; 4]].concat()));
            prop_assert!(got == UdpProbe::Incomplete || got == detected("prefix.example.com", &["h3"]), "{got:?}");
        }

        #[test]
        fn truncated_datagrams_never_give_a_wrong_answer(cut in 0usize..1200) {
            let got = QuicInitialProbe::default().push(&rfc9001_packet()[..cut]);
            prop_assert_eq!(got, UdpProbe::Unknown);
        }
    }
}
