//! The reconciler: one idempotent function from an `L4Proxy` (and the Services, EndpointSlices
//! and gateway objects it refers to) to its effective config, its gateway objects and its status.
//!
//! It never branches on why it ran. Every replica computes effective configs (each serves
//! proxies); only the lease holder writes. Nothing is written when nothing changed: status is
//! compared before it is patched, and a server-side apply that changes nothing persists nothing
//! (and is not counted as a write). Nothing is read either, in the steady state: Services,
//! EndpointSlices and the operator's own gateway objects come from the controller's watches
//! ([`Cache`]).

mod cache;
mod error;
mod gateway;
pub mod proxies;
mod status;
mod watches;

use std::{sync::Arc, time::Duration};

use kube::{
    Client, ResourceExt,
    runtime::{controller::Action, events::Recorder},
};

pub use self::{
    cache::{Cache, Writers},
    error::Error,
    status::recorder,
    watches::run,
};
use crate::{
    api::crd::L4Proxy,
    lease::Leadership,
    metrics::Metrics,
    model::{
        conditions,
        configs::ConfigStore,
        effective::{self, Resolved},
        spec,
    },
};

/// The one field manager for every server-side apply.
pub const FIELD_MANAGER: &str = "l4proxy-operator";

/// What the reconciler needs to know besides the cluster.
#[derive(Clone, Debug)]
pub struct Options {
    /// Watch only this namespace; `None`: all namespaces.
    pub namespace: Option<String>,
    /// Default image for gateway pods.
    pub proxy_image: String,
    /// How gateway pods reach the config service; `None`: they only read their ConfigMap.
    pub gateway_control: Option<crate::model::gateway::GatewayControl>,
    /// Allow Service backends in other namespaces than the resource's.
    pub allow_cross_namespace_services: bool,
    /// Every resource is reconciled at least this often (re-resolving its Services), even
    /// without events.
    pub resync: Duration,
    /// This replica's name, in Events.
    pub identity: String,
    /// Most reconciles running at once (a leader's may make a few API calls; unbounded, a
    /// relist of thousands of resources would hit the API server all at once).
    pub max_concurrent_reconciles: u16,
}

pub struct Context {
    pub client: Client,
    pub options: Options,
    /// Services, EndpointSlices and gateway objects, as the watches last saw them.
    pub cache: Cache,
    pub configs: Arc<ConfigStore>,
    /// The proxies of each resource, merged over the operator's replicas.
    pub proxy_status: Arc<proxies::ProxyStatus>,
    pub leadership: Leadership,
    pub metrics: Arc<Metrics>,
    pub recorder: Recorder,
}

fn error_policy(proxy: Arc<L4Proxy>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.failure(error.label());
    tracing::warn!(
        resource = %format!("{}/{}", proxy.namespace().unwrap_or_default(), proxy.name_any()),
        error = %error,
        "reconcile failed; retrying"
    );
    Action::requeue(Duration::from_secs(5))
}

async fn reconcile(proxy: Arc<L4Proxy>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile();
    let ns = proxy.namespace().unwrap_or_default();
    let resolved = spec::check(&proxy.spec.listeners, &ns, ctx.options.allow_cross_namespace_services)
        .map(|()| resolve_and_hold(&proxy, &ns, &ctx));
    ctx.metrics.set_configs(ctx.configs.len());
    if !ctx.leadership.is_leader() {
        return Ok(Action::requeue(ctx.options.resync));
    }

    let effective = resolved.as_ref().ok().and_then(|r| r.config.as_ref()).map(|c| c.listeners.as_slice());
    let gateway = match (&proxy.spec.gateway, &resolved) {
        (Some(spec), Ok(_)) => Some(gateway::apply(&proxy, spec, effective, &ctx).await?),
        // A spec that is not accepted leaves a running gateway as it is (serving its last good
        // config) rather than taking it down over a typo.
        (Some(_), Err(_)) => None,
        (None, _) => {
            gateway::delete(&proxy, &ctx).await?;
            None
        }
    };
    let decided = conditions::decide(&resolved, gateway.as_ref());
    status::write(&proxy, &decided, resolved.as_ref().ok(), &ctx).await?;
    ctx.metrics.leader_reconcile();
    Ok(Action::requeue(ctx.options.resync))
}

