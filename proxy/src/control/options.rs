//! The `run --control-plane` flags (each also read from an environment variable, for the
//! injector), and their checks: every flag is parsed, and every file read, before anything
//! binds. A bad one is a [`ConfigError`] naming the flag and the value.

use std::{fmt, net::SocketAddr, path::PathBuf, str::FromStr, time::Duration};

use rustls::{
    RootCertStore,
    pki_types::{CertificateDer, pem::PemObject},
};
use tonic::transport::{ClientTlsConfig, Endpoint, Uri};

use super::{Backoff, token};
use crate::config::{Config, ConfigDuration, ConfigError};

/// TCP connect, and then the TLS handshake, to the config service.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 pings on the stream's connection, and how long one may go unanswered (the protocol's
/// bounds): a silent operator is noticed within half a minute even when no message is due.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// The admin address when neither `--admin-address` nor the bootstrap config names one.
pub const DEFAULT_ADMIN_ADDRESS: &str = "127.0.0.1:9901";
/// How often stats are reported when `--stats-interval` is not given.
pub const DEFAULT_STATS_INTERVAL: ConfigDuration = ConfigDuration::from_secs(10);

/// The flags of `run` that take the config from a control plane.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct Flags {
    /// The operator's config service, `https://HOST:PORT`. With it, listeners come from the
    /// control plane: `--config` is an optional bootstrap served until the first push, and it
    /// is not watched for changes (pushes are the source of truth).
    #[arg(long, env = "L4PROXY_CONTROL_PLANE", value_name = "URL")]
    pub control_plane: Option<String>,
    /// The L4Proxy resource this proxy serves (with --control-plane).
    #[arg(long, env = "L4PROXY_RESOURCE", value_name = "NAMESPACE/NAME")]
    pub resource: Option<String>,
    /// A ServiceAccount token of audience `l4proxy.dev`, read again for every new stream (with
    /// --control-plane).
    #[arg(long, env = "L4PROXY_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// The PEM CA that signs the config service's certificate, the only one trusted (with
    /// --control-plane).
    #[arg(long, env = "L4PROXY_CA_FILE", value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// The same CA inline, as PEM text, instead of --ca-file (an injected sidecar gets it so:
    /// the CA's ConfigMap is in the operator's namespace, not the pod's).
    #[arg(long, env = "L4PROXY_CA_PEM", value_name = "PEM", conflicts_with = "ca_file", hide_env_values = true)]
    pub ca_pem: Option<String>,
    /// How often stats are reported to the control plane [default: 10s] (with --control-plane).
    #[arg(long, env = "L4PROXY_STATS_INTERVAL", value_name = "DURATION")]
    pub stats_interval: Option<String>,
    /// The admin server's address unless the bootstrap config names one [default:
    /// 127.0.0.1:9901] (with --control-plane).
    #[arg(long, env = "L4PROXY_ADMIN_ADDRESS", value_name = "ADDR")]
    pub admin_address: Option<String>,
}

/// The checked flags: what the client needs to reach and follow its control plane.
#[derive(Clone, Debug)]
pub struct Settings {
    /// As given, for logs and `/stats`.
    pub url: String,
    /// TLS trusting only the given CA, HTTP/2 keepalives, connect timeout.
    pub endpoint: Endpoint,
    pub resource: Resource,
    pub token_file: PathBuf,
    /// Who this proxy is, in the Hello: `POD_NAMESPACE/POD_NAME`, else the host name.
    pub identity: String,
    pub stats_interval: Duration,
    /// The admin server's address, unless the bootstrap config names one.
    pub admin: SocketAddr,
    pub backoff: Backoff,
}

/// An `L4Proxy` resource: `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resource {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl FromStr for Resource {
    type Err = String;

    /// A namespace (a DNS label) and a name (a DNS subdomain), as Kubernetes names them.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let Some((namespace, name)) = s.split_once('/') else {
            return Err(format!("{s:?} is not NAMESPACE/NAME"));
        };
        let label = |part: &str, max: usize, dots: bool| {
            let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
            !part.is_empty()
                && part.len() <= max
                && edge(part.chars().next())
                && edge(part.chars().last())
                && part.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || (dots && c == '.'))
        };
        if !label(namespace, 63, false) {
            return Err(format!("{s:?}: the namespace must be a DNS label (lowercase letters, digits, '-')"));
        }
        if !label(name, 253, true) {
            return Err(format!("{s:?}: the name must be a DNS subdomain (lowercase letters, digits, '-', '.')"));
        }
        Ok(Self { namespace: namespace.to_owned(), name: name.to_owned() })
    }
}

