//! Leader election on a `coordination.k8s.io/v1` Lease: the holder is the only replica that
//! writes (status, gateway objects, Events); every replica reconciles and keeps effective configs.
//!
//! The algorithm is client-go's: the holder renews every `retry_period` and considers itself
//! leader until `renew_deadline` after the start of its last successful renewal; another replica
//! takes over only after it has watched the lease record stay unchanged for `lease_duration` by
//! its own clock (so clock skew between nodes does not matter). With `renew_deadline` <
//! `lease_duration`, an old holder stops writing before anyone else may start. Updates are
//! compare-and-swap on `resourceVersion`, so two replicas never both win the same round.
//!
//! Race window: a write that starts just before the deadline may land just after it; with the
//! defaults (10 s deadline, 15 s duration) a write has 5 s to complete, far above an API call's
//! timeout.
//!
//! An API server that stops answering must not leave a replica believing it leads: each round
//! (a read and a write of the Lease) is given up after half the renew deadline, and leadership
//! ends at the deadline itself even while a round is still waiting, so the change is seen (the
//! `leader` gauge, the log, `/readyz`) and a regained lease reconciles everything again.

use std::time::Duration;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};
use std::sync::Arc;

use tokio::{sync::watch, time::Instant};

use crate::metrics::Metrics;

/// Lease timing; see the module docs.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// This replica's identity (pod name).
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

/// Whether this replica may write now. Cheap to clone and to ask.
#[derive(Clone, Debug)]
pub struct Leadership {
    valid_until: watch::Receiver<Option<Instant>>,
}

impl Leadership {
    pub fn is_leader(&self) -> bool {
        valid(*self.valid_until.borrow())
    }

    /// `leader` or `follower`, for `/readyz`.
    pub fn role(&self) -> &'static str {
        if self.is_leader() { "leader" } else { "follower" }
    }

    /// Waits for the next change of leadership (gained, renewed or lost).
    pub async fn wait_changed(&mut self) -> Result<(), watch::error::RecvError> {
        self.valid_until.changed().await
    }

    /// Resolves each time this replica becomes leader (not on renewals).
    pub fn acquisitions(&self) -> impl futures::Stream<Item = ()> + Send + 'static {
        let rx = self.valid_until.clone();
        futures::stream::unfold((rx, false), |(mut rx, mut was)| async move {
            loop {
                let now = rx.borrow_and_update().is_some();
                if now && !was {
                    return Some(((), (rx, true)));
                }
                was = now;
                rx.changed().await.ok()?;
            }
        })
    }
}

/// Runs the election until `shutdown` resolves, then releases the lease if held (so a standby
/// takes over at its next retry rather than after `lease_duration`).
pub struct Elector {
    api: Api<Lease>,
    config: LeaseConfig,
    tx: watch::Sender<Option<Instant>>,
    /// The holder record last seen and when it was first seen (by our clock).
    observed: Option<(Record, Instant)>,
    metrics: Arc<Metrics>,
    /// Rounds failed in a row: the first failure and the recovery are logged, not each retry.
    failing: u32,
}

/// A lease record as another replica left it: holder and renew time.
type Record = (Option<String>, Option<Timestamp>);

/// Whether leadership that lasts `until` still holds.
fn valid(until: Option<Instant>) -> bool {
    until.is_some_and(|until| Instant::now() < until)
}

/// Resolves when leadership that lasts `until` ends; never without leadership.
async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// What one round ended with.
#[derive(Debug, PartialEq, Eq)]
enum Round {
    Leader,
    Follower,
}

