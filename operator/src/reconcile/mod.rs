//! The reconciler: one idempotent function from an `L4Proxy` (and the Services, EndpointSlices
//! and gateway objects it refers to) to its effective config, its gateway objects and its status.
//!
//! It never branches on why it ran. Every replica computes effective configs (each serves
//! proxies); only the lease holder writes. Nothing is written when nothing changed: status is
//! compared before it is patched, and a server-side apply that changes nothing persists nothing
//! (and is not counted as a write).

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{ConfigMap, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams},
    runtime::{
        Controller, WatchStreamExt,
        controller::Action,
        events::{Event, EventType, Recorder, Reporter},
        predicates,
        reflector::{self, ObjectRef, Store},
        watcher,
    },
};
use serde::{Serialize, de::DeserializeOwned};

use crate::{
    api::{
        crd::{L4Proxy, L4ProxyStatus, ListenerStatus},
        labels::{self, SERVICE_NAME_LABEL},
    },
    lease::Leadership,
    metrics::{Metrics, Write},
    model::{
        conditions::{self as status, ACCEPTED, Decided, READY},
        effective::{self, ConfigStore, Resolved, ServiceKey},
        gateway,
        resolve::{self, Unresolved},
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
    /// Allow Service backends in other namespaces than the resource's.
    pub allow_cross_namespace_services: bool,
    /// Every resource is reconciled at least this often (re-resolving its Services), even
    /// without events.
    pub resync: Duration,
    /// This replica's name, in Events.
    pub identity: String,
    /// Most reconciles running at once (each makes a few API calls; unbounded, a relist of
    /// thousands of resources would hit the API server all at once).
    pub max_concurrent_reconciles: u16,
}

pub struct Context {
    pub client: Client,
    pub options: Options,
    pub configs: Arc<ConfigStore>,
    pub leadership: Leadership,
    pub metrics: Arc<Metrics>,
    pub recorder: Recorder,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{action}: {source}")]
    Api {
        action: &'static str,
        #[source]
        source: kube::Error,
    },
}

impl Error {
    /// A bounded label for `reconcile_failures_total{reason}`.
    pub fn label(&self) -> &'static str {
        let Self::Api { source, .. } = self;
        match source {
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
}

fn api_error(action: &'static str) -> impl FnOnce(kube::Error) -> Error {
    move |source| Error::Api { action, source }
}

fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Runs the controller until `shutdown` resolves; `ready` is called each time a full list of
/// `L4Proxy` resources is in (the first one makes the operator ready).
pub async fn run(
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
    ready: impl Fn() + Send + 'static,
) {
    let client = ctx.client.clone();
    let ns = ctx.options.namespace.as_deref();
    let (reader, writer) = reflector::store::<L4Proxy>();
    let configs = ctx.configs.clone();
    let metrics = ctx.metrics.clone();
    let known = reader.clone();
    // Deletions leave the store of effective configs here; after a relist, entries whose
    // resource is gone (a deletion the watch missed) are dropped.
    let proxies = watcher(api::<L4Proxy>(&client, ns), watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .inspect_ok(move |event| {
            match event {
                watcher::Event::Delete(p) => configs.remove(&p.namespace().unwrap_or_default(), &p.name_any()),
                watcher::Event::InitDone => {
                    configs.retain(|(ns, name)| known.get(&ObjectRef::new(name).within(ns)).is_some());
                    // Not `Store::wait_until_ready`: its oneshot wakes only one of several
                    // waiters, and the controller itself is already waiting on it.
                    ready();
                }
                _ => {}
            }
            metrics.set_configs(configs.len());
        })
        .touched_objects()
        // Status writes (ours included) do not change the generation and trigger nothing.
        .predicate_filter(predicates::generation, Default::default());

    let managed = watcher::Config::default().labels(&labels::managed_by_selector());
    let by_slice = reader.clone();
    let by_service = reader.clone();
    let config = kube::runtime::controller::Config::default().concurrency(ctx.options.max_concurrent_reconciles);
    Controller::for_stream(proxies, reader)
        .with_config(config)
        .owns(api::<Deployment>(&client, ns), managed.clone())
        .owns(api::<Service>(&client, ns), managed.clone())
        .owns(api::<ConfigMap>(&client, ns), managed)
        .watches(
            api::<EndpointSlice>(&client, ns),
            watcher::Config::default().labels(SERVICE_NAME_LABEL),
            move |slice| {
                let service = slice.labels().get(SERVICE_NAME_LABEL).cloned().unwrap_or_default();
                referring(&by_slice, &slice.namespace().unwrap_or_default(), &service)
            },
        )
        .watches(api::<Service>(&client, ns), watcher::Config::default(), move |svc| {
            referring(&by_service, &svc.namespace().unwrap_or_default(), &svc.name_any())
        })
        // A new leader writes everything it did not write while following.
        .reconcile_all_on(ctx.leadership.acquisitions())
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "reconcile did not complete");
            }
        })
        .await;
}

