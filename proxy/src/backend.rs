//! Backends of a listener: addresses (re-resolved for host names), health with ejection, and
//! connecting to the one the balancer picks, failing over to the next.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use tokio::{net::TcpStream, time::Instant};

use crate::{
    balance::{Balancer, Candidate},
    config::{BackendConfig, BackendTarget, LoadBalancing, ProxyProtocolVersion, resolve},
    connection::{ConnectionContext, ConnectionError},
    metrics::{BackendMetrics, Metrics},
};

/// Consecutive connect failures that eject a backend.
pub const EJECT_AFTER_FAILURES: u32 = 3;
/// The longest an ejection lasts, however often it repeats.
pub const MAX_EJECTION_COOLDOWN: Duration = Duration::from_secs(300);

/// One backend's shared, long-lived state. Kept across reloads while the listener keeps a
/// backend with the same address, so health and active counts survive a reload.
pub struct BackendState {
    address: Arc<str>,
    target: BackendTarget,
    resolved: ArcSwap<Vec<SocketAddr>>,
    next_address: AtomicUsize,
    active: AtomicUsize,
    consecutive_failures: AtomicU32,
    ejections: AtomicU32,
    /// Milliseconds since `born` until which the backend is ejected; 0 when it is not.
    ejected_until: AtomicU64,
    born: Instant,
    metrics: BackendMetrics,
}

/// Why a connect to a backend failed, for its failure counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Failure {
    Refused,
    Timeout,
    /// This process ran out of something (descriptors, buffers): not the backend's failure.
    Local,
}

impl BackendState {
    fn new(config: &BackendConfig, metrics: BackendMetrics) -> Self {
        Self {
            address: config.address.as_str().into(),
            target: config.target.clone(),
            resolved: ArcSwap::from_pointee(config.resolved.clone()),
            next_address: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            consecutive_failures: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            born: Instant::now(),
            metrics,
        }
    }

    /// The address as written in the config: the backend's identity in metrics and health.
    pub fn address(&self) -> &Arc<str> {
        &self.address
    }

    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Times this backend failed in a row since its last success.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures.load(Ordering::Relaxed)
    }

    /// The addresses connects go to now.
    pub fn resolved(&self) -> Arc<Vec<SocketAddr>> {
        self.resolved.load_full()
    }

    fn millis_since_born(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.born).as_millis() as u64
    }

    /// False while ejected. The first check after the cooldown readmits it.
    pub fn is_available(&self, now: Instant) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        if until == 0 {
            return true;
        }
        if self.millis_since_born(now) < until {
            return false;
        }
        // Race: several pickers may see the cooldown end at once; only one clears the flag and
        // the gauge, and all of them correctly treat the backend as available.
        if self.ejected_until.compare_exchange(until, 0, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
            self.metrics.ejected.set(0);
            tracing::info!(backend = %self.address, "backend readmitted after cooldown");
        }
        true
    }

    pub fn is_ejected(&self) -> bool {
        !self.is_available(Instant::now())
    }

    pub(crate) fn record_success(&self) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
        self.ejections.store(0, Ordering::Relaxed);
    }

    fn record_failure(&self, failure: Failure, base_cooldown: Duration) {
        match failure {
            Failure::Refused => self.metrics.failures_refused.inc(),
            Failure::Timeout => self.metrics.failures_timeout.inc(),
            Failure::Local => return,
        };
        let failures = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures < EJECT_AFTER_FAILURES {
            return;
        }
        // Race: concurrent failures may both pass the threshold; the swap lets one of them eject.
        if self.consecutive_failures.compare_exchange(failures, 0, Ordering::Relaxed, Ordering::Relaxed).is_err() {
            return;
        }
        let repeat = self.ejections.fetch_add(1, Ordering::Relaxed).min(16);
        let cooldown = base_cooldown.saturating_mul(1 << repeat).min(MAX_EJECTION_COOLDOWN);
        let until = self.millis_since_born(Instant::now()).saturating_add(cooldown.as_millis().max(1) as u64);
        self.ejected_until.store(until, Ordering::Relaxed);
        self.metrics.ejected.set(1);
        self.metrics.ejections.inc();
        tracing::warn!(backend = %self.address, failures, cooldown = ?cooldown, "backend ejected");
    }

    /// Connects to one of the backend's addresses, starting at a rotating one and trying the
    /// others (a host name may resolve to several) before the backend counts as failed.
    async fn connect(
        &self,
        src: SocketAddr,
        timeout: Duration,
    ) -> Result<(TcpStream, SocketAddr), (Failure, Option<ConnectionError>)> {
        let addrs = self.resolved.load_full();
        let start = self.next_address.fetch_add(1, Ordering::Relaxed);
        let mut last = None;
        for k in 0..addrs.len() {
            let dst = addrs[(start + k) % addrs.len()];
            match tokio::time::timeout(timeout, TcpStream::connect(dst)).await {
                Ok(Ok(stream)) => return Ok((stream, dst)),
                Ok(Err(source)) => match crate::connection::connect_error(src, dst, source) {
                    // Another address of the same backend would fail alike.
                    local @ ConnectionError::LocalResource { .. } => return Err((Failure::Local, Some(local))),
                    refused => last = Some((Failure::Refused, refused)),
                },
                Err(_) => last = Some((Failure::Timeout, ConnectionError::ConnectTimeout { src, dst, after: timeout })),
            }
        }
        Err(match last {
            Some((failure, error)) => (failure, Some(error)),
            None => (Failure::Refused, None), // no addresses
        })
    }

    /// Re-resolves a host-name backend; on failure the previous addresses stay in use.
    pub async fn refresh(&self) {
        if !matches!(self.target, BackendTarget::Dns { .. }) {
            return;
        }
        match resolve(&self.target, "backend", &self.address).await {
            Ok(mut addrs) => {
                addrs.sort();
                let mut current = self.resolved.load().as_ref().clone();
                current.sort();
                if current != addrs {
                    tracing::info!(backend = %self.address, addresses = ?addrs, "backend addresses changed");
                    self.resolved.store(Arc::new(addrs));
                }
            }
            Err(e) => {
                self.metrics.resolve_failures.inc();
                tracing::warn!(backend = %self.address, error = %e, "re-resolving backend failed; keeping its previous addresses");
            }
        }
    }
}