impl Flags {
    /// `None` without `--control-plane` (the config comes from a file); otherwise every flag
    /// checked and both files read.
    pub async fn check(self) -> Result<Option<Settings>, ConfigError> {
        let Some(url) = self.control_plane else {
            let stray = [
                ("--resource", self.resource.is_some()),
                ("--token-file", self.token_file.is_some()),
                ("--ca-file", self.ca_file.is_some()),
                ("--ca-pem", self.ca_pem.is_some()),
                ("--stats-interval", self.stats_interval.is_some()),
                ("--admin-address", self.admin_address.is_some()),
            ];
            return match stray.into_iter().find(|(_, given)| *given) {
                Some((flag, _)) => Err(ConfigError::invalid(flag, "is only used with --control-plane")),
                None => Ok(None),
            };
        };
        let resource =
            required("--resource", self.resource)?.parse().map_err(|why| ConfigError::invalid("--resource", why))?;
        let token_file = required("--token-file", self.token_file)?;
        token::bearer(&token_file).await.map_err(|e| ConfigError::invalid("--token-file", e.to_string()))?;
        let tls = match (self.ca_file, self.ca_pem) {
            (Some(_), Some(_)) => return Err(ConfigError::invalid("--ca-pem", "cannot be given with --ca-file")),
            (None, Some(pem)) => trusting(pem.as_bytes()).map_err(|why| ConfigError::invalid("--ca-pem", why))?,
            (Some(ca_file), None) => {
                let ca = tokio::fs::read(&ca_file).await.map_err(|e| {
                    ConfigError::invalid("--ca-file", format!("cannot read {}: {e}", ca_file.display()))
                })?;
                trusting(&ca)
                    .map_err(|why| ConfigError::invalid("--ca-file", format!("{}: {why}", ca_file.display())))?
            }
            (None, None) => {
                return Err(ConfigError::invalid("--ca-file", "(or --ca-pem) is required with --control-plane"));
            }
        };
        let stats_interval = match self.stats_interval {
            Some(text) => {
                text.parse::<ConfigDuration>().map_err(|why| ConfigError::invalid("--stats-interval", why))?
            }
            None => DEFAULT_STATS_INTERVAL,
        };
        if stats_interval.get().is_zero() {
            return Err(ConfigError::invalid("--stats-interval", "must be longer than 0s"));
        }
        let admin_text = self.admin_address.as_deref().unwrap_or(DEFAULT_ADMIN_ADDRESS);
        let admin = admin_text
            .parse()
            .map_err(|_| ConfigError::invalid("--admin-address", format!("{admin_text:?} is not ip:port")))?;
        Ok(Some(Settings {
            endpoint: endpoint(&url, tls).map_err(|why| ConfigError::invalid("--control-plane", why))?,
            url,
            resource,
            token_file,
            identity: identity(),
            stats_interval: stats_interval.get(),
            admin,
            backoff: Backoff::default(),
        }))
    }
}

impl Settings {
    /// What serves until the first push: the bootstrap config, with its admin server at
    /// `admin` unless it names an address, or, without a bootstrap, only the admin server.
    /// Pushed versions keep this admin address (they carry listeners only).
    pub fn first_config(&self, bootstrap: Option<Config>) -> Config {
        let mut config = bootstrap.unwrap_or(Config { admin: None, listeners: Vec::new() });
        config.admin = config.admin.or(Some(self.admin));
        config
    }
}

fn required<T>(flag: &str, value: Option<T>) -> Result<T, ConfigError> {
    value.ok_or_else(|| ConfigError::invalid(flag, "is required with --control-plane"))
}

/// TLS that trusts the certificates in `pem`, and nothing else (no system roots).
fn trusting(pem: &[u8]) -> Result<ClientTlsConfig, String> {
    let certificates = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not a PEM certificate file: {e}"))?;
    if certificates.is_empty() {
        return Err("holds no PEM certificate".into());
    }
    let mut roots = RootCertStore::empty();
    for certificate in certificates {
        roots.add(certificate).map_err(|e| format!("not a usable CA certificate: {e}"))?;
    }
    Ok(ClientTlsConfig::new().trust_anchors(roots.roots).timeout(CONNECT_TIMEOUT))
}

/// The config service's endpoint: `https://HOST[:PORT]`, nothing after the authority.
fn endpoint(url: &str, tls: ClientTlsConfig) -> Result<Endpoint, String> {
    let uri: Uri = url.parse().map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    if uri.scheme_str() != Some("https") {
        return Err(format!("{url:?} is not an https URL (https://HOST:PORT)"));
    }
    if uri.host().is_none_or(str::is_empty) || !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(format!("{url:?} is not https://HOST:PORT (no path, no query)"));
    }
    let endpoint = Endpoint::from_shared(url.to_owned())
        .and_then(|e| e.tls_config(tls))
        .map_err(|e| format!("{url:?}: {}", super::chain(&e)))?;
    Ok(endpoint
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true))
}

