//! The admin kubeconfig written next to the control plane's logs.
//!
//! Credentials are embedded as base64 data (not file paths) so the file stays valid when copied
//! and `kube::Config` needs no filesystem access besides the kubeconfig itself.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

use crate::certs::AdminCredentials;

/// The kubeconfig's only context (and cluster) name.
pub const CONTEXT: &str = "l4proxy-test";

/// Writes `DIR/kubeconfig` for `server` (an `https://` URL) and returns its path.
pub(crate) fn write(dir: &Path, server: &str, admin: &AdminCredentials) -> Result<PathBuf> {
    let path = dir.join("kubeconfig");
    fs::write(&path, render(server, admin)).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

fn render(server: &str, admin: &AdminCredentials) -> String {
    let ca = STANDARD.encode(&admin.ca_cert_pem);
    let cert = STANDARD.encode(&admin.cert_pem);
    let key = STANDARD.encode(&admin.key_pem);
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: {CONTEXT}
  cluster:
    server: {server}
    certificate-authority-data: {ca}
users:
- name: admin
  user:
    client-certificate-data: {cert}
    client-key-data: {key}
contexts:
- name: {CONTEXT}
  context:
    cluster: {CONTEXT}
    user: admin
current-context: {CONTEXT}
"
    )
}
