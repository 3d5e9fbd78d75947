//! Per-test namespaces and a kube client for the caller's runtime.

use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context as _, Result};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};

use crate::controlplane::ControlPlane;
use crate::kubeconfig::CONTEXT;

/// Label put on every test namespace, so they can be told apart from system namespaces.
pub const TEST_NAMESPACE_LABEL: &str = "l4proxy.test/namespace";

/// Longest DNS label Kubernetes accepts as a namespace name.
const MAX_NAME_LEN: usize = 63;

/// A namespace created for one test.
///
/// It is deliberately never deleted: without kube-controller-manager the namespace controller
/// never removes the `kubernetes` finalizer, so a deleted namespace would stay `Terminating`
/// forever and a delete would only pretend to clean up. Unique names make leftovers harmless,
/// and the whole etcd goes away with the control plane.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestNamespace {
    name: String,
}

impl TestNamespace {
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl ControlPlane {
    /// A client for this control plane as admin, built on the calling task's runtime (each
    /// `#[tokio::test]` has its own runtime, so clients must not be shared between tests).
    ///
    /// Panics on failure (test helper); see [`ControlPlane::try_client`].
    pub async fn client(&self) -> Client {
        self.try_client().await.unwrap_or_else(|err| panic!("{err:#}"))
    }

    /// [`ControlPlane::client`] without the panic.
    pub async fn try_client(&self) -> Result<Client> {
        let path = self.kubeconfig_path();
        let kubeconfig = Kubeconfig::read_from(path).with_context(|| format!("reading {}", path.display()))?;
        let options = KubeConfigOptions { context: Some(CONTEXT.to_owned()), ..KubeConfigOptions::default() };
        let config = Config::from_custom_kubeconfig(kubeconfig, &options).await.context("loading the kubeconfig")?;
        Client::try_from(config).context("building the kube client")
    }

    /// Creates a fresh namespace named `<prefix>-<n>-<random>` for one test.
    ///
    /// Panics on failure (test helper); see [`ControlPlane::try_namespace`].
    pub async fn namespace(&self, client: &Client, prefix: &str) -> TestNamespace {
        self.try_namespace(client, prefix).await.unwrap_or_else(|err| panic!("{err:#}"))
    }

    /// [`ControlPlane::namespace`] without the panic.
    pub async fn try_namespace(&self, client: &Client, prefix: &str) -> Result<TestNamespace> {
        let name = unique_name(prefix);
        let namespace = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some([(TEST_NAMESPACE_LABEL.to_owned(), "true".to_owned())].into()),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &namespace)
            .await
            .with_context(|| format!("creating namespace {name}"))?;
        Ok(TestNamespace { name })
    }
}

/// `<prefix>-<counter>-<random>` as a valid DNS label: the counter makes names unique within
/// the process, the random part across processes sharing a control plane (`up`/`down`).
fn unique_name(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let counter = NEXT.fetch_add(1, Ordering::Relaxed);
    let random: String = (0..6).map(|_| fastrand::alphanumeric().to_ascii_lowercase()).collect();
    let suffix = format!("-{counter}-{random}");
    let prefix = sanitize(prefix, MAX_NAME_LEN - suffix.len());
    format!("{prefix}{suffix}")
}

/// Lower-case alphanumerics and inner hyphens only, at most `max_len` bytes, never empty.
fn sanitize(prefix: &str, max_len: usize) -> String {
    let mapped: String = prefix
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' })
        .take(max_len)
        .collect();
    let trimmed = mapped.trim_matches('-');
    if trimmed.is_empty() { "test".to_owned() } else { trimmed.to_owned() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_dns_label(name: &str) -> bool {
        name.len() <= MAX_NAME_LEN
            && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !name.starts_with('-')
            && !name.ends_with('-')
    }

    #[test]
    fn names_are_unique_dns_labels() {
        let long = "x".repeat(100);
        for prefix in ["gateway", "My_Test::case", "", "---", long.as_str(), "ünïcode"] {
            let (a, b) = (unique_name(prefix), unique_name(prefix));
            assert!(is_dns_label(&a), "{a:?} from {prefix:?}");
            assert_ne!(a, b);
        }
        assert!(unique_name("My_Test").starts_with("my-test-"));
    }
}
