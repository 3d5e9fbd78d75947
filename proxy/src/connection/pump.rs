//! Copies bytes both ways between two TCP streams, with half-close, an idle timeout, and no
//! per-connection buffer while the connection is quiet.
//!
//! Why not `tokio::io::copy_bidirectional`: it keeps two 8 KiB buffers per connection for its
//! whole life, 16 KiB per idle connection. Here a read goes into one buffer per worker thread
//! and is written out in the same poll; only bytes the destination cannot take right now are
//! copied into a per-direction `Vec`, which is freed as soon as it drains. An idle connection
//! therefore holds no copy buffer at all.
//!
//! A direction whose read fills the whole buffer is busy (its source has more queued than one
//! read takes): it switches to `splice(2)` through a pipe ([`super::splice`]), which moves the
//! bytes inside the kernel, and back to reads once a splice moves less than [`SPLICE_LEAVE`]
//! (small messages: a read and a write cost no more than two splices, and no pipe is held).

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

use super::{CloseReason, ConnectionError, Leg, splice::Pipe};

/// Size of the per-thread read buffer: the most one read moves.
pub const COPY_BUFFER_SIZE: usize = 64 * 1024;

/// A splice that moves less than this takes its direction back to reads and writes.
const SPLICE_LEAVE: usize = 4 * 1024;

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
    /// A busy direction could not get a pipe (out of file descriptors) and copied instead.
    pub no_pipe: &'a Counter,
    /// A new pipe stayed below [`super::splice::PIPE_SIZE`] (the user's pipe allowance).
    pub small_pipe: &'a Counter,
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
    /// Busy: reads are splices into `pipe`.
    splicing: bool,
    /// Held only while it has bytes in it, or a splice is about to fill it.
    pipe: Option<Pipe>,
    /// Bytes in `pipe` not yet moved on to the destination.
    piped: usize,
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
        counters: &ByteCounters<'_>,
    ) -> Poll<Result<usize, Failure>> {
        loop {
            if self.piped > 0 {
                ready!(dst.poll_write_ready(cx)).map_err(Failure::Write)?;
                match self.drain_pipe(dst) {
                    Ok(()) => {
                        self.finish_if_drained(dst, other_done)?;
                        return Poll::Ready(Ok(0));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Poll::Ready(Err(Failure::Write(e))),
                }
            }
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
            let step = match self.splicing.then(|| self.pipe.take().map_or_else(|| Pipe::take(counters.small_pipe), Ok))
            {
                Some(Ok(pipe)) => self.splice_then_write(src, dst, pipe, other_done),
                Some(Err(_)) => {
                    // Out of descriptors: this read copies, the next one tries again.
                    counters.no_pipe.inc();
                    BUFFER.with_borrow_mut(|buf| self.read_then_write(src, dst, buf, other_done))
                }
                None => BUFFER.with_borrow_mut(|buf| self.read_then_write(src, dst, buf, other_done)),
            };
            match step {
                Err(Failure::Read(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                    // The source is drained and the pipe empty: an idle direction holds no pipe.
                    if let Some(pipe) = self.pipe.take() {
                        pipe.give_back();
                    }
                    continue;
                }
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
            return self.source_ended(src, dst, other_done);
        }
        self.bytes += n as u64;
        self.splicing = n == buf.len();
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

    /// [`Self::read_then_write`] through `pipe`: splices what `src` has into it and on into
    /// `dst` at once; what `dst` cannot take now stays in the pipe (`piped`).
    fn splice_then_write(
        &mut self,
        src: &TcpStream,
        dst: &TcpStream,
        pipe: Pipe,
        other_done: bool,
    ) -> Result<usize, Failure> {
        let pipe = self.pipe.insert(pipe);
        let n = src.try_io(Interest::READABLE, || pipe.fill_from(src)).map_err(Failure::Read)?;
        if n == 0 {
            if let Some(pipe) = self.pipe.take() {
                pipe.give_back();
            }
            return self.source_ended(src, dst, other_done);
        }
        self.bytes += n as u64;
        self.piped = n;
        self.splicing = n >= SPLICE_LEAVE;
        match self.drain_pipe(dst) {
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => Err(Failure::Write(e)),
            _ => Ok(n),
        }
    }

    /// A read (or splice) found the end of `src`'s stream: Ok(0) and the half-close passed on,
    /// or the reset behind it.
    fn source_ended(&mut self, src: &TcpStream, dst: &TcpStream, other_done: bool) -> Result<usize, Failure> {
        // A reset that arrived while data was still queued is reported by a later read as an
        // end of stream (the kernel checks for the end before the pending error): look for the
        // error, so a reset is not mistaken for a clean finish.
        if let Ok(Some(reset)) = src.take_error() {
            return Err(Failure::Read(reset));
        }
        self.read_done = true;
        self.finished_at = Some(Instant::now());
        self.finish_if_drained(dst, other_done)?;
        Ok(0)
    }

    /// Moves the pipe's bytes on to `dst` until it is empty (then the pipe is given back,
    /// unless the direction stays busy) or `dst` would block.
    fn drain_pipe(&mut self, dst: &TcpStream) -> io::Result<()> {
        let Some(pipe) = &self.pipe else { return Ok(()) };
        while self.piped > 0 {
            self.piped -= dst.try_io(Interest::WRITABLE, || pipe.drain_to(dst, self.piped))?;
        }
        if !self.splicing
            && let Some(pipe) = self.pipe.take()
        {
            pipe.give_back();
        }
        Ok(())
    }

    /// Once the source has ended and everything read was written, pass the half-close on
    /// (unless both sockets are about to be closed anyway).
    fn finish_if_drained(&mut self, dst: &TcpStream, other_done: bool) -> Result<(), Failure> {
        if self.read_done && self.pending.is_empty() && self.piped == 0 && !self.write_done {
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
                match up.poll_advance(cx, client, backend, down.done(), &counters) {
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
                match down.poll_advance(cx, backend, client, up.done(), &counters) {
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

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    use super::*;
    use crate::connection::splice;

    /// A connected pair: (the end the test drives, the end the pump gets).
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let outer = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (inner, _) = listener.accept().await.unwrap();
        (outer, inner)
    }

    struct Counters([Counter; 4]);

    impl Counters {
        fn new() -> Self {
            Self(Default::default())
        }

        fn get(&self) -> ByteCounters<'_> {
            let [up, down, no_pipe, small_pipe] = &self.0;
            ByteCounters { up, down, no_pipe, small_pipe }
        }
    }

    async fn within_deadline<T>(work: impl Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(20), work).await.expect("the transfer stalled")
    }

    fn payload(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    /// Runs the pump between `client` and `backend` on this thread (the test runtime is
    /// single-threaded, so the pipe pool it uses is this thread's).
    async fn run_pump(client: TcpStream, backend: TcpStream, counters: &Counters) -> PumpOutcome {
        let cut = CancellationToken::new();
        let bounds = Bounds { idle: Duration::from_secs(30), deadline: None, cut: &cut };
        pump(&client, &backend, false, bounds, counters.get()).await
    }

    #[tokio::test]
    async fn a_bulk_transfer_is_spliced_both_ways_unchanged_and_the_pipes_are_given_back() {
        let (mut client, client_inner) = pair().await;
        let (mut backend, backend_inner) = pair().await;
        let counters = Counters::new();
        let up = payload(8 << 20);
        let down: Vec<u8> = payload(6 << 20).into_iter().rev().collect();
        // Queued before the pump starts, so its first reads fill the buffer: both directions
        // switch to splicing. The far ends read slowly, so pipes also hold bytes for a while.
        client.write_all(&up[..1 << 20]).await.unwrap();
        backend.write_all(&down[..1 << 20]).await.unwrap();
        let before = splice::pooled();
        let pumped = run_pump(client_inner, backend_inner, &counters);
        let drive = async {
            let (mut cr, mut cw) = client.split();
            let (mut br, mut bw) = backend.split();
            let send_up = async {
                cw.write_all(&up[1 << 20..]).await.unwrap();
                cw.shutdown().await.unwrap();
            };
            let send_down = async {
                bw.write_all(&down[1 << 20..]).await.unwrap();
                bw.shutdown().await.unwrap();
            };
            let mut got_up = Vec::new();
            let mut got_down = Vec::new();
            let (_, _, read_up, read_down) =
                tokio::join!(send_up, send_down, br.read_to_end(&mut got_up), cr.read_to_end(&mut got_down));
            read_up.unwrap();
            read_down.unwrap();
            (got_up, got_down)
        };
        let (outcome, (got_up, got_down)) = within_deadline(async { tokio::join!(pumped, drive) }).await;
        assert_eq!(outcome.reason, CloseReason::Completed, "{:?}", outcome.error);
        assert!(got_up == up, "client to backend: {} of {} bytes, or changed", got_up.len(), up.len());
        assert!(got_down == down, "backend to client: {} of {} bytes, or changed", got_down.len(), down.len());
        assert_eq!((outcome.bytes_up, outcome.bytes_down), (up.len() as u64, down.len() as u64));
        assert_eq!(counters.get().up.get(), up.len() as u64);
        assert_eq!(counters.get().no_pipe.get(), 0);
        assert!(splice::pooled() > before, "the pipes went back to the pool: they were used");
    }

    #[tokio::test]
    async fn a_reset_in_the_middle_of_a_spliced_transfer_is_reported_as_the_clients() {
        let (mut client, client_inner) = pair().await;
        let (mut backend, backend_inner) = pair().await;
        let counters = Counters::new();
        client.write_all(&payload(1 << 20)).await.unwrap();
        let pumped = run_pump(client_inner, backend_inner, &counters);
        let drive = async {
            let mut first = vec![0; 1 << 20];
            backend.read_exact(&mut first).await.unwrap();
            assert!(first == payload(1 << 20));
            // Unread bytes at close make the kernel send a reset instead of a FIN.
            client.write_all(b"never read").await.unwrap();
            socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO)).unwrap();
            drop(client);
        };
        let (outcome, ()) = within_deadline(async { tokio::join!(pumped, drive) }).await;
        match outcome.error {
            Some(ConnectionError::Broken { leg: Leg::Client, source }) => {
                assert_eq!(source.kind(), io::ErrorKind::ConnectionReset, "{source}")
            }
            other => panic!("expected the client's reset, got {other:?} ({:?})", outcome.reason),
        }
    }
}
