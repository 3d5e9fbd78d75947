//! Which pods an `L4Proxy` serves as a sidecar: those its `spec.selector` selects, or those
//! that name it with the annotation `l4proxy.dev/proxy`. The injection webhook and the config
//! service's pod check ask the same question here.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement, ObjectMeta};

use crate::api::{crd::L4Proxy, labels::PROXY_ANNOTATION};

/// Whether `proxy` serves the pod with `pod` metadata: the pod names it, or names none and
/// the proxy's selector selects it.
pub fn serves(proxy: &L4Proxy, pod: &ObjectMeta) -> bool {
    match pod.annotations.as_ref().and_then(|a| a.get(PROXY_ANNOTATION)) {
        Some(named) => proxy.metadata.name.as_ref() == Some(named),
        None => selected(proxy, pod),
    }
}

/// Whether `proxy`'s selector selects the pod (a proxy without a selector selects none).
pub fn selected(proxy: &L4Proxy, pod: &ObjectMeta) -> bool {
    let empty = BTreeMap::new();
    let labels = pod.labels.as_ref().unwrap_or(&empty);
    proxy.spec.selector.as_ref().is_some_and(|s| selects(s, labels))
}

/// Whether a label selector selects `labels` (matchLabels and matchExpressions, as Kubernetes
/// evaluates them; an empty selector selects everything).
pub fn selects(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let matched = selector.match_labels.iter().flatten().all(|(k, v)| labels.get(k) == Some(v));
    matched && selector.match_expressions.iter().flatten().all(|e| expression_holds(e, labels))
}

fn expression_holds(requirement: &LabelSelectorRequirement, labels: &BTreeMap<String, String>) -> bool {
    let value = labels.get(&requirement.key);
    let values = requirement.values.as_deref().unwrap_or_default();
    match requirement.operator.as_str() {
        "In" => value.is_some_and(|v| values.contains(v)),
        "NotIn" => value.is_none_or(|v| !values.contains(v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        // The API server refuses other operators in a stored object.
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_match_labels_and_expressions() {
        let labels = BTreeMap::from([("app".to_owned(), "web".to_owned()), ("tier".to_owned(), "front".to_owned())]);
        let by_label =
            LabelSelector { match_labels: Some(BTreeMap::from([("app".into(), "web".into())])), ..Default::default() };
        assert!(selects(&by_label, &labels));
        let requirement = |operator: &str, values: &[&str]| LabelSelectorRequirement {
            key: "tier".into(),
            operator: operator.into(),
            values: Some(values.iter().map(|v| (*v).to_owned()).collect()),
        };
        let expressions = |r| LabelSelector { match_expressions: Some(vec![r]), ..Default::default() };
        assert!(selects(&expressions(requirement("In", &["front", "back"])), &labels));
        assert!(!selects(&expressions(requirement("NotIn", &["front"])), &labels));
        assert!(selects(&expressions(requirement("Exists", &[])), &labels));
        assert!(!selects(&expressions(requirement("DoesNotExist", &[])), &labels));
        let other =
            LabelSelector { match_labels: Some(BTreeMap::from([("app".into(), "db".into())])), ..Default::default() };
        assert!(!selects(&other, &labels));
    }

    fn proxy(name: &str, app: &str) -> L4Proxy {
        let yaml = format!(
            "apiVersion: l4proxy.dev/v1alpha1\nkind: L4Proxy\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  selector: {{matchLabels: {{app: {app}}}}}\n  listeners: []\n"
        );
        serde_yaml_ng::from_str(&yaml).unwrap()
    }

    fn pod(app: &str, named: Option<&str>) -> ObjectMeta {
        ObjectMeta {
            labels: Some(BTreeMap::from([("app".into(), app.into())])),
            annotations: named.map(|n| BTreeMap::from([(PROXY_ANNOTATION.into(), n.into())])),
            ..Default::default()
        }
    }

    #[test]
    fn a_proxy_serves_the_pods_it_selects_unless_they_name_another() {
        let (web, db) = (proxy("web", "web"), proxy("db", "db"));
        assert!(serves(&web, &pod("web", None)));
        assert!(!serves(&db, &pod("web", None)));
        // The annotation decides alone: a named proxy serves the pod whatever its selector.
        assert!(serves(&db, &pod("web", Some("db"))));
        assert!(!serves(&web, &pod("web", Some("db"))));
    }
}
