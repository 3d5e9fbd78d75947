//! The TCP connection manager: admission against `maxConnections`, backend connect with
//! failover, the two-way copy, and what each connection reports when it ends.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use tokio::{io::AsyncWriteExt, net::TcpStream, time::Instant};
use tokio_util::sync::CancellationToken;

use super::{
    Admitted, CloseReason, ConnectionContext, ConnectionError, ConnectionManager, ConnectionMetrics, Leg,
    ListenerManager, ListenerSettings,
    pool::{Admission, PoolStats, Slot},
    pump::{Bounds, ByteCounters, pump},
};
use crate::{
    backend::Connected,
    config::{ListenerConfig, Protocol},
    metrics::{Metrics, Open},
    probe::{MAX_TCP_PROBE_BYTES, TcpProbe, probe_tcp},
    proxy_protocol,
    routing::Probed,
};

/// Serves the connections of one TCP listening socket.
pub struct TcpConnectionManager {
    settings: ArcSwap<ListenerSettings>,
    admission: Arc<Admission>,
    /// Cancelled at the end of the shutdown drain: cuts connections still open.
    cut: CancellationToken,
}

/// An admitted TCP connection: the client socket, its context and its place under the limit.
pub struct TcpConnection {
    pub context: ConnectionContext,
    client: TcpStream,
    settings: Arc<ListenerSettings>,
    _slot: Slot,
    _open: Open,
}

impl Admitted for TcpConnection {
    fn context(&self) -> &ConnectionContext {
        &self.context
    }

    fn settings(&self) -> &Arc<ListenerSettings> {
        &self.settings
    }
}

impl TcpConnectionManager {
    pub fn new(settings: ListenerSettings, cut: CancellationToken) -> Self {
        let admission = Admission::new(settings.limits().max_connections as usize);
        Self { settings: ArcSwap::from_pointee(settings), admission, cut }
    }
}

impl ListenerManager for TcpConnectionManager {
    fn settings(&self) -> Arc<ListenerSettings> {
        self.settings.load_full()
    }

    fn update(&self, config: ListenerConfig, metrics: &Metrics) {
        let next = ListenerSettings::new(config, Some(&self.settings.load()), metrics);
        self.admission.set_max(next.limits().max_connections as usize);
        self.settings.store(Arc::new(next));
    }

    /// Open connections as a pool: entries are connections, expired ones are those closed for
    /// idleness or age, evictions those cut at shutdown.
    fn pool_stats(&self) -> PoolStats {
        let m = &self.settings.load().metrics;
        let expired = m.closed(CloseReason::IdleTimeout).get() + m.closed(CloseReason::MaxDuration).get();
        self.admission.stats(expired, m.closed(CloseReason::Shutdown).get())
    }
}

impl ConnectionManager for TcpConnectionManager {
    type Client = TcpStream;
    type Connection = TcpConnection;

    fn create_connection(
        &self,
        client: TcpStream,
        source: SocketAddr,
        destination: SocketAddr,
    ) -> Result<TcpConnection, ConnectionError> {
        let settings = self.settings.load_full();
        let Some(slot) = self.admission.admit() else {
            settings.metrics.rejected_limit.inc();
            let max = self.admission.max();
            return Err(ConnectionError::LimitExceeded { listener: settings.name.clone(), src: source, max });
        };
        settings.metrics.accepted.inc();
        let context = ConnectionContext::new(settings.name.clone(), Protocol::Tcp, source, destination);
        let open = Open::new(&settings.metrics.active);
        Ok(TcpConnection { context, client, settings, _slot: slot, _open: open })
    }

