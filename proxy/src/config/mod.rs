//! Configuration: the file's schema (shared with the `L4Proxy` resource), parsing with field
//! paths in every error, and validation into typed values before anything binds.

mod duration;
mod schema;
mod validate;

use std::path::Path;

pub use duration::ConfigDuration;
pub use schema::{
    AcceptProxyProtocol, AdminConfig, Backend, Limits, Listener, LoadBalancing, MAX_ADDRESS_LEN, MAX_LISTENERS,
    MAX_MATCH_ITEMS, Protocol, ProxyConfig, ProxyProtocolVersion, Route, RouteMatch, RouteProtocol, ServiceBackend,
};
pub use validate::{
    BackendConfig, BackendTarget, Config, DEFAULT_CONNECT_TIMEOUT, DEFAULT_EJECTION_COOLDOWN, DEFAULT_MAX_CONNECTIONS,
    DEFAULT_PROBE_TIMEOUT, DEFAULT_TCP_IDLE_TIMEOUT, DEFAULT_UDP_IDLE_TIMEOUT, EffectiveLimits, ListenerConfig,
    MAX_BACKENDS, RouteConfig, ServerName, check, resolve,
};

/// A config that cannot be used. `Display` starts with the field path.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

impl ConfigError {
    pub fn invalid(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid { path: path.into(), message: message.into() }
    }

    /// Short label for the `reason` of the reload-failure metric.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Read { .. } => "read",
            Self::Invalid { .. } => "invalid",
        }
    }
}

/// Parses YAML into the file schema; unknown fields are errors, and errors name the field path.
pub fn parse_yaml(text: &str) -> Result<ProxyConfig, ConfigError> {
    let deserializer = serde_yaml_ng::Deserializer::from_str(text);
    serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let path = match e.path().to_string() {
            p if p == "." || p.is_empty() => "config".to_owned(),
            p => p,
        };
        ConfigError::invalid(path, e.into_inner().to_string())
    })
}

/// Reads, parses, checks and resolves a config file.
pub async fn load(path: &Path) -> Result<Config, ConfigError> {
    load_with_text(path).await.map(|(config, _)| config)
}

/// Like [`load`], also returning the text that was read, so that a file watcher compares later
/// contents with exactly the version in force.
pub async fn load_with_text(path: &Path) -> Result<(Config, String), ConfigError> {
    let text = tokio::fs::read_to_string(path)
        .await
        .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
    let config = Config::from_file_config(parse_yaml(&text)?).await?;
    Ok((config, text))
}

impl From<ProxyProtocolVersion> for crate::proxy_protocol::Version {
    fn from(version: ProxyProtocolVersion) -> Self {
        match version {
            ProxyProtocolVersion::V1 => Self::V1,
            ProxyProtocolVersion::V2 => Self::V2,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_field_is_an_error_naming_its_path() {
        let err = parse_yaml(
            "listeners:\n- name: web\n  address: 127.0.0.1:1\n  backends: []\n  limits: {maxConection: 5}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("listeners[0].limits.maxConection:"), "{err}");
        assert!(err.contains("unknown field `maxConection`"), "{err}");
    }

    #[test]
    fn wrong_type_is_an_error_naming_its_path_and_value() {
        let err = parse_yaml(
            "listeners:\n- name: web\n  address: 127.0.0.1:1\n  backends: []\n  limits: {maxConnections: lots}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("listeners[0].limits.maxConnections:"), "{err}");
        assert!(err.contains("lots"), "{err}");
    }

    #[test]
    fn unknown_protocol_is_an_error_naming_the_value() {
        let err = parse_yaml("listeners:\n- name: web\n  protocol: SCTP\n  address: 127.0.0.1:1\n  backends: []\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("listeners[0].protocol:"), "{err}");
        assert!(err.contains("SCTP"), "{err}");
    }

    #[test]
    fn bad_duration_is_an_error_naming_its_path() {
        let err = parse_yaml(
            "listeners:\n- name: web\n  address: 127.0.0.1:1\n  backends: []\n  limits: {idleTimeout: soon}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("listeners[0].limits.idleTimeout:"), "{err}");
        assert!(err.contains("\"soon\""), "{err}");
    }

    #[test]
    fn quickstart_example_is_valid() {
        let text = include_str!("../../../examples/quickstart.yaml");
        check(&parse_yaml(text).unwrap()).unwrap();
    }
}
