//! The controller: the watches that trigger reconciles and fill the [`Cache`], and which
//! resources a Service or EndpointSlice event concerns.

use std::{fmt::Debug, sync::Arc};

use futures::{Stream, StreamExt, TryStreamExt, stream};
use k8s_openapi::{
    NamespaceResourceScope,
    api::{
        apps::v1::Deployment,
        core::v1::{ConfigMap, Service},
        discovery::v1::EndpointSlice,
    },
};
use kube::{
    Api, Client, Resource, ResourceExt,
    core::PartialObjectMeta,
    runtime::{
        Controller, WatchStreamExt, predicates,
        reflector::{ObjectRef, Store, store::Writer},
        watcher,
    },
};

use super::{Context, Writers, error_policy, reconcile};
use crate::{
    api::{
        crd::L4Proxy,
        labels::{self, SERVICE_NAME_LABEL},
    },
    model::effective,
};

fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Runs the controller until `shutdown` resolves, filling the cache through `writers`; `ready`
/// is called each time a full list of `L4Proxy` resources is in (the first one makes the
/// operator ready).
///
/// `triggers` asks for reconciles of resources whose proxies changed (`proxies::run`).
pub async fn run(
    ctx: Arc<Context>,
    writers: Writers,
    triggers: impl Stream<Item = ObjectRef<L4Proxy>> + Send + 'static,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
    ready: impl Fn() + Send + 'static,
) {
    let client = ctx.client.clone();
    let ns = ctx.options.namespace.as_deref();
    let (reader, writer) = (ctx.cache.resources().clone(), writers.resources);
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
    // The controller holds reconciles until the L4Proxy store is filled. Starting that watch
    // only once the cache is filled means no reconcile reads a cache that is still filling
    // (where a Service not listed yet would read as "not found").
    let cache = ctx.cache.clone();
    let proxies = stream::once(async move {
        cache.filled().await;
        proxies
    })
    .flatten();

    let services = cached(watcher(api::<Service>(&client, ns), watcher::Config::default()), writers.services);
    let slices = cached(
        watcher(api::<EndpointSlice>(&client, ns), watcher::Config::default().labels(SERVICE_NAME_LABEL)),
        writers.slices,
    );
    let managed = || watcher::Config::default().labels(&labels::managed_by_selector());
    let deployments =
        cached(watcher(api::<PartialObjectMeta<Deployment>>(&client, ns), managed()), writers.deployments);
    let gateway_services =
        cached(watcher(api::<PartialObjectMeta<Service>>(&client, ns), managed()), writers.gateway_services);
    let config_maps = cached(watcher(api::<PartialObjectMeta<ConfigMap>>(&client, ns), managed()), writers.config_maps);
    let by_slice = reader.clone();
    let by_service = reader.clone();
    let config = kube::runtime::controller::Config::default().concurrency(ctx.options.max_concurrent_reconciles);
    Controller::for_stream(proxies, reader)
        .with_config(config)
        .owns_stream(deployments)
        .owns_stream(gateway_services)
        .owns_stream(config_maps)
        .watches_stream(slices, move |slice| {
            let service = slice.labels().get(SERVICE_NAME_LABEL).cloned().unwrap_or_default();
            referring(&by_slice, &slice.namespace().unwrap_or_default(), &service)
        })
        .watches_stream(services, move |svc| {
            referring(&by_service, &svc.namespace().unwrap_or_default(), &svc.name_any())
        })
        // A new leader writes everything it did not write while following.
        .reconcile_all_on(ctx.leadership.acquisitions())
        .reconcile_on(triggers)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "reconcile did not complete");
            }
        })
        .await;
}

/// A watch that fills `writer` and yields each object it saw change. Managed fields are
/// dropped first: they are most of an object's size, and nothing reads them.
fn cached<K>(
    events: impl Stream<Item = watcher::Result<watcher::Event<K>>> + Send + 'static,
    writer: Writer<K>,
) -> impl Stream<Item = watcher::Result<K>> + Send + 'static
where
    K: Resource<DynamicType = ()> + Clone + Debug + Send + Sync + 'static,
{
    events.default_backoff().modify(|object| object.managed_fields_mut().clear()).reflect(writer).touched_objects()
}

/// The resources with a Service backend named `service` in `namespace`: a scan over the
/// `L4Proxy` store on each Service or EndpointSlice event.
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