/// A backend as a listener config uses it: shared state plus this config's settings.
pub struct Backend {
    pub state: Arc<BackendState>,
    pub weight: u32,
    pub proxy_protocol: Option<ProxyProtocolVersion>,
}

impl Candidate for Backend {
    fn weight(&self) -> u32 {
        self.weight
    }
    fn active(&self) -> usize {
        self.state.active()
    }
    fn key(&self) -> &str {
        self.state.address()
    }
}

/// Counts a connection against its backend while it lives.
pub struct BackendLease {
    state: Arc<BackendState>,
}

impl BackendLease {
    pub fn new(state: Arc<BackendState>) -> Self {
        state.active.fetch_add(1, Ordering::Relaxed);
        state.metrics.active.inc();
        Self { state }
    }

    pub fn backend(&self) -> &BackendState {
        &self.state
    }
}

impl Drop for BackendLease {
    fn drop(&mut self) {
        self.state.active.fetch_sub(1, Ordering::Relaxed);
        self.state.metrics.active.dec();
    }
}

/// A connected backend leg.
pub struct Connected {
    pub stream: TcpStream,
    pub address: SocketAddr,
    pub lease: BackendLease,
    pub attempts: u32,
    pub proxy_protocol: Option<ProxyProtocolVersion>,
}

/// The backends of one listener config, with their balancer.
pub struct BackendSet {
    backends: Vec<Backend>,
    balancer: Balancer,
}

impl BackendSet {
    /// Builds a set for `backends` of the listener `listener`, reusing the state of backends
    /// that one of `previous` already had (same address and target), so health and counts carry
    /// over a reload.
    pub fn new(
        listener: &str,
        backends: &[BackendConfig],
        load_balancing: LoadBalancing,
        previous: &[&BackendSet],
        metrics: &Metrics,
    ) -> Self {
        let backends = backends
            .iter()
            .map(|config| {
                let reused = previous
                    .iter()
                    .flat_map(|p| p.backends.iter())
                    .find(|b| *b.state.address == config.address && b.state.target == config.target);
                let state = match reused {
                    Some(b) => b.state.clone(),
                    None => Arc::new(BackendState::new(config, metrics.backend(listener, &config.address))),
                };
                Backend { state, weight: config.weight, proxy_protocol: config.proxy_protocol }
            })
            .collect::<Vec<_>>();
        let balancer = Balancer::new(load_balancing, backends.len());
        Self { backends, balancer }
    }

    /// Picks a backend without connecting (UDP: a session's socket is set up by the caller).
    /// Ejected backends are skipped.
    pub fn pick(&self, client: std::net::IpAddr) -> Option<&Backend> {
        let now = Instant::now();
        let index = self.balancer.pick(&self.backends, client, |i| self.backends[i].state.is_available(now))?;
        self.backends.get(index)
    }

    pub fn backends(&self) -> &[Backend] {
        &self.backends
    }

