//! Why the certificates could not be read, made or stored, with a bounded label for metrics.

use super::layout;

#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    /// A setting that cannot work (a name that is not a DNS name or an IP address, validities
    /// that overlap); found before anything is read or written.
    #[error("certificate settings: {0}")]
    Config(String),
    #[error("{action} {kind} {namespace}/{name}: {source}", name = layout::NAME)]
    Api {
        action: &'static str,
        kind: &'static str,
        namespace: String,
        #[source]
        source: kube::Error,
    },
    /// The Secret holds something the operator cannot use. It is never overwritten: a CA that
    /// proxies trust must not be replaced behind a person's back, and a bad serving pair says
    /// someone edited the Secret, which they should learn about.
    #[error("Secret {namespace}/{name}, key {key}: {problem}; {remedy}", name = layout::NAME, remedy = layout::remedy(key))]
    Unusable { namespace: String, key: &'static str, problem: String },
    /// Replicas kept replacing the Secret under each other; the next check tries again.
    #[error("Secret {namespace}/{name} was still changing after {attempts} writes", name = layout::NAME)]
    Contended { namespace: String, attempts: usize },
    #[error("issuing a certificate: {0}")]
    Issue(#[from] rcgen::Error),
    #[error("building the TLS server config: {0}")]
    Tls(#[from] rustls::Error),
}

impl CertsError {
    /// A bounded label for `cert_check_failures_total{reason}`.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Config(_) => "config",
            Self::Api { source, .. } => crate::metrics::api_reason(source),
            Self::Unusable { .. } => "unusable",
            Self::Contended { .. } => "conflict",
            Self::Issue(_) => "issue",
            Self::Tls(_) => "tls",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_labels_are_bounded_and_api_failures_use_the_status_code() {
        let status: kube::core::Status = serde_json::from_value(serde_json::json!({"code": 403})).unwrap();
        let api = CertsError::Api {
            action: "reading",
            kind: "Secret",
            namespace: "ns".into(),
            source: kube::Error::Api(Box::new(status)),
        };
        assert_eq!(api.label(), "forbidden");
        assert!(api.to_string().starts_with("reading Secret ns/l4proxy-ca: "), "{api}");
        assert_eq!(CertsError::Config("x".into()).label(), "config");
        assert_eq!(CertsError::Contended { namespace: "ns".into(), attempts: 8 }.label(), "conflict");
        let unusable = CertsError::Unusable { namespace: "ns".into(), key: "tls.key", problem: "is bad".into() };
        assert_eq!(unusable.label(), "unusable");
    }
}
