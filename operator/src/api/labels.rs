//! The labels the operator sets on its objects and reads on others'.

/// On every gateway object the operator applies (the watches of its own objects select on it)
/// and on Secret and ConfigMap `l4proxy-ca`.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "l4proxy-operator");

/// `MANAGED_BY` as a label selector.
pub fn managed_by_selector() -> String {
    format!("{}={}", MANAGED_BY.0, MANAGED_BY.1)
}

/// Selects one resource's gateway pods.
pub const INSTANCE_LABEL: &str = "l4proxy.dev/gateway";

/// Ties an EndpointSlice to its Service (set by Kubernetes' EndpointSlice controller).
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// On a pod or its namespace: `enabled` asks for the sidecar, `disabled` on the pod refuses it.
pub const INJECT_LABEL: &str = "l4proxy.dev/inject";

/// On a pod: the `L4Proxy` (in the pod's namespace) whose sidecar it gets, whatever selects it.
pub const PROXY_ANNOTATION: &str = "l4proxy.dev/proxy";
