//! Sidecar injection, decided: whether a pod being created gets the proxy, for which `L4Proxy`,
//! and the JSON patch that adds it. Pure; the webhook ([`crate::webhook`]) feeds it the pod,
//! its namespace's labels and the namespace's resources, and answers with what it returns.
//!
//! A pod opts in with `l4proxy.dev/inject: enabled` on itself or its namespace; `disabled` on
//! the pod wins. Its proxy is the resource named by its `l4proxy.dev/proxy` annotation, else
//! the one resource whose selector selects it ([`selector::serves`], the rule the config service
//! checks tokens by too). The sidecar is a native sidecar: the first init container, with
//! `restartPolicy: Always` and a startup probe on `/readyz`, so the pod's containers start once
//! the proxy serves its first pushed config. It has no capabilities: for a listener below port
//! 1024 the pod's `net.ipv4.ip_unprivileged_port_start` is lowered instead
//! ([`gateway::lowest_port_sysctl`]).

use std::{collections::BTreeMap, sync::Arc};

use json_patch::{AddOperation, Patch, PatchOperation, jsonptr::PointerBuf};
use k8s_openapi::{
    api::core::v1::{
        Capabilities, Container, ContainerPort, EnvVar, HTTPGetAction, Pod, Probe, ResourceRequirements,
        SeccompProfile, SecurityContext, Sysctl, VolumeMount,
    },
    apimachinery::pkg::{api::resource::Quantity, util::intstr::IntOrString},
};
use kube::ResourceExt;

pub use super::gateway::TOKEN_EXPIRY_SECONDS;
use super::{
    gateway::{self, TOKEN_DIR, TOKEN_FILE, UNPRIVILEGED_PORT_START},
    selector,
};
use crate::api::{
    crd::L4Proxy,
    labels::{INJECT_LABEL, PROXY_ANNOTATION},
};

/// The sidecar's container name: a pod holding a container so named is injected already.
pub const SIDECAR_NAME: &str = "l4proxy";
/// Set on an injected pod: the resource whose sidecar it got.
pub const INJECTED_ANNOTATION: &str = "l4proxy.dev/injected";
/// Where the sidecar serves `/readyz` (its startup probe), `/healthz` and `/metrics`, on all
/// addresses: the kubelet probes the pod's address.
pub const ADMIN_PORT: u16 = 9901;
const TOKEN_VOLUME: &str = "l4proxy-token";
/// The user the sidecar runs as (the image's `USER`), so `runAsNonRoot` holds whatever the image.
const SIDECAR_USER: i64 = 65532;
/// The startup probe: every second, for at most this many seconds, before the kubelet restarts
/// the sidecar (the app's containers wait until it succeeds).
const STARTUP_SECONDS: i32 = 300;

/// Per-pod overrides of the sidecar's resources and log level.
pub const CPU_REQUEST_ANNOTATION: &str = "l4proxy.dev/proxy-cpu-request";
pub const CPU_LIMIT_ANNOTATION: &str = "l4proxy.dev/proxy-cpu-limit";
pub const MEMORY_REQUEST_ANNOTATION: &str = "l4proxy.dev/proxy-memory-request";
pub const MEMORY_LIMIT_ANNOTATION: &str = "l4proxy.dev/proxy-memory-limit";
pub const LOG_LEVEL_ANNOTATION: &str = "l4proxy.dev/proxy-log-level";
const LOG_LEVELS: [&str; 5] = ["error", "warn", "info", "debug", "trace"];

/// The sidecar's resources (each `None`: not set).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resources {
    pub cpu_request: Option<String>,
    pub cpu_limit: Option<String>,
    pub memory_request: Option<String>,
    pub memory_limit: Option<String>,
}

