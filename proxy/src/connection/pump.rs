//! Copies bytes both ways between two TCP streams, with half-close, an idle timeout, and no
//! per-connection buffer while the connection is quiet.
//!
//! Why not `tokio::io::copy_bidirectional`: it keeps two 8 KiB buffers per connection for its
//! whole life, 16 KiB per idle connection. Here a read goes into one buffer per worker thread
//! and is written out in the same poll; only bytes the destination cannot take right now are
//! copied into a per-direction `Vec`, which is freed as soon as it drains. An idle connection
//! therefore holds no copy buffer at all.

use std::{
    cell::RefCell,
    future::poll_fn,
    io::{self, Read},
    net::Shutdown,
    pin::pin,
    task::{Context, Poll, ready},
    time::Duration,
};

use prometheus_client::metrics::counter::Counter;
use tokio::{io::Interest, net::TcpStream, time::Instant};
use tokio_util::sync::CancellationToken;

use super::{CloseReason, ConnectionError, Leg};

/// Size of the per-thread read buffer: the most one read moves.
pub const COPY_BUFFER_SIZE: usize = 64 * 1024;

thread_local! {
    // Borrowed only inside one synchronous read-then-write step, never across an await.
    static BUFFER: RefCell<Box<[u8]>> = RefCell::new(vec![0; COPY_BUFFER_SIZE].into_boxed_slice());
}

/// How the copy ended and what it moved.
#[derive(Debug, Default)]
pub(crate) struct PumpOutcome {
    pub reason: CloseReason,
    /// The leg failure behind a `ClientError` or `BackendError`.
    pub error: Option<ConnectionError>,
    /// Client to backend.
    pub bytes_up: u64,
    /// Backend to client.
    pub bytes_down: u64,
    pub client_finished: Option<Instant>,
    pub backend_finished: Option<Instant>,
}

/// Counters advanced as bytes move, so `/stats` is live for long connections.
pub(crate) struct ByteCounters<'a> {
    pub up: &'a Counter,
    pub down: &'a Counter,
}

enum Failure {
    Read(io::Error),
    Write(io::Error),
}

/// One direction of the copy.
#[derive(Default)]
struct Half {
    /// Bytes read but not yet accepted by the destination; empty (and unallocated) when caught up.
    pending: Vec<u8>,
    read_done: bool,
    write_done: bool,
    bytes: u64,
    finished_at: Option<Instant>,
}

impl Half {
    fn done(&self) -> bool {
        self.write_done
    }