/// The resources with a Service backend named `service` in `namespace`. A scan over the
/// cache: cheap next to the API round trips a reconcile makes.
fn referring(store: &Store<L4Proxy>, namespace: &str, service: &str) -> Vec<ObjectRef<L4Proxy>> {
    store
        .state()
        .iter()
        .filter(|p| {
            let own = p.namespace().unwrap_or_default();
            effective::services(&p.spec.listeners, &own).iter().any(|k| k.namespace == namespace && k.name == service)
        })
        .map(|p| ObjectRef::from_obj(p.as_ref()))
        .collect()
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
    let resolved = match effective::check_spec(&proxy.spec.listeners, &ns, ctx.options.allow_cross_namespace_services) {
        Err(e) => Err(e),
        Ok(()) => Ok(resolve_and_hold(&proxy, &ns, &ctx).await?),
    };
    ctx.metrics.set_configs(ctx.configs.len());
    if !ctx.leadership.is_leader() {
        return Ok(Action::requeue(ctx.options.resync));
    }

    let effective = resolved.as_ref().ok().and_then(|r| r.config.as_ref()).map(|c| c.listeners.as_slice());
    let gateway = match (&proxy.spec.gateway, &resolved) {
        (Some(spec), Ok(_)) => Some(apply_gateway(&proxy, spec, effective, &ctx).await?),
        // A spec that is not accepted leaves a running gateway as it is (serving its last good
        // config) rather than taking it down over a typo.
        (Some(_), Err(_)) => None,
        (None, _) => {
            delete_gateway(&proxy, &ctx).await?;
            None
        }
    };
    let decided = decide(&resolved, gateway.as_ref());
    write_status(&proxy, &decided, resolved.as_ref().ok(), &ctx).await?;
    ctx.metrics.leader_reconcile();
    Ok(Action::requeue(ctx.options.resync))
}

/// Resolves the spec's Service backends, builds the effective config and, when it is valid,
/// holds it for the proxies.
async fn resolve_and_hold(proxy: &L4Proxy, ns: &str, ctx: &Context) -> Result<Resolved, Error> {
    let listeners = &proxy.spec.listeners;
    let resolutions = resolve_services(&ctx.client, listeners, ns).await?;
    let resolved = effective::build(listeners, ns, proxy.metadata.generation.unwrap_or(0), &resolutions);
    let name = proxy.name_any();
    if let Some(config) = &resolved.config
        && ctx.configs.put((ns.to_owned(), name.clone()), config.clone())
    {
        tracing::info!(resource = %format!("{ns}/{name}"), version = %config.version, "effective config changed");
    }
    Ok(resolved)
}

