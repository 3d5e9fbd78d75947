//! The operator's CA and its serving certificate, kept in Secret `l4proxy-ca` in the operator's
//! namespace; the CA certificate alone is published in ConfigMap `l4proxy-ca` (key `ca.crt`).
//! The layout is in [`layout`].
//!
//! Every replica runs this, not only the lease holder: each one serves proxies and needs the
//! certificate, so replicas share the Secret by compare-and-swap rather than by leadership. A
//! replica reads the Secret at start and every `check_interval`, writes it only when it lacks a
//! pair or the serving certificate is due ([`Rotation`]), and then presents what the Secret
//! holds. Races, and why each is harmless:
//!
//! - Two replicas start at once, both find no Secret and both make a CA. Only one `create`
//!   succeeds; the other gets 409, reads the winner's Secret and uses its CA. A second CA is
//!   never stored, so it is never presented or published.
//! - Two replicas find the serving certificate due and both issue one. A replace carries the
//!   `resourceVersion` that was read, so one wins; the other gets 409, reads again and presents
//!   the winner's certificate. The same holds for any write.
//! - Between checks a replica may present a certificate that another has already replaced. Both
//!   are valid: rotation happens `renew_before` ahead of expiry, and that is longer than a check.
//! - A stop that interrupts a write leaves the Secret as it was or as written, and either is
//!   whole.
//!
//! Replicas must agree on the names: two with different names replace each other's certificate
//! at every check (a rollout that changes the names does this until it is done).
//!
//! A Secret that goes missing while the operator runs is written again with the CA this replica
//! holds, so proxies keep trusting it. The CA itself is not rotated (it is valid for 10 years by
//! default). An unusable Secret ([`CertsError::Unusable`]) is never overwritten: at start it is
//! an error and the operator does not start; later it is logged and counted, and the current
//! certificates stay in use.

mod error;
pub mod layout;
mod pki;
mod store;
mod tls;

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;
use kube::Client;
use rustls::{ServerConfig, crypto::CryptoProvider};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use self::{
    error::CertsError,
    pki::{Ca, Half, Invalid, PemPair, Rotation, ServingCert, ServingNames, ServingPolicy},
};
use self::{
    layout::Contents,
    store::{Store, Written},
};
use crate::metrics::Metrics;

const DAY: Duration = Duration::from_secs(24 * 3600);

/// Decisions on what the Secret holds (each but the last followed by a write) in one check
/// before it gives up until the next: enough for every replica of a deployment to have raced
/// once.
const MAX_PASSES: usize = 8;

/// Where the certificates live and how long they last.
#[derive(Clone, Debug)]
pub struct CertsConfig {
    /// The operator's namespace (its Lease's): where the Secret and the ConfigMap are.
    pub namespace: String,
    /// The serving certificate's DNS names (or IP addresses); 127.0.0.1 is always added.
    pub dns_names: Vec<String>,
    pub ca_validity: Duration,
    pub serving_validity: Duration,
    /// A serving certificate with less than this left is replaced.
    pub renew_before: Duration,
    /// How often the Secret is read again: how soon a replica presents another's rotation.
    pub check_interval: Duration,
}

impl CertsConfig {
    /// A 10-year CA; a 90-day serving certificate replaced with a third of it left; hourly checks.
    pub fn new(namespace: impl Into<String>, dns_names: Vec<String>) -> Self {
        let serving_validity = 90 * DAY;
        Self {
            namespace: namespace.into(),
            dns_names,
            ca_validity: 3650 * DAY,
            serving_validity,
            renew_before: serving_validity / 3,
            check_interval: Duration::from_secs(3600),
        }
    }

