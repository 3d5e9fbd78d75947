//! The stream loop: connect, say Hello, apply and acknowledge every pushed version, report stats
//! every interval, and reconnect when the stream ends (at once after a clean close, with backoff
//! after anything else). The proxy serves its last config throughout.

use std::{sync::Arc, time::Duration};

use futures::{Stream, StreamExt as _};
use tokio::{sync::mpsc, task::JoinHandle, time::Instant};
use tonic::{Code, Request};

use super::{
    MAX_MESSAGE_BYTES, Settings, Status,
    backoff::Retries,
    proto::{
        Hello, OperatorMessage, ProxyMessage, config_service_client::ConfigServiceClient, operator_message,
        proxy_message::Message,
    },
    report::stats_report,
    token::{self, TokenError},
    update,
};
use crate::{
    Proxy,
    config::{Config, ConfigDuration},
    metrics::Metrics,
    server::ApplyError,
};

/// How long opening a stream may take: TCP, TLS and the operator's answer together.
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);
/// Messages waiting for the stream to take them. Acks wait for room (the operator sends only the
/// newest version, so few are ever due); a stats report that finds no room is dropped, as the
/// next one carries the same cumulative counters.
const OUTBOUND_QUEUE: usize = 8;

/// Why a stream ended, or could not be opened.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error(transparent)]
    Token(TokenError),
    #[error("cannot connect")]
    Connect(#[source] tonic::transport::Error),
    #[error("no answer within {}", ConfigDuration(OPEN_TIMEOUT))]
    Timeout,
    #[error("subscription refused: {}", describe(.0))]
    Refused(tonic::Status),
    #[error("stream failed: {}", describe(.0))]
    Ended(tonic::Status),
}

fn describe(status: &tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

impl Failure {
    /// A short label for logs: a failure with another label than the last one is logged.
    fn label(&self) -> &'static str {
        match self {
            Self::Token(_) => "token",
            Self::Connect(_) => "connect",
            Self::Timeout => "timeout",
            Self::Refused(status) => match status.code() {
                Code::Unauthenticated => "unauthenticated",
                Code::PermissionDenied => "permission_denied",
                Code::NotFound => "not_found",
                Code::InvalidArgument => "invalid_argument",
                Code::Unavailable => "unavailable",
                _ => "refused",
            },
            Self::Ended(_) => "stream",
        }
    }
}

/// Starts a proxy that follows its control plane: it serves `bootstrap` at once (or only its
/// admin server: not ready until the first push), then every version pushed. The task returned
/// is the client; abort it to stop following (the proxy serves on).
pub async fn start(
    settings: Settings,
    bootstrap: Option<Config>,
    metrics: Arc<Metrics>,
) -> Result<(Arc<Proxy>, JoinHandle<()>), ApplyError> {
    let status = Arc::new(Status::new(&metrics, &settings.url, &settings.resource.to_string(), bootstrap.is_some()));
    let config = settings.first_config(bootstrap);
    let proxy = Proxy::start_controlled(config, metrics, status.clone()).await?;
    let client = Client { settings, proxy: proxy.clone(), status };
    Ok((proxy, tokio::spawn(client.run())))
}

/// Follows one control plane for one proxy.
struct Client {
    settings: Settings,
    proxy: Arc<Proxy>,
    status: Arc<Status>,
}

impl Client {
    /// Runs until its task is aborted.
    async fn run(self) {
        let mut retries = self.settings.backoff.retries();
        loop {
            match self.session(&mut retries).await {
                Ok(()) => self.status.closed_cleanly(),
                Err(failure) => {
                    self.status.failed(failure.label(), super::chain(&failure));
                    tokio::time::sleep(retries.next_delay()).await;
                }
            }
        }
    }

    /// One stream, from connect to its end: `Ok` when the control plane ended it with status
    /// OK. The token is read now, so a rotated one is used from this stream on.
    async fn session(&self, retries: &mut Retries) -> Result<(), Failure> {
        let token = token::bearer(&self.settings.token_file).await.map_err(Failure::Token)?;
        let (outbound, queued) = mpsc::channel(OUTBOUND_QUEUE);
        let mut request = Request::new(outgoing(self.hello(), queued));
        request.metadata_mut().insert("authorization", token);
        let open = async {
            let channel = self.settings.endpoint.connect().await.map_err(Failure::Connect)?;
            let mut client = ConfigServiceClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES);
            client.subscribe(request).await.map_err(Failure::Refused)
        };
        let mut inbound = tokio::time::timeout(OPEN_TIMEOUT, open).await.map_err(|_| Failure::Timeout)??.into_inner();
        self.status.connected();

        let every = self.settings.stats_interval;
        let mut report = tokio::time::interval_at(Instant::now() + every, every);
        report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                message = inbound.message() => match message.map_err(Failure::Ended)? {
                    None => return Ok(()),
                    Some(OperatorMessage { message: Some(operator_message::Message::Config(update)) }) => {
                        // A stream that delivers a config works: the next failure backs off
                        // from the first step again.
                        retries.reset();
                        let ack = update::apply(&self.proxy, &self.status, update).await;
                        // Fails only once tonic has dropped the request stream, i.e. the call
                        // is over: the next read says how it ended.
                        let _ = outbound.send(ProxyMessage { message: Some(Message::Ack(ack)) }).await;
                    }
                    Some(OperatorMessage { message: None }) => {
                        tracing::debug!("a message this release does not know, from the control plane: ignored");
                    }
                },
                _ = report.tick() => {
                    let stats = stats_report(&self.proxy, self.status.applied_version());
                    let _ = outbound.try_send(ProxyMessage { message: Some(Message::Stats(stats)) });
                }
            }
        }
    }

    fn hello(&self) -> ProxyMessage {
        let resource = &self.settings.resource;
        ProxyMessage {
            message: Some(Message::Hello(Hello {
                namespace: resource.namespace.clone(),
                name: resource.name.clone(),
                proxy: self.settings.identity.clone(),
                proxy_version: env!("CARGO_PKG_VERSION").to_owned(),
                applied_version: self.status.applied_version(),
            })),
        }
    }
}

/// What the proxy sends on a stream: the Hello, then whatever the loop queues, until the
/// queue's sender is dropped with the session.
fn outgoing(hello: ProxyMessage, queued: mpsc::Receiver<ProxyMessage>) -> impl Stream<Item = ProxyMessage> {
    let rest = futures::stream::unfold(queued, |mut queued| async move { queued.recv().await.map(|m| (m, queued)) });
    futures::stream::once(std::future::ready(hello)).chain(rest)
}
