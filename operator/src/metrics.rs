//! The operator's metrics: one registered struct, bounded labels (reasons and kinds, never
//! resource names), reconcile durations recorded by a timer on drop.

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
use tokio::time::Instant;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

/// What the operator wrote.
#[derive(Clone, Copy, Debug)]
pub enum Write {
    Status,
    Apply,
    Delete,
    Event,
}

impl Write {
    fn label(self) -> &'static str {
        match self {
            Self::Status => "status",
            Self::Apply => "apply",
            Self::Delete => "delete",
            Self::Event => "event",
        }
    }
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    reconciles: Counter,
    leader_reconciles: Counter,
    failures: Family<ReasonLabels, Counter>,
    duration: Histogram,
    writes: Family<KindLabels, Counter>,
    leader: Gauge,
    lease_failures: Counter,
    configs: Gauge,
    proxies: Gauge,
    pushes: Counter,
    applied: Counter,
    rejected: Counter,
    refused: Family<ReasonLabels, Counter>,
    push_latency: Histogram,
    token_reviews: Family<ResultLabels, Counter>,
    serving_cert_expiry: Gauge,
    serving_cert_rotations: Family<ReasonLabels, Counter>,
    cert_check_failures: Family<ReasonLabels, Counter>,
    admissions: Family<ResultLabels, Counter>,
    admission_events_skipped: Counter,
    ca_bundle_writes: Family<ResultLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut m = Self {
            registry: Registry::with_prefix("l4proxy_operator"),
            reconciles: Counter::default(),
            leader_reconciles: Counter::default(),
            failures: Family::default(),
            // 1 ms .. ~16 s
            duration: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            writes: Family::default(),
            leader: Gauge::default(),
            lease_failures: Counter::default(),
            configs: Gauge::default(),
            proxies: Gauge::default(),
            pushes: Counter::default(),
            applied: Counter::default(),
            rejected: Counter::default(),
            refused: Family::default(),
            // 1 ms .. ~33 s
            push_latency: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            token_reviews: Family::default(),
            serving_cert_expiry: Gauge::default(),
            serving_cert_rotations: Family::default(),
            cert_check_failures: Family::default(),
            admissions: Family::default(),
            admission_events_skipped: Counter::default(),
            ca_bundle_writes: Family::default(),
        };
        let r = &mut m.registry;
        r.register("reconciles", "Reconciles run", m.reconciles.clone());
        r.register(
            "leader_reconciles",
            "Reconciles completed while holding the lease (the ones that may write)",
            m.leader_reconciles.clone(),
        );
        r.register("reconcile_failures", "Reconciles that failed, by reason", m.failures.clone());
        r.register("reconcile_duration_seconds", "Time per reconcile", m.duration.clone());
        r.register("writes", "Writes to the API server, by kind (status, apply, delete, event)", m.writes.clone());
        r.register("leader", "1 while this replica holds the lease (the only one that writes)", m.leader.clone());
        r.register(
            "lease_failures",
            "Lease rounds that failed or got no answer in time (past the renew deadline, leadership ends)",
            m.lease_failures.clone(),
        );
        r.register("effective_configs", "Resources with an effective config held for proxies", m.configs.clone());
        r.register("proxies_connected", "Proxies connected to this replica's config service", m.proxies.clone());
        r.register("config_pushes", "Configs sent to proxies", m.pushes.clone());
        r.register("config_applied", "Configs proxies acknowledged as applied", m.applied.clone());
        r.register("config_rejected", "Configs proxies rejected", m.rejected.clone());
        r.register("proxies_refused", "Proxy connections refused, by reason", m.refused.clone());
        r.register(
            "push_latency_seconds",
            "From a new config version to a proxy's Ack that applied it",
            m.push_latency.clone(),
        );
        r.register("token_reviews", "TokenReview calls, by result", m.token_reviews.clone());
        r.register(
            "serving_cert_expiry_timestamp_seconds",
            "When the serving certificate this replica presents expires (unix seconds)",
            m.serving_cert_expiry.clone(),
        );
        r.register(
            "webhook_admissions",
            "Pods the injection webhook answered for, by result (injected, unmatched, refused, not_opted_in, \
             already_injected, excluded_namespace, not_a_create, bad_request, error)",
            m.admissions.clone(),
        );
        r.register(
            "webhook_events_skipped",
            "Events about pods admitted without a sidecar that were skipped: too many were being published",
            m.admission_events_skipped.clone(),
        );
        r.register(
            "webhook_ca_bundle_writes",
            "Patches of the webhook configuration's caBundle, by result (ok, error)",
            m.ca_bundle_writes.clone(),
        );
        r.register(
            "serving_cert_rotations",
            "Serving certificates this replica issued and stored, by reason (missing, issuer, names, expiring)",
            m.serving_cert_rotations.clone(),
        );
        r.register(
            "cert_check_failures",
            "Checks of Secret l4proxy-ca that failed, by reason (the current certificates stay in use)",
            m.cert_check_failures.clone(),
        );
        m
    }

    pub fn connected(&self, proxies: usize) {
        self.proxies.set(i64::try_from(proxies).unwrap_or(i64::MAX));
    }

    pub fn pushed(&self) {
        self.pushes.inc();
    }

    pub fn applied(&self) {
        self.applied.inc();
    }

    pub fn rejected(&self) {
        self.rejected.inc();
    }

    pub fn refused(&self, reason: &'static str) {
        self.refused.get_or_create(&ReasonLabels { reason }).inc();
    }

    pub fn push_latency(&self, latency: std::time::Duration) {
        self.push_latency.observe(latency.as_secs_f64());
    }

    pub fn admission(&self, result: &'static str) {
        self.admissions.get_or_create(&ResultLabels { result }).inc();
    }

    pub fn admission_event_skipped(&self) {
        self.admission_events_skipped.inc();
    }

    pub fn ca_bundle_write(&self, ok: bool) {
        self.ca_bundle_writes.get_or_create(&ResultLabels { result: if ok { "ok" } else { "error" } }).inc();
    }

    pub fn token_review(&self, authenticated: bool) {
        let result = if authenticated { "authenticated" } else { "refused" };
        self.token_reviews.get_or_create(&ResultLabels { result }).inc();
    }

    /// Counts a reconcile; its duration is recorded when the timer drops.
    pub fn reconcile(&self) -> ReconcileTimer<'_> {
        self.reconciles.inc();
        ReconcileTimer { metrics: self, start: Instant::now() }
    }

    /// Counts a reconcile that completed while holding the lease.
    pub fn leader_reconcile(&self) {
        self.leader_reconciles.inc();
    }

    /// Reconciles run while holding the lease.
    pub fn leader_reconciles(&self) -> u64 {
        self.leader_reconciles.get()
    }

    pub fn failure(&self, reason: &'static str) {
        self.failures.get_or_create(&ReasonLabels { reason }).inc();
    }

    pub fn wrote(&self, kind: Write) {
        self.writes.get_or_create(&KindLabels { kind: kind.label() }).inc();
    }

    pub fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
    }

    pub fn lease_failure(&self) {
        self.lease_failures.inc();
    }

    pub fn set_configs(&self, count: usize) {
        self.configs.set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    pub fn set_serving_cert_expiry(&self, unix_seconds: i64) {
        self.serving_cert_expiry.set(unix_seconds);
    }

    pub fn serving_cert_rotation(&self, reason: &'static str) {
        self.serving_cert_rotations.get_or_create(&ReasonLabels { reason }).inc();
    }

    pub fn cert_check_failure(&self, reason: &'static str) {
        self.cert_check_failures.get_or_create(&ReasonLabels { reason }).inc();
    }

    /// Reconciles run so far.
    pub fn reconciles(&self) -> u64 {
        self.reconciles.get()
    }

    /// Writes of every kind so far.
    pub fn writes(&self) -> u64 {
        [Write::Status, Write::Apply, Write::Delete, Write::Event]
            .into_iter()
            .map(|k| self.writes.get_or_create(&KindLabels { kind: k.label() }).get())
            .sum()
    }

    pub fn encode(&self) -> String {
        l4proxy::telemetry::encode(&self.registry)
    }
}

