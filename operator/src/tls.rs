//! TLS connections for the config service and the webhook: accepted on one task, each
//! handshake on its own (bounded in number and in time), so a slow client never holds up the
//! others.

use std::{io, sync::Arc, time::Duration};

use futures::Stream;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{Semaphore, mpsc},
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_util::sync::CancellationToken;

/// How long a TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most handshakes under way at once.
pub const MAX_HANDSHAKES: usize = 256;
/// Pause after a failed accept (e.g. out of descriptors), so the loop does not spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// The established TLS connections on `socket`, until `stop`.
pub fn tls(
    what: &'static str,
    socket: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    stop: CancellationToken,
) -> impl Stream<Item = io::Result<TlsStream<TcpStream>>> + Send + 'static {
    let (tx, rx) = mpsc::channel(MAX_HANDSHAKES);
    let acceptor = TlsAcceptor::from(tls);
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let place = tokio::select! {
                () = stop.cancelled() => return,
                place = handshakes.clone().acquire_owned() => place.expect("the semaphore is never closed"),
            };
            let (stream, peer) = tokio::select! {
                () = stop.cancelled() => return,
                accepted = socket.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        tracing::debug!(what, %error, "accept failed");
                        tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                        continue;
                    }
                },
            };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let _place = place;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(error)) => tracing::debug!(what, %peer, %error, "TLS handshake failed"),
                    Err(_) => tracing::debug!(what, %peer, "TLS handshake timed out"),
                }
            });
        }
    });
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) })
}