/// Looks up every Service the spec names and its EndpointSlices (each Service once, however
/// many of its ports the spec uses).
async fn resolve_services(
    client: &Client,
    listeners: &[l4proxy::config::Listener],
    namespace: &str,
) -> Result<BTreeMap<ServiceKey, Result<Vec<std::net::SocketAddr>, Unresolved>>, Error> {
    let mut fetched: BTreeMap<(String, String), (Option<Service>, Vec<EndpointSlice>)> = BTreeMap::new();
    let mut resolutions = BTreeMap::new();
    for key in effective::services(listeners, namespace) {
        let id = (key.namespace.clone(), key.name.clone());
        if !fetched.contains_key(&id) {
            let service = fetch_service(client, &key.namespace, &key.name).await?;
            fetched.insert(id.clone(), service);
        }
        let (service, slices) = &fetched[&id];
        let result = resolve::endpoints(&key.namespace, &key.name, key.port, key.protocol, service.as_ref(), slices);
        resolutions.insert(key, result);
    }
    Ok(resolutions)
}

/// A Service and its EndpointSlices (none when the Service does not exist).
async fn fetch_service(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<(Option<Service>, Vec<EndpointSlice>), Error> {
    let services: Api<Service> = Api::namespaced(client.clone(), namespace);
    let Some(service) = services.get_opt(name).await.map_err(api_error("reading a backend Service"))? else {
        return Ok((None, Vec::new()));
    };
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), namespace);
    let selector = format!("{SERVICE_NAME_LABEL}={name}");
    let slices =
        slices.list(&ListParams::default().labels(&selector)).await.map_err(api_error("listing EndpointSlices"))?;
    Ok((Some(service), slices.items))
}

/// What became of the gateway.
#[derive(Debug)]
enum GatewayState {
    /// Applied; the Deployment reports this many available replicas.
    Applied { name: String, wanted: i32, available: i32 },
    /// An object with the gateway's name exists and belongs to someone else: nothing applied.
    Conflict(String),
}

/// Applies the gateway's ConfigMap (when there is an effective config), Service and Deployment,
/// unless one of those names is taken by an object this resource does not own (server-side
/// apply with force would otherwise take it over).
async fn apply_gateway(
    proxy: &L4Proxy,
    spec: &crate::api::crd::GatewaySpec,
    effective: Option<&[l4proxy::config::Listener]>,
    ctx: &Context,
) -> Result<GatewayState, Error> {
    let ns = proxy.namespace().unwrap_or_default();
    let name = gateway::name(proxy);
    let config_map: Option<ConfigMap> = current(ctx, &ns, &name).await?;
    let service: Option<Service> = current(ctx, &ns, &name).await?;
    let deployment: Option<Deployment> = current(ctx, &ns, &name).await?;
    let taken = [
        config_map.as_ref().is_some_and(|o| !gateway::owned_by(o, proxy)).then_some("ConfigMap"),
        service.as_ref().is_some_and(|o| !gateway::owned_by(o, proxy)).then_some("Service"),
        deployment.as_ref().is_some_and(|o| !gateway::owned_by(o, proxy)).then_some("Deployment"),
    ];
    if let Some(kind) = taken.into_iter().flatten().next() {
        return Ok(GatewayState::Conflict(format!(
            "{kind} {ns}/{name} exists and is not owned by this L4Proxy; rename or remove it"
        )));
    }
    if let Some(listeners) = effective {
        apply(ctx, &ns, config_map, &gateway::config_map(proxy, listeners)).await?;
    }
    apply(ctx, &ns, service, &gateway::service(proxy, spec)).await?;
    let desired = gateway::deployment(proxy, spec, &ctx.options.proxy_image);
    let deployment = apply(ctx, &ns, deployment, &desired).await?;
    let status = deployment.status.unwrap_or_default();
    Ok(GatewayState::Applied {
        name: format!("{ns}/{name}"),
        wanted: spec.replicas.unwrap_or(1),
        available: status.available_replicas.unwrap_or(0),
    })
}

/// A namespaced object the reconciler reads, applies or deletes.
trait Object:
    Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug
{
}

impl<K> Object for K where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
{
}

async fn current<K: Object>(ctx: &Context, namespace: &str, name: &str) -> Result<Option<K>, Error> {
    let api: Api<K> = Api::namespaced(ctx.client.clone(), namespace);
    api.get_opt(name).await.map_err(api_error("reading a gateway object"))
}