impl Resources {
    /// Each value checked as a Kubernetes quantity, and each request within its limit; the
    /// error names the flag or annotation (`name` of each field) and the value.
    pub fn check_as(&self, names: [&str; 4]) -> Result<(), String> {
        let fields = [&self.cpu_request, &self.cpu_limit, &self.memory_request, &self.memory_limit];
        let mut values = [None; 4];
        for ((field, name), value) in fields.into_iter().zip(names).zip(&mut values) {
            if let Some(text) = field {
                *value = Some(quantity(text).map_err(|why| format!("{name}: {text:?} {why}"))?);
            }
        }
        // cpu (0, 1) and memory (2, 3): a request above its limit would be refused by the API
        // server with a message that does not name the annotation.
        for (request, limit) in [(0, 1), (2, 3)] {
            if let (Some(r), Some(l)) = (values[request], values[limit])
                && r > l
            {
                let (rt, lt) = (fields[request].as_deref().unwrap(), fields[limit].as_deref().unwrap());
                return Err(format!("{}: {rt:?} is above {} {lt:?}", names[request], names[limit]));
            }
        }
        Ok(())
    }

    fn requirements(&self) -> Option<ResourceRequirements> {
        let map = |entries: [(&str, &Option<String>); 2]| {
            let map: BTreeMap<String, Quantity> =
                entries.into_iter().filter_map(|(k, v)| v.clone().map(|v| (k.to_owned(), Quantity(v)))).collect();
            (!map.is_empty()).then_some(map)
        };
        let requests = map([("cpu", &self.cpu_request), ("memory", &self.memory_request)]);
        let limits = map([("cpu", &self.cpu_limit), ("memory", &self.memory_limit)]);
        (requests.is_some() || limits.is_some()).then(|| ResourceRequirements {
            requests,
            limits,
            ..Default::default()
        })
    }
}

/// The operator's names for the resource fields: its flags.
pub const RESOURCE_FLAGS: [&str; 4] =
    ["--sidecar-cpu-request", "--sidecar-cpu-limit", "--sidecar-memory-request", "--sidecar-memory-limit"];
const RESOURCE_ANNOTATIONS: [&str; 4] =
    [CPU_REQUEST_ANNOTATION, CPU_LIMIT_ANNOTATION, MEMORY_REQUEST_ANNOTATION, MEMORY_LIMIT_ANNOTATION];

/// What every injected sidecar gets, from the operator's flags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sidecar {
    pub image: String,
    /// `https://HOST:PORT` of the config service, as pods reach it.
    pub control_plane: String,
    /// The CA that signs the config service's certificate, PEM (passed inline: ConfigMap
    /// `l4proxy-ca` is in the operator's namespace, which pods cannot mount from).
    pub ca_pem: String,
    /// Defaults, overridden per pod by annotation.
    pub resources: Resources,
}

/// Whether a pod's own label decides: `Some(true)` for `enabled`, `Some(false)` for any other
/// value (`disabled` wins over its namespace); `None` without the label (its namespace decides).
pub fn pod_opts_in(pod: &Pod) -> Option<bool> {
    pod.labels().get(INJECT_LABEL).map(|v| v == "enabled")
}

/// Whether a namespace with `labels` asks for sidecars in its pods.
pub fn namespace_opts_in(labels: &BTreeMap<String, String>) -> bool {
    labels.get(INJECT_LABEL).is_some_and(|v| v == "enabled")
}

/// What happens to an opted-in pod.
#[derive(Debug)]
pub enum Decision {
    /// The pod has the sidecar already: admitted unchanged (a second admission changes nothing).
    AlreadyInjected,
    /// No resource serves the pod, or two do and it names none: admitted unchanged with this
    /// warning, and an Event on each of `tell` (the resources concerned).
    Unmatched { warning: String, tell: Vec<Arc<L4Proxy>> },
    /// The sidecar of `proxy`, added by `patch`.
    Inject { proxy: String, patch: Patch },
    /// A bad override: the pod is refused with this message (naming the annotation).
    Refused(String),
}

/// Most resources an Event about an unmatched pod goes to (all of a namespace's when none match).
const MAX_TOLD: usize = 5;