    async fn handle_connection(&self, connection: TcpConnection) -> ConnectionMetrics {
        let TcpConnection { mut context, client, settings, _slot, _open } = connection;
        // A reference, not a copy: a local lives in the task's state for the whole connection.
        let limits = settings.limits();

        if let Some(trusted) = &settings.config.accept_proxy_protocol {
            match Box::pin(accept_proxy_header(&client, &context, trusted, limits.probe_timeout.get())).await {
                Ok(Some((source, destination))) => (context.source, context.destination) = (source, destination),
                Ok(None) => {}
                Err(error) => return ConnectionMetrics::failed(context, error),
            }
        }

        // Bytes read while probing; forwarded to the backend before anything else.
        let mut early = Vec::new();
        let mut client_finished = false;
        let backends = if settings.probes() {
            let probe = Box::pin(read_probe(&client, &mut early, limits.probe_timeout.get())).await;
            client_finished = probe.client_finished;
            let Some(backends) = settings.route(&probe.routing_view()) else {
                let error = ConnectionError::NoRoute { listener: context.listener.clone(), src: context.source };
                return ConnectionMetrics::failed(context, error);
            };
            backends
        } else {
            &settings.backends
        };

        // Boxed, as are the other set-up steps: an async fn's state is as large as its largest
        // step, and the connection holds that state for its whole life (the copy's step is
        // the small one). No named `Result` either: a local keeps its room in the state.
        let connect = backends.connect(&context, limits.connect_timeout.get(), limits.ejection_cooldown.get());
        let Connected { stream: mut backend, address, lease, attempts, proxy_protocol } = match Box::pin(connect).await
        {
            Ok(connected) => connected,
            Err(error) => return ConnectionMetrics::failed(context, error),
        };
        let connect_time = context.started.elapsed();
        settings.metrics.connect_time.observe(connect_time.as_secs_f64());
        let deadline = limits.max_connection_duration.map(|d| super::later(context.started, d.get()));

        // Small writes (handshakes, RPCs) must not wait for Nagle; errors here only cost latency.
        let _ = client.set_nodelay(true);
        let _ = backend.set_nodelay(true);

        if let Some(version) = proxy_protocol {
            let mut prefix = Vec::with_capacity(proxy_protocol::MAX_HEADER_LEN + early.len());
            proxy_protocol::write_header(version.into(), context.source, context.destination, &mut prefix);
            prefix.extend_from_slice(&early);
            early = prefix;
        }
        let sent = if early.is_empty() {
            Ok(())
        } else {
            Box::pin(send_early(&mut backend, &early, limits.idle_timeout.get())).await
        };
        let outcome = if let Err(source) = sent {
            let error = ConnectionError::Broken { leg: Leg::Backend, source };
            super::pump::PumpOutcome { reason: error.close_reason(), error: Some(error), ..Default::default() }
        } else {
            drop(early);
            let counters = ByteCounters {
                up: &settings.metrics.bytes_received,
                down: &settings.metrics.bytes_sent,
                no_pipe: &settings.metrics.splice_unavailable,
                small_pipe: &settings.metrics.splice_pipe_small,
            };
            let bounds = Bounds { idle: limits.idle_timeout.get(), deadline, cut: &self.cut };
            pump(&client, &backend, client_finished, bounds, counters).await
        };
        if let Some(ConnectionError::Broken { leg, source }) = &outcome.error
            && is_reset(source)
        {
            // A reset is passed on as a reset, so the other side can tell a cut-off transfer
            // from a finished one: closing with a zero linger sends RST instead of FIN.
            let other = match leg {
                Leg::Client => &backend,
                Leg::Backend => &client,
            };
            let _ = socket2::SockRef::from(other).set_linger(Some(Duration::ZERO));
        }
        drop((client, backend));

        // Built only now, so that it is not part of what an open connection holds.
        let mut metrics = ConnectionMetrics::new(context);
        metrics.backend_name = Some(lease.backend().address().clone());
        drop(lease);
        metrics.backend = Some(address);
        metrics.connect_attempts = attempts;
        metrics.connect_time = Some(connect_time);
        metrics.lifecycle.backend_connected = Some(connect_time);
        let started = metrics.context.started;
        let since_start = |at: Option<Instant>| at.map(|t| t.saturating_duration_since(started));
        metrics.bytes_received = outcome.bytes_up;
        metrics.bytes_sent = outcome.bytes_down;
        metrics.lifecycle.client_finished = since_start(outcome.client_finished);
        metrics.lifecycle.backend_finished = since_start(outcome.backend_finished);
        metrics.close_reason = outcome.reason;
        metrics.error = outcome.error;
        metrics.close();
        metrics
    }

    fn connection_count(&self) -> usize {
        self.admission.occupied()
    }

    fn max_connections(&self) -> usize {
        self.admission.max()
    }
}

/// Whether a leg failed because its peer reset it (or is gone, for a write).
fn is_reset(error: &std::io::Error) -> bool {
    matches!(error.kind(), std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe)
}