/// Server-side apply over `before` (the object as read); counted as a write only when the
/// server persisted a change.
async fn apply<K: Object + Serialize>(
    ctx: &Context,
    namespace: &str,
    before: Option<K>,
    object: &K,
) -> Result<K, Error> {
    let api: Api<K> = Api::namespaced(ctx.client.clone(), namespace);
    let name = object.meta().name.clone().unwrap_or_default();
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let after =
        api.patch(&name, &params, &Patch::Apply(object)).await.map_err(api_error("applying a gateway object"))?;
    if before.and_then(|b| b.meta().resource_version.clone()) != after.meta().resource_version {
        ctx.metrics.wrote(Write::Apply);
    }
    Ok(after)
}

/// Deletes the gateway objects, if there are any owned by `proxy`.
async fn delete_gateway(proxy: &L4Proxy, ctx: &Context) -> Result<(), Error> {
    let ns = proxy.namespace().unwrap_or_default();
    let name = gateway::name(proxy);
    delete_owned::<Deployment>(ctx, proxy, &ns, &name).await?;
    delete_owned::<Service>(ctx, proxy, &ns, &name).await?;
    delete_owned::<ConfigMap>(ctx, proxy, &ns, &name).await
}

async fn delete_owned<K: Object>(ctx: &Context, proxy: &L4Proxy, namespace: &str, name: &str) -> Result<(), Error> {
    let api: Api<K> = Api::namespaced(ctx.client.clone(), namespace);
    let Some(object) = current::<K>(ctx, namespace, name).await? else {
        return Ok(());
    };
    if !gateway::owned_by(&object, proxy) {
        return Ok(());
    }
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => {
            ctx.metrics.wrote(Write::Delete);
            tracing::info!(object = %format!("{namespace}/{name}"), kind = %K::kind(&()), "deleted gateway object");
            Ok(())
        }
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(api_error("deleting a gateway object")(e)),
    }
}

/// The conditions, from what the reconcile found.
fn decide(resolved: &Result<Resolved, effective::SpecError>, gateway: Option<&GatewayState>) -> Vec<Decided> {
    let resolved = match resolved {
        Err(e) => {
            return vec![
                Decided::new(ACCEPTED, false, e.reason, e.to_string()),
                Decided::new(READY, false, "NotAccepted", "the spec is not accepted; see the Accepted condition"),
            ];
        }
        Ok(resolved) => resolved,
    };
    let accepted = Decided::new(ACCEPTED, true, "Valid", "the spec is valid");
    let ready = if !resolved.unresolved.is_empty() {
        let names: Vec<_> = resolved.unresolved.iter().map(ToString::to_string).collect();
        Decided::new(READY, false, "BackendsUnresolved", names.join("; "))
    } else if resolved.config.is_none() {
        Decided::new(READY, false, "InvalidEffectiveConfig", "the resolved backends do not make a valid config")
    } else if let Some(GatewayState::Conflict(why)) = gateway {
        Decided::new(READY, false, "GatewayConflict", why.clone())
    } else if let Some(GatewayState::Applied { name, wanted, available }) = gateway
        && *available < (*wanted).min(1)
    {
        Decided::new(
            READY,
            false,
            "GatewayUnavailable",
            format!("gateway Deployment {name} has {available} of {wanted} replicas available"),
        )
    } else {
        let backends: u32 = resolved.backends_per_listener.iter().map(|(_, n)| n).sum();
        Decided::new(READY, true, "Resolved", format!("{backends} backend addresses resolved"))
    };
    vec![accepted, ready]
}