    /// The serving policy, once the settings are checked: none may let a certificate lapse.
    fn policy(&self) -> Result<ServingPolicy, CertsError> {
        let names = ServingNames::new(&self.dns_names)?;
        let policy = ServingPolicy::new(names, self.serving_validity, self.renew_before)?;
        if self.check_interval.is_zero() || self.check_interval >= self.renew_before {
            // Otherwise a certificate could expire between two checks.
            return Err(CertsError::Config(format!(
                "check_interval ({:?}) must be above zero and shorter than renew_before ({:?})",
                self.check_interval, self.renew_before
            )));
        }
        if self.ca_validity <= self.serving_validity {
            return Err(CertsError::Config(format!(
                "ca_validity ({:?}) must be longer than serving_validity ({:?})",
                self.ca_validity, self.serving_validity
            )));
        }
        Ok(policy)
    }
}

/// The names by which a Service is reached from inside the cluster: `name`, `name.namespace`
/// and `name.namespace.svc`.
pub fn service_dns_names(service: &str, namespace: &str) -> Vec<String> {
    vec![service.to_owned(), format!("{service}.{namespace}"), format!("{service}.{namespace}.svc")]
}

/// What the Secret held at the last check, checked.
struct Bundle {
    ca: Arc<Ca>,
    serving: ServingCert,
}

/// The running certificates: what the config service presents and what proxies trust.
pub struct Certificates {
    current: Arc<ArcSwap<Bundle>>,
    server_config: Arc<ServerConfig>,
    task: JoinHandle<()>,
}

impl Certificates {
    /// Reads Secret `l4proxy-ca` (writing a CA and a serving certificate where it has none),
    /// publishes ConfigMap `l4proxy-ca`, and keeps both current in a background task until
    /// `stop` is cancelled. Fails on settings that cannot work, an unusable Secret, or an API
    /// error: nothing is served then.
    pub async fn start(
        client: Client,
        config: CertsConfig,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
    ) -> Result<Self, CertsError> {
        let keeper = Keeper::new(client, config, metrics)?;
        let bundle = keeper.sync(None).await?;
        keeper.store.publish(&bundle.ca.pem().cert).await?;
        keeper.presenting(&bundle);
        let current = Arc::new(ArcSwap::from_pointee(bundle));
        let resolver = Arc::new(tls::Current(current.clone()));
        let server_config = Arc::new(tls::server_config(resolver, keeper.provider.clone())?);
        let task = tokio::spawn(keeper.run(current.clone(), stop));
        Ok(Self { current, server_config, task })
    }

    /// A rustls server config that presents the current serving certificate at every handshake:
    /// a rotation takes effect for new connections without a restart.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.server_config.clone()
    }

    /// The CA certificate, PEM: what ConfigMap `l4proxy-ca` holds under `ca.crt`.
    pub fn ca_pem(&self) -> String {
        self.current.load().ca.pem().cert.clone()
    }

    /// Waits for the background task to end once `stop` is cancelled.
    pub async fn stopped(self) {
        if let Err(e) = self.task.await {
            tracing::error!(error = %e, "certificate task panicked");
        }
    }
}

/// Keeps the Secret, the ConfigMap and the presented certificate in step.
struct Keeper {
    store: Store,
    policy: ServingPolicy,
    ca_validity: Duration,
    check_interval: Duration,
    provider: Arc<CryptoProvider>,
    metrics: Arc<Metrics>,
}

impl Keeper {
    fn new(client: Client, config: CertsConfig, metrics: Arc<Metrics>) -> Result<Self, CertsError> {
        let policy = config.policy()?;
        Ok(Self {
            store: Store::new(client, &config.namespace),
            policy,
            ca_validity: config.ca_validity,
            check_interval: config.check_interval,
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            metrics,
        })
    }

