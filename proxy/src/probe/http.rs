//! HTTP/1.x request-line probing (RFC 9112 §3), including the HTTP/2 prior-knowledge preface
//! (`PRI * HTTP/2.0`, RFC 9113 §3.4), and the Host header for routing.

use super::{ProbeInfo, Verdict};

/// Request methods we accept: a client sending anything else is not routed as HTTP, which keeps
/// false positives (e.g. a text protocol that happens to start with a word) unlikely.
const METHODS: [&[u8]; 10] =
    [b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH", b"CONNECT", b"TRACE", b"PRI"];
/// The longest method, so a longer first word is known not to be one.
const MAX_METHOD_LEN: usize = 7;
/// The version HTTP/1.x requests carry; `#` stands for any digit.
const HTTP1_VERSION: &[u8] = b"HTTP/1.#";
/// The only version (and target) the HTTP/2 preface carries.
const PREFACE_VERSION: &[u8] = b"HTTP/2.0";

/// Probes TCP bytes for an HTTP request. Detected once the request line is complete; the Host
/// is reported if a complete Host header line is among the bytes received.
pub(super) fn probe(data: &[u8], _no_more: bool) -> Verdict {
    let Some(space) = data.iter().take(MAX_METHOD_LEN + 1).position(|&b| b == b' ') else {
        return method_prefix_verdict(data);
    };
    let (method, rest) = data.split_at(space);
    if !METHODS.contains(&method) {
        return Verdict::NotThis;
    }
    let rest = rest.get(1..).unwrap_or_default();
    let Some(line_end) = rest.iter().position(|&b| b == b'\n') else {
        return if request_line_prefix_ok(method, rest) { Verdict::Incomplete } else { Verdict::NotThis };
    };
    let (line, after) = rest.split_at(line_end);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if !request_line_ok(method, line) {
        return Verdict::NotThis;
    }
    let headers = after.get(1..).unwrap_or_default();
    Verdict::Detected(ProbeInfo { server_name: host_header(headers), alpn: Vec::new() })
}

/// Before the first space: Incomplete while the bytes could still begin a known method.
fn method_prefix_verdict(data: &[u8]) -> Verdict {
    if data.len() <= MAX_METHOD_LEN && METHODS.iter().any(|m| m.starts_with(data)) {
        Verdict::Incomplete
    } else {
        Verdict::NotThis
    }
}

/// Splits `target SP version` (the request line after the method).
fn split_target(line: &[u8]) -> (&[u8], Option<&[u8]>) {
    match line.iter().position(|&b| b == b' ') {
        Some(i) => (line.get(..i).unwrap_or_default(), line.get(i + 1..)),
        None => (line, None),
    }
}

/// A request target is a run of visible, non-space bytes (obs-text allowed).
fn target_ok(target: &[u8]) -> bool {
    target.iter().all(|&b| b > b' ' && b != 0x7f)
}

/// Which version pattern the method's request line must carry.
fn version_pattern(method: &[u8]) -> &'static [u8] {
    if method == b"PRI" { PREFACE_VERSION } else { HTTP1_VERSION }
}

/// Whether `version` matches the pattern (`#` = digit), fully or, if `partial`, as a prefix.
fn version_matches(version: &[u8], pattern: &[u8], partial: bool) -> bool {
    let lengths_ok = if partial { version.len() <= pattern.len() } else { version.len() == pattern.len() };
    lengths_ok && version.iter().zip(pattern).all(|(&v, &p)| if p == b'#' { v.is_ascii_digit() } else { v == p })
}

/// An incomplete request line (no LF yet) that could still become valid.
fn request_line_prefix_ok(method: &[u8], rest: &[u8]) -> bool {
    let (target, version) = split_target(rest);
    if !target_ok(target) {
        return false;
    }
    match version {
        None => method != b"PRI" || b"*".starts_with(target),
        Some(v) => {
            let v = v.strip_suffix(b"\r").unwrap_or(v);
            (method != b"PRI" || target == b"*") && version_matches(v, version_pattern(method), true)
        }
    }
}

/// A complete request line (without its line ending, after the method).
fn request_line_ok(method: &[u8], line: &[u8]) -> bool {
    let (target, version) = split_target(line);
    let Some(version) = version else { return false };
    !target.is_empty()
        && target_ok(target)
        && (method != b"PRI" || target == b"*")
        && version_matches(version, version_pattern(method), false)
}

/// The value of the first complete `Host:` header line in the received header section, without
/// port, lowercased. Lines not yet terminated are ignored (they might still be growing).
fn host_header(headers: &[u8]) -> Option<String> {
    let mut lines = headers.split(|&b| b == b'\n');
    let _unterminated_tail = lines.next_back();
    for line in lines {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break;
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else { continue };
        let (name, value) = line.split_at(colon);
        if name.eq_ignore_ascii_case(b"host") {
            return host_without_port(value.get(1..).unwrap_or_default());
        }
    }
    None
}

