//! TLS ClientHello probing (RFC 8446 §4.1.2, §5.1; RFC 6066 §3 SNI; RFC 7301 ALPN).
//!
//! Over TCP the ClientHello arrives in TLS records, possibly split across several records and
//! several reads; [`probe`] reassembles the handshake layer and hands it to
//! [`parse_client_hello`], which QUIC reuses on its CRYPTO stream (QUIC carries the handshake
//! messages without record headers).

use super::{ProbeInfo, Reader, Stop, Verdict};

/// TLS record content type `handshake`.
const CONTENT_TYPE_HANDSHAKE: u8 = 22;
/// Handshake message type `client_hello`.
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
/// A plaintext record's fragment may not exceed 2^14 bytes (RFC 8446 §5.1).
const MAX_RECORD_FRAGMENT: usize = 1 << 14;
/// Extension `server_name` (RFC 6066 §3).
const EXT_SERVER_NAME: u16 = 0;
/// Extension `application_layer_protocol_negotiation` (RFC 7301).
const EXT_ALPN: u16 = 16;
/// `NameType` `host_name` inside `server_name`.
const NAME_TYPE_HOST_NAME: u8 = 0;

/// How far a handshake-layer byte stream got towards a ClientHello.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum HelloParse {
    /// The whole ClientHello arrived and parsed.
    Complete(ProbeInfo),
    /// A consistent prefix of a ClientHello; the info holds the extensions fully received.
    Partial(ProbeInfo),
    /// Not a ClientHello (other message type, or malformed).
    NotClientHello,
}

/// Probes TCP bytes for a TLS ClientHello. `no_more`: no further bytes will be looked at, so a
/// consistent partial ClientHello is reported with what it contained.
pub(super) fn probe(data: &[u8], no_more: bool) -> Verdict {
    let Some(stream) = reassemble_records(data) else { return Verdict::NotThis };
    match parse_client_hello(&stream) {
        HelloParse::Complete(info) => Verdict::Detected(info),
        HelloParse::Partial(info) if no_more => Verdict::Detected(info),
        HelloParse::Partial(_) => Verdict::Incomplete,
        HelloParse::NotClientHello => Verdict::NotThis,
    }
}

/// Concatenates the fragments of the leading handshake records, stopping once the first
/// handshake message is complete (later records, e.g. early data, are not ours to judge).
/// `None` if a record header proves this is not a TLS handshake.
fn reassemble_records(data: &[u8]) -> Option<Vec<u8>> {
    let mut records = Reader::new(data);
    let mut stream = Vec::new();
    while !records.is_empty() && !handshake_message_complete(&stream) {
        let header = records.up_to(5);
        check_record_header(header)?;
        let Ok(len) = Reader::new(header.get(3..).unwrap_or_default()).u16() else { break };
        stream.extend_from_slice(records.up_to(usize::from(len)));
    }
    Some(stream)
}

/// Checks a (possibly partial) record header: handshake content type, legacy version 3.1–3.4,
/// and a non-empty fragment within the plaintext limit.
fn check_record_header(header: &[u8]) -> Option<()> {
    let mut r = Reader::new(header);
    let ok = |field: Result<bool, Stop>| field.unwrap_or(true).then_some(());
    ok(r.u8().map(|t| t == CONTENT_TYPE_HANDSHAKE))?;
    ok(r.u8().map(|major| major == 3))?;
    ok(r.u8().map(|minor| (1..=4).contains(&minor)))?;
    ok(r.u16().map(|len| (1..=MAX_RECORD_FRAGMENT).contains(&usize::from(len))))
}

/// Whether `stream` starts with a whole handshake message (header + body).
fn handshake_message_complete(stream: &[u8]) -> bool {
    let mut r = Reader::new(stream);
    match (r.u8(), r.u24()) {
        (Ok(_), Ok(len)) => r.rest().len() >= len,
        _ => false,
    }
}

/// Parses a ClientHello from a handshake-layer byte stream (handshake type, 24-bit length,
/// body), which may be only a prefix of the message.
pub(super) fn parse_client_hello(stream: &[u8]) -> HelloParse {
    let mut r = Reader::new(stream);
    match r.u8() {
        Ok(HANDSHAKE_CLIENT_HELLO) => {}
        Ok(_) => return HelloParse::NotClientHello,
        Err(_) => return HelloParse::Partial(ProbeInfo::default()),
    }
    let Ok(len) = r.u24() else { return HelloParse::Partial(ProbeInfo::default()) };
    let complete = r.rest().len() >= len;
    let body = r.up_to(len);
    let mut info = ProbeInfo::default();
    match parse_hello_body(body, &mut info) {
        Ok(()) if complete => HelloParse::Complete(info),
        Ok(()) | Err(Stop::Short) if !complete => HelloParse::Partial(info),
        Ok(()) | Err(Stop::Short) | Err(Stop::Invalid) => HelloParse::NotClientHello,
    }
}

