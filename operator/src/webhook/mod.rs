//! The mutating admission webhook that injects the proxy sidecar: `POST /inject` over TLS with
//! the operator's serving certificate (signed by the `l4proxy-ca` CA, whose certificate
//! [`ca_bundle`] keeps in the webhook configuration's `caBundle`). What a pod gets is decided in
//! [`crate::model::injection`]; this module reads what the decision needs (the namespace's
//! labels, its `L4Proxy` resources from the controller's cache) and answers the API server.
//!
//! Every replica serves the webhook (it only reads), so it answers while another holds the lease.
//! An answer the webhook cannot give (the namespace cannot be read) is an HTTP 503, so that the
//! configuration's `failurePolicy` decides; a pod it refuses is a denial naming the annotation.

pub mod ca_bundle;

use std::{sync::Arc, time::Duration};

use axum::{
    Router,
    body::Bytes,
    extract::{DefaultBodyLimit, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::post,
};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
    service::TowerToHyperService,
};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{
    Api, Client, Resource, ResourceExt,
    core::{
        DynamicObject,
        admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation},
    },
    runtime::{
        events::{Event, EventType, Recorder},
        reflector::Store,
    },
};
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    api::crd::L4Proxy,
    metrics::{Metrics, Write},
    model::injection::{self, Decision, Sidecar},
};

/// The path the webhook configuration calls.
pub const PATH: &str = "/inject";
/// Most connections from API servers at once (each API server keeps a few open).
pub const MAX_CONNECTIONS: usize = 256;
/// A connection that sends no complete request headers for this long is closed.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest AdmissionReview read: a pod is at most ~1.5 MiB in etcd, and a review may carry it
/// twice (object and oldObject).
pub const MAX_REVIEW_BYTES: usize = 4 << 20;
/// Events about unmatched pods being published at once; beyond, an Event is skipped (and
/// counted): admission never waits on one.
const MAX_PENDING_EVENTS: usize = 64;

/// What the webhook needs from the rest of the operator.
pub struct Injector {
    pub sidecar: Sidecar,
    pub client: Client,
    /// The `L4Proxy` resources, as the controller's watch sees them.
    pub resources: Store<L4Proxy>,
    /// Namespaces whose pods are never touched: `kube-system` and the operator's own.
    pub excluded_namespaces: Vec<String>,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    events: Arc<Semaphore>,
}

impl Injector {
    pub fn new(
        sidecar: Sidecar,
        client: Client,
        resources: Store<L4Proxy>,
        operator_namespace: &str,
        recorder: Recorder,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            sidecar,
            client,
            resources,
            excluded_namespaces: vec!["kube-system".to_owned(), operator_namespace.to_owned()],
            recorder,
            metrics,
            events: Arc::new(Semaphore::new(MAX_PENDING_EVENTS)),
        }
    }

    /// The answer to one request, or `Err` (a 503) when it cannot be decided.
    async fn admit(&self, request: &AdmissionRequest<Pod>) -> Result<AdmissionResponse, String> {
        let response = AdmissionResponse::from(request);
        let namespace = request.namespace.as_deref().unwrap_or_default();
        let Some(pod) = request.object.as_ref().filter(|_| request.operation == Operation::Create) else {
            return Ok(self.untouched(response, "not_a_create"));
        };
        if self.excluded_namespaces.iter().any(|n| n == namespace) {
            return Ok(self.untouched(response, "excluded_namespace"));
        }
        let opted_in = match injection::pod_opts_in(pod) {
            Some(decided) => decided,
            None => {
                let namespaces: Api<Namespace> = Api::all(self.client.clone());
                let found = namespaces
                    .get_opt(namespace)
                    .await
                    .map_err(|e| format!("reading namespace {namespace}'s labels: {e}"))?;
                found.is_some_and(|ns| injection::namespace_opts_in(ns.labels()))
            }
        };
        if !opted_in {
            return Ok(self.untouched(response, "not_opted_in"));
        }
        let proxies: Vec<Arc<L4Proxy>> =
            self.resources.state().into_iter().filter(|p| p.namespace().as_deref() == Some(namespace)).collect();
        let pod_name = pod.metadata.name.clone().or_else(|| pod.metadata.generate_name.clone()).unwrap_or_default();
        match injection::decide(&self.sidecar, namespace, pod, &proxies) {
            Decision::AlreadyInjected => Ok(self.untouched(response, "already_injected")),
            Decision::Inject { proxy, patch } => {
                self.metrics.admission("injected");
                tracing::info!(namespace, pod = pod_name, proxy, dry_run = request.dry_run, "injecting the sidecar");
                response.with_patch(patch).map_err(|e| format!("serialising the patch: {e}"))
            }
            Decision::Unmatched { warning, tell } => {
                self.metrics.admission("unmatched");
                tracing::info!(namespace, pod = pod_name, why = warning, "admitted without a sidecar");
                if !request.dry_run {
                    self.tell(&tell, format!("pod {pod_name}: {warning}"));
                }
                let mut response = response;
                response.warnings = Some(vec![warning]);
                Ok(response)
            }
            Decision::Refused(message) => {
                self.metrics.admission("refused");
                tracing::info!(namespace, pod = pod_name, why = message, "pod refused");
                let mut response = response.deny(message);
                response.result.code = 400;
                response.result.reason = "BadRequest".into();
                Ok(response)
            }
        }
    }

    fn untouched(&self, response: AdmissionResponse, why: &'static str) -> AdmissionResponse {
        self.metrics.admission(why);
        response
    }

    /// An Event on each of `proxies`, in the background and bounded.
    fn tell(&self, proxies: &[Arc<L4Proxy>], note: String) {
        for proxy in proxies {
            let Ok(place) = self.events.clone().try_acquire_owned() else {
                self.metrics.admission_event_skipped();
                continue;
            };
            let (recorder, metrics, reference) = (self.recorder.clone(), self.metrics.clone(), proxy.object_ref(&()));
            let event = Event {
                type_: EventType::Warning,
                reason: "SidecarNotInjected".into(),
                note: Some(note.chars().take(1024).collect()),
                action: "Inject".into(),
                secondary: None,
            };
            tokio::spawn(async move {
                let _place = place;
                match recorder.publish(&event, &reference).await {
                    Ok(()) => metrics.wrote(Write::Event),
                    Err(error) => tracing::warn!(%error, "publishing an Event failed"),
                }
            });
        }
    }
}