/// The decision for `pod`, opted in, in `namespace` holding `proxies`.
pub fn decide(sidecar: &Sidecar, namespace: &str, pod: &Pod, proxies: &[Arc<L4Proxy>]) -> Decision {
    let spec = pod.spec.as_ref();
    let containers = spec.into_iter().flat_map(|s| s.init_containers.iter().flatten().chain(&s.containers));
    if containers.clone().any(|c| c.name == SIDECAR_NAME) {
        return Decision::AlreadyInjected;
    }
    let named = pod.annotations().get(PROXY_ANNOTATION);
    let serving: Vec<&Arc<L4Proxy>> = proxies.iter().filter(|p| selector::serves(p, &pod.metadata)).collect();
    let proxy = match (serving.as_slice(), named) {
        ([proxy], _) => *proxy,
        ([], Some(name)) => {
            return Decision::Unmatched {
                warning: format!(
                    "l4proxy: no sidecar: the annotation {PROXY_ANNOTATION} names L4Proxy {name:?}, which is not in namespace {namespace}"
                ),
                tell: Vec::new(),
            };
        }
        ([], None) => {
            return Decision::Unmatched {
                warning: format!(
                    "l4proxy: no sidecar: no L4Proxy in namespace {namespace} selects this pod (set spec.selector, or name one with the annotation {PROXY_ANNOTATION})"
                ),
                tell: proxies.iter().take(MAX_TOLD).cloned().collect(),
            };
        }
        (several, _) => {
            let names: Vec<String> = several.iter().map(|p| p.name_any()).collect();
            return Decision::Unmatched {
                warning: format!(
                    "l4proxy: no sidecar: L4Proxies {} all select this pod; name one with the annotation {PROXY_ANNOTATION}",
                    names.join(", ")
                ),
                tell: several.iter().take(MAX_TOLD).map(|p| (*p).clone()).collect(),
            };
        }
    };
    let overrides = match Overrides::of(pod, &sidecar.resources) {
        Ok(overrides) => overrides,
        Err(why) => return Decision::Refused(format!("l4proxy: {why}")),
    };
    let resource = format!("{namespace}/{}", proxy.name_any());
    let container = container(sidecar, &resource, &overrides);
    let sysctl = gateway::lowest_port_sysctl(&proxy.spec.listeners);
    Decision::Inject { proxy: proxy.name_any(), patch: patch(pod, container, &resource, sysctl) }
}

/// The sidecar's resources and log level for one pod: the defaults, then its annotations.
struct Overrides {
    resources: Resources,
    log_level: Option<String>,
}

impl Overrides {
    fn of(pod: &Pod, defaults: &Resources) -> Result<Self, String> {
        let annotations = pod.annotations();
        let pick = |name: &str, default: &Option<String>| annotations.get(name).cloned().or_else(|| default.clone());
        let resources = Resources {
            cpu_request: pick(CPU_REQUEST_ANNOTATION, &defaults.cpu_request),
            cpu_limit: pick(CPU_LIMIT_ANNOTATION, &defaults.cpu_limit),
            memory_request: pick(MEMORY_REQUEST_ANNOTATION, &defaults.memory_request),
            memory_limit: pick(MEMORY_LIMIT_ANNOTATION, &defaults.memory_limit),
        };
        resources.check_as(RESOURCE_ANNOTATIONS)?;
        let log_level = annotations.get(LOG_LEVEL_ANNOTATION).cloned();
        if let Some(level) = &log_level
            && !LOG_LEVELS.contains(&level.as_str())
        {
            return Err(format!("{LOG_LEVEL_ANNOTATION}: {level:?} is not one of {}", LOG_LEVELS.join(", ")));
        }
        Ok(Self { resources, log_level })
    }
}

/// The value of a Kubernetes quantity (`100m`, `64Mi`, `1.5`, `2e3`), or why it is not one.
/// Only what comparisons need: not exact past f64's precision.
pub fn quantity(text: &str) -> Result<f64, &'static str> {
    const NOT: &str = "is not a quantity (like 100m, 0.5, 64Mi, 1G)";
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    if number.is_empty() || number == "." || number.matches('.').count() > 1 {
        return Err(NOT);
    }
    let number: f64 = number.parse().map_err(|_| NOT)?;
    let scale = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024f64,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        exponent => {
            let digits = exponent.strip_prefix(['e', 'E']).ok_or(NOT)?;
            let digits = digits.strip_prefix('+').unwrap_or(digits);
            let valid = digits.strip_prefix('-').unwrap_or(digits);
            if valid.is_empty() || !valid.bytes().all(|b| b.is_ascii_digit()) {
                return Err(NOT);
            }
            10f64.powi(digits.parse().map_err(|_| NOT)?)
        }
    };
    Ok(number * scale)
}