    /// Connects to a backend chosen by the balancer; on failure tries the next eligible one,
    /// each at most once. Ejected backends are not tried.
    pub async fn connect(
        &self,
        context: &ConnectionContext,
        timeout: Duration,
        cooldown: Duration,
    ) -> Result<Connected, ConnectionError> {
        let mut tried = Tried::default();
        let mut attempts = 0u32;
        let mut last_error = None;
        loop {
            let now = Instant::now();
            let pick = self.balancer.pick(&self.backends, context.source.ip(), |i| {
                !tried.contains(i) && self.backends[i].state.is_available(now)
            });
            let Some(index) = pick else { break };
            tried.insert(index);
            let state = &self.backends[index].state;
            attempts += 1;
            match state.connect(context.source, timeout).await {
                Ok((stream, address)) => {
                    state.record_success();
                    let lease = BackendLease::new(state.clone());
                    let proxy_protocol = self.backends[index].proxy_protocol;
                    return Ok(Connected { stream, address, lease, attempts, proxy_protocol });
                }
                Err((failure, error)) => {
                    state.record_failure(failure, cooldown);
                    tracing::debug!(connection = context.id, backend = %state.address, error = error.as_ref().map(tracing::field::display), "backend connect failed");
                    last_error = error.or(last_error);
                    if failure == Failure::Local {
                        // Every other backend would fail alike: give up now, blaming none.
                        break;
                    }
                }
            }
        }
        Err(last_error.unwrap_or_else(|| ConnectionError::NoBackend {
            listener: context.listener.clone(),
            src: context.source,
            attempts,
        }))
    }
}

/// Backends already tried for one connection (at most [`crate::config::MAX_BACKENDS`]); a fixed
/// bitset so failover allocates nothing.
#[derive(Default)]
struct Tried([u64; 16]);

impl Tried {
    fn contains(&self, i: usize) -> bool {
        self.0[i / 64] & (1 << (i % 64)) != 0
    }

    fn insert(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{check, parse_yaml};

    fn state(cooldown_ms: u64) -> (BackendState, Duration) {
        let config = check(
            &parse_yaml("listeners:\n- name: web\n  address: 127.0.0.1:1\n  backends: [{address: 127.0.0.1:2}]\n")
                .unwrap(),
        )
        .unwrap();
        let metrics = Metrics::new();
        let b = BackendState::new(&config.listeners[0].backends[0], metrics.backend("web", "127.0.0.1:2"));
        (b, Duration::from_millis(cooldown_ms))
    }

    #[tokio::test(start_paused = true)]
    async fn backend_is_ejected_after_three_consecutive_failures() {
        let (b, cooldown) = state(1000);
        b.record_failure(Failure::Refused, cooldown);
        b.record_failure(Failure::Timeout, cooldown);
        assert!(b.is_available(Instant::now()));
        b.record_failure(Failure::Refused, cooldown);
        assert!(!b.is_available(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn running_out_of_local_resources_never_counts_against_a_backend() {
        let (b, cooldown) = state(1000);
        for _ in 0..10 {
            b.record_failure(Failure::Local, cooldown);
        }
        assert!(b.is_available(Instant::now()));
        assert_eq!(b.consecutive_failures(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn success_resets_the_failure_streak() {
        let (b, cooldown) = state(1000);
        b.record_failure(Failure::Refused, cooldown);
        b.record_failure(Failure::Refused, cooldown);
        b.record_success();
        b.record_failure(Failure::Refused, cooldown);
        assert!(b.is_available(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn ejected_backend_is_readmitted_after_cooldown_that_doubles_on_repeat() {
        let (b, cooldown) = state(1000);
        let eject = |b: &BackendState| (0..3).for_each(|_| b.record_failure(Failure::Refused, cooldown));
        eject(&b);
        tokio::time::advance(Duration::from_millis(999)).await;
        assert!(!b.is_available(Instant::now()));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(b.is_available(Instant::now()));
        // Second ejection without a success in between: twice as long.
        eject(&b);
        tokio::time::advance(Duration::from_millis(1999)).await;
        assert!(!b.is_available(Instant::now()));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(b.is_available(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn ejection_cooldown_is_capped() {
        let (b, _) = state(0);
        let cooldown = Duration::from_secs(200);
        for _ in 0..3 {
            (0..3).for_each(|_| b.record_failure(Failure::Refused, cooldown));
            tokio::time::advance(MAX_EJECTION_COOLDOWN).await;
            assert!(b.is_available(Instant::now()), "never out longer than the cap");
        }
    }

    #[test]
    fn tried_set_covers_every_allowed_backend() {
        let mut tried = Tried::default();
        for i in (0..crate::config::MAX_BACKENDS).step_by(7) {
            assert!(!tried.contains(i));
            tried.insert(i);
            assert!(tried.contains(i));
        }
    }
}