/// Parses the ClientHello body, filling `info` from each extension as soon as it is whole, so
/// that a truncated body still yields what preceded the cut.
fn parse_hello_body(body: &[u8], info: &mut ProbeInfo) -> Result<(), Stop> {
    let mut r = Reader::new(body);
    let legacy_version = r.u16()?;
    if legacy_version >> 8 != 3 {
        return Err(Stop::Invalid);
    }
    r.bytes(32)?; // random
    let session_id_len = r.u8()?;
    if session_id_len > 32 {
        return Err(Stop::Invalid);
    }
    r.bytes(usize::from(session_id_len))?;
    let suites_len = usize::from(r.u16()?);
    if suites_len < 2 || suites_len % 2 != 0 {
        return Err(Stop::Invalid);
    }
    r.bytes(suites_len)?;
    let compression_len = r.u8()?;
    if compression_len == 0 {
        return Err(Stop::Invalid);
    }
    r.bytes(usize::from(compression_len))?;
    if r.is_empty() {
        // Extensions are optional before TLS 1.3; if the body is merely truncated here, the
        // caller knows from the declared length and reports a partial hello.
        return Ok(());
    }
    let extensions_len = usize::from(r.u16()?);
    let declared_end = r.rest().len() >= extensions_len;
    parse_extensions(r.up_to(extensions_len), info)?;
    if declared_end { Ok(()) } else { Err(Stop::Short) }
}

/// Walks the extensions block, reading SNI and ALPN (the first occurrence of each).
fn parse_extensions(block: &[u8], info: &mut ProbeInfo) -> Result<(), Stop> {
    let mut r = Reader::new(block);
    while !r.is_empty() {
        let ext_type = r.u16()?;
        let len = usize::from(r.u16()?);
        let data = r.bytes(len)?;
        match ext_type {
            EXT_SERVER_NAME if info.server_name.is_none() => info.server_name = parse_server_name(data),
            EXT_ALPN if info.alpn.is_empty() => info.alpn = parse_alpn(data).unwrap_or_default(),
            _ => {}
        }
    }
    Ok(())
}

/// The first `host_name` of a `server_name` extension, lowercased. A malformed extension or a
/// name that is not printable ASCII yields `None` (routing on a garbled name would be wrong).
fn parse_server_name(data: &[u8]) -> Option<String> {
    let mut r = Reader::new(data);
    let list_len = usize::from(r.u16().ok()?);
    let mut list = Reader::new(r.bytes(list_len).ok()?);
    while !list.is_empty() {
        let name_type = list.u8().ok()?;
        let len = usize::from(list.u16().ok()?);
        let name = list.bytes(len).ok()?;
        if name_type == NAME_TYPE_HOST_NAME {
            return host_name(name);
        }
    }
    None
}

/// A non-empty printable-ASCII host name, lowercased.
fn host_name(name: &[u8]) -> Option<String> {
    let printable = !name.is_empty() && name.iter().all(|b| b.is_ascii_graphic());
    printable.then(|| String::from_utf8_lossy(name).to_ascii_lowercase())
}