/// The sidecar container for `proxy`'s pods.
fn container(sidecar: &Sidecar, resource: &str, overrides: &Overrides) -> Container {
    let args = [
        "run",
        "--log-format",
        "json",
        "--control-plane",
        &sidecar.control_plane,
        "--resource",
        resource,
        "--token-file",
        &format!("{TOKEN_DIR}/{TOKEN_FILE}"),
        "--admin-address",
        &format!("0.0.0.0:{ADMIN_PORT}"),
    ]
    .map(String::from)
    .into();
    let mut env = gateway::pod_identity_env();
    env.push(EnvVar { name: "L4PROXY_CA_PEM".into(), value: Some(sidecar.ca_pem.clone()), ..Default::default() });
    if let Some(level) = &overrides.log_level {
        env.push(EnvVar { name: "RUST_LOG".into(), value: Some(level.clone()), ..Default::default() });
    }
    let probe = |path: &str, period: i32, failures: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(i32::from(ADMIN_PORT)),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        ..Default::default()
    };
    Container {
        name: SIDECAR_NAME.into(),
        image: Some(sidecar.image.clone()),
        restart_policy: Some("Always".into()),
        args: Some(args),
        env: Some(env),
        ports: Some(vec![ContainerPort {
            name: Some("l4proxy-admin".into()),
            container_port: i32::from(ADMIN_PORT),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        startup_probe: Some(probe("/readyz", 1, STARTUP_SECONDS)),
        liveness_probe: Some(probe("/healthz", 10, 3)),
        resources: overrides.resources.requirements(),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            run_as_user: Some(SIDECAR_USER),
            run_as_group: Some(SIDECAR_USER),
            capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), add: None }),
            seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), ..Default::default() }),
            ..Default::default()
        }),
        volume_mounts: Some(vec![VolumeMount {
            name: TOKEN_VOLUME.into(),
            mount_path: TOKEN_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        }]),
        ..Default::default()
    }
}

/// Adds `container` as the first init container, its token volume, the annotation naming
/// `resource`, and `sysctl` (for listeners below port 1024) unless the pod sets that sysctl itself.
fn patch(pod: &Pod, container: Container, resource: &str, sysctl: Option<Sysctl>) -> Patch {
    let add = |path: &str, value: serde_json::Value| {
        PatchOperation::Add(AddOperation { path: PointerBuf::parse(path).expect("a valid pointer"), value })
    };
    let spec = pod.spec.as_ref();
    let mut operations = Vec::with_capacity(3);
    operations.push(if spec.and_then(|s| s.init_containers.as_ref()).is_some_and(|c| !c.is_empty()) {
        add("/spec/initContainers/0", to_json(&container))
    } else {
        add("/spec/initContainers", serde_json::Value::Array(vec![to_json(&container)]))
    });
    let volume = gateway::token_volume(TOKEN_VOLUME);
    operations.push(if spec.and_then(|s| s.volumes.as_ref()).is_some() {
        add("/spec/volumes/-", to_json(&volume))
    } else {
        add("/spec/volumes", serde_json::Value::Array(vec![to_json(&volume)]))
    });
    let security = spec.and_then(|s| s.security_context.as_ref());
    let sysctls = security.and_then(|s| s.sysctls.as_ref());
    if let Some(sysctl) =
        sysctl.filter(|_| !sysctls.iter().flat_map(|s| s.iter()).any(|s| s.name == UNPRIVILEGED_PORT_START))
    {
        operations.push(match (security, sysctls) {
            (None, _) => add("/spec/securityContext", serde_json::json!({ "sysctls": [to_json(&sysctl)] })),
            (Some(_), None) => add("/spec/securityContext/sysctls", serde_json::Value::Array(vec![to_json(&sysctl)])),
            (Some(_), Some(_)) => add("/spec/securityContext/sysctls/-", to_json(&sysctl)),
        });
    }
    let name = serde_json::Value::String(resource.to_owned());
    operations.push(if pod.metadata.annotations.is_some() {
        add(&format!("/metadata/annotations/{}", INJECTED_ANNOTATION.replace('/', "~1")), name)
    } else {
        add("/metadata/annotations", serde_json::json!({ INJECTED_ANNOTATION: name }))
    });
    Patch(operations)
}

