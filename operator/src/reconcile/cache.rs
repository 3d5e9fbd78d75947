//! What the reconciler reads besides `L4Proxy`s, from the controller's watches (reflector
//! stores) rather than the API server: every Service and EndpointSlice (backends), and the
//! metadata of the operator's own gateway objects (selected by the managed-by label).
//!
//! A cached object may lag the API server by one watch event. That is harmless: the event that
//! brings the change also triggers a reconcile of every resource it concerns, which then sees it.

use std::{collections::BTreeMap, fmt::Debug, net::SocketAddr, sync::Arc};

use k8s_openapi::{
    NamespaceResourceScope,
    api::{
        apps::v1::Deployment,
        core::v1::{ConfigMap, Service},
        discovery::v1::EndpointSlice,
    },
};
use kube::{
    Resource,
    core::PartialObjectMeta,
    runtime::reflector::{self, ObjectRef, Store, store::Writer},
};
use l4proxy::config::Listener;
use serde::{Serialize, de::DeserializeOwned};

use crate::{
    api::{crd::L4Proxy, labels::SERVICE_NAME_LABEL},
    model::{
        effective::{self, ServiceKey},
        resolve::{self, Unresolved},
    },
};

/// The read halves; cheap to clone.
#[derive(Clone)]
pub struct Cache {
    /// The `L4Proxy` resources themselves (the controller's own store; the config service
    /// reads it too).
    resources: Store<L4Proxy>,
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    deployments: Store<PartialObjectMeta<Deployment>>,
    gateway_services: Store<PartialObjectMeta<Service>>,
    config_maps: Store<PartialObjectMeta<ConfigMap>>,
}

/// The write halves, one per watch that fills the cache (see `watches::run`).
pub struct Writers {
    pub(super) resources: Writer<L4Proxy>,
    pub(super) services: Writer<Service>,
    pub(super) slices: Writer<EndpointSlice>,
    pub(super) deployments: Writer<PartialObjectMeta<Deployment>>,
    pub(super) gateway_services: Writer<PartialObjectMeta<Service>>,
    pub(super) config_maps: Writer<PartialObjectMeta<ConfigMap>>,
}

/// A kind of gateway object, and where the cache keeps its metadata.
pub trait GatewayObject:
    Resource<Scope = NamespaceResourceScope, DynamicType = ()>
    + Clone
    + DeserializeOwned
    + Serialize
    + Debug
    + Send
    + Sync
    + 'static
{
    fn cached(cache: &Cache) -> &Store<PartialObjectMeta<Self>>;
}

impl GatewayObject for Deployment {
    fn cached(cache: &Cache) -> &Store<PartialObjectMeta<Self>> {
        &cache.deployments
    }
}

impl GatewayObject for Service {
    fn cached(cache: &Cache) -> &Store<PartialObjectMeta<Self>> {
        &cache.gateway_services
    }
}

impl GatewayObject for ConfigMap {
    fn cached(cache: &Cache) -> &Store<PartialObjectMeta<Self>> {
        &cache.config_maps
    }
}

impl Cache {
    /// An empty cache and the writers that fill it.
    pub fn new() -> (Self, Writers) {
        let (resources, resources_writer) = reflector::store();
        let (services, services_writer) = reflector::store();
        let (slices, slices_writer) = reflector::store();
        let (deployments, deployments_writer) = reflector::store();
        let (gateway_services, gateway_services_writer) = reflector::store();
        let (config_maps, config_maps_writer) = reflector::store();
        let cache = Self { resources, services, slices, deployments, gateway_services, config_maps };
        let writers = Writers {
            resources: resources_writer,
            services: services_writer,
            slices: slices_writer,
            deployments: deployments_writer,
            gateway_services: gateway_services_writer,
            config_maps: config_maps_writer,
        };
        (cache, writers)
    }

    /// The `L4Proxy` resources as the controller's watch last saw them.
    pub fn resources(&self) -> &Store<L4Proxy> {
        &self.resources
    }

    /// Resolves once every watch has listed its objects (or a writer is gone, when the
    /// controller stops). Call it once: `Store::wait_until_ready` wakes only one waiter per
    /// store, and this is it.
    pub async fn filled(&self) {
        let _ = futures::try_join!(
            self.services.wait_until_ready(),
            self.slices.wait_until_ready(),
            self.deployments.wait_until_ready(),
            self.gateway_services.wait_until_ready(),
            self.config_maps.wait_until_ready(),
        );
    }

    /// Every Service port the spec names, resolved from the cached Service and its
    /// EndpointSlices.
    pub fn resolve(
        &self,
        listeners: &[Listener],
        namespace: &str,
    ) -> BTreeMap<ServiceKey, Result<Vec<SocketAddr>, Unresolved>> {
        effective::services(listeners, namespace)
            .into_iter()
            .map(|key| {
                let service = self.services.get(&ObjectRef::new(&key.name).within(&key.namespace));
                let slices = self.slices_of(&key.namespace, &key.name);
                let slices = slices.iter().map(AsRef::as_ref);
                let result =
                    resolve::endpoints(&key.namespace, &key.name, key.port, key.protocol, service.as_deref(), slices);
                (key, result)
            })
            .collect()
    }

    /// The EndpointSlices of Service `name`: a scan over the cached slices, cheap next to the
    /// list request it replaces.
    fn slices_of(&self, namespace: &str, name: &str) -> Vec<Arc<EndpointSlice>> {
        self.slices.state_filter(|slice| {
            slice.metadata.namespace.as_deref() == Some(namespace)
                && slice.metadata.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL)).map(String::as_str)
                    == Some(name)
        })
    }

    /// The cached metadata of gateway object `name`, if the operator's watch has seen one.
    pub fn gateway_object<K: GatewayObject>(&self, namespace: &str, name: &str) -> Option<Arc<PartialObjectMeta<K>>> {
        K::cached(self).get(&ObjectRef::new(name).within(namespace))
    }
}