/// A bounded label for a failed API call: the status code's meaning, or `transport`.
pub fn api_reason(error: &kube::Error) -> &'static str {
    match error {
        kube::Error::Api(e) => match e.code {
            403 => "forbidden",
            404 => "not_found",
            409 => "conflict",
            422 => "invalid",
            429 => "throttled",
            500..=599 => "server_error",
            _ => "api_error",
        },
        _ => "transport",
    }
}

pub struct ReconcileTimer<'a> {
    metrics: &'a Metrics,
    start: Instant,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        self.metrics.duration.observe(self.start.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_encode_with_the_operator_prefix() {
        let m = Metrics::new();
        drop(m.reconcile());
        m.failure("conflict");
        m.wrote(Write::Status);
        let text = m.encode();
        assert!(text.contains("l4proxy_operator_reconciles_total 1"), "{text}");
        assert!(text.contains("l4proxy_operator_reconcile_failures_total{reason=\"conflict\"} 1"), "{text}");
        assert!(text.contains("l4proxy_operator_writes_total{kind=\"status\"} 1"), "{text}");
        assert!(text.contains("l4proxy_operator_reconcile_duration_seconds_count 1"), "{text}");
        assert_eq!(m.writes(), 1);
    }

    #[test]
    fn certificate_metrics_encode_expiry_rotations_and_failures() {
        let m = Metrics::new();
        m.set_serving_cert_expiry(1_900_000_000);
        m.serving_cert_rotation("expiring");
        m.cert_check_failure("unusable");
        let text = m.encode();
        assert!(text.contains("l4proxy_operator_serving_cert_expiry_timestamp_seconds 1900000000"), "{text}");
        assert!(text.contains("l4proxy_operator_serving_cert_rotations_total{reason=\"expiring\"} 1"), "{text}");
        assert!(text.contains("l4proxy_operator_cert_check_failures_total{reason=\"unusable\"} 1"), "{text}");
    }
}