/// Reads a PROXY protocol header when the peer is trusted. Returns the carried addresses
/// (`None` for a LOCAL header: keep the socket's own), or why the connection must be closed.
async fn accept_proxy_header(
    client: &TcpStream,
    context: &ConnectionContext,
    trusted: &[ipnet::IpNet],
    timeout: Duration,
) -> Result<Option<(SocketAddr, SocketAddr)>, ConnectionError> {
    let peer = context.source;
    if !trusted.iter().any(|net| net.contains(&peer.ip())) {
        return Err(ConnectionError::UntrustedSource { listener: context.listener.clone(), src: peer });
    }
    match proxy_protocol::read_header(client, timeout).await {
        Ok(header) => Ok(match header.addresses {
            proxy_protocol::Addresses::Proxied { source, destination } => Some((source, destination)),
            proxy_protocol::Addresses::Local => None,
        }),
        Err(source) => Err(ConnectionError::ProxyHeader { listener: context.listener.clone(), src: peer, source }),
    }
}

/// What probing read from a client.
struct ProbeRead {
    result: TcpProbe,
    /// The client shut its sending side during the probe.
    client_finished: bool,
}

impl ProbeRead {
    fn routing_view(&self) -> Probed<'_> {
        match &self.result {
            TcpProbe::Detected { protocol, info } => Probed::found((*protocol).into(), info),
            TcpProbe::Incomplete | TcpProbe::Unknown => Probed::default(),
        }
    }
}

/// Reads the client's first bytes into `buf` (at most [`MAX_TCP_PROBE_BYTES`]) until probing
/// decides, the client stops sending, or `timeout` passes. A client that sends nothing in time
/// (a server-speaks-first protocol) is not an error: it gets the default route.
async fn read_probe(client: &TcpStream, buf: &mut Vec<u8>, timeout: Duration) -> ProbeRead {
    let deadline = super::later(Instant::now(), timeout);
    buf.reserve_exact(MAX_TCP_PROBE_BYTES);
    loop {
        let outcome = |result| ProbeRead { result, client_finished: false };
        match tokio::time::timeout_at(deadline, client.readable()).await {
            Err(_) | Ok(Err(_)) => return outcome(decided(probe_tcp(buf))),
            Ok(Ok(())) => {}
        }
        match client.try_read_buf(buf) {
            Ok(0) => return ProbeRead { result: decided(probe_tcp(buf)), client_finished: true },
            Ok(_) => match probe_tcp(buf) {
                TcpProbe::Incomplete if buf.len() < MAX_TCP_PROBE_BYTES => continue,
                result => return outcome(decided(result)),
            },
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            // A broken client fails again in the copy, which reports it.
            Err(_) => return outcome(decided(probe_tcp(buf))),
        }
    }
}

/// No more bytes are coming: an incomplete answer is no answer.
fn decided(result: TcpProbe) -> TcpProbe {
    match result {
        TcpProbe::Incomplete => TcpProbe::Unknown,
        other => other,
    }
}

