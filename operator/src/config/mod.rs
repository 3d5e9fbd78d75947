//! The config service: proxies dial in over gRPC and TLS (see
//! `proxy/proto/l4proxy/control/v1/control.proto`), authenticate with a ServiceAccount token
//! ([`auth`]), and receive their resource's effective config at once and on every change
//! ([`session`]); what they report is held in the [`registry`] for the resource's status.

pub mod auth;
pub mod registry;
mod session;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use kube::runtime::reflector::Store;
use l4proxy::control::{
    MAX_MESSAGE_BYTES,
    proto::{ProxyMessage, config_service_server::ConfigServiceServer},
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::{api::crd::L4Proxy, metrics::Metrics, model::configs::ConfigStore};
pub use registry::Registry;

/// HTTP/2 keepalive: a ping this often, and the connection ends when one is not answered in
/// [`KEEPALIVE_TIMEOUT`] (a proxy that vanished without a FIN is noticed).
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// What every session shares.
pub struct Shared {
    pub auth: auth::Authenticator,
    pub configs: Arc<ConfigStore>,
    /// The `L4Proxy` resources, as the controller's watch sees them.
    pub resources: Store<L4Proxy>,
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    /// Cancelled when the operator stops: every stream ends cleanly, so proxies reconnect at
    /// once (to another replica).
    pub shutdown: CancellationToken,
}

struct Service(Arc<Shared>);

#[tonic::async_trait]
impl l4proxy::control::proto::config_service_server::ConfigService for Service {
    type SubscribeStream = session::Pushes;

    async fn subscribe(
        &self,
        request: Request<Streaming<ProxyMessage>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        session::subscribe(self.0.clone(), request).await
    }
}

/// Serves the config service on `socket` with `tls` until `shared.shutdown`.
pub async fn serve(socket: TcpListener, tls: Arc<rustls::ServerConfig>, shared: Arc<Shared>) {
    let address = socket.local_addr().ok();
    let shutdown = shared.shutdown.clone();
    let incoming = crate::tls::tls("config service", socket, tls, shutdown.clone());
    let service = ConfigServiceServer::new(Service(shared))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let served = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await;
    if let Err(error) = served {
        tracing::error!(?address, %error, "config service failed");
    }
}

/// The address the config service listens on, for logs.
pub fn describe(address: SocketAddr) -> String {
    format!("https://{address}")
}
