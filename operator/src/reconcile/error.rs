//! Why a reconcile failed, with a bounded label for metrics.

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
        crate::metrics::api_reason(source)
    }
}

/// Wraps a failed API call with what the reconciler was doing.
pub(super) fn api_error(action: &'static str) -> impl FnOnce(kube::Error) -> Error {
    move |source| Error::Api { action, source }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
