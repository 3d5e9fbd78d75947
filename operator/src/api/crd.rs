//! The `L4Proxy` custom resource (`l4proxy.dev/v1alpha1`).
//!
//! `spec.listeners` is the proxy's own config type ([`l4proxy::config::Listener`]): one schema for
//! files and resources, so a listener can be copied from one to the other. The schema carries the
//! bounds and CEL rules, so the API server refuses bad resources before the operator sees them.

use k8s_openapi::{
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector},
};
use kube::{CustomResource, CustomResourceExt};
use l4proxy::config::{Listener, MAX_LISTENERS};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Most gateway replicas.
pub const MAX_GATEWAY_REPLICAS: i32 = 100;

/// Listener proxies for a set of pods (sidecars) and, optionally, a gateway Deployment.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "l4proxy.dev",
    version = "v1alpha1",
    kind = "L4Proxy",
    plural = "l4proxies",
    shortname = "l4p",
    namespaced,
    status = "L4ProxyStatus",
    doc = "Layer-4 (TCP/UDP) listeners served by l4proxy sidecars and an optional gateway.",
    printcolumn(name = "Ready", type_ = "string", json_path = r#".status.conditions[?(@.type=="Ready")].status"#),
    printcolumn(name = "Reason", type_ = "string", json_path = r#".status.conditions[?(@.type=="Ready")].reason"#, priority = "1"),
    printcolumn(name = "Programmed", type_ = "string", json_path = r#".status.conditions[?(@.type=="Programmed")].status"#),
    printcolumn(name = "Proxies", type_ = "string", json_path = ".status.proxies.summary", description = "proxies running the current config / proxies connected"),
    printcolumn(name = "Listeners", type_ = "string", json_path = ".spec.listeners[*].name"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("!has(self.spec.gateway) || size(self.metadata.name) <= 55")
        .message("with spec.gateway, metadata.name is at most 55 characters (the gateway Service is named <name>-gateway)")
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct L4ProxySpec {
    /// Pods (in this namespace) that get this proxy injected as a sidecar. Absent: no sidecars.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
    /// Run the listeners in an operator-managed Deployment behind a Service. Removing it
    /// removes the Deployment and the Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<GatewaySpec>,
    /// The listeners: the same type as in the proxy's config file. Names are unique, and
    /// addresses are unique per protocol.
    #[schemars(length(min = 1, max = MAX_LISTENERS))]
    #[schemars(extend("x-kubernetes-validations" = [
        {
            "rule": "self.all(l, self.exists_one(m, m.name == l.name))",
            "message": "listener names must be unique"
        },
        {
            "rule": "self.all(l, self.exists_one(m, m.address == l.address && (has(m.protocol) ? m.protocol : 'TCP') == (has(l.protocol) ? l.protocol : 'TCP')))",
            "message": "listener addresses must be unique per protocol"
        }
    ]))]
    pub listeners: Vec<Listener>,
}

/// An operator-managed Deployment running the listeners, and a Service exposing them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewaySpec {
    /// Number of proxy pods. Default 1; 0 to 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = MAX_GATEWAY_REPLICAS))]
    pub replicas: Option<i32>,
    /// How the Service is exposed. Default ClusterIP.
    #[serde(default)]
    pub service_type: GatewayServiceType,
    /// Proxy image for the gateway pods. Default: the operator's `--proxy-image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub image: Option<String>,
}

/// The gateway Service's type.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum GatewayServiceType {
    #[default]
    ClusterIP,
    NodePort,
    LoadBalancer,
}

impl GatewayServiceType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClusterIP => "ClusterIP",
            Self::NodePort => "NodePort",
            Self::LoadBalancer => "LoadBalancer",
        }
    }
}

/// What the operator and the proxies report about an `L4Proxy`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct L4ProxyStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Accepted` (the spec is valid), `Ready` (every backend resolved, the gateway available),
    /// `Programmed` (the proxies run the current config).
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Version of the effective config the operator serves to this resource's proxies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_version: Option<String>,
    /// Proxies serving this resource.
    #[serde(default)]
    pub proxies: ProxyCounts,
    /// Per listener: resolved backends.
    #[serde(default)]
    pub listeners: Vec<ListenerStatus>,
}

/// How many proxies serve a resource.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProxyCounts {
    /// Proxies connected to the operator's config service.
    pub connected: u32,
    /// Connected proxies running `configVersion`.
    pub in_sync: u32,
    /// `inSync/connected`, for `kubectl get`.
    #[serde(default)]
    pub summary: String,
}

