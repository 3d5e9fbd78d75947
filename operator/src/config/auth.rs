//! Who may subscribe to which resource: the proxy's ServiceAccount token, checked with the
//! TokenReview API (answers cached for at most [`CACHE_TTL`]), and the rules of the design's
//! "Identity and trust": the resource is in the token's namespace, and a token bound to a pod
//! belongs to a pod the resource serves (selects, or is named by) or to one of its gateway pods.

use std::{collections::HashMap, sync::Mutex, time::Duration};

use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec},
    core::v1::Pod,
};
use kube::{Api, Client, api::PostParams};
use l4proxy::control::TOKEN_AUDIENCE;
use tokio::time::Instant;
use xxhash_rust::xxh3::xxh3_128;

use crate::{
    api::{crd::L4Proxy, labels::INSTANCE_LABEL},
    metrics::Metrics,
    model::selector,
};

/// How long a TokenReview answer is reused.
pub const CACHE_TTL: Duration = Duration::from_secs(60);
/// Most answers cached; past it, expired ones are dropped, then the oldest.
pub const CACHE_MAX: usize = 10_000;
/// The TokenReview `user.extra` key that names the pod a token is bound to.
const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
const POD_UID_EXTRA: &str = "authentication.kubernetes.io/pod-uid";

/// Why a subscription is refused. The label is the `reason` of the refusals metric; the
/// message goes to the proxy in the gRPC status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("no token: send `authorization: Bearer <ServiceAccount token with audience {TOKEN_AUDIENCE}>`")]
    NoToken,
    #[error("invalid token: {0}")]
    InvalidToken(String),
    #[error(
        "the token's audiences do not include {TOKEN_AUDIENCE} (kubectl create token SA --audience {TOKEN_AUDIENCE}): {0}"
    )]
    WrongAudience(String),
    #[error(
        "the token is for namespace {token}, the resource is in {resource}: a proxy serves resources of its own namespace"
    )]
    OtherNamespace { token: String, resource: String },
    #[error("pod {pod} is not selected by L4Proxy {resource} and is not one of its gateway pods")]
    PodDoesNotMatch { pod: String, resource: String },
    #[error("L4Proxy {0} not found")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("the token could not be checked: {0}")]
    Unavailable(String),
}

impl Refusal {
    pub fn label(&self) -> &'static str {
        match self {
            Self::NoToken => "no_token",
            Self::InvalidToken(_) => "invalid_token",
            Self::WrongAudience(_) => "wrong_audience",
            Self::OtherNamespace { .. } => "other_namespace",
            Self::PodDoesNotMatch { .. } => "pod_mismatch",
            Self::NotFound(_) => "not_found",
            Self::BadRequest(_) => "bad_request",
            Self::Unavailable(_) => "unavailable",
        }
    }

    pub fn status(&self) -> tonic::Status {
        let message = self.to_string();
        match self {
            Self::NoToken | Self::InvalidToken(_) | Self::WrongAudience(_) => tonic::Status::unauthenticated(message),
            Self::OtherNamespace { .. } | Self::PodDoesNotMatch { .. } => tonic::Status::permission_denied(message),
            Self::NotFound(_) => tonic::Status::not_found(message),
            Self::BadRequest(_) => tonic::Status::invalid_argument(message),
            Self::Unavailable(_) => tonic::Status::unavailable(message),
        }
    }
}

/// What a valid token says about its holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub namespace: String,
    pub service_account: String,
    /// The pod the token is bound to (name and uid), if it is.
    pub pod: Option<(String, String)>,
}

/// A TokenReview's answer, and when it was given.
type Answer = (Result<Identity, Refusal>, Instant);

/// Checks tokens and subscriptions.
pub struct Authenticator {
    client: Client,
    /// By a hash of the token (the token itself is not kept).
    cache: Mutex<HashMap<u128, Answer>>,
}

impl Authenticator {
    pub fn new(client: Client) -> Self {
        Self { client, cache: Mutex::new(HashMap::new()) }
    }

    /// The holder of `token` (a bearer token from the request's metadata).
    pub async fn identify(&self, token: Option<&str>, metrics: &Metrics) -> Result<Identity, Refusal> {
        let token = token.filter(|t| !t.is_empty()).ok_or(Refusal::NoToken)?;
        let key = xxh3_128(token.as_bytes());
        if let Some(answer) = self.cached(key) {
            return answer;
        }
        let answer = self.review(token).await;
        metrics.token_review(answer.is_ok());
        // A failed call to the API server is not an answer about the token: not cached.
        if !matches!(answer, Err(Refusal::Unavailable(_))) {
            self.remember(key, answer.clone());
        }
        answer
    }

