//! Gateway objects on the API server: applied (server-side, one field manager) unless a name is
//! taken by someone else's object, deleted when `spec.gateway` goes away.
//!
//! Whether an object exists and whose it is comes from the cache. The API server is asked only
//! when the cache has no object of ours by that name: a foreign object carries no label of ours,
//! so only a read finds it. In the steady state (the objects exist and are ours) nothing is read.

use std::sync::Arc;

use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{ConfigMap, Service},
};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, Patch, PatchParams},
    core::PartialObjectMeta,
};
use l4proxy::config::Listener;

use super::{Context, Error, FIELD_MANAGER, cache::GatewayObject, error::api_error};
use crate::{
    api::crd::{GatewaySpec, L4Proxy},
    metrics::Write,
    model::{conditions::GatewayState, gateway},
};

/// Applies the gateway's ConfigMap (when there is an effective config), Service and Deployment,
/// unless one of those names is taken by an object this resource does not own (server-side
/// apply with force would otherwise take it over).
pub(super) async fn apply(
    proxy: &L4Proxy,
    spec: &GatewaySpec,
    effective: Option<&[Listener]>,
    ctx: &Context,
) -> Result<GatewayState, Error> {
    let ns = proxy.namespace().unwrap_or_default();
    let name = gateway::name(proxy);
    let config_map = current::<ConfigMap>(ctx, &ns, &name).await?;
    let service = current::<Service>(ctx, &ns, &name).await?;
    let deployment = current::<Deployment>(ctx, &ns, &name).await?;
    let taken = [
        config_map.as_deref().is_some_and(|o| !gateway::owned_by(o, proxy)).then_some("ConfigMap"),
        service.as_deref().is_some_and(|o| !gateway::owned_by(o, proxy)).then_some("Service"),
        deployment.as_deref().is_some_and(|o| !gateway::owned_by(o, proxy)).then_some("Deployment"),
    ];
    if let Some(kind) = taken.into_iter().flatten().next() {
        return Ok(GatewayState::Conflict(format!(
            "{kind} {ns}/{name} exists and is not owned by this L4Proxy; rename or remove it"
        )));
    }
    if let Some(listeners) = effective {
        let control = ctx.options.gateway_control.as_ref();
        apply_one(ctx, &ns, config_map, &gateway::config_map(proxy, listeners, control)).await?;
    }
    apply_one(ctx, &ns, service, &gateway::service(proxy, spec)).await?;
    let desired = gateway::deployment(proxy, spec, &ctx.options.proxy_image, ctx.options.gateway_control.as_ref());
    let deployment = apply_one(ctx, &ns, deployment, &desired).await?;
    let status = deployment.status.unwrap_or_default();
    Ok(GatewayState::Applied {
        name: format!("{ns}/{name}"),
        wanted: spec.replicas.unwrap_or(1),
        available: status.available_replicas.unwrap_or(0),
    })
}

/// The metadata of gateway object `name`: from the cache, else from the API server.
async fn current<K: GatewayObject>(
    ctx: &Context,
    namespace: &str,
    name: &str,
) -> Result<Option<Arc<PartialObjectMeta<K>>>, Error> {
    if let Some(cached) = ctx.cache.gateway_object::<K>(namespace, name) {
        return Ok(Some(cached));
    }
    let api: Api<K> = Api::namespaced(ctx.client.clone(), namespace);
    let read = api.get_metadata_opt(name).await.map_err(api_error("reading a gateway object"))?;
    Ok(read.map(Arc::new))
}

/// Server-side apply over `before` (the object as last seen); counted as a write only when the
/// server persisted a change.
async fn apply_one<K: GatewayObject>(
    ctx: &Context,
    namespace: &str,
    before: Option<Arc<PartialObjectMeta<K>>>,
    object: &K,
) -> Result<K, Error> {
    let api: Api<K> = Api::namespaced(ctx.client.clone(), namespace);
    let name = object.meta().name.clone().unwrap_or_default();
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let after =
        api.patch(&name, &params, &Patch::Apply(object)).await.map_err(api_error("applying a gateway object"))?;
    if before.and_then(|b| b.metadata.resource_version.clone()) != after.meta().resource_version {
        ctx.metrics.wrote(Write::Apply);
    }
    Ok(after)
}

/// Deletes the gateway objects, if there are any owned by `proxy`.
pub(super) async fn delete(proxy: &L4Proxy, ctx: &Context) -> Result<(), Error> {
    let ns = proxy.namespace().unwrap_or_default();
    let name = gateway::name(proxy);
    delete_owned::<Deployment>(ctx, proxy, &ns, &name).await?;
    delete_owned::<Service>(ctx, proxy, &ns, &name).await?;
    delete_owned::<ConfigMap>(ctx, proxy, &ns, &name).await
}

/// Every object of ours carries our label, so the cache has it (or soon will: its watch event
/// then triggers another reconcile): no read.
async fn delete_owned<K: GatewayObject>(
    ctx: &Context,
    proxy: &L4Proxy,
    namespace: &str,
    name: &str,
) -> Result<(), Error> {
    let Some(object) = ctx.cache.gateway_object::<K>(namespace, name) else {
        return Ok(());
    };
    if !gateway::owned_by(object.as_ref(), proxy) {
        return Ok(());
    }
    let api: Api<K> = Api::namespaced(ctx.client.clone(), namespace);
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