    /// One check: reads the Secret and, while it lacks a pair or its serving certificate is
    /// due, writes it and decides again on what was stored (after a lost race, on what the
    /// winner stored). `held` is what this replica presents: its CA fills a Secret without one.
    async fn sync(&self, held: Option<&Bundle>) -> Result<Bundle, CertsError> {
        let namespace = self.store.namespace();
        let mut secret = self.store.read().await?;
        for _ in 0..MAX_PASSES {
            let contents = match &secret {
                Some(secret) => layout::read(secret, namespace, &self.provider)?,
                None => Contents::default(),
            };
            let now = SystemTime::now();
            let stored_ca = contents.ca.is_some();
            let ca = match (contents.ca, held) {
                (Some(ca), _) => ca,
                (None, Some(held)) => held.ca.clone(),
                (None, None) => Arc::new(Ca::generate(self.ca_validity, now)?),
            };
            let rotation = self.policy.rotation(&ca, contents.serving.as_ref(), now);
            let serving = match (rotation, contents.serving) {
                (None, Some(serving)) if stored_ca => return Ok(Bundle { ca, serving }),
                (None, Some(serving)) => serving.pem().clone(),
                _ => self.policy.issue(&ca, now)?,
            };
            let desired = layout::secret(secret, namespace, ca.pem(), &serving);
            secret = match self.store.write(&desired).await? {
                Written::Stored(stored) => {
                    tracing::info!(
                        namespace,
                        wrote_ca = !stored_ca,
                        rotation = rotation.map(Rotation::label),
                        "wrote Secret {}",
                        layout::NAME
                    );
                    if let Some(rotation) = rotation {
                        self.metrics.serving_cert_rotation(rotation.label());
                    }
                    Some(*stored)
                }
                Written::Raced => {
                    tracing::debug!(namespace, "Secret {} changed since it was read; reading it again", layout::NAME);
                    self.store.read().await?
                }
            };
        }
        Err(CertsError::Contended { namespace: namespace.to_owned(), attempts: MAX_PASSES })
    }

    /// Checks every `check_interval` until `stop`. A failed check changes nothing: the current
    /// certificates stay in use and the next check tries again.
    async fn run(self, current: Arc<ArcSwap<Bundle>>, stop: CancellationToken) {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(self.check_interval) => {}
            }
            let check = async {
                let bundle = self.sync(Some(&current.load_full())).await?;
                let ca_cert = bundle.ca.pem().cert.clone();
                if bundle.serving.pem() != current.load().serving.pem() {
                    self.presenting(&bundle);
                }
                current.store(Arc::new(bundle));
                self.store.publish(&ca_cert).await
            };
            tokio::select! {
                () = stop.cancelled() => return,
                result = check => if let Err(e) = result {
                    self.metrics.cert_check_failure(e.label());
                    tracing::warn!(error = %e, "certificate check failed; the current certificates stay in use");
                },
            }
        }
    }

    fn presenting(&self, bundle: &Bundle) {
        let not_after = bundle.serving.not_after();
        self.metrics.set_serving_cert_expiry(pki::unix_seconds(not_after));
        tracing::info!(
            namespace = self.store.namespace(),
            not_after = %humantime::format_rfc3339_seconds(not_after),
            "presenting the serving certificate from Secret {}",
            layout::NAME
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_usable_and_settings_that_could_let_a_certificate_lapse_are_refused() {
        let defaults = || CertsConfig::new("ns", service_dns_names("op", "ns"));
        assert!(defaults().policy().is_ok());
        let refused = |change: fn(&mut CertsConfig), field: &str| {
            let mut config = defaults();
            change(&mut config);
            let err = config.policy().unwrap_err().to_string();
            assert!(err.contains(field), "{field}: {err}");
        };
        refused(|c| c.check_interval = c.renew_before, "check_interval");
        refused(|c| c.check_interval = Duration::ZERO, "check_interval");
        refused(|c| c.renew_before = c.serving_validity, "renew_before");
        refused(|c| c.ca_validity = c.serving_validity, "ca_validity");
        refused(|c| c.dns_names.push("not a name".into()), "\"not a name\"");
    }

    #[test]
    fn a_service_is_named_as_the_cluster_resolves_it() {
        assert_eq!(service_dns_names("op", "sys"), ["op", "op.sys", "op.sys.svc"]);
    }
}