/// One listener's state: its backends, and what its proxies report (summed over them).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ListenerStatus {
    /// The listener's name.
    pub name: String,
    /// Backend addresses in the effective config (service backends count each ready endpoint).
    pub backends: u32,
    /// The proxies' connections (TCP) or session pools (UDP) of this listener, summed; absent
    /// while no proxy reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool_stats: Option<PoolStatus>,
    /// Connections or sessions open now.
    #[serde(default)]
    pub active: u64,
    /// Connections or sessions admitted since the proxies started.
    #[serde(default)]
    pub accepted: u64,
    /// Refused at the listener's limit.
    #[serde(default)]
    pub rejected: u64,
    /// Bytes from clients.
    #[serde(default)]
    pub bytes_received: u64,
    /// Bytes to clients.
    #[serde(default)]
    pub bytes_sent: u64,
}

/// A listener's pool, summed over the proxies that report it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolStatus {
    /// Entries (open connections, or UDP sessions) now.
    pub size: u64,
    /// The sum of the proxies' limits.
    pub max_size: u64,
    /// Entries closed or removed for idleness or age.
    pub expired_count: u64,
    /// The mean age of the entries, weighted by each proxy's size.
    pub average_age_seconds: f64,
}

/// The CRD, with schemars' unsigned integer formats (`uint16`, `uint32`), which the API server
/// does not know and warns about on every apply, mapped to Kubernetes' `int32`/`int64`. The
/// ranges (`minimum`/`maximum`) stay, so nothing is lost.
pub fn crd() -> CustomResourceDefinition {
    let mut value = serde_json::to_value(L4Proxy::crd()).expect("a CRD always serialises");
    kubernetes_formats(&mut value);
    serde_json::from_value(value).expect("format changes keep a valid CRD")
}

fn kubernetes_formats(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            let replacement = match map.get("format").and_then(|f| f.as_str()) {
                Some("uint8" | "uint16") => Some("int32"),
                Some("uint32" | "uint64") => Some("int64"),
                _ => None,
            };
            if let Some(format) = replacement {
                map.insert("format".into(), format.into());
            }
            map.values_mut().for_each(kubernetes_formats);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(kubernetes_formats),
        _ => {}
    }
}

/// The CRD as YAML, as `l4proxy-operator crd` prints it and `crds/` holds it.
pub fn crd_yaml() -> String {
    let crd = crd();
    let yaml = serde_yaml_ng::to_string(&crd).expect("a CRD always serialises");
    format!("# Generated by `l4proxy-operator crd`; do not edit.\n---\n{yaml}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crd_has_short_name_status_subresource_and_printer_columns() {
        let crd = L4Proxy::crd();
        assert_eq!(crd.spec.group, "l4proxy.dev");
        assert_eq!(crd.spec.scope, "Namespaced");
        assert_eq!(crd.spec.names.short_names.as_deref(), Some(&["l4p".to_string()][..]));
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, "v1alpha1");
        assert!(version.subresources.as_ref().and_then(|s| s.status.as_ref()).is_some());
        let columns: Vec<_> = version.additional_printer_columns.iter().flatten().map(|c| c.name.as_str()).collect();
        for want in ["Ready", "Proxies", "Listeners", "Age"] {
            assert!(columns.contains(&want), "{columns:?}");
        }
    }

    #[test]
    fn crd_uses_only_integer_formats_kubernetes_knows() {
        let text = serde_json::to_string(&crd()).unwrap();
        assert!(!text.contains("\"uint"), "unsigned formats left in the CRD");
        assert!(text.contains("\"maximum\":65535"), "ranges are kept");
    }

    #[test]
    fn every_field_has_a_description_for_kubectl_explain() {
        let crd = serde_json::to_value(crd()).unwrap();
        let root = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        let mut missing = Vec::new();
        find_undescribed(root, "", &mut missing);
        assert!(missing.is_empty(), "fields without a description: {missing:?}");
    }

    fn find_undescribed(schema: &serde_json::Value, path: &str, missing: &mut Vec<String>) {
        if let Some(properties) = schema.get("properties").and_then(|p| p.as_object()) {
            for (name, field) in properties {
                let field_path = format!("{path}.{name}");
                if field.get("description").is_none() {
                    missing.push(field_path.clone());
                }
                find_undescribed(field, &field_path, missing);
            }
        }
        if let Some(items) = schema.get("items") {
            find_undescribed(items, &format!("{path}[]"), missing);
        }
    }

    #[test]
    fn spec_listener_parses_the_config_file_listener_yaml() {
        let spec: L4ProxySpec = serde_yaml_ng::from_str(
            "listeners:\n- name: postgres\n  address: 127.0.0.1:15432\n  backends:\n  - service: {name: pg, port: 5432}\n",
        )
        .unwrap();
        let backend = &spec.listeners[0].backends[0];
        assert_eq!(backend.service.as_ref().unwrap().name, "pg");
        assert!(backend.address.is_none());
    }

    #[test]
    fn unknown_spec_field_is_refused() {
        let err = serde_yaml_ng::from_str::<L4ProxySpec>("listeners: []\ngatway: {}\n").unwrap_err();
        assert!(err.to_string().contains("gatway"), "{err}");
    }
}
