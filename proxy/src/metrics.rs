//! All metrics, registered once in one struct. Labels are bounded by config (listener names and
//! backend addresses as written), never by clients. Hot paths hold pre-resolved handles
//! ([`ListenerMetrics`], [`BackendMetrics`]) so a connection does no label lookups.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use std::sync::{Arc, OnceLock};

use crate::connection::{CloseReason, DropReason};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabels {
    listener: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    listener: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabels {
    listener: String,
    backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendReasonLabels {
    listener: String,
    backend: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn connect_time_histogram() -> Histogram {
    // 100µs .. ~3.3s
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

fn duration_histogram() -> Histogram {
    // 1ms .. ~9h
    Histogram::new(exponential_buckets(0.001, 4.0, 13))
}

/// The process's metrics.
pub struct Metrics {
    registry: Registry,
    accepted: Family<ListenerLabels, Counter>,
    rejected: Family<ReasonLabels, Counter>,
    closed: Family<ReasonLabels, Counter>,
    active: Family<ListenerLabels, Gauge>,
    bytes_received: Family<ListenerLabels, Counter>,
    bytes_sent: Family<ListenerLabels, Counter>,
    accept_errors: Family<ListenerLabels, Counter>,
    splice_unavailable: Family<ListenerLabels, Counter>,
    splice_pipe_small: Family<ListenerLabels, Counter>,
    datagrams_received: Family<ListenerLabels, Counter>,
    datagrams_sent: Family<ListenerLabels, Counter>,
    drops: Family<ReasonLabels, Counter>,
    pool_size: Family<ListenerLabels, Gauge>,
    pool_expired: Family<ListenerLabels, Counter>,
    connect_time: HistogramFamily<ListenerLabels>,
    duration: HistogramFamily<ListenerLabels>,
    backend_active: Family<BackendLabels, Gauge>,
    backend_failures: Family<BackendReasonLabels, Counter>,
    backend_ejected: Family<BackendLabels, Gauge>,
    backend_ejections: Family<BackendLabels, Counter>,
    backend_resolve_failures: Family<BackendLabels, Counter>,
    reloads: Family<ResultLabels, Counter>,
    control_plane_connected: Gauge,
    config_updates: Family<ResultLabels, Counter>,
    listener_failures: Family<ListenerLabels, Counter>,
    receive_drops: Family<ListenerLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut m = Self {
            registry: Registry::with_prefix("l4proxy"),
            accepted: Family::default(),
            rejected: Family::default(),
            closed: Family::default(),
            active: Family::default(),
            bytes_received: Family::default(),
            bytes_sent: Family::default(),
            accept_errors: Family::default(),
            splice_unavailable: Family::default(),
            splice_pipe_small: Family::default(),
            datagrams_received: Family::default(),
            datagrams_sent: Family::default(),
            drops: Family::default(),
            pool_size: Family::default(),
            pool_expired: Family::default(),
            connect_time: Family::new_with_constructor(connect_time_histogram),
            duration: Family::new_with_constructor(duration_histogram),
            backend_active: Family::default(),
            backend_failures: Family::default(),
            backend_ejected: Family::default(),
            backend_ejections: Family::default(),
            backend_resolve_failures: Family::default(),
            reloads: Family::default(),
            control_plane_connected: Gauge::default(),
            config_updates: Family::default(),
            listener_failures: Family::default(),
            receive_drops: Family::default(),
        };
        let r = &mut m.registry;
        r.register("connections_accepted", "Connections admitted by a listener", m.accepted.clone());
        r.register("connections_rejected", "Connections refused on arrival, by reason", m.rejected.clone());
        r.register("connections_closed", "Connections ended, by reason", m.closed.clone());
        r.register("connections_active", "Connections open now", m.active.clone());
        r.register("bytes_received", "Bytes read from clients", m.bytes_received.clone());
        r.register("bytes_sent", "Bytes written to clients", m.bytes_sent.clone());
        r.register(
            "accept_errors",
            "Errors accepting a connection (e.g. out of file descriptors)",
            m.accept_errors.clone(),
        );
        r.register(
            "splice_unavailable",
            "Reads of busy TCP connections copied through user space because no pipe could be opened",
            m.splice_unavailable.clone(),
        );
        r.register(
            "splice_pipe_small",
            "Pipes for splice(2) the kernel would not enlarge to 256 KiB (fs.pipe-user-pages-soft)",
            m.splice_pipe_small.clone(),
        );
        r.register("datagrams_received", "UDP datagrams read from clients", m.datagrams_received.clone());
        r.register("datagrams_sent", "UDP datagrams written to clients", m.datagrams_sent.clone());
        r.register("datagrams_dropped", "UDP datagrams dropped, by reason", m.drops.clone());
        r.register(
            "pool_size",
            "Entries in a listener's session pool (UDP) or open connections (TCP)",
            m.pool_size.clone(),
        );
        r.register("pool_expired", "Pool entries removed for idleness", m.pool_expired.clone());
        r.register("connect_duration_seconds", "Time to establish the backend leg", m.connect_time.clone());
        r.register("connection_duration_seconds", "Lifetime of finished connections", m.duration.clone());
        r.register("backend_connections_active", "Connections open now, per backend", m.backend_active.clone());
        r.register("backend_failures", "Failed connects to a backend, by reason", m.backend_failures.clone());
        r.register(
            "backend_ejected",
            "1 while a backend is ejected after consecutive failures",
            m.backend_ejected.clone(),
        );
        r.register("backend_ejections", "Times a backend was ejected", m.backend_ejections.clone());
        r.register(
            "backend_resolve_failures",
            "Failed re-resolutions of a backend host name",
            m.backend_resolve_failures.clone(),
        );
        r.register("config_reloads", "Config reloads, by result", m.reloads.clone());
        r.register(
            "control_plane_connected",
            "1 while a stream to the control plane is open (always 0 without --control-plane)",
            m.control_plane_connected.clone(),
        );
        r.register(
            "config_updates",
            "Configs pushed by the control plane, by result (applied, rejected)",
            m.config_updates.clone(),
        );
        r.register(
            "udp_receive_drops",
            "Datagrams the kernel dropped before the proxy read them (receive buffer full), per UDP listener",
            m.receive_drops.clone(),
        );
        r.register(
            "listener_failures",
            "Listeners whose accept or receive loop died (the listener is down: /readyz fails)",
            m.listener_failures.clone(),
        );
        m
    }

    /// Handles for one listener's hot path.
    pub fn listener(&self, name: &str) -> ListenerMetrics {
        let l = ListenerLabels { listener: name.to_owned() };
        let reason = |reason| ReasonLabels { listener: name.to_owned(), reason };
        ListenerMetrics {
            accepted: handle(&self.accepted, &l),
            rejected_limit: handle(&self.rejected, &reason("limit")),
            closed: CloseReason::ALL.map(|r| handle(&self.closed, &reason(r.label()))),
            active: handle(&self.active, &l),
            bytes_received: handle(&self.bytes_received, &l),
            bytes_sent: handle(&self.bytes_sent, &l),
            accept_errors: handle(&self.accept_errors, &l),
            splice_unavailable: handle(&self.splice_unavailable, &l),
            splice_pipe_small: handle(&self.splice_pipe_small, &l),
            datagrams_received: handle(&self.datagrams_received, &l),
            datagrams_sent: handle(&self.datagrams_sent, &l),
            send_failed: handle(&self.drops, &reason(DropReason::SendFailed.label())),
            probe_overflow: handle(&self.drops, &reason(DropReason::ProbeOverflow.label())),
            refused: Arc::new(Refused {
                family: self.drops.clone(),
                listener: name.to_owned(),
                counters: Default::default(),
            }),
            pool_size: handle(&self.pool_size, &l),
            pool_expired: handle(&self.pool_expired, &l),
            receive_drops: handle(&self.receive_drops, &l),
            connect_time: handle(&self.connect_time, &l),
            duration: handle(&self.duration, &l),
        }
    }

    /// Handles for one backend of one listener.
    pub fn backend(&self, listener: &str, backend: &str) -> BackendMetrics {
        let l = BackendLabels { listener: listener.to_owned(), backend: backend.to_owned() };
        let reason =
            |reason| BackendReasonLabels { listener: listener.to_owned(), backend: backend.to_owned(), reason };
        BackendMetrics {
            active: handle(&self.backend_active, &l),
            failures_refused: handle(&self.backend_failures, &reason(CloseReason::ConnectFailed.label())),
            failures_timeout: handle(&self.backend_failures, &reason("connect_timeout")),
            ejected: handle(&self.backend_ejected, &l),
            ejections: handle(&self.backend_ejections, &l),
            resolve_failures: handle(&self.backend_resolve_failures, &l),
        }
    }

    /// Counts one reload attempt.
    pub fn reload(&self, succeeded: bool) {
        let result = if succeeded { "success" } else { "failure" };
        self.reloads.get_or_create(&ResultLabels { result }).inc();
    }

    /// Handles for the control-plane client.
    pub fn control_plane(&self) -> ControlPlaneMetrics {
        let result = |result| handle(&self.config_updates, &ResultLabels { result });
        ControlPlaneMetrics {
            connected: self.control_plane_connected.clone(),
            updates_applied: result("applied"),
            updates_rejected: result("rejected"),
        }
    }

    /// Counts a listener going down.
    pub fn listener_failed(&self, listener: &str) {
        self.listener_failures.get_or_create(&ListenerLabels { listener: listener.to_owned() }).inc();
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        crate::telemetry::encode(&self.registry)
    }
}

/// A handle to one labelled metric. A function, not an inline `get_or_create(..).clone()`:
/// that returns a read guard on the family, and a guard kept alive to the end of a larger
/// expression deadlocks the next `get_or_create` on the same family that needs to insert.
fn handle<L, M, C>(family: &Family<L, M, C>, labels: &L) -> M
where
    L: Clone + std::hash::Hash + Eq,
    M: Clone,
    C: prometheus_client::metrics::family::MetricConstructor<M>,
{
    family.get_or_create(labels).clone()
}

/// One listener's metric handles.
#[derive(Clone)]
pub struct ListenerMetrics {
    pub accepted: Counter,
    pub rejected_limit: Counter,
    pub closed: [Counter; CloseReason::ALL.len()],
    pub active: Gauge,
    pub bytes_received: Counter,
    pub bytes_sent: Counter,
    pub accept_errors: Counter,
    /// Reads of busy TCP connections that went through user space because no pipe for
    /// `splice(2)` could be opened (out of file descriptors).
    pub splice_unavailable: Counter,
    /// New pipes the kernel kept below the size asked for (the user's pipe allowance).
    pub splice_pipe_small: Counter,
    pub datagrams_received: Counter,
    pub datagrams_sent: Counter,
    send_failed: Counter,
    probe_overflow: Counter,
    refused: Arc<Refused>,
    pub pool_size: Gauge,
    pub pool_expired: Counter,
    /// Follows the kernel's count of the listening socket ([`Self::follow_receive_drops`]).
    receive_drops: Counter,
    pub connect_time: Histogram,
    pub duration: Histogram,
}

impl ListenerMetrics {
    pub fn closed(&self, reason: CloseReason) -> &Counter {
        &self.closed[reason.index()]
    }

    pub fn dropped(&self, reason: DropReason) -> &Counter {
        match reason {
            DropReason::SendFailed => &self.send_failed,
            DropReason::ProbeOverflow => &self.probe_overflow,
            DropReason::Refused(why) => self.refused.counter(why),
        }
    }

    /// Brings the kernel-drop counter up to `total`, the kernel's own (monotonic) count.
    /// Callers serialise (the proxy does it under its state lock), so no rise is counted twice.
    pub fn follow_receive_drops(&self, total: u64) {
        self.receive_drops.inc_by(total.saturating_sub(self.receive_drops.get()));
    }

    pub fn receive_drops(&self) -> u64 {
        self.receive_drops.get()
    }

    /// Dropped datagrams by reason label: the fixed reasons, and each refusal that happened.
    pub fn drop_counts(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        [DropReason::SendFailed, DropReason::ProbeOverflow]
            .into_iter()
            .map(|r| (r.label(), self.dropped(r).get()))
            .chain(self.refused.counted())
    }
}

/// Dropped-datagram counters of refused sessions, one per close reason, each registered the
/// first time a session is refused for it: only the reasons that happen show in `/metrics`.
struct Refused {
    family: Family<ReasonLabels, Counter>,
    listener: String,
    counters: [OnceLock<Counter>; CloseReason::ALL.len()],
}

impl Refused {
    /// The counts of the reasons that happened so far.
    fn counted(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        CloseReason::ALL.iter().zip(&self.counters).filter_map(|(why, c)| c.get().map(|c| (why.label(), c.get())))
    }

    fn counter(&self, why: CloseReason) -> &Counter {
        self.counters[why.index()].get_or_init(|| {
            handle(&self.family, &ReasonLabels { listener: self.listener.clone(), reason: why.label() })
        })
    }
}

/// Counts one open connection or session in a gauge while it lives.
pub struct Open(Gauge);

impl Open {
    pub fn new(gauge: &Gauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The control-plane client's metric handles.
#[derive(Clone)]
pub struct ControlPlaneMetrics {
    pub connected: Gauge,
    pub updates_applied: Counter,
    pub updates_rejected: Counter,
}

/// One backend's metric handles.
#[derive(Clone)]
pub struct BackendMetrics {
    pub active: Gauge,
    pub failures_refused: Counter,
    pub failures_timeout: Counter,
    pub ejected: Gauge,
    pub ejections: Counter,
    pub resolve_failures: Counter,
}