impl Elector {
    pub fn new(client: Client, config: LeaseConfig, metrics: Arc<Metrics>) -> (Self, Leadership) {
        let (tx, rx) = watch::channel(None);
        let api = Api::namespaced(client, &config.namespace);
        (Self { api, config, tx, observed: None, metrics, failing: 0 }, Leadership { valid_until: rx })
    }

    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            let started = Instant::now();
            let round_timeout = self.config.renew_deadline / 2;
            let deadline = *self.tx.borrow();
            let outcome = tokio::select! {
                outcome = tokio::time::timeout(round_timeout, self.round()) => Some(outcome),
                // Leadership ends on time even while a round waits for an answer.
                () = until(deadline) => None,
            };
            match outcome {
                Some(Ok(Ok(Round::Leader))) => {
                    self.recovered();
                    if self.tx.borrow().is_none() {
                        tracing::info!(lease = %self.config.name, identity = %self.config.identity, "became leader");
                    }
                    self.tx.send_replace(Some(started + self.config.renew_deadline));
                }
                Some(Ok(Ok(Round::Follower))) => {
                    self.recovered();
                    self.lose("another replica holds the lease");
                }
                Some(Ok(Err(error))) => self.failed(&error.to_string()),
                Some(Err(_)) => self.failed(&format!("no answer within {round_timeout:?}")),
                None => self.lose("the renew deadline passed while the lease could not be renewed"),
            }
            let deadline = *self.tx.borrow();
            tokio::select! {
                () = tokio::time::sleep(self.config.retry_period) => {}
                () = until(deadline) => {}
                () = &mut shutdown => break,
            }
        }
        self.release().await;
    }

    fn failed(&mut self, error: &str) {
        self.metrics.lease_failure();
        if self.failing == 0 {
            tracing::warn!(lease = %self.config.name, error, "lease round failed; retrying every {:?}", self.config.retry_period);
        }
        self.failing += 1;
        // Still leader until the deadline of the last successful renewal.
        if !self.is_valid() {
            self.lose("the renew deadline passed");
        }
    }

    fn recovered(&mut self) {
        if self.failing > 0 {
            tracing::info!(lease = %self.config.name, failed_rounds = self.failing, "lease rounds succeed again");
        }
        self.failing = 0;
    }

    fn is_valid(&self) -> bool {
        valid(*self.tx.borrow())
    }

    fn lose(&self, why: &str) {
        if self.tx.borrow().is_some() {
            tracing::warn!(lease = %self.config.name, why, "lost leadership: writes stop until it is regained");
            self.tx.send_replace(None);
        }
    }

    async fn round(&mut self) -> Result<Round, kube::Error> {
        let now = MicroTime(Timestamp::now());
        let Some(mut lease) = self.api.get_opt(&self.config.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(self.config.name.clone()), ..Default::default() },
                spec: Some(self.spec(now.clone(), now, 0)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Round::Leader),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(Round::Follower),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        if holder.as_deref() == Some(self.config.identity.as_str()) {
            let acquired = spec.acquire_time.clone().unwrap_or_else(|| now.clone());
            lease.spec = Some(self.spec(acquired, now, spec.lease_transitions.unwrap_or(0)));
            return self.replace(&lease).await;
        }
        let record: Record = (holder.clone(), spec.renew_time.as_ref().map(|t| t.0));
        if self.observed.as_ref().is_none_or(|(seen, _)| *seen != record) {
            self.observed = Some((record, Instant::now()));
        }
        let first_seen = self.observed.as_ref().map_or_else(Instant::now, |(_, at)| *at);
        let duration = spec
            .lease_duration_seconds
            .map_or(self.config.lease_duration, |s| Duration::from_secs(u64::try_from(s).unwrap_or(0)));
        if holder.is_some() && first_seen.elapsed() < duration {
            return Ok(Round::Follower);
        }
        lease.spec = Some(self.spec(now.clone(), now, spec.lease_transitions.unwrap_or(0) + 1));
        self.replace(&lease).await
    }

    /// Compare-and-swap: `lease` carries the resourceVersion it was read at.
    async fn replace(&self, lease: &Lease) -> Result<Round, kube::Error> {
        match self.api.replace(&self.config.name, &PostParams::default(), lease).await {
            Ok(_) => Ok(Round::Leader),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(Round::Follower),
            Err(e) => Err(e),
        }
    }

    fn spec(&self, acquired: MicroTime, renewed: MicroTime, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.config.identity.clone()),
            lease_duration_seconds: Some(i32::try_from(self.config.lease_duration.as_secs()).unwrap_or(i32::MAX)),
            acquire_time: Some(acquired),
            renew_time: Some(renewed),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    /// Gives the lease up (holder cleared), if we still hold it.
    async fn release(&self) {
        if self.tx.borrow().is_none() {
            return;
        }
        self.tx.send_replace(None);
        let result = async {
            let Some(mut lease) = self.api.get_opt(&self.config.name).await? else { return Ok(()) };
            let mut spec = lease.spec.clone().unwrap_or_default();
            if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
                return Ok(());
            }
            spec.holder_identity = None;
            spec.lease_duration_seconds = Some(1);
            lease.spec = Some(spec);
            self.api.replace(&self.config.name, &PostParams::default(), &lease).await.map(drop)
        }
        .await;
        match result {
            Ok(()) => tracing::info!(lease = %self.config.name, "released leadership"),
            Err(e) => {
                tracing::warn!(lease = %self.config.name, error = %e, "releasing the lease failed; it expires on its own")
            }
        }
    }
}