async fn inject(State(injector): State<Arc<Injector>>, body: Bytes) -> Response {
    let review: AdmissionReview<Pod> = match serde_json::from_slice(&body) {
        Ok(review) => review,
        Err(error) => {
            injector.metrics.admission("bad_request");
            return (StatusCode::BAD_REQUEST, format!("not an AdmissionReview of a Pod: {error}\n")).into_response();
        }
    };
    let request: AdmissionRequest<Pod> = match review.try_into() {
        Ok(request) => request,
        Err(error) => {
            injector.metrics.admission("bad_request");
            return (StatusCode::BAD_REQUEST, format!("{error}\n")).into_response();
        }
    };
    match injector.admit(&request).await {
        Ok(response) => axum::Json::<AdmissionReview<DynamicObject>>(response.into_review()).into_response(),
        Err(why) => {
            injector.metrics.admission("error");
            tracing::warn!(uid = request.uid, why, "admission not decided");
            (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")).into_response()
        }
    }
}

/// The webhook's routes.
pub fn router(injector: Arc<Injector>) -> Router {
    Router::new().route(PATH, post(inject)).layer(DefaultBodyLimit::max(MAX_REVIEW_BYTES)).with_state(injector)
}

/// Serves the webhook on `socket` with `tls` until `stop`: HTTP/1.1 or HTTP/2, as the API server
/// chooses, at most [`MAX_CONNECTIONS`] at once.
pub async fn serve(
    socket: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    injector: Arc<Injector>,
    stop: CancellationToken,
) {
    use futures::StreamExt;
    let app = router(injector);
    let places = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let connections = TaskTracker::new();
    let mut incoming = std::pin::pin!(crate::tls::tls("webhook", socket, tls, stop.clone()));
    loop {
        let place = tokio::select! {
            () = stop.cancelled() => break,
            place = places.clone().acquire_owned() => place.expect("the semaphore is never closed"),
        };
        let stream = tokio::select! {
            () = stop.cancelled() => break,
            next = incoming.next() => match next {
                Some(Ok(stream)) => stream,
                Some(Err(error)) => {
                    tracing::debug!(%error, "webhook connection failed");
                    continue;
                }
                None => break,
            },
        };
        let service = TowerToHyperService::new(app.clone());
        let stop = stop.clone();
        connections.spawn(async move {
            let _place = place;
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder.http1().timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
            builder.http2().timer(TokioTimer::new()).keep_alive_interval(Some(Duration::from_secs(20)));
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                () = stop.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(1), connection).await;
                }
            }
        });
    }
    connections.close();
    let _ = tokio::time::timeout(Duration::from_secs(1), connections.wait()).await;
}
