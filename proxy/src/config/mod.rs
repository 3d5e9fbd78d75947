//! Configuration: the file's schema (shared with the `L4Proxy` resource), parsing with field
//! paths in every error, and validation into typed values before anything binds.

mod depth;
mod duration;
mod schema;
mod validate;

use std::path::Path;

pub use duration::{ConfigDuration, MAX_DURATION, MAX_DURATION_TEXT};
pub use schema::{
    AcceptProxyProtocol, AdminConfig, Backend, Limits, Listener, LoadBalancing, MAX_ADDRESS_LEN, MAX_LISTENERS,
    MAX_MATCH_ITEMS, Protocol, ProxyConfig, ProxyProtocolVersion, Route, RouteMatch, RouteProtocol, ServiceBackend,
};
pub use validate::{
    BackendConfig, BackendTarget, Config, DEFAULT_CONNECT_TIMEOUT, DEFAULT_EJECTION_COOLDOWN, DEFAULT_MAX_CONNECTIONS,
    DEFAULT_PROBE_TIMEOUT, DEFAULT_RECEIVE_BUFFER, DEFAULT_TCP_IDLE_TIMEOUT, DEFAULT_UDP_IDLE_TIMEOUT, EffectiveLimits,
    ListenerConfig, MAX_BACKENDS, RouteConfig, ServerName, check, resolve,
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

/// The largest config file read (64 listeners of 1024 backends each fit in less than half).
pub const MAX_CONFIG_BYTES: usize = 8 * 1024 * 1024;
/// The deepest nesting of collections a config may have (the schema itself needs 8). Parsing
/// time grows with the square of the depth, so a hostile file is refused before it is parsed.
pub const MAX_CONFIG_DEPTH: usize = 32;

/// Parses YAML into the file schema; unknown fields are errors, and errors name the field path.
/// Text beyond [`MAX_CONFIG_BYTES`] or nested deeper than [`MAX_CONFIG_DEPTH`] is refused
/// before parsing.
pub fn parse_yaml(text: &str) -> Result<ProxyConfig, ConfigError> {
    if text.len() > MAX_CONFIG_BYTES {
        return Err(too_large(text.len()));
    }
    if let Some(line) = depth::first_too_deep(text, MAX_CONFIG_DEPTH) {
        return Err(ConfigError::invalid(
            "config",
            format!("line {line}: collections are nested deeper than {MAX_CONFIG_DEPTH} levels, the most allowed"),
        ));
    }
    let deserializer = serde_yaml_ng::Deserializer::from_str(text);
    serde_path_to_error::deserialize(deserializer).map_err(|e| at_path(e, "config", ""))
}

/// Parses a JSON array of listeners (what a control plane pushes: the same schema as a file's
/// `listeners`); unknown fields are errors, and errors name the field path
/// (`listeners[0].limits.maxConnections`). JSON nesting is bounded by the parser (128 levels)
/// and parsing it is linear, so no pre-scan is needed.
pub fn parse_listeners_json(json: &[u8]) -> Result<Vec<Listener>, ConfigError> {
    let mut deserializer = serde_json::Deserializer::from_slice(json);
    let listeners =
        serde_path_to_error::deserialize(&mut deserializer).map_err(|e| at_path(e, "listeners", "listeners"))?;
    deserializer.end().map_err(|e| ConfigError::invalid("listeners", e.to_string()))?;
    Ok(listeners)
}

/// A parse error at its field path: `prefix` and the path, or `root` for the document itself.
fn at_path<E: std::fmt::Display>(error: serde_path_to_error::Error<E>, root: &str, prefix: &str) -> ConfigError {
    let path = match error.path().to_string() {
        p if p == "." || p.is_empty() => root.to_owned(),
        p => format!("{prefix}{p}"),
    };
    ConfigError::invalid(path, error.into_inner().to_string())
}

/// Reads, parses, checks and resolves a config file.
pub async fn load(path: &Path) -> Result<Config, ConfigError> {
    load_with_text(path).await.map(|(config, _)| config)
}

/// Like [`load`], also returning the text that was read, so that a file watcher compares later
/// contents with exactly the version in force. Parsing runs on a blocking thread, so a large
/// file never stalls the runtime (signals, the admin server, connections).
pub async fn load_with_text(path: &Path) -> Result<(Config, String), ConfigError> {
    let read_error = |source| ConfigError::Read { path: path.display().to_string(), source };
    let bytes = read_bounded(path).await.map_err(read_error)?;
    let text = String::from_utf8(bytes)
        .map_err(|e| read_error(std::io::Error::new(std::io::ErrorKind::InvalidData, e.utf8_error())))?;
    let (file, text) = tokio::task::spawn_blocking(move || parse_yaml(&text).map(|file| (file, text)))
        .await
        .map_err(|e| ConfigError::invalid("config", format!("parsing stopped: {e}")))??;
    let config = Config::from_file_config(file).await?;
    Ok((config, text))
}

/// The file's contents; a file larger than [`MAX_CONFIG_BYTES`] is refused having read no more
/// than that.
pub async fn read_bounded(path: &Path) -> std::io::Result<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let file = tokio::fs::File::open(path).await?;
    let mut bytes = Vec::new();
    file.take(MAX_CONFIG_BYTES as u64 + 1).read_to_end(&mut bytes).await?;
    if bytes.len() > MAX_CONFIG_BYTES {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, too_large(bytes.len()).to_string()));
    }
    Ok(bytes)
}

fn too_large(len: usize) -> ConfigError {
    ConfigError::invalid(
        "config",
        format!("{len} bytes or more, larger than the {} MiB a config may have", MAX_CONFIG_BYTES >> 20),
    )
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
    fn pushed_listeners_with_a_typo_are_an_error_naming_the_field_path() {
        let json = br#"[{"name": "web", "address": "127.0.0.1:1", "backends": [], "limits": {"maxConection": 5}}]"#;
        let err = parse_listeners_json(json).unwrap_err().to_string();
        assert!(err.starts_with("listeners[0].limits.maxConection:"), "{err}");
        assert!(err.contains("unknown field `maxConection`"), "{err}");
    }

    #[test]
    fn pushed_listeners_that_are_not_a_json_array_are_an_error_at_listeners() {
        for bad in [&b"{}"[..], b"[] []", b"", b"[{\"name\": "] {
            let err = parse_listeners_json(bad).unwrap_err().to_string();
            assert!(err.starts_with("listeners"), "{err}");
        }
        let listeners = parse_listeners_json(br#"[{"name": "web", "address": "127.0.0.1:1", "backends": []}]"#);
        assert_eq!(listeners.unwrap()[0].name, "web");
    }

    #[test]
    fn quickstart_example_is_valid() {
        let text = include_str!("../../../examples/quickstart.yaml");
        check(&parse_yaml(text).unwrap()).unwrap();
    }
}
