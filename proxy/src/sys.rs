//! The one place that asks the kernel directly, for what no safe crate exposes.

use std::{io, os::fd::AsRawFd};

/// `SO_MEMINFO` (asm-generic/socket.h, which x86-64 and arm64 use).
const SO_MEMINFO: libc::c_int = 55;
/// Entries `SO_MEMINFO` fills (`SK_MEMINFO_VARS`).
const SK_MEMINFO_VARS: usize = 9;

/// Packets the kernel dropped on `socket`'s receive side since it was created, mostly for a
/// full receive buffer: `SO_MEMINFO`'s `SK_MEMINFO_DROPS`, the counter `SO_RXQ_OVFL` reports.
pub fn receive_drops(socket: &impl AsRawFd) -> io::Result<u64> {
    let mut info = [0u32; SK_MEMINFO_VARS];
    let mut len = std::mem::size_of_val(&info) as libc::socklen_t;
    // SAFETY: `info` is a writable buffer of `len` bytes that outlives the call, and `len`
    // points to its size; the kernel writes at most `len` bytes and updates `len`.
    let result = unsafe {
        libc::getsockopt(socket.as_raw_fd(), libc::SOL_SOCKET, SO_MEMINFO, info.as_mut_ptr().cast(), &mut len)
    };
    if result != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u64::from(info[libc::SK_MEMINFO_DROPS as usize]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_receive_buffer_shows_in_the_drop_count() {
        let receiver = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket2::SockRef::from(&receiver).set_recv_buffer_size(4096).unwrap();
        assert_eq!(receive_drops(&receiver).unwrap(), 0);
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        for _ in 0..200 {
            sender.send_to(&[0u8; 1000], receiver.local_addr().unwrap()).unwrap();
        }
        assert!(receive_drops(&receiver).unwrap() > 0, "200 KB into a 4 KiB buffer");
    }
}
