//! Kernel-side copying for busy TCP connections: `splice(2)` moves bytes from the source socket
//! into a pipe and from the pipe into the destination socket, so they never cross into user
//! space (on loopback and most NICs the pages themselves move; nothing is copied).
//!
//! A pipe is held only while it carries bytes: once it is empty and the source has nothing
//! more, it goes back to a small per-thread pool ([`POOL_SIZE`]), so an idle connection holds
//! no pipe and a busy one takes and returns it without a system call.

use std::{
    cell::RefCell,
    io,
    os::fd::{AsFd, OwnedFd},
};

use prometheus_client::metrics::counter::Counter;
use rustix::pipe::{PipeFlags, SpliceFlags};

/// Empty pipes kept per worker thread for the next busy connection; beyond this they are
/// closed. Each costs two file descriptors and no buffer memory while empty.
pub(super) const POOL_SIZE: usize = 16;

/// Capacity asked for each pipe (`F_SETPIPE_SZ`; the kernel default is 64 KiB). Memory is
/// taken only for bytes in flight, and those are the socket's own pages, referenced, not
/// copied. On this machine 256 KiB moved one iperf3 stream about 20 % faster than 64 KiB, at a
/// third less CPU per GB; 1 MiB was no better (docs/performance.md).
pub(super) const PIPE_SIZE: usize = 256 * 1024;

/// The most one splice moves into the pipe; the pipe's capacity stops it earlier.
const CHUNK: usize = 1 << 20;

thread_local! {
    static POOL: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

/// One direction's pipe.
#[derive(Debug)]
pub(super) struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    /// A pipe from this thread's pool, or a new one.
    /// `small` counts new pipes the kernel would not enlarge to [`PIPE_SIZE`].
    pub(super) fn take(small: &Counter) -> io::Result<Self> {
        if let Some(pipe) = POOL.with_borrow_mut(Vec::pop) {
            return Ok(pipe);
        }
        let (read, write) = rustix::pipe::pipe_with(PipeFlags::NONBLOCK | PipeFlags::CLOEXEC)?;
        if rustix::pipe::fcntl_setpipe_size(&write, PIPE_SIZE).is_err() {
            // Over the user's pipe allowance (fs.pipe-user-pages-soft, or a lowered
            // fs.pipe-max-size): the pipe works at the size it has, moving less per splice.
            small.inc();
        }
        Ok(Self { read, write })
    }

    /// Returns an empty pipe to this thread's pool (or closes it when the pool is full). A pipe
    /// that still holds bytes must be dropped instead: they belong to its connection.
    pub(super) fn give_back(self) {
        POOL.with_borrow_mut(|pool| {
            if pool.len() < POOL_SIZE {
                pool.push(self);
            }
        });
    }

    /// Moves what `src` has queued (up to the pipe's capacity) into the empty pipe: the bytes
    /// moved, 0 at end of stream, `WouldBlock` when `src` has nothing.
    pub(super) fn fill_from(&self, src: impl AsFd) -> io::Result<usize> {
        Ok(rustix::pipe::splice(src, None, &self.write, None, CHUNK, SpliceFlags::MOVE | SpliceFlags::NONBLOCK)?)
    }

    /// Moves up to `len` of the pipe's bytes into `dst`: the bytes moved, `WouldBlock` when
    /// `dst` takes nothing now.
    pub(super) fn drain_to(&self, dst: impl AsFd, len: usize) -> io::Result<usize> {
        Ok(rustix::pipe::splice(&self.read, None, dst, None, len, SpliceFlags::MOVE | SpliceFlags::NONBLOCK)?)
    }
}

#[cfg(test)]
pub(super) fn pooled() -> usize {
    POOL.with_borrow(Vec::len)
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    fn socket_pair() -> (std::net::TcpStream, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let a = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (b, _) = listener.accept().unwrap();
        (a, b)
    }

    #[test]
    fn bytes_spliced_through_a_pipe_arrive_unchanged() {
        let (mut client, from_client) = socket_pair();
        let (to_server, mut server) = socket_pair();
        from_client.set_nonblocking(true).unwrap();
        let pipe = Pipe::take(&Counter::default()).unwrap();
        client.write_all(b"through the kernel").unwrap();
        let mut moved = 0;
        while moved == 0 {
            match pipe.fill_from(&from_client) {
                Ok(n) => moved = n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(pipe.drain_to(&to_server, moved).unwrap(), moved);
        let mut got = vec![0; moved];
        server.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"through the kernel");
        assert!(matches!(pipe.fill_from(&from_client), Err(e) if e.kind() == io::ErrorKind::WouldBlock));
        drop(client);
        // The end of stream shows as 0 once the FIN is in.
        let eof = loop {
            match pipe.fill_from(&from_client) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => break other.unwrap(),
            }
        };
        assert_eq!(eof, 0);
    }

    #[test]
    fn a_new_pipe_has_the_size_asked_for() {
        let small = Counter::default();
        let pipe = Pipe::take(&small).unwrap();
        assert_eq!(rustix::pipe::fcntl_getpipe_size(&pipe.write).unwrap(), PIPE_SIZE);
        assert_eq!(small.get(), 0);
    }

    #[test]
    fn the_pool_keeps_at_most_its_size_and_hands_pipes_out_again() {
        let pipes: Vec<_> = (0..POOL_SIZE + 3).map(|_| Pipe::take(&Counter::default()).unwrap()).collect();
        let before = pooled();
        for pipe in pipes {
            pipe.give_back();
        }
        assert_eq!(pooled(), POOL_SIZE.max(before));
        let _taken = Pipe::take(&Counter::default()).unwrap();
        assert_eq!(pooled(), POOL_SIZE - 1);
    }
}
