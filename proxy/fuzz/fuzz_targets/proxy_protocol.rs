//! Fuzzes the PROXY protocol parser: it must never panic, and a header it accepts must fit in
//! the input and within `MAX_HEADER_LEN` (callers slice the stream by `header.len`).

#![no_main]

use l4proxy::proxy_protocol::{MAX_HEADER_LEN, parse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(header)) = parse(data) {
        assert!(header.len <= data.len());
        assert!(header.len <= MAX_HEADER_LEN);
    }
});