fn to_json(value: &impl serde::Serialize) -> serde_json::Value {
    serde_json::to_value(value).expect("Kubernetes objects serialise")
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::PodSecurityContext;

    use super::*;

    fn sidecar() -> Sidecar {
        Sidecar {
            image: "example/l4proxy:1".into(),
            control_plane: "https://l4proxy-operator.ops.svc:8443".into(),
            ca_pem: "PEM".into(),
            resources: Resources {
                cpu_request: Some("50m".into()),
                memory_request: Some("32Mi".into()),
                memory_limit: Some("128Mi".into()),
                ..Resources::default()
            },
        }
    }

    fn proxy(name: &str, app: &str, port: u16) -> Arc<L4Proxy> {
        let yaml = format!(
            "apiVersion: l4proxy.dev/v1alpha1\nkind: L4Proxy\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  selector: {{matchLabels: {{app: {app}}}}}\n  listeners:\n  - {{name: db, address: '127.0.0.1:{port}', backends: [{{address: '10.0.0.1:5432'}}]}}\n"
        );
        Arc::new(serde_yaml_ng::from_str(&yaml).unwrap())
    }

    fn pod(yaml: &str) -> Pod {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    const WEB: &str = "metadata: {generateName: web-, labels: {app: web, l4proxy.dev/inject: enabled}}\nspec:\n  containers: [{name: app, image: app:1}]\n";

    /// The pod after `patch`, as the API server would apply it.
    fn patched(pod: &Pod, patch: &Patch) -> Pod {
        let mut json = serde_json::to_value(pod).unwrap();
        json_patch::patch(&mut json, patch).unwrap();
        serde_json::from_value(json).unwrap()
    }

    fn injected(pod: &Pod, proxies: &[Arc<L4Proxy>]) -> Pod {
        match decide(&sidecar(), "shop", pod, proxies) {
            Decision::Inject { patch, .. } => patched(pod, &patch),
            other => panic!("not injected: {other:?}"),
        }
    }

    #[test]
    fn the_pod_label_decides_before_its_namespace_and_disabled_wins() {
        let with = |label: Option<&str>| {
            let mut p = pod(WEB);
            p.metadata.labels.as_mut().unwrap().remove(INJECT_LABEL);
            if let Some(v) = label {
                p.metadata.labels.as_mut().unwrap().insert(INJECT_LABEL.into(), v.into());
            }
            pod_opts_in(&p)
        };
        assert_eq!(with(Some("enabled")), Some(true));
        assert_eq!(with(Some("disabled")), Some(false));
        assert_eq!(with(None), None);
        let ns = |v: &str| BTreeMap::from([(INJECT_LABEL.to_owned(), v.to_owned())]);
        assert!(namespace_opts_in(&ns("enabled")));
        assert!(!namespace_opts_in(&ns("disabled")));
        assert!(!namespace_opts_in(&BTreeMap::new()));
    }

    #[test]
    fn the_sidecar_is_the_first_init_container_restarted_always_and_gated_by_a_startup_probe() {
        let mut p = pod(WEB);
        p.spec.as_mut().unwrap().init_containers =
            Some(vec![Container { name: "migrate".into(), ..Default::default() }]);
        let out = injected(&p, &[proxy("db", "web", 15432)]);
        let spec = out.spec.unwrap();
        let inits = spec.init_containers.unwrap();
        assert_eq!(inits.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), ["l4proxy", "migrate"]);
        let c = &inits[0];
        assert_eq!(c.restart_policy.as_deref(), Some("Always"));
        assert_eq!(c.image.as_deref(), Some("example/l4proxy:1"));
        let args = c.args.clone().unwrap();
        let after = |flag: &str| args.iter().position(|a| a == flag).map(|i| args[i + 1].as_str());
        assert_eq!(after("--control-plane"), Some("https://l4proxy-operator.ops.svc:8443"));
        assert_eq!(after("--resource"), Some("shop/db"));
        assert_eq!(after("--token-file"), Some("/var/run/secrets/l4proxy.dev/token"));
        assert_eq!(after("--admin-address"), Some("0.0.0.0:9901"));
        let startup = c.startup_probe.as_ref().unwrap().http_get.as_ref().unwrap();
        assert_eq!((startup.path.as_deref(), &startup.port), (Some("/readyz"), &IntOrString::Int(9901)));
        let env: Vec<_> = c.env.iter().flatten().map(|e| e.name.as_str()).collect();
        assert_eq!(env, ["POD_NAME", "POD_NAMESPACE", "L4PROXY_CA_PEM"]);
        assert_eq!(c.env.as_ref().unwrap()[2].value.as_deref(), Some("PEM"));
        let security = c.security_context.clone().unwrap();
        assert_eq!(security.run_as_non_root, Some(true));
        assert_eq!(security.read_only_root_filesystem, Some(true));
        assert_eq!(security.allow_privilege_escalation, Some(false));
        assert_eq!(security.capabilities.unwrap(), Capabilities { drop: Some(vec!["ALL".into()]), add: None });
        assert_eq!(security.seccomp_profile.unwrap().type_, "RuntimeDefault");
        let resources = c.resources.clone().unwrap();
        assert_eq!(resources.requests.unwrap()["cpu"], Quantity("50m".into()));
        assert_eq!(resources.limits.unwrap()["memory"], Quantity("128Mi".into()));
        let token = spec.volumes.unwrap().into_iter().find(|v| v.name == TOKEN_VOLUME).unwrap();
        let projection = token.projected.unwrap().sources.unwrap()[0].service_account_token.clone().unwrap();
        assert_eq!(projection.audience.as_deref(), Some("l4proxy.dev"));
        assert_eq!(projection.expiration_seconds, Some(TOKEN_EXPIRY_SECONDS));
        assert_eq!(out.metadata.annotations.unwrap()[INJECTED_ANNOTATION], "shop/db");
        // The app's containers are left as they were.
        assert_eq!(spec.containers.len(), 1);
    }

    #[test]
    fn admitting_an_injected_pod_again_changes_nothing() {
        let once = injected(&pod(WEB), &[proxy("db", "web", 15432)]);
        let again = decide(&sidecar(), "shop", &once, &[proxy("db", "web", 15432)]);
        assert!(matches!(again, Decision::AlreadyInjected), "{again:?}");
    }

    #[test]
    fn a_listener_below_1024_lowers_the_pods_unprivileged_port_start_and_adds_no_capability() {
        let wanted = Sysctl { name: UNPRIVILEGED_PORT_START.into(), value: "53".into() };
        let out = injected(&pod(WEB), &[proxy("dns", "web", 53)]);
        let spec = out.spec.unwrap();
        let caps = spec.init_containers.unwrap()[0].security_context.clone().unwrap().capabilities.unwrap();
        assert_eq!(caps.add, None);
        assert_eq!(spec.security_context.unwrap().sysctls.unwrap(), std::slice::from_ref(&wanted));
        // Beside the pod's own sysctls; and a pod that sets this one keeps its value.
        let mut p = pod(WEB);
        let other = Sysctl { name: "net.ipv4.tcp_syncookies".into(), value: "1".into() };
        p.spec.as_mut().unwrap().security_context =
            Some(PodSecurityContext { sysctls: Some(vec![other.clone()]), ..Default::default() });
        let out = injected(&p, &[proxy("dns", "web", 53)]);
        assert_eq!(out.spec.unwrap().security_context.unwrap().sysctls.unwrap(), [other, wanted]);
        let own = Sysctl { name: UNPRIVILEGED_PORT_START.into(), value: "0".into() };
        p.spec.as_mut().unwrap().security_context =
            Some(PodSecurityContext { sysctls: Some(vec![own.clone()]), ..Default::default() });
        let out = injected(&p, &[proxy("dns", "web", 53)]);
        assert_eq!(out.spec.unwrap().security_context.unwrap().sysctls.unwrap(), [own]);
        // Ports from 1024 need nothing.
        let out = injected(&pod(WEB), &[proxy("db", "web", 15432)]);
        assert!(out.spec.unwrap().security_context.is_none());
    }

    #[test]
    fn an_unmatched_or_ambiguous_pod_is_admitted_unchanged_with_a_warning_naming_why() {
        match decide(&sidecar(), "shop", &pod(WEB), &[proxy("db", "api", 1)]) {
            Decision::Unmatched { warning, tell } => {
                assert!(warning.contains("no L4Proxy in namespace shop selects this pod"), "{warning}");
                assert_eq!(tell.len(), 1);
            }
            other => panic!("{other:?}"),
        }
        let two = [proxy("a", "web", 1), proxy("b", "web", 2)];
        match decide(&sidecar(), "shop", &pod(WEB), &two) {
            Decision::Unmatched { warning, tell } => {
                assert!(warning.contains("L4Proxies a, b all select this pod"), "{warning}");
                assert_eq!(tell.iter().map(|p| p.name_any()).collect::<Vec<_>>(), ["a", "b"]);
            }
            other => panic!("{other:?}"),
        }
        // Naming one settles it.
        let mut named = pod(WEB);
        named.metadata.annotations = Some(BTreeMap::from([(PROXY_ANNOTATION.into(), "b".into())]));
        let out = injected(&named, &two);
        assert_eq!(out.metadata.annotations.unwrap()[INJECTED_ANNOTATION], "shop/b");
        let mut missing = pod(WEB);
        missing.metadata.annotations = Some(BTreeMap::from([(PROXY_ANNOTATION.into(), "c".into())]));
        match decide(&sidecar(), "shop", &missing, &two) {
            Decision::Unmatched { warning, tell } => {
                assert!(warning.contains("names L4Proxy \"c\", which is not in namespace shop"), "{warning}");
                assert!(tell.is_empty());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn annotations_override_resources_and_log_level_and_bad_values_refuse_the_pod_naming_the_annotation() {
        let mut p = pod(WEB);
        p.metadata.annotations = Some(BTreeMap::from([
            (CPU_LIMIT_ANNOTATION.into(), "1".into()),
            (MEMORY_LIMIT_ANNOTATION.into(), "256Mi".into()),
            (LOG_LEVEL_ANNOTATION.into(), "debug".into()),
        ]));
        let out = injected(&p, &[proxy("db", "web", 15432)]);
        let c = &out.spec.unwrap().init_containers.unwrap()[0];
        let limits = c.resources.clone().unwrap().limits.unwrap();
        assert_eq!((&limits["cpu"].0[..], &limits["memory"].0[..]), ("1", "256Mi"));
        assert!(c.env.iter().flatten().any(|e| e.name == "RUST_LOG" && e.value.as_deref() == Some("debug")));

        let refused = |annotation: &str, value: &str| {
            let mut p = pod(WEB);
            p.metadata.annotations = Some(BTreeMap::from([(annotation.into(), value.into())]));
            match decide(&sidecar(), "shop", &p, &[proxy("db", "web", 15432)]) {
                Decision::Refused(message) => message,
                other => panic!("{annotation}={value}: {other:?}"),
            }
        };
        let message = refused(CPU_REQUEST_ANNOTATION, "lots");
        assert!(message.contains("l4proxy.dev/proxy-cpu-request: \"lots\" is not a quantity"), "{message}");
        let message = refused(MEMORY_REQUEST_ANNOTATION, "1Gi");
        assert!(message.contains("l4proxy.dev/proxy-memory-request: \"1Gi\" is above"), "{message}");
        let message = refused(LOG_LEVEL_ANNOTATION, "loud");
        assert!(message.contains("l4proxy.dev/proxy-log-level: \"loud\" is not one of error"), "{message}");
    }

    #[test]
    fn quantities_are_read_as_kubernetes_writes_them() {
        assert_eq!(quantity("100m"), Ok(0.1));
        assert_eq!(quantity("2"), Ok(2.0));
        assert_eq!(quantity("1.5"), Ok(1.5));
        assert_eq!(quantity("64Mi"), Ok(64.0 * 1024.0 * 1024.0));
        assert_eq!(quantity("1G"), Ok(1e9));
        assert_eq!(quantity("2e3"), Ok(2000.0));
        for bad in ["", "m", "1.2.3", "-1", "1x", "1e", "1e+", "10 Mi", ".", "1mi"] {
            assert!(quantity(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn bad_default_resources_are_refused_naming_the_flag() {
        let mut s = sidecar();
        s.resources.cpu_limit = Some("10m".into());
        let error = s.resources.check_as(RESOURCE_FLAGS).unwrap_err();
        assert_eq!(error, "--sidecar-cpu-request: \"50m\" is above --sidecar-cpu-limit \"10m\"");
    }
}