    /// Moves what it can from `src` to `dst`. Ready(Ok(n)) after progress (n bytes read, or 0
    /// for a state change); Pending once both the read and the write side would block.
    ///
    /// `other_done`: the opposite direction has finished, so both sockets are about to be
    /// closed; this direction's end then needs no `shutdown` (the close sends the FIN).
    fn poll_advance(
        &mut self,
        cx: &mut Context<'_>,
        src: &TcpStream,
        dst: &TcpStream,
        other_done: bool,
    ) -> Poll<Result<usize, Failure>> {
        loop {
            if !self.pending.is_empty() {
                ready!(dst.poll_write_ready(cx)).map_err(Failure::Write)?;
                match dst.try_write(&self.pending) {
                    Ok(n) => {
                        self.pending.drain(..n);
                        if self.pending.is_empty() {
                            self.pending = Vec::new();
                            self.finish_if_drained(dst, other_done)?;
                        }
                        return Poll::Ready(Ok(0));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Poll::Ready(Err(Failure::Write(e))),
                }
            }
            if self.read_done {
                self.finish_if_drained(dst, other_done)?;
                return Poll::Ready(Ok(0));
            }
            ready!(src.poll_read_ready(cx)).map_err(Failure::Read)?;
            let step = BUFFER.with_borrow_mut(|buf| self.read_then_write(src, dst, buf, other_done));
            match step {
                Err(Failure::Read(e)) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => return Poll::Ready(other),
            }
        }
    }

    fn read_then_write(
        &mut self,
        src: &TcpStream,
        dst: &TcpStream,
        buf: &mut [u8],
        other_done: bool,
    ) -> Result<usize, Failure> {
        let n = read_drained(src, buf).map_err(Failure::Read)?;
        if n == 0 {
            // A reset that arrived while data was still queued is reported by a later read as
            // an end of stream (the kernel checks for the end before the pending error): look
            // for the error, so a reset is not mistaken for a clean finish.
            if let Ok(Some(reset)) = src.take_error() {
                return Err(Failure::Read(reset));
            }
            self.read_done = true;
            self.finished_at = Some(Instant::now());
            self.finish_if_drained(dst, other_done)?;
            return Ok(0);
        }
        self.bytes += n as u64;
        let mut written = 0;
        while written < n {
            match dst.try_write(&buf[written..n]) {
                Ok(w) => written += w,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(Failure::Write(e)),
            }
        }
        if written < n {
            self.pending.extend_from_slice(&buf[written..n]);
        }
        Ok(n)
    }

    /// Once the source has ended and everything read was written, pass the half-close on
    /// (unless both sockets are about to be closed anyway).
    fn finish_if_drained(&mut self, dst: &TcpStream, other_done: bool) -> Result<(), Failure> {
        if self.read_done && self.pending.is_empty() && !self.write_done {
            self.write_done = true;
            if other_done {
                return Ok(());
            }
            match socket2::SockRef::from(dst).shutdown(Shutdown::Write) {
                // The peer may already be gone; its own read error or EOF reports that.
                Err(e) if e.kind() != io::ErrorKind::NotConnected => return Err(Failure::Write(e)),
                _ => {}
            }
        }
        Ok(())
    }
}

/// Reads once from `src`. A short read (less than the buffer) means the socket's queue was
/// drained, so its read readiness is cleared here, saving the `recv` that would only return
/// `EAGAIN` (edge-triggered: data arriving later raises readiness again, and tokio never clears
/// a read-closed state, so an EOF that came with the data is still seen).
fn read_drained(src: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    let mut short_read = 0;
    let result = src.try_io(Interest::READABLE, || {
        let n = (&*socket2::SockRef::from(src)).read(buf)?;
        if n > 0 && n < buf.len() {
            short_read = n;
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match result {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock && short_read > 0 => Ok(short_read),
        other => other,
    }
}

/// How long a copy may run.
pub(crate) struct Bounds<'a> {
    /// No bytes either way for this long ends it.
    pub idle: Duration,
    /// It ends at this moment however busy (`maxConnectionDuration`).
    pub deadline: Option<Instant>,
    /// Cancelled: cut now (end of the shutdown drain).
    pub cut: &'a CancellationToken,
}

/// Copies until both directions have finished (`client_finished`: the client already sent
/// EOF), a leg fails, or a bound in `bounds` is reached. Dropping the streams afterwards closes
/// both legs.
pub(crate) async fn pump(
    client: &TcpStream,
    backend: &TcpStream,
    client_finished: bool,
    bounds: Bounds<'_>,
    counters: ByteCounters<'_>,
) -> PumpOutcome {
    let Bounds { idle, deadline, cut } = bounds;
    let mut up = Half::default();
    if client_finished {
        // The client ended while its first bytes were probed: pass the half-close on first.
        up.read_done = true;
        up.finished_at = Some(Instant::now());
    }
    let mut down = Half::default();
    let mut last_activity = Instant::now();
    // One timer for both bounds: it fires at the earlier of the idle deadline and the lifetime
    // deadline, and is re-armed only when it fires, so timer work stays off the per-read path.
    let next_deadline = |last_activity| {
        let idle_deadline = super::later(last_activity, idle);
        deadline.map_or(idle_deadline, |end| end.min(idle_deadline))
    };
    let mut timer = pin!(tokio::time::sleep_until(next_deadline(last_activity)));
    let mut cancelled = pin!(cut.cancelled());
    let (reason, error) = poll_fn(|cx| {
        if cancelled.as_mut().poll(cx).is_ready() {
            return Poll::Ready((CloseReason::Shutdown, None));
        }
        loop {
            let mut progressed = false;
            if !up.done() {
                match up.poll_advance(cx, client, backend, down.done()) {
                    Poll::Ready(Ok(n)) => {
                        counters.up.inc_by(n as u64);
                        progressed = true;
                    }
                    Poll::Ready(Err(Failure::Read(e))) => return Poll::Ready(broken(Leg::Client, e)),
                    Poll::Ready(Err(Failure::Write(e))) => return Poll::Ready(broken(Leg::Backend, e)),
                    Poll::Pending => {}
                }
            }
            if !down.done() {
                match down.poll_advance(cx, backend, client, up.done()) {
                    Poll::Ready(Ok(n)) => {
                        counters.down.inc_by(n as u64);
                        progressed = true;
                    }
                    Poll::Ready(Err(Failure::Read(e))) => return Poll::Ready(broken(Leg::Backend, e)),
                    Poll::Ready(Err(Failure::Write(e))) => return Poll::Ready(broken(Leg::Client, e)),
                    Poll::Pending => {}
                }
            }
            if up.done() && down.done() {
                return Poll::Ready((CloseReason::Completed, None));
            }
            if progressed {
                // Tokio's cooperative budget (charged by the readiness polls) makes this loop
                // yield to other tasks on a busy connection.
                last_activity = Instant::now();
                continue;
            }
            break;
        }
        while timer.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            if deadline.is_some_and(|end| now >= end) {
                return Poll::Ready((CloseReason::MaxDuration, None));
            }
            if now >= super::later(last_activity, idle) {
                return Poll::Ready((CloseReason::IdleTimeout, None));
            }
            timer.as_mut().reset(next_deadline(last_activity));
        }
        Poll::Pending
    })
    .await;

    PumpOutcome {
        reason,
        error,
        bytes_up: up.bytes,
        bytes_down: down.bytes,
        client_finished: up.finished_at,
        backend_finished: down.finished_at,
    }
}

fn broken(leg: Leg, source: io::Error) -> (CloseReason, Option<ConnectionError>) {
    let error = ConnectionError::Broken { leg, source };
    (error.close_reason(), Some(error))
}
