//! A config service for the control-plane tests: the real protocol over TLS on 127.0.0.1 (a
//! tonic server with an rcgen CA and a certificate for 127.0.0.1), played by the test. It
//! records every stream (token, Hello, every message the proxy sent), pushes versions to the
//! newest stream, ends a stream cleanly, goes away and comes back on the same address.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, Mutex},
};

use futures::Stream;
use l4proxy::control::proto::{
    Ack, ConfigUpdate, Hello, OperatorMessage, ProxyMessage, StatsReport,
    config_service_server::{ConfigService, ConfigServiceServer},
    operator_message, proxy_message,
};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use tokio::{
    net::TcpListener,
    sync::{mpsc, oneshot},
    task::JoinHandle,
};
use tonic::{
    Request, Response, Status, Streaming,
    transport::{Identity, Server, ServerTlsConfig, server::TcpIncoming},
};

use super::support::{DEADLINE, wait_until};

type ToProxy = mpsc::Sender<Result<OperatorMessage, Status>>;

/// One stream, as the server saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    /// The `authorization` metadata, as sent.
    pub token: String,
    pub hello: Hello,
    /// Everything after the Hello, in order.
    pub messages: Vec<proxy_message::Message>,
    /// False once the proxy's side of the stream has ended.
    pub open: bool,
}

impl Seen {
    pub fn acks(&self) -> impl Iterator<Item = &Ack> {
        self.messages.iter().filter_map(|m| match m {
            proxy_message::Message::Ack(ack) => Some(ack),
            _ => None,
        })
    }

    pub fn stats(&self) -> impl Iterator<Item = &StatsReport> {
        self.messages.iter().filter_map(|m| match m {
            proxy_message::Message::Stats(report) => Some(report),
            _ => None,
        })
    }
}

struct Recorded {
    seen: Seen,
    /// Dropping it ends the stream with status OK.
    to_proxy: Option<ToProxy>,
}

#[derive(Clone, Default)]
struct Streams(Arc<Mutex<Vec<Recorded>>>);

impl Streams {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Recorded>> {
        self.0.lock().unwrap()
    }
}

pub struct ControlServer {
    pub address: SocketAddr,
    pub url: String,
    pub ca_file: PathBuf,
    pub token_file: PathBuf,
    identity: Identity,
    streams: Streams,
    running: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
}

impl ControlServer {
    /// A fresh CA and server certificate in `dir` (`ca.crt`), a token file (`token`, holding
    /// "first-token"), and the server listening on a free port of 127.0.0.1.
    pub async fn start(dir: &Path) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_key = KeyPair::generate().unwrap();
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let ca = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap().signed_by(&key, &ca).unwrap();