/// Sends what must reach the backend before the copy starts: a PROXY header and the bytes read
/// while probing. Bounded by the idle timeout, like any write.
async fn send_early(backend: &mut TcpStream, early: &[u8], idle: Duration) -> std::io::Result<()> {
    match tokio::time::timeout(idle, backend.write_all(early)).await {
        Ok(result) => result,
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, parse_yaml};
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    async fn manager(max: u32, backend: SocketAddr) -> (TcpConnectionManager, Metrics) {
        let yaml = format!(
            "listeners:\n- name: web\n  address: 127.0.0.1:1\n  backends: [{{address: '{backend}'}}]\n  limits: {{maxConnections: {max}}}\n"
        );
        let config = Config::from_file_config(parse_yaml(&yaml).unwrap()).await.unwrap();
        let metrics = Metrics::new();
        let settings = ListenerSettings::new(config.listeners[0].clone(), None, &metrics);
        (TcpConnectionManager::new(settings, CancellationToken::new()), metrics)
    }

    /// A connected client stream (the client half stays in the returned pair).
    async fn accepted_pair(listener: &TcpListener) -> (TcpStream, TcpStream, SocketAddr) {
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, peer) = listener.accept().await.unwrap();
        (client, server, peer)
    }

    #[tokio::test]
    async fn connection_manager_refuses_over_the_limit_and_frees_slots_on_drop() {
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (manager, _metrics) = manager(2, "127.0.0.1:9".parse().unwrap()).await;
        let local = front.local_addr().unwrap();
        let mut admitted = Vec::new();
        for _ in 0..2 {
            let (_c, s, peer) = accepted_pair(&front).await;
            admitted.push(manager.create_connection(s, peer, local).unwrap());
        }
        assert_eq!(manager.connection_count(), 2);
        assert!(!manager.can_accept_connection());
        let (_c, s, peer) = accepted_pair(&front).await;
        let err = manager.create_connection(s, peer, local).err().expect("over the limit");
        assert_eq!(err.close_reason(), CloseReason::Limit);
        assert!(err.to_string().contains(&peer.to_string()), "{err}");
        drop(admitted.pop());
        assert_eq!(manager.connection_count(), 1);
        assert!(manager.can_accept_connection());
    }

    #[tokio::test]
    async fn connection_context_ids_are_unique_and_carry_addresses() {
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (manager, _metrics) = manager(10, "127.0.0.1:9".parse().unwrap()).await;
        let local = front.local_addr().unwrap();
        let (_c1, s1, p1) = accepted_pair(&front).await;
        let (_c2, s2, p2) = accepted_pair(&front).await;
        let a = manager.create_connection(s1, p1, local).unwrap();
        let b = manager.create_connection(s2, p2, local).unwrap();
        assert_ne!(a.context.id, b.context.id);
        assert_eq!((a.context.source, a.context.destination), (p1, local));
        assert_eq!(&*a.context.listener, "web");
    }

    #[tokio::test]
    async fn reloaded_limit_applies_to_new_connections() {
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (manager, metrics) = manager(1, "127.0.0.1:9".parse().unwrap()).await;
        assert_eq!(manager.max_connections(), 1);
        let mut config = manager.settings().config.clone();
        config.limits.max_connections = 3;
        manager.update(config, &metrics);
        assert_eq!(manager.max_connections(), 3);
        let local = front.local_addr().unwrap();
        let mut held = Vec::new();
        for _ in 0..3 {
            let (_c, s, p) = accepted_pair(&front).await;
            held.push(manager.create_connection(s, p, local).unwrap());
        }
    }

    #[tokio::test]
    async fn handled_connection_reports_bytes_lifecycle_and_close_reason() {
        let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let backend = upstream.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = upstream.accept().await.unwrap();
            let mut request = Vec::new();
            s.read_to_end(&mut request).await.unwrap();
            s.write_all(b"reply of 17 bytes").await.unwrap();
        });
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (manager, _metrics) = manager(1, backend).await;
        let (mut client, server, peer) = accepted_pair(&front).await;
        let connection = manager.create_connection(server, peer, front.local_addr().unwrap()).unwrap();
        let handled = tokio::spawn(async move { manager.handle_connection(connection).await });
        client.write_all(b"hello").await.unwrap();
        client.shutdown().await.unwrap();
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).await.unwrap();
        assert_eq!(reply, b"reply of 17 bytes");
        let metrics = handled.await.unwrap();
        assert!(metrics.error.is_none(), "{:?}", metrics.error);
        assert_eq!(metrics.backend, Some(backend));
        assert_eq!((metrics.bytes_received, metrics.bytes_sent), (5, 17));
        assert_eq!(metrics.close_reason, CloseReason::Completed);
        assert_eq!(metrics.connect_attempts, 1);
        let l = metrics.lifecycle;
        assert!(l.backend_connected <= l.client_finished && l.client_finished <= l.closed, "{l:?}");
        assert!(l.backend_finished.is_some());
    }

    #[tokio::test]
    async fn handled_connection_to_a_dead_backend_fails_with_its_address() {
        let dead = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (manager, _metrics) = manager(1, dead).await;
        let (_client, server, peer) = accepted_pair(&front).await;
        let connection = manager.create_connection(server, peer, front.local_addr().unwrap()).unwrap();
        let metrics = manager.handle_connection(connection).await;
        assert_eq!(metrics.close_reason, CloseReason::ConnectFailed);
        let err = metrics.error.expect("the connect error");
        assert!(err.to_string().contains(&dead.to_string()), "{err}");
        assert_eq!(manager.connection_count(), 0, "the slot is freed on failure");
    }

    /// What an open connection holds in user space is mostly its task, and the task is as large
    /// as the largest step of `handle_connection`: the set-up steps are boxed (freed once
    /// connected) so that the copy's step sets the size. It was 1,760 bytes before (3.01 KiB
    /// per idle connection in `bench/run.sh`); now 2.40 KiB.
    #[tokio::test]
    async fn an_open_connections_task_state_stays_small() {
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (manager, _metrics) = manager(1, front.local_addr().unwrap()).await;
        let (_client, server, peer) = accepted_pair(&front).await;
        let connection = manager.create_connection(server, peer, front.local_addr().unwrap()).unwrap();
        let state = std::mem::size_of_val(&manager.handle_connection(connection));
        assert!(state <= 1280, "handle_connection's state is {state} bytes");
    }
}