/// `POD_NAMESPACE/POD_NAME` in a pod (the injector sets both from the downward API), else the
/// host name.
fn identity() -> String {
    let var = |name| std::env::var(name).ok().filter(|v| !v.is_empty());
    match (var("POD_NAMESPACE"), var("POD_NAME")) {
        (Some(namespace), Some(name)) => format!("{namespace}/{name}"),
        _ => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|host| host.trim().to_owned())
            .ok()
            .filter(|host| !host.is_empty())
            .unwrap_or_else(|| "unknown".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_is_a_namespace_and_a_name() {
        let resource: Resource = "shop/db.primary".parse().unwrap();
        assert_eq!((resource.namespace.as_str(), resource.name.as_str()), ("shop", "db.primary"));
        assert_eq!(resource.to_string(), "shop/db.primary");
    }

    #[test]
    fn resource_without_a_slash_or_with_bad_parts_is_refused_naming_the_value() {
        for bad in ["db", "/db", "shop/", "shop/db/x", "Shop/db", "shop/-db", "sh.op/db", "shop/db_1"] {
            let error = bad.parse::<Resource>().unwrap_err();
            assert!(error.contains(&format!("{bad:?}")), "{bad}: {error}");
        }
    }

    #[test]
    fn only_https_urls_without_a_path_make_an_endpoint() {
        let tls = || ClientTlsConfig::new();
        assert!(endpoint("https://l4proxy-operator.l4proxy-system.svc:8443", tls()).is_ok());
        assert!(endpoint("https://127.0.0.1:8443/", tls()).is_ok());
        for bad in
            ["http://127.0.0.1:8443", "127.0.0.1:8443", "https://127.0.0.1:8443/config", "https://:8443", "not a url"]
        {
            let error = endpoint(bad, tls()).unwrap_err();
            assert!(error.contains(&format!("{bad:?}")), "{bad}: {error}");
        }
    }

    #[test]
    fn a_ca_file_without_a_certificate_is_refused() {
        assert_eq!(trusting(b"").unwrap_err(), "holds no PEM certificate");
        assert_eq!(trusting(b"hello\n").unwrap_err(), "holds no PEM certificate");
        let garbage = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert!(trusting(garbage).unwrap_err().starts_with("not a usable CA certificate"));
    }

    #[tokio::test]
    async fn without_control_plane_the_other_flags_are_refused_and_none_is_fine() {
        assert!(Flags::default().check().await.unwrap().is_none());
        let stray = Flags { resource: Some("shop/db".into()), ..Flags::default() };
        let error = stray.check().await.unwrap_err().to_string();
        assert_eq!(error, "--resource: is only used with --control-plane");
    }

    #[tokio::test]
    async fn control_plane_without_the_others_names_the_first_missing_flag() {
        let flags = Flags { control_plane: Some("https://127.0.0.1:1".into()), ..Flags::default() };
        let error = flags.check().await.unwrap_err().to_string();
        assert_eq!(error, "--resource: is required with --control-plane");
    }

    /// Flags as an injected sidecar gets them: the CA inline, a token in a file.
    fn inline_ca(ca_pem: &str, ca_file: Option<PathBuf>) -> Flags {
        let token = std::env::temp_dir().join(format!("l4proxy-options-token-{}", std::process::id()));
        std::fs::write(&token, "a-token\n").unwrap();
        Flags {
            control_plane: Some("https://127.0.0.1:8443".into()),
            resource: Some("shop/db".into()),
            token_file: Some(token),
            ca_pem: Some(ca_pem.into()),
            ca_file,
            ..Flags::default()
        }
    }

    #[tokio::test]
    async fn an_inline_ca_is_trusted_like_a_file_and_a_bad_one_is_refused_naming_the_flag() {
        let ca = rcgen::generate_simple_self_signed(vec!["ca".into()]).unwrap().cert.pem();
        let settings = inline_ca(&ca, None).check().await.unwrap().unwrap();
        assert_eq!(settings.resource.to_string(), "shop/db");
        let error = inline_ca("hello", None).check().await.unwrap_err().to_string();
        assert_eq!(error, "--ca-pem: holds no PEM certificate");
        let both = inline_ca(&ca, Some("/ca.crt".into())).check().await.unwrap_err().to_string();
        assert_eq!(both, "--ca-pem: cannot be given with --ca-file");
    }
}