        let ca_file = dir.join("ca.crt");
        std::fs::write(&ca_file, ca_cert.pem()).unwrap();
        let token_file = dir.join("token");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let mut server = Self {
            address,
            url: format!("https://{address}"),
            ca_file,
            token_file,
            identity: Identity::from_pem(cert.pem(), key.serialize_pem()),
            streams: Streams::default(),
            running: None,
        };
        server.rotate_token("first-token");
        server.serve(listener);
        server
    }

    fn serve(&mut self, listener: TcpListener) {
        let (stop, stopped) = oneshot::channel();
        let router = Server::builder()
            .tls_config(ServerTlsConfig::new().identity(self.identity.clone()))
            .unwrap()
            .add_service(ConfigServiceServer::new(Service(self.streams.clone())));
        let task = tokio::spawn(async move {
            let incoming = TcpIncoming::from(listener);
            router.serve_with_incoming_shutdown(incoming, async { drop(stopped.await) }).await.unwrap();
        });
        self.running = Some((stop, task));
    }

    /// Goes away as an operator that dies does: stops accepting and ends every open stream with
    /// UNAVAILABLE (not a clean close), then waits until the server has stopped.
    pub async fn stop(&mut self) {
        let (stop, task) = self.running.take().expect("the server is running");
        let _ = stop.send(());
        for recorded in self.streams.lock().iter_mut() {
            if let Some(to_proxy) = recorded.to_proxy.take() {
                let _ = to_proxy.try_send(Err(Status::unavailable("the test server goes away")));
            }
        }
        tokio::time::timeout(DEADLINE, task).await.expect("the server stops in time").unwrap();
    }

    /// Listens again on the same address.
    pub async fn restart(&mut self) {
        let listener = TcpListener::bind(self.address).await.expect("the same address again");
        self.serve(listener);
    }

    /// Writes a new token the way the kubelet does (write, then rename over the old file).
    pub fn rotate_token(&self, token: &str) {
        let tmp = self.token_file.with_extension("tmp");
        std::fs::write(&tmp, format!("{token}\n")).unwrap();
        std::fs::rename(&tmp, &self.token_file).unwrap();
    }

    /// Streams opened so far.
    pub fn count(&self) -> usize {
        self.streams.lock().len()
    }

    /// What stream `index` (0: the first) has seen so far.
    pub fn seen(&self, index: usize) -> Seen {
        self.streams.lock()[index].seen.clone()
    }

    /// Waits until stream `index` is open, and returns what it has seen.
    pub async fn stream(&self, index: usize) -> Seen {
        wait_until(&format!("stream {index} is open"), || self.count() > index).await;
        self.seen(index)
    }

    /// Waits until `found` finds something in what stream `index` has seen.
    pub async fn wait_for<T>(&self, index: usize, what: &str, found: impl Fn(&Seen) -> Option<T>) -> T {
        let mut result = None;
        wait_until(what, || {
            result = self.streams.lock().get(index).and_then(|r| found(&r.seen));
            result.is_some()
        })
        .await;
        result.unwrap()
    }

    /// Sends a version on the newest stream, and waits for the Ack that names its nonce.
    pub async fn push(&self, version: &str, nonce: &str, listeners: serde_json::Value) -> Ack {
        let update = ConfigUpdate {
            version: version.to_owned(),
            nonce: nonce.to_owned(),
            listeners_json: serde_json::to_vec(&listeners).unwrap(),
        };
        let (index, to_proxy) = {
            let streams = self.streams.lock();
            let index = streams.len().checked_sub(1).expect("a stream is open");
            (index, streams[index].to_proxy.clone().expect("the newest stream is open"))
        };
        let message = OperatorMessage { message: Some(operator_message::Message::Config(update)) };
        to_proxy.send(Ok(message)).await.expect("the stream takes the update");
        self.wait_for(index, &format!("the ack of nonce {nonce}"), |seen| {
            seen.acks().find(|a| a.nonce == nonce).cloned()
        })
        .await
    }

    /// Ends the newest stream with status OK, as an operator that shuts down does.
    pub fn close_cleanly(&self) {
        let mut streams = self.streams.lock();
        let newest = streams.last_mut().expect("a stream is open");
        newest.to_proxy.take().expect("the newest stream is open");
    }
}

struct Service(Streams);

#[tonic::async_trait]
impl ConfigService for Service {
    type SubscribeStream = Pin<Box<dyn Stream<Item = Result<OperatorMessage, Status>> + Send>>;

    async fn subscribe(
        &self,
        request: Request<Streaming<ProxyMessage>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let token = request.metadata().get("authorization").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
        let mut inbound = request.into_inner();
        let hello = match inbound.message().await? {
            Some(ProxyMessage { message: Some(proxy_message::Message::Hello(hello)) }) => hello,
            other => return Err(Status::invalid_argument(format!("a stream starts with a Hello, not {other:?}"))),
        };
        let (to_proxy, queued) = mpsc::channel(16);
        let index = {
            let mut streams = self.0.lock();
            let seen = Seen { token, hello, messages: Vec::new(), open: true };
            streams.push(Recorded { seen, to_proxy: Some(to_proxy) });
            streams.len() - 1
        };
        let streams = self.0.clone();
        tokio::spawn(async move {
            while let Ok(Some(ProxyMessage { message: Some(message) })) = inbound.message().await {
                streams.lock()[index].seen.messages.push(message);
            }
            streams.lock()[index].seen.open = false;
        });
        let outbound =
            futures::stream::unfold(queued, |mut queued| async move { queued.recv().await.map(|m| (m, queued)) });
        Ok(Response::new(Box::pin(outbound)))
    }
}
