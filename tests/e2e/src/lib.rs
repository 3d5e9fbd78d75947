//! The end-to-end suite lives in `tests/e2e.rs`; it runs against the cluster named by
//! `$L4PROXY_E2E_KUBECONFIG` (`make e2e` starts the real node, `tests/kind/e2e.sh` a kind cluster).