/// Resolves the spec's Service backends from the cache, builds the effective config and, when
/// it is valid, holds it for the proxies.
fn resolve_and_hold(proxy: &L4Proxy, ns: &str, ctx: &Context) -> Resolved {
    let listeners = &proxy.spec.listeners;
    let resolutions = ctx.cache.resolve(listeners, ns);
    let resolved = effective::build(listeners, ns, proxy.metadata.generation.unwrap_or(0), &resolutions);
    let name = proxy.name_any();
    if let Some(config) = &resolved.config
        && ctx.configs.put((ns.to_owned(), name.clone()), config.clone())
    {
        tracing::info!(resource = %format!("{ns}/{name}"), version = %config.version, "effective config changed");
    }
    resolved
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use k8s_openapi::api::core::v1::Event as K8sEvent;
    use kube::{
        Api,
        api::{ListParams, Patch, PatchParams, PostParams},
    };
    use l4proxy_testenv::{ControlPlane, wait_for};

    use super::*;
    use crate::lease::{Elector, LeaseConfig};

    #[tokio::test]
    async fn reconcile_of_a_stale_cached_object_writes_status_and_events_once() {
        let control_plane = ControlPlane::shared();
        let client = control_plane.client().await;
        let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
            Api::all(client.clone());
        crds.patch(
            "l4proxies.l4proxy.dev",
            &PatchParams::apply("l4proxy-tests").force(),
            &Patch::Apply(crate::api::crd::crd()),
        )
        .await
        .unwrap();
        let ns = control_plane.namespace(&client, "stale").await;
        let lease = LeaseConfig {
            namespace: ns.name().into(),
            name: "l4proxy-operator".into(),
            identity: "unit".into(),
            lease_duration: Duration::from_secs(6),
            renew_deadline: Duration::from_secs(4),
            retry_period: Duration::from_millis(200),
        };
        let (elector, leadership) = Elector::new(client.clone(), lease, Arc::default());
        tokio::spawn(elector.run(std::future::pending()));
        wait_for("leadership", Duration::from_secs(30), || async { leadership.is_leader().then_some(()) }).await;
        let ctx = Arc::new(Context {
            recorder: recorder(client.clone(), "unit"),
            client: client.clone(),
            options: Options {
                namespace: Some(ns.name().into()),
                proxy_image: "example.invalid/l4proxy".into(),
                gateway_control: None,
                allow_cross_namespace_services: false,
                resync: Duration::from_secs(300),
                identity: "unit".into(),
                max_concurrent_reconciles: 1,
            },
            // Empty: the resource names no Service and has no gateway.
            cache: Cache::new().0,
            configs: Arc::default(),
            proxy_status: Arc::default(),
            leadership,
            metrics: Arc::default(),
        });
        let api: Api<L4Proxy> = Api::namespaced(client.clone(), ns.name());
        let resource: L4Proxy = serde_yaml_ng::from_str(
            "apiVersion: l4proxy.dev/v1alpha1\nkind: L4Proxy\nmetadata: {name: web}\nspec:\n  listeners:\n  - {name: web, address: '127.0.0.1:1', backends: [{address: '127.0.0.1:2'}]}\n",
        )
        .unwrap();
        let stale = Arc::new(
            wait_for("the CRD to serve", Duration::from_secs(30), || async {
                api.create(&PostParams::default(), &resource).await.ok()
            })
            .await,
        );

        // The same cached object twice, as when a reconcile runs before the watch delivered the
        // first one's status write.
        reconcile(stale.clone(), ctx.clone()).await.unwrap();
        reconcile(stale, ctx.clone()).await.unwrap();

        let events: Api<K8sEvent> = Api::namespaced(client, ns.name());
        let events = events.list(&ListParams::default()).await.unwrap().items;
        let reasons: Vec<_> = events.iter().filter_map(|e| e.reason.clone()).collect();
        assert_eq!(reasons.len(), 3, "Accepted, Ready and Programmed, once each: {reasons:?}");
        assert_eq!(ctx.metrics.writes(), 4, "one status write and three Events");
    }
}
