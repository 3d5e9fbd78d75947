//! SSH identification-string probing (RFC 4253 §4.2): `SSH-2.0-…`, or `SSH-1.99-…` from
//! servers/clients that also speak the old protocol.

use super::{ProbeInfo, Verdict};

/// The banner prefixes that identify an SSH-2 capable peer.
const BANNERS: [&[u8]; 2] = [b"SSH-2.0-", b"SSH-1.99-"];

/// Probes TCP bytes for an SSH banner: Incomplete while they are a prefix of one.
pub(super) fn probe(data: &[u8], _no_more: bool) -> Verdict {
    if BANNERS.iter().any(|banner| data.starts_with(banner)) {
        Verdict::Detected(ProbeInfo::default())
    } else if BANNERS.iter().any(|banner| banner.starts_with(data)) {
        Verdict::Incomplete
    } else {
        Verdict::NotThis
    }
}

#[cfg(test)]
mod tests {
    use crate::probe::{ProbeInfo, TcpProbe, TcpProbedProtocol, probe_tcp};
    use proptest::prelude::*;

    const SSH: TcpProbe = TcpProbe::Detected {
        protocol: TcpProbedProtocol::Ssh,
        info: ProbeInfo { server_name: None, alpn: Vec::new() },
    };

    #[test]
    fn ssh2_banner_is_ssh() {
        assert_eq!(probe_tcp(b"SSH-2.0-OpenSSH_9.6\r\n"), SSH);
    }

    #[test]
    fn ssh199_banner_is_ssh() {
        assert_eq!(probe_tcp(b"SSH-1.99-Legacy"), SSH);
    }

    #[test]
    fn prefix_of_a_banner_is_incomplete() {
        for prefix in ["S", "SS", "SSH", "SSH-", "SSH-2", "SSH-2.0", "SSH-1.9"] {
            assert_eq!(probe_tcp(prefix.as_bytes()), TcpProbe::Incomplete, "{prefix}");
        }
    }

    #[test]
    fn other_versions_are_unknown() {
        assert_eq!(probe_tcp(b"SSH-1.5-old"), TcpProbe::Unknown);
        assert_eq!(probe_tcp(b"SSH-3"), TcpProbe::Unknown);
        assert_eq!(probe_tcp(b"SSX"), TcpProbe::Unknown);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_after_the_prefix_never_panic(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = probe_tcp(&[b"SSH-".as_slice(), &data].concat());
        }

        #[test]
        fn any_prefix_of_a_banner_is_incomplete_or_ssh(cut in 0usize..30) {
            let banner = b"SSH-2.0-OpenSSH_9.6\r\n";
            let got = probe_tcp(&banner[..cut.min(banner.len())]);
            prop_assert!(got == TcpProbe::Incomplete || got == SSH, "{got:?}");
        }
    }
}
