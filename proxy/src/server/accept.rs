//! The TCP accept loop.

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::connection::{self, ConnectionManager, ListenerManager, TcpConnectionManager};

/// Pause after a failed accept (e.g. out of file descriptors), so the loop does not spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);
/// At most one log line per this long about failed accepts (each is counted in the metric).
const ACCEPT_ERROR_LOG_EVERY: Duration = Duration::from_secs(10);

/// Accepts until `stop`, handing each client to `manager` and its connection to `connections`.
/// A failed accept that leaves the socket usable (out of descriptors or memory, a client that
/// went away before it was accepted) is counted, logged and retried after a pause; a failure of
/// the listening socket itself ends the loop with its error.
pub(super) async fn accept_loop(
    socket: TcpListener,
    manager: Arc<TcpConnectionManager>,
    stop: CancellationToken,
    connections: TaskTracker,
) -> io::Result<()> {
    let local = socket.local_addr()?;
    // One cancellation future for the loop's life: registering a fresh one per accept costs a
    // lock on the token each time.
    let mut stopped = std::pin::pin!(stop.cancelled());
    let mut errors = ErrorLog::default();
    loop {
        let accepted: io::Result<(TcpStream, SocketAddr)> = tokio::select! {
            biased;
            _ = &mut stopped => return Ok(()),
            accepted = socket.accept() => accepted,
        };
        let (client, source) = match accepted {
            Ok(accepted) => accepted,
            Err(error) if socket_failed(&error) => return Err(error),
            Err(error) => {
                let settings = manager.settings();
                settings.metrics.accept_errors.inc();
                errors.failed(&settings.name, &error);
                tokio::select! {
                    _ = &mut stopped => return Ok(()),
                    _ = tokio::time::sleep(ACCEPT_ERROR_BACKOFF) => continue,
                }
            }
        };
        match manager.create_connection(client, source, local) {
            Ok(connection) => connection::serve(&connections, manager.clone(), connection),
            Err(error) => tracing::debug!(%error, reason = error.close_reason().label(), "connection rejected"),
        }
    }
}

/// Whether an accept error means the listening socket is unusable (accept(2): a bad or closed
/// descriptor, or a socket that no longer listens), rather than a passing condition.
fn socket_failed(error: &io::Error) -> bool {
    matches!(error.raw_os_error(), Some(libc::EBADF | libc::EINVAL | libc::ENOTSOCK | libc::EFAULT))
}

/// Failed accepts, logged at most once per [`ACCEPT_ERROR_LOG_EVERY`]: under descriptor
/// exhaustion they come every [`ACCEPT_ERROR_BACKOFF`], and the log must not become the load.
#[derive(Default)]
struct ErrorLog {
    last_logged: Option<tokio::time::Instant>,
    unlogged: u64,
}

impl ErrorLog {
    fn failed(&mut self, listener: &str, error: &io::Error) {
        let now = tokio::time::Instant::now();
        if self.last_logged.is_some_and(|at| now.duration_since(at) < ACCEPT_ERROR_LOG_EVERY) {
            self.unlogged += 1;
            return;
        }
        let more = std::mem::take(&mut self.unlogged);
        tracing::warn!(listener, %error, more_since_last_line = more, "accept failed; retrying");
        self.last_logged = Some(now);
    }
}
