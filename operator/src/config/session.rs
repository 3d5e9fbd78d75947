//! One proxy's stream: authentication, the Hello, the pushes of the resource's config (the
//! newest version each time, never a queue), and the Acks and stats reports coming back.

use std::{pin::Pin, sync::Arc, time::Duration};

use futures::Stream;
use kube::runtime::reflector::ObjectRef;
use l4proxy::control::proto::{
    Ack, ConfigUpdate, Hello, OperatorMessage, ProxyMessage, StatsReport, operator_message, proxy_message,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use super::{
    Shared,
    auth::Refusal,
    registry::{Full, Registration},
};
use crate::{
    api::crd::L4Proxy,
    model::{
        configs::{Published, ResourceKey},
        gateway::gateway_listeners,
        proxies::ListenerTotals,
    },
};

/// How long a new stream may take to send its Hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// The stream of pushes to one proxy.
pub type Pushes = Pin<Box<dyn Stream<Item = Result<OperatorMessage, Status>> + Send>>;

/// Serves one `Subscribe` call.
pub async fn subscribe(
    shared: Arc<Shared>,
    request: Request<Streaming<ProxyMessage>>,
) -> Result<Response<Pushes>, Status> {
    let refused = |refusal: Refusal| {
        shared.metrics.refused(refusal.label());
        tracing::info!(reason = refusal.label(), %refusal, "proxy refused");
        refusal.status()
    };
    let token = bearer(request.metadata());
    let identity = shared.auth.identify(token, &shared.metrics).await.map_err(refused)?;
    let mut inbound = request.into_inner();
    let hello = read_hello(&mut inbound).await.map_err(refused)?;
    let key: ResourceKey = (hello.namespace.clone(), hello.name.clone());
    let resource = format!("{}/{}", hello.namespace, hello.name);
    let proxy = shared
        .resources
        .get(&ObjectRef::<L4Proxy>::new(&hello.name).within(&hello.namespace))
        .ok_or_else(|| Refusal::NotFound(resource.clone()))
        .map_err(refused)?;
    let gateway = shared.auth.authorize(&identity, &proxy).await.map_err(refused)?;
    let name = if hello.proxy.is_empty() {
        format!("{}/{}", identity.namespace, identity.service_account)
    } else {
        hello.proxy.clone()
    };
    let registration = shared.registry.register(key.clone(), name.clone()).map_err(|Full(max)| {
        shared.metrics.refused("full");
        Status::resource_exhausted(format!("this operator replica serves {max} proxies, the most it may; try another"))
    })?;
    if !hello.applied_version.is_empty() {
        registration.applied(&hello.applied_version);
    }
    tracing::info!(proxy = %name, %resource, gateway, applied = %hello.applied_version, "proxy connected");
    shared.metrics.connected(shared.registry.connected());

    // The stream ends when the proxy goes (its inbound side ends) or the operator stops.
    let done = shared.shutdown.child_token();
    let pushes = shared.configs.subscribe(&key);
    tokio::spawn(receive(
        inbound,
        registration,
        Peer {
            shared: shared.clone(),
            since: tokio::time::Instant::now(),
            name,
            resource,
            pushes: pushes.clone(),
            done: done.clone(),
        },
    ));
    Ok(Response::new(push_stream(pushes, gateway, done, shared.metrics.clone())))
}

/// The token from `authorization: Bearer <token>`.
fn bearer(metadata: &tonic::metadata::MetadataMap) -> Option<&str> {
    metadata.get("authorization")?.to_str().ok()?.strip_prefix("Bearer ").map(str::trim)
}

async fn read_hello(inbound: &mut Streaming<ProxyMessage>) -> Result<Hello, Refusal> {
    let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
        .await
        .map_err(|_| Refusal::BadRequest(format!("no Hello within {HELLO_TIMEOUT:?}")))?
        .map_err(|e| Refusal::BadRequest(format!("reading the Hello: {}", e.message())))?;
    match first.and_then(|m| m.message) {
        Some(proxy_message::Message::Hello(hello)) if !hello.namespace.is_empty() && !hello.name.is_empty() => {
            Ok(hello)
        }
        Some(proxy_message::Message::Hello(_)) => {
            Err(Refusal::BadRequest("the Hello names no resource (namespace and name)".into()))
        }
        _ => Err(Refusal::BadRequest("a stream starts with a Hello".into())),
    }
}

/// The pushes: the current config (if there is one) at once, then each new version; the
/// newest only, since a watch channel holds one value.
fn push_stream(
    pushes: watch::Receiver<Option<Published>>,
    gateway: bool,
    done: CancellationToken,
    metrics: Arc<crate::metrics::Metrics>,
) -> Pushes {
    let state = (pushes, done, 0u64, true);
    Box::pin(futures::stream::unfold(state, move |(mut pushes, done, mut nonce, first)| {
        let metrics = metrics.clone();
        async move {
            loop {
                if !first || pushes.borrow().is_none() {
                    tokio::select! {
                        biased;
                        () = done.cancelled() => return None,
                        changed = pushes.changed() => changed.ok()?,
                    }
                }
                let published = pushes.borrow_and_update().clone();
                let Some(published) = published else { continue };
                nonce += 1;
                let update = update_of(&published, gateway, nonce);
                metrics.pushed();
                let message = OperatorMessage { message: Some(operator_message::Message::Config(update)) };
                return Some((Ok(message), (pushes, done, nonce, false)));
            }
        }
    }))
}

fn update_of(published: &Published, gateway: bool, nonce: u64) -> ConfigUpdate {
    let config = &published.config;
    let listeners = if gateway { gateway_listeners(&config.listeners) } else { config.listeners.clone() };
    ConfigUpdate {
        version: config.version.to_string(),
        nonce: nonce.to_string(),
        listeners_json: serde_json::to_vec(&listeners).expect("listeners always serialise"),
    }
}

/// What the inbound side needs of the session.
struct Peer {
    shared: Arc<Shared>,
    /// When the stream began: versions older than that were not pushed because they changed.
    since: tokio::time::Instant,
    name: String,
    resource: String,
    pushes: watch::Receiver<Option<Published>>,
    done: CancellationToken,
}

/// Reads Acks and stats reports until the proxy goes, then ends the session.
async fn receive(mut inbound: Streaming<ProxyMessage>, registration: Registration, peer: Peer) {
    let why = loop {
        let message = tokio::select! {
            () = peer.done.cancelled() => break "the operator is stopping".to_owned(),
            message = inbound.message() => message,
        };
        match message {
            Ok(Some(ProxyMessage { message: Some(proxy_message::Message::Ack(ack)) })) => {
                on_ack(&peer, &registration, ack)
            }
            Ok(Some(ProxyMessage { message: Some(proxy_message::Message::Stats(report)) })) => {
                registration.report(totals_of(report));
            }
            Ok(Some(_)) => break "it sent a second Hello or an empty message".to_owned(),
            Ok(None) => break "it closed the stream".to_owned(),
            Err(status) => break format!("the stream failed: {}", status.message()),
        }
    };
    peer.done.cancel();
    drop(registration);
    peer.shared.metrics.connected(peer.shared.registry.connected());
    tracing::info!(proxy = %peer.name, resource = %peer.resource, why, "proxy disconnected");
}

fn on_ack(peer: &Peer, registration: &Registration, ack: Ack) {
    if ack.applied {
        registration.applied(&ack.version);
        peer.shared.metrics.applied();
        let pushed = peer.pushes.borrow();
        // Only for a version that appeared while this proxy was connected: the latency of a push
        // caused by a change, not of a first config at connect time.
        let changed_since_connect =
            |p: &&Published| p.since >= peer.since && p.config.version.to_string() == ack.version;
        if let Some(published) = pushed.as_ref().filter(changed_since_connect) {
            peer.shared.metrics.push_latency(published.since.elapsed());
        }
    } else {
        registration.rejected(&ack.version, &ack.error);
        peer.shared.metrics.rejected();
        tracing::warn!(proxy = %peer.name, resource = %peer.resource, version = %ack.version, error = %ack.error, "proxy rejected a config");
    }
}

fn totals_of(report: StatsReport) -> Vec<ListenerTotals> {
    report
        .listeners
        .into_iter()
        .map(|l| {
            let pool = l.pool_stats.unwrap_or_default();
            ListenerTotals {
                name: l.name,
                size: pool.size,
                max_size: pool.max_size,
                expired_count: pool.expired_count,
                age_weight: pool.size as f64 * pool.average_age_seconds,
                active: l.active,
                accepted: l.accepted,
                rejected: l.rejected,
                bytes_received: l.bytes_received,
                bytes_sent: l.bytes_sent,
            }
        })
        .collect()
}