/// The protocol ids of an ALPN extension, in the client's order; `None` if malformed.
fn parse_alpn(data: &[u8]) -> Option<Vec<String>> {
    let mut r = Reader::new(data);
    let list_len = usize::from(r.u16().ok()?);
    let mut list = Reader::new(r.bytes(list_len).ok()?);
    let mut protocols = Vec::new();
    while !list.is_empty() {
        let len = usize::from(list.u8().ok()?);
        if len == 0 {
            return None;
        }
        protocols.push(String::from_utf8_lossy(list.bytes(len).ok()?).into_owned());
    }
    Some(protocols)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::probe::{MAX_TCP_PROBE_BYTES, TcpProbe, TcpProbedProtocol, probe_tcp};
    use proptest::prelude::*;
    use std::sync::Arc;

    /// The TLS records a real rustls client sends first, for `server_name` and `alpn`.
    pub(crate) fn rustls_client_hello(server_name: &str, alpn: &[&str]) -> Vec<u8> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        let name = rustls::pki_types::ServerName::try_from(server_name.to_owned()).expect("server name");
        let mut conn = rustls::ClientConnection::new(Arc::new(config), name).expect("client connection");
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).expect("write_tls");
        }
        out
    }

    /// The handshake-layer bytes of TLS records (the record headers stripped).
    pub(crate) fn handshake_bytes(records: &[u8]) -> Vec<u8> {
        let mut r = Reader::new(records);
        let mut out = Vec::new();
        while let (Ok(_), Ok(_), Ok(len)) = (r.u8(), r.u16(), r.u16()) {
            out.extend_from_slice(r.up_to(usize::from(len)));
        }
        out
    }

    /// Re-frames handshake bytes into handshake records of at most `size` bytes each.
    fn reframe(handshake: &[u8], size: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for chunk in handshake.chunks(size) {
            out.extend_from_slice(&[CONTENT_TYPE_HANDSHAKE, 3, 1]);
            out.extend_from_slice(&u16::try_from(chunk.len()).expect("chunk len").to_be_bytes());
            out.extend_from_slice(chunk);
        }
        out
    }

    fn tls(server_name: Option<&str>, alpn: &[&str]) -> TcpProbe {
        TcpProbe::Detected {
            protocol: TcpProbedProtocol::Tls,
            info: ProbeInfo {
                server_name: server_name.map(str::to_owned),
                alpn: alpn.iter().map(|p| p.to_string()).collect(),
            },
        }
    }

    /// A hand-built ClientHello handshake message with the given extensions (type, data).
    fn handmade_hello(extensions: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one cipher suite
        body.extend_from_slice(&[1, 0]); // null compression
        let mut exts = Vec::new();
        for (ext_type, data) in extensions {
            exts.extend_from_slice(&ext_type.to_be_bytes());
            exts.extend_from_slice(&u16::try_from(data.len()).expect("ext len").to_be_bytes());
            exts.extend_from_slice(data);
        }
        body.extend_from_slice(&u16::try_from(exts.len()).expect("exts len").to_be_bytes());
        body.extend_from_slice(&exts);
        let mut msg = vec![HANDSHAKE_CLIENT_HELLO];
        msg.extend_from_slice(&u32::try_from(body.len()).expect("body len").to_be_bytes()[1..]);
        msg.extend_from_slice(&body);
        msg
    }

    fn sni_extension(name: &str) -> (u16, Vec<u8>) {
        let mut entry = vec![NAME_TYPE_HOST_NAME];
        entry.extend_from_slice(&u16::try_from(name.len()).expect("len").to_be_bytes());
        entry.extend_from_slice(name.as_bytes());
        let mut data = u16::try_from(entry.len()).expect("len").to_be_bytes().to_vec();
        data.extend_from_slice(&entry);
        (EXT_SERVER_NAME, data)
    }

    #[test]
    fn sni_and_alpn_are_read_from_a_rustls_client_hello() {
        let records = rustls_client_hello("api.example.com", &["h2", "http/1.1"]);
        assert_eq!(probe_tcp(&records), tls(Some("api.example.com"), &["h2", "http/1.1"]));
    }

    #[test]
    fn every_proper_prefix_of_a_client_hello_is_incomplete() {
        let records = rustls_client_hello("api.example.com", &["h2", "http/1.1"]);
        for end in 0..records.len() {
            assert_eq!(probe_tcp(&records[..end]), TcpProbe::Incomplete, "prefix of {end} bytes");
        }
    }

    #[test]
    fn sni_is_read_from_client_hello_split_across_many_records() {
        let handshake = handshake_bytes(&rustls_client_hello("api.example.com", &["h2", "http/1.1"]));
        for size in [1, 7, 100, 1000] {
            let records = reframe(&handshake, size);
            assert_eq!(probe_tcp(&records), tls(Some("api.example.com"), &["h2", "http/1.1"]), "records of {size}");
            for end in (0..records.len()).step_by(13) {
                assert_eq!(probe_tcp(&records[..end]), TcpProbe::Incomplete, "size {size}, prefix {end}");
            }
        }
    }

    #[test]
    fn client_hello_without_sni_is_tls_with_no_server_name() {
        let records = rustls_client_hello("192.0.2.7", &[]);
        assert_eq!(probe_tcp(&records), tls(None, &[]));
    }

    #[test]
    fn sni_is_lowercased() {
        let records = reframe(&handmade_hello(&[sni_extension("API.Example.COM")]), 100);
        assert_eq!(probe_tcp(&records), tls(Some("api.example.com"), &[]));
    }

    #[test]
    fn records_after_a_complete_client_hello_are_ignored() {
        let mut records = reframe(&handmade_hello(&[sni_extension("a.example")]), 1000);
        records.extend_from_slice(&[23, 3, 3, 0, 2, 0xaa, 0xbb]);
        assert_eq!(probe_tcp(&records), tls(Some("a.example"), &[]));
    }

    #[test]
    fn non_handshake_record_before_the_hello_is_complete_is_unknown() {
        let handshake = handmade_hello(&[sni_extension("a.example")]);
        let mut records = reframe(&handshake[..10], 10);
        records.extend_from_slice(&[21, 3, 3, 0, 2, 2, 40]);
        assert_eq!(probe_tcp(&records), TcpProbe::Unknown);
    }

    #[test]
    fn other_handshake_message_or_bad_record_header_is_unknown() {
        assert_eq!(probe_tcp(&[22, 3, 1, 0, 4, 2, 0, 0, 0]), TcpProbe::Unknown); // ServerHello
        assert_eq!(probe_tcp(&[22, 3, 5]), TcpProbe::Unknown); // bad version
        assert_eq!(probe_tcp(&[22, 3, 3, 0, 0]), TcpProbe::Unknown); // empty fragment
        assert_eq!(probe_tcp(&[22, 3, 3, 0x40, 1]), TcpProbe::Unknown); // oversized fragment
    }

    #[test]
    fn malformed_complete_client_hello_is_unknown() {
        let mut msg = handmade_hello(&[]);
        if let Some(session_id_len) = msg.get_mut(4 + 2 + 32) {
            *session_id_len = 33;
        }
        assert_eq!(probe_tcp(&reframe(&msg, 1000)), TcpProbe::Unknown);
    }

    #[test]
    fn client_hello_without_extensions_is_tls_with_no_info() {
        let msg = handmade_hello(&[]);
        // Drop the empty extensions block and fix the length: a pre-TLS-1.3 style hello.
        let mut short = msg[..msg.len() - 2].to_vec();
        short[3] -= 2;
        assert_eq!(probe_tcp(&reframe(&short, 1000)), tls(None, &[]));
    }

    #[test]
    fn client_hello_larger_than_the_probe_limit_is_tls_with_what_was_parsed() {
        let alpn = (EXT_ALPN, vec![0, 3, 2, b'h', b'2']);
        let padding = (21, vec![0; 30_000]);
        let msg = handmade_hello(&[sni_extension("big.example"), alpn, padding, sni_extension("late.example")]);
        let records = reframe(&msg, MAX_RECORD_FRAGMENT);
        assert!(records.len() > MAX_TCP_PROBE_BYTES);
        assert_eq!(probe_tcp(&records[..MAX_TCP_PROBE_BYTES - 1]), TcpProbe::Incomplete);
        assert_eq!(probe_tcp(&records), tls(Some("big.example"), &["h2"]));
    }

    #[test]
    fn malformed_sni_or_alpn_extension_is_ignored() {
        let bad_sni = (EXT_SERVER_NAME, vec![0, 9, 0, 0, 3, b'a']);
        let bad_alpn = (EXT_ALPN, vec![0, 1, 0]);
        let records = reframe(&handmade_hello(&[bad_sni, bad_alpn]), 1000);
        assert_eq!(probe_tcp(&records), tls(None, &[]));
    }

    #[test]
    fn parse_client_hello_reads_a_bare_handshake_stream() {
        let handshake = handshake_bytes(&rustls_client_hello("quic.example.com", &["h3"]));
        let expected = ProbeInfo { server_name: Some("quic.example.com".into()), alpn: vec!["h3".into()] };
        assert_eq!(parse_client_hello(&handshake), HelloParse::Complete(expected));
        assert!(matches!(parse_client_hello(&handshake[..handshake.len() - 1]), HelloParse::Partial(_)));
        assert_eq!(parse_client_hello(&[2, 0, 0, 0]), HelloParse::NotClientHello);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = probe_tcp(&data);
            let _ = parse_client_hello(&data);
        }

        #[test]
        fn arbitrary_bytes_after_a_record_header_never_panic(
            body in proptest::collection::vec(any::<u8>(), 0..1024), len in any::<u16>()
        ) {
            let mut data = vec![22, 3, 1];
            data.extend_from_slice(&len.to_be_bytes());
            data.push(1);
            data.extend_from_slice(&body);
            let _ = probe_tcp(&data);
        }

        #[test]
        fn any_prefix_of_a_client_hello_is_incomplete_or_correct(cut in 0usize..4096, size in 1usize..600) {
            let handshake = handshake_bytes(&rustls_client_hello("api.example.com", &["h2", "http/1.1"]));
            let records = reframe(&handshake, size);
            let got = probe_tcp(&records[..cut.min(records.len())]);
            prop_assert!(
                got == TcpProbe::Incomplete || got == tls(Some("api.example.com"), &["h2", "http/1.1"]),
                "{got:?}"
            );
        }
    }
}