    fn cached(&self, key: u128) -> Option<Result<Identity, Refusal>> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.get(&key).filter(|(_, at)| at.elapsed() < CACHE_TTL).map(|(answer, _)| answer.clone())
    }

    fn remember(&self, key: u128, answer: Result<Identity, Refusal>) {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= CACHE_MAX {
            cache.retain(|_, (_, at)| at.elapsed() < CACHE_TTL);
        }
        if cache.len() >= CACHE_MAX
            && let Some(oldest) = cache.iter().min_by_key(|(_, (_, at))| *at).map(|(k, _)| *k)
        {
            cache.remove(&oldest);
        }
        cache.insert(key, (answer, Instant::now()));
    }

    async fn review(&self, token: &str) -> Result<Identity, Refusal> {
        let review = TokenReview {
            spec: TokenReviewSpec { token: token.to_owned(), audiences: Some(vec![TOKEN_AUDIENCE.to_owned()]) },
            ..Default::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let reviewed = api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| Refusal::Unavailable(format!("TokenReview failed: {e}")))?;
        identity_of(reviewed.status.unwrap_or_default())
    }

    /// Whether `identity` may subscribe to `proxy`; `Ok(true)` for one of its gateway pods.
    pub async fn authorize(&self, identity: &Identity, proxy: &L4Proxy) -> Result<bool, Refusal> {
        let resource_ns = proxy.metadata.namespace.clone().unwrap_or_default();
        let resource = format!("{resource_ns}/{}", proxy.metadata.name.as_deref().unwrap_or_default());
        if identity.namespace != resource_ns {
            return Err(Refusal::OtherNamespace { token: identity.namespace.clone(), resource: resource_ns });
        }
        let Some((pod_name, pod_uid)) = &identity.pod else { return Ok(false) };
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &resource_ns);
        let mismatch =
            || Refusal::PodDoesNotMatch { pod: format!("{resource_ns}/{pod_name}"), resource: resource.clone() };
        let pod = pods
            .get_opt(pod_name)
            .await
            .map_err(|e| Refusal::Unavailable(format!("reading pod {resource_ns}/{pod_name}: {e}")))?
            .ok_or_else(mismatch)?;
        if pod.metadata.uid.as_deref() != Some(pod_uid.as_str()) {
            return Err(mismatch());
        }
        let name = proxy.metadata.name.as_deref().unwrap_or_default();
        let gateway_pod = pod.metadata.labels.as_ref().and_then(|l| l.get(INSTANCE_LABEL)).is_some_and(|g| g == name);
        if gateway_pod || selector::serves(proxy, &pod.metadata) { Ok(gateway_pod) } else { Err(mismatch()) }
    }
}

/// The identity in a TokenReview's answer, or why the token is refused.
fn identity_of(status: k8s_openapi::api::authentication::v1::TokenReviewStatus) -> Result<Identity, Refusal> {
    if status.authenticated != Some(true) {
        let error = status.error.unwrap_or_else(|| "not authenticated".into());
        // The API server refuses a token for other audiences as unauthenticated, saying why.
        return Err(if error.contains("audience") {
            Refusal::WrongAudience(error)
        } else {
            Refusal::InvalidToken(error)
        });
    }
    let audiences = status.audiences.unwrap_or_default();
    if !audiences.iter().any(|a| a == TOKEN_AUDIENCE) {
        return Err(Refusal::WrongAudience(format!("it is for {audiences:?}")));
    }
    let user = status.user.unwrap_or_default();
    let username = user.username.unwrap_or_default();
    let not_a_service_account = || Refusal::InvalidToken(format!("{username:?} is not a ServiceAccount"));
    let (namespace, service_account) = username
        .strip_prefix("system:serviceaccount:")
        .and_then(|rest| rest.split_once(':'))
        .ok_or_else(not_a_service_account)?;
    let extra = user.extra.unwrap_or_default();
    let first = |key: &str| extra.get(key).and_then(|v| v.first()).cloned();
    let pod = first(POD_NAME_EXTRA).zip(first(POD_UID_EXTRA));
    Ok(Identity { namespace: namespace.to_owned(), service_account: service_account.to_owned(), pod })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    use k8s_openapi::api::authentication::v1::{TokenReviewStatus, UserInfo};

    fn reviewed(username: &str, audiences: &[&str], pod: Option<(&str, &str)>) -> TokenReviewStatus {
        let extra = pod.map(|(name, uid)| {
            BTreeMap::from([
                (POD_NAME_EXTRA.to_owned(), vec![name.to_owned()]),
                (POD_UID_EXTRA.to_owned(), vec![uid.to_owned()]),
            ])
        });
        TokenReviewStatus {
            authenticated: Some(true),
            audiences: Some(audiences.iter().map(|a| (*a).to_owned()).collect()),
            user: Some(UserInfo { username: Some(username.to_owned()), extra, ..Default::default() }),
            ..Default::default()
        }
    }

    #[test]
    fn a_service_account_token_names_its_namespace_and_pod() {
        let identity =
            identity_of(reviewed("system:serviceaccount:shop:web", &["l4proxy.dev"], Some(("web-1", "u1")))).unwrap();
        assert_eq!(
            identity,
            Identity {
                namespace: "shop".into(),
                service_account: "web".into(),
                pod: Some(("web-1".into(), "u1".into()))
            }
        );
    }

    #[test]
    fn a_token_the_api_server_refuses_for_its_audience_is_a_wrong_audience() {
        let refused = TokenReviewStatus {
            authenticated: Some(false),
            error: Some(r#"[invalid bearer token, token audiences ["https://kubernetes.default.svc"] is invalid for the target audiences ["l4proxy.dev"]]"#.into()),
            ..Default::default()
        };
        assert_eq!(identity_of(refused).unwrap_err().label(), "wrong_audience");
    }

    #[test]
    fn tokens_are_refused_with_their_reason() {
        let wrong = identity_of(reviewed("system:serviceaccount:shop:web", &["https://kubernetes.default.svc"], None));
        assert_eq!(wrong.unwrap_err().label(), "wrong_audience");
        let user = identity_of(reviewed("alice", &["l4proxy.dev"], None));
        assert_eq!(user.unwrap_err().label(), "invalid_token");
        let invalid = identity_of(TokenReviewStatus {
            authenticated: Some(false),
            error: Some("expired".into()),
            ..Default::default()
        });
        assert_eq!(invalid.unwrap_err(), Refusal::InvalidToken("expired".into()));
        assert_eq!(Refusal::NoToken.status().code(), tonic::Code::Unauthenticated);
        assert_eq!(Refusal::NotFound("shop/db".into()).status().code(), tonic::Code::NotFound);
    }
}
