//! Fuzzes `probe_tcp` (TLS, HTTP, SSH). Beyond never panicking, it checks the property callers
//! rely on when they re-probe a growing buffer: once a prefix has a definite answer (Detected or
//! Unknown), more bytes never change which protocol it is.

#![no_main]

use l4proxy::probe::{TcpProbe, probe_tcp};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let whole = probe_tcp(data);
    let Some((&split, _)) = data.split_first() else { return };
    let prefix = data.get(..usize::from(split).min(data.len())).unwrap_or_default();
    match (probe_tcp(prefix), &whole) {
        (TcpProbe::Incomplete, _) => {}
        (TcpProbe::Unknown, whole) => assert_eq!(whole, &TcpProbe::Unknown),
        (TcpProbe::Detected { protocol, .. }, TcpProbe::Detected { protocol: whole_protocol, .. }) => {
            assert_eq!(protocol, *whole_protocol)
        }
        (prefix_answer, whole) => panic!("prefix said {prefix_answer:?}, whole input said {whole:?}"),
    }
});
