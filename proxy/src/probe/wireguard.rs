//! WireGuard handshake-initiation recognition (WireGuard whitepaper §5.4.2): the message type
//! byte 1, three reserved zero bytes, and a fixed total size of 148 bytes.

/// Size of a handshake initiation: header 4, sender 4, ephemeral 32, static 48, timestamp 28,
/// mac1 16, mac2 16.
const INITIATION_LEN: usize = 148;
/// Type and reserved bytes that start an initiation.
const INITIATION_HEADER: [u8; 4] = [1, 0, 0, 0];

/// Whether a datagram is a WireGuard handshake initiation (the first datagram of a session).
pub(crate) fn is_wireguard_initiation(datagram: &[u8]) -> bool {
    datagram.len() == INITIATION_LEN && datagram.starts_with(&INITIATION_HEADER)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn initiation() -> Vec<u8> {
        let mut d = vec![0x5a; INITIATION_LEN];
        d[..4].copy_from_slice(&INITIATION_HEADER);
        d
    }

    #[test]
    fn initiation_of_148_bytes_is_wireguard() {
        assert!(is_wireguard_initiation(&initiation()));
    }

    #[test]
    fn wrong_length_is_not_wireguard() {
        let d = initiation();
        assert!(!is_wireguard_initiation(&d[..147]));
        assert!(!is_wireguard_initiation(&[d.as_slice(), &[0]].concat()));
    }

    #[test]
    fn other_message_type_or_nonzero_reserved_is_not_wireguard() {
        let mut d = initiation();
        d[0] = 2;
        assert!(!is_wireguard_initiation(&d));
        let mut d = initiation();
        d[2] = 1;
        assert!(!is_wireguard_initiation(&d));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = is_wireguard_initiation(&data);
        }
    }
}
