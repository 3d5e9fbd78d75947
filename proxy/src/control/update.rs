//! A pushed version, from its JSON to [`Proxy::apply`] and the [`Ack`] that answers it.

use std::sync::Arc;

use super::{
    Status,
    proto::{Ack, ConfigUpdate},
};
use crate::{
    Proxy,
    config::{self, AdminConfig, Config, ConfigError, ProxyConfig},
};

/// Applies `update` through the same no-drop reload as a file (kept listeners keep their
/// sockets and their open connections), or rejects it with the reason; the previous config
/// keeps serving then. Never fails otherwise: every update gets its Ack.
pub async fn apply(proxy: &Arc<Proxy>, status: &Status, update: ConfigUpdate) -> Ack {
    let ConfigUpdate { version, nonce, listeners_json } = update;
    // Two updates with the same version carry the same config (the protocol's promise): one
    // already in force (a reconnect is answered with the current version) is not parsed again.
    let result = if status.serves(&version) {
        Ok(false)
    } else {
        match pushed_config(proxy, listeners_json).await {
            Ok(config) => proxy.apply_if_changed(config),
            Err(e) => Err(e.into()),
        }
    };
    let (applied, error) = match result {
        Ok(changed) => {
            status.applied(&version, changed, proxy.config().listeners.len());
            (true, String::new())
        }
        Err(e) => {
            let error = super::chain(&e);
            status.rejected(&version, e.label(), &error);
            (false, error)
        }
    };
    Ack { version, nonce, applied, error }
}

/// The pushed listeners with the proxy's own admin address (pushes carry listeners only),
/// checked and resolved like a file. Parsing runs on a blocking thread: a push may be 16 MiB.
async fn pushed_config(proxy: &Proxy, listeners_json: Vec<u8>) -> Result<Config, ConfigError> {
    let listeners = tokio::task::spawn_blocking(move || config::parse_listeners_json(&listeners_json))
        .await
        .map_err(|e| ConfigError::invalid("listeners", format!("parsing stopped: {e}")))??;
    let admin = proxy.config().admin.map(|address| AdminConfig { address: address.to_string() });
    Config::from_file_config(ProxyConfig { admin, listeners }).await
}