/// `host[:port]` or `[v6]:port` → `host` / `[v6]`, trimmed and lowercased; `None` if empty or
/// not printable ASCII.
fn host_without_port(value: &[u8]) -> Option<String> {
    let value = value.trim_ascii();
    let host = if value.starts_with(b"[") {
        let end = value.iter().position(|&b| b == b']')?;
        value.get(..=end)?
    } else {
        value.split(|&b| b == b':').next()?
    };
    let printable = !host.is_empty() && host.iter().all(|b| b.is_ascii_graphic());
    printable.then(|| String::from_utf8_lossy(host).to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use crate::probe::{ProbeInfo, TcpProbe, TcpProbedProtocol, probe_tcp};
    use proptest::prelude::*;

    fn http(host: Option<&str>) -> TcpProbe {
        TcpProbe::Detected {
            protocol: TcpProbedProtocol::Http,
            info: ProbeInfo { server_name: host.map(str::to_owned), alpn: Vec::new() },
        }
    }

    const REQUEST: &[u8] = b"GET /index.html HTTP/1.1\r\nUser-Agent: t\r\nHost: WWW.Example.com:8080\r\n\r\n";

    #[test]
    fn request_with_host_header_reports_lowercased_host_without_port() {
        assert_eq!(probe_tcp(REQUEST), http(Some("www.example.com")));
    }

    #[test]
    fn every_known_method_is_http() {
        for method in ["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "CONNECT", "TRACE"] {
            let request = format!("{method} / HTTP/1.0\r\n");
            assert_eq!(probe_tcp(request.as_bytes()), http(None), "{method}");
        }
    }

    #[test]
    fn prefixes_before_the_request_line_ends_are_incomplete() {
        let line_end = REQUEST.iter().position(|&b| b == b'\n').expect("line");
        for end in 0..=line_end {
            assert_eq!(probe_tcp(&REQUEST[..end]), TcpProbe::Incomplete, "prefix {end}");
        }
    }

    #[test]
    fn request_line_alone_is_http_without_host() {
        assert_eq!(probe_tcp(b"POST /x HTTP/1.1\r\n"), http(None));
        assert_eq!(probe_tcp(b"POST /x HTTP/1.1\r\nHost: a.example"), http(None));
    }

    #[test]
    fn http2_preface_is_http() {
        assert_eq!(probe_tcp(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), http(None));
        assert_eq!(probe_tcp(b"PRI * HTTP/2."), TcpProbe::Incomplete);
        assert_eq!(probe_tcp(b"PRI /x HTTP/2.0\r\n"), TcpProbe::Unknown);
        assert_eq!(probe_tcp(b"GET / HTTP/2.0\r\n"), TcpProbe::Unknown);
    }

    #[test]
    fn unknown_method_or_bad_bytes_are_unknown_before_the_line_ends() {
        assert_eq!(probe_tcp(b"GX"), TcpProbe::Unknown);
        assert_eq!(probe_tcp(b"FETCH / HTTP/1.1\r\n"), TcpProbe::Unknown);
        assert_eq!(probe_tcp(b"GET /\x01"), TcpProbe::Unknown);
        assert_eq!(probe_tcp(b"GET / HTTX"), TcpProbe::Unknown);
        assert_eq!(probe_tcp(b"get / HTTP/1.1\r\n"), TcpProbe::Unknown);
    }

    #[test]
    fn bare_lf_line_ending_is_accepted() {
        assert_eq!(probe_tcp(b"GET / HTTP/1.1\nhost: a.example\n\n"), http(Some("a.example")));
    }

    #[test]
    fn ipv6_host_keeps_brackets_and_drops_port() {
        assert_eq!(probe_tcp(b"GET / HTTP/1.1\r\nHost: [2001:DB8::1]:443\r\n\r\n"), http(Some("[2001:db8::1]")));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = probe_tcp(&data);
        }

        #[test]
        fn arbitrary_bytes_after_a_method_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = probe_tcp(&[b"GET ".as_slice(), &data].concat());
        }

        #[test]
        fn any_prefix_of_a_request_is_incomplete_or_http(cut in 0usize..200) {
            let got = probe_tcp(&REQUEST[..cut.min(REQUEST.len())]);
            prop_assert!(matches!(
                got,
                TcpProbe::Incomplete | TcpProbe::Detected { protocol: TcpProbedProtocol::Http, .. }
            ), "{got:?}");
        }
    }
}
