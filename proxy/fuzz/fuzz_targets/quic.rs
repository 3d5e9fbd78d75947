//! Fuzzes `QuicInitialProbe::push` over a sequence of datagrams cut from the input (each
//! prefixed by a 16-bit big-endian length), and `is_wireguard_initiation`. Beyond never
//! panicking, a probe's answer must be final once it is not `Incomplete`.

#![no_main]

use l4proxy::probe::{QuicInitialProbe, UdpProbe, is_wireguard_initiation};
use libfuzzer_sys::fuzz_target;

/// Splits the input into datagrams: a 2-byte length, then up to that many bytes, repeated.
fn datagrams(mut data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while let Some((len, rest)) = data.split_first_chunk::<2>() {
        let (datagram, tail) = rest.split_at(usize::from(u16::from_be_bytes(*len)).min(rest.len()));
        out.push(datagram);
        data = tail;
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let mut probe = QuicInitialProbe::default();
    let mut settled: Option<UdpProbe> = None;
    for datagram in datagrams(data) {
        let _ = is_wireguard_initiation(datagram);
        let answer = probe.push(datagram);
        if let Some(previous) = &settled {
            assert_eq!(&answer, previous, "a final answer changed");
        } else if answer != UdpProbe::Incomplete {
            settled = Some(answer);
        }
    }
});