/// Patches status when it differs from what the resource says, and publishes one Event per
/// condition that changed status or reason.
async fn write_status(
    proxy: &L4Proxy,
    decided: &[Decided],
    resolved: Option<&Resolved>,
    ctx: &Context,
) -> Result<(), Error> {
    let ns = proxy.namespace().unwrap_or_default();
    let generation = proxy.metadata.generation.unwrap_or(0);
    let config_version = ctx.configs.get(&ns, &proxy.name_any()).map(|c| c.version.to_string());
    let listeners: Vec<ListenerStatus> = resolved
        .map(|r| {
            r.backends_per_listener
                .iter()
                .map(|(name, backends)| ListenerStatus { name: name.clone(), backends: *backends })
                .collect()
        })
        .unwrap_or_default();
    let desired_over = |current: &L4ProxyStatus| L4ProxyStatus {
        observed_generation: Some(generation),
        conditions: status::merge(&current.conditions, decided, generation, status::now()),
        config_version: config_version.clone(),
        proxies: current.proxies.clone(),
        listeners: listeners.clone(),
    };
    let cached = proxy.status.clone().unwrap_or_default();
    if desired_over(&cached) == cached {
        return Ok(());
    }
    // The cache may not have seen our previous write yet (a reconcile right after one): decide
    // against the stored status, so neither the status nor an Event is written twice.
    let api: Api<L4Proxy> = Api::namespaced(ctx.client.clone(), &ns);
    let stored = api.get_status(&proxy.name_any()).await.map_err(api_error("reading status"))?;
    let current = stored.status.unwrap_or_default();
    let desired = desired_over(&current);
    if desired == current {
        return Ok(());
    }
    let patch = serde_json::json!({
        "apiVersion": "l4proxy.dev/v1alpha1",
        "kind": "L4Proxy",
        "status": desired,
    });
    api.patch_status(&proxy.name_any(), &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch))
        .await
        .map_err(api_error("writing status"))?;
    ctx.metrics.wrote(Write::Status);
    for condition in status::transitions(&current.conditions, &desired.conditions) {
        let event = Event {
            type_: if condition.status == "True" { EventType::Normal } else { EventType::Warning },
            reason: condition.reason.clone(),
            note: Some(format!("{} is {}: {}", condition.type_, condition.status, condition.message)),
            action: "Reconcile".into(),
            secondary: None,
        };
        match ctx.recorder.publish(&event, &proxy.object_ref(&())).await {
            Ok(()) => ctx.metrics.wrote(Write::Event),
            // An Event is a courtesy: failing to publish one must not fail the reconcile.
            Err(e) => tracing::warn!(error = %e, "publishing an Event failed"),
        }
    }
    Ok(())
}

/// The Event recorder for this replica.
pub fn recorder(client: Client, identity: &str) -> Recorder {
    Recorder::new(client, Reporter { controller: FIELD_MANAGER.into(), instance: Some(identity.to_owned()) })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use k8s_openapi::api::core::v1::Event as K8sEvent;
    use kube::api::PostParams;
    use l4proxy_testenv::{ControlPlane, wait_for};

    use super::*;
    use crate::lease::{Elector, LeaseConfig};

    fn api_failure(code: u16) -> Error {
        let status: kube::core::Status = serde_json::from_value(serde_json::json!({"code": code})).unwrap();
        Error::Api { action: "test", source: kube::Error::Api(Box::new(status)) }
    }

    #[test]
    fn failure_labels_are_bounded_reasons_by_status_code() {
        assert_eq!(api_failure(409).label(), "conflict");
        assert_eq!(api_failure(403).label(), "forbidden");
        assert_eq!(api_failure(422).label(), "invalid");
        assert_eq!(api_failure(503).label(), "server_error");
        assert_eq!(api_failure(418).label(), "api_error");
    }

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
        let (elector, leadership) = Elector::new(client.clone(), lease);
        tokio::spawn(elector.run(std::future::pending()));
        wait_for("leadership", Duration::from_secs(30), || async { leadership.is_leader().then_some(()) }).await;
        let ctx = Arc::new(Context {
            recorder: recorder(client.clone(), "unit"),
            client: client.clone(),
            options: Options {
                namespace: Some(ns.name().into()),
                proxy_image: "example.invalid/l4proxy".into(),
                allow_cross_namespace_services: false,
                resync: Duration::from_secs(300),
                identity: "unit".into(),
                max_concurrent_reconciles: 1,
            },
            configs: Arc::default(),
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
        assert_eq!(reasons.len(), 2, "{reasons:?}");
        assert_eq!(ctx.metrics.writes(), 3, "one status write and two Events");
    }
}
