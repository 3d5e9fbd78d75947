//! The CA and serving certificate (`certs`) against a real kube-apiserver + etcd on loopback:
//! Secret and ConfigMap `l4proxy-ca`, replicas racing, rotation seen by real TLS handshakes.

use std::{collections::BTreeMap, net::SocketAddr, sync::Arc, time::Duration};

use k8s_openapi::{
    ByteString,
    api::core::v1::{ConfigMap, Secret},
};
use kube::{
    Api, Client,
    api::{DeleteParams, ObjectMeta, PostParams},
};
use l4proxy_operator::{
    certs::{Ca, Certificates, CertsConfig, CertsError, ServingNames, ServingPolicy, service_dns_names},
    metrics::Metrics,
};
use l4proxy_testenv::{ControlPlane, TestNamespace, wait_for};
use rustls::{
    ClientConfig, RootCertStore, ServerConfig,
    pki_types::{CertificateDer, ServerName, pem::PemObject as _},
};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;
use x509_parser::extensions::GeneralName;

const TIMEOUT: Duration = Duration::from_secs(30);
const SERVICE: &str = "l4proxy-operator";
const DAY: Duration = Duration::from_secs(24 * 3600);

async fn setup(prefix: &str) -> (Client, TestNamespace) {
    let control_plane = ControlPlane::shared();
    let client = control_plane.client().await;
    let namespace = control_plane.namespace(&client, prefix).await;
    (client, namespace)
}

/// The defaults, checked every 100 ms.
fn config(namespace: &str) -> CertsConfig {
    let mut config = CertsConfig::new(namespace, service_dns_names(SERVICE, namespace));
    config.check_interval = Duration::from_millis(100);
    config
}

/// `config`, but every serving certificate is due 2 s after it was issued (and so every 2 s).
fn rotating(namespace: &str) -> CertsConfig {
    let mut config = config(namespace);
    config.renew_before = config.serving_validity - Duration::from_secs(2);
    config
}

struct Replica {
    certs: Certificates,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
    /// A TLS server on loopback with `certs.server_config()`, started once.
    address: SocketAddr,
}

impl Replica {
    async fn start(client: &Client, config: CertsConfig) -> Result<Self, CertsError> {
        let metrics = Arc::new(Metrics::new());
        let stop = CancellationToken::new();
        let certs = Certificates::start(client.clone(), config, metrics.clone(), stop.clone()).await?;
        let address = serve_tls(certs.server_config()).await;
        Ok(Self { certs, metrics, stop, address })
    }

    /// The leaf certificate this replica presents to a client that trusts only its CA.
    async fn presented(&self) -> CertificateDer<'static> {
        presented(self.address, &self.certs.ca_pem(), "127.0.0.1").await
    }

    async fn stop(self) {
        self.stop.cancel();
        self.certs.stopped().await;
    }
}

/// Completes TLS handshakes on a loopback port, with `config`, until the test ends.
async fn serve_tls(config: Arc<ServerConfig>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(config);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move { acceptor.accept(tcp).await.map(drop) });
        }
    });
    address
}

/// The leaf certificate presented at `address` to a client that trusts only `ca_pem`, asks for
/// `server_name` and offers ALPN h2 (as a gRPC client does). Panics when the handshake fails.
async fn presented(address: SocketAddr, ca_pem: &str, server_name: &str) -> CertificateDer<'static> {
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap()).unwrap();
    let mut config = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(address).await.unwrap();
    let name = ServerName::try_from(server_name.to_owned()).unwrap();
    let tls = TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap_or_else(|e| panic!("TLS handshake for {server_name}: {e}"));
    let (_, session) = tls.get_ref();
    assert_eq!(session.alpn_protocol(), Some(&b"h2"[..]));
    session.peer_certificates().unwrap()[0].clone().into_owned()
}

fn secrets(client: &Client, namespace: &TestNamespace) -> Api<Secret> {
    Api::namespaced(client.clone(), namespace.name())
}

fn text(secret: Secret) -> BTreeMap<String, String> {
    let data = secret.data.unwrap_or_default();
    data.into_iter().map(|(key, value)| (key, String::from_utf8(value.0).unwrap())).collect()
}

async fn stored(secrets: &Api<Secret>) -> BTreeMap<String, String> {
    text(secrets.get("l4proxy-ca").await.expect("Secret l4proxy-ca exists"))
}

fn der(pem: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
}

/// The subject alternative names, as `DNS:name` and `IP:address`.
fn alt_names(der: &CertificateDer<'_>) -> Vec<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    let san = cert.subject_alternative_name().unwrap().expect("a subjectAltName");
    san.value
        .general_names
        .iter()
        .map(|name| match name {
            GeneralName::DNSName(dns) => format!("DNS:{dns}"),
            GeneralName::IPAddress(ip) => format!("IP:{}", std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*ip).unwrap())),
            other => panic!("unexpected name {other:?}"),
        })
        .collect()
}

#[tokio::test]
async fn a_missing_secret_is_created_with_a_ca_and_a_serving_cert_for_the_names_and_loopback() {
    let (client, ns) = setup("certs-create").await;
    let replica = Replica::start(&client, config(ns.name())).await.expect("certificates start");

    let secret = secrets(&client, &ns).get("l4proxy-ca").await.unwrap();
    assert_eq!(secret.type_.as_deref(), Some("Opaque"));
    assert_eq!(secret.metadata.labels.unwrap()["app.kubernetes.io/managed-by"], "l4proxy-operator");
    let data = stored(&secrets(&client, &ns)).await;
    assert_eq!(data.keys().collect::<Vec<_>>(), ["ca.crt", "ca.key", "tls.crt", "tls.key"]);
    assert_eq!(data["ca.crt"], replica.certs.ca_pem());

    let leaf = der(&data["tls.crt"]);
    let service = format!("{SERVICE}.{}", ns.name());
    let mut names = alt_names(&leaf);
    names.sort();
    assert_eq!(
        names,
        [format!("DNS:{SERVICE}"), format!("DNS:{service}"), format!("DNS:{service}.svc"), "IP:127.0.0.1".into()]
    );
    // A client that trusts only the CA accepts it for each name (so it chains to the CA).
    for name in [SERVICE.to_owned(), format!("{service}.svc"), "127.0.0.1".into()] {
        assert_eq!(presented(replica.address, &replica.certs.ca_pem(), &name).await, leaf);
    }

    let (_, cert) = x509_parser::parse_x509_certificate(&leaf).unwrap();
    let expiry = cert.validity().not_after.timestamp();
    let text = replica.metrics.encode();
    assert!(text.contains(&format!("l4proxy_operator_serving_cert_expiry_timestamp_seconds {expiry}")), "{text}");
    assert!(text.contains("l4proxy_operator_serving_cert_rotations_total{reason=\"missing\"} 1"), "{text}");
    replica.stop().await;
}

#[tokio::test]
async fn the_ca_certificate_is_published_in_the_config_map() {
    let (client, ns) = setup("certs-configmap").await;
    let replica = Replica::start(&client, config(ns.name())).await.expect("certificates start");
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), ns.name());
    let config_map = config_maps.get("l4proxy-ca").await.expect("ConfigMap l4proxy-ca exists");
    assert_eq!(config_map.data.unwrap()["ca.crt"], replica.certs.ca_pem());
    assert_eq!(config_map.metadata.labels.unwrap()["app.kubernetes.io/managed-by"], "l4proxy-operator");
    assert!(!replica.certs.ca_pem().contains("PRIVATE KEY"));

    // Deleted, it is published again at the next check.
    config_maps.delete("l4proxy-ca", &DeleteParams::default()).await.unwrap();
    wait_for("the ConfigMap to be published again", TIMEOUT, || async {
        let data = config_maps.get("l4proxy-ca").await.ok()?.data?;
        (data["ca.crt"] == replica.certs.ca_pem()).then_some(())
    })
    .await;
    replica.stop().await;
}

#[tokio::test]
async fn two_replicas_starting_at_once_end_with_one_ca() {
    // Each round in a fresh namespace: both replicas find no Secret.
    for round in 0..3 {
        let (client, ns) = setup(&format!("certs-race-{round}")).await;
        // Two clients, each already connected, as two replicas have: neither waits on the other.
        let other = ControlPlane::shared().client().await;
        other.apiserver_version().await.unwrap();
        let (a, b) =
            tokio::join!(Replica::start(&client, config(ns.name())), Replica::start(&other, config(ns.name())));
        let (a, b) = (a.expect("replica a starts"), b.expect("replica b starts"));
        assert_eq!(a.certs.ca_pem(), b.certs.ca_pem(), "round {round}");
        let data = stored(&secrets(&client, &ns)).await;
        assert_eq!(data["ca.crt"], a.certs.ca_pem(), "round {round}");
        let leaf = der(&data["tls.crt"]);
        assert_eq!(a.presented().await, leaf, "round {round}");
        assert_eq!(b.presented().await, leaf, "round {round}");
        a.stop().await;
        b.stop().await;
    }
}

#[tokio::test]
async fn a_serving_cert_near_expiry_is_rotated_and_new_handshakes_present_the_new_one() {
    let (client, ns) = setup("certs-rotate").await;
    let replica = Replica::start(&client, rotating(ns.name())).await.expect("certificates start");
    let first = replica.presented().await;
    let ca = replica.certs.ca_pem();

    // The same TLS server, not restarted: a later handshake gets a new certificate.
    let rotated = wait_for("a handshake presenting a rotated certificate", TIMEOUT, || async {
        let leaf = replica.presented().await;
        (leaf != first).then_some(leaf)
    })
    .await;
    assert_eq!(alt_names(&rotated), alt_names(&first));
    assert_eq!(replica.certs.ca_pem(), ca, "the CA stays");
    let text = replica.metrics.encode();
    assert!(text.contains("l4proxy_operator_serving_cert_rotations_total{reason=\"expiring\"}"), "{text}");
    replica.stop().await;
}

#[tokio::test]
async fn a_second_replica_presents_the_rotation_the_first_stored() {
    let (client, ns) = setup("certs-pickup").await;
    let steady = Replica::start(&client, config(ns.name())).await.expect("replica starts");
    let first = steady.presented().await;
    // Same names and validity, but it finds every certificate due 2 s after issue.
    let rotating = Replica::start(&client, rotating(ns.name())).await.expect("rotating replica starts");
    let secrets = secrets(&client, &ns);

    wait_for("the steady replica to present what the other stored", TIMEOUT, || async {
        let current = der(stored(&secrets).await.get("tls.crt")?);
        (current != first && steady.presented().await == current).then_some(())
    })
    .await;
    assert_eq!(steady.certs.ca_pem(), rotating.certs.ca_pem());
    let text = steady.metrics.encode();
    assert!(!text.contains("reason=\"expiring\""), "the steady replica rotated nothing itself: {text}");
    rotating.stop().await;
    steady.stop().await;
}

#[tokio::test]
async fn a_deleted_secret_is_written_again_with_the_same_ca() {
    let (client, ns) = setup("certs-deleted").await;
    let replica = Replica::start(&client, config(ns.name())).await.expect("certificates start");
    let ca = replica.certs.ca_pem();
    let secrets = secrets(&client, &ns);
    secrets.delete("l4proxy-ca", &DeleteParams::default()).await.unwrap();
    let data = wait_for("the Secret to be written again", TIMEOUT, || async {
        secrets.get_opt("l4proxy-ca").await.ok()?.map(text)
    })
    .await;
    assert_eq!(data["ca.crt"], ca, "proxies keep trusting the same CA");
    replica.stop().await;
}

/// A Secret `l4proxy-ca` with `data` (strings), as a person or a chart might leave it.
fn secret_with(data: &[(&str, &str)]) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some("l4proxy-ca".into()),
            annotations: Some(BTreeMap::from([("example.com/note".into(), "kept".into())])),
            ..ObjectMeta::default()
        },
        data: Some(data.iter().map(|(k, v)| ((*k).to_owned(), ByteString(v.as_bytes().to_vec()))).collect()),
        ..Secret::default()
    }
}

#[tokio::test]
async fn an_empty_secret_made_beforehand_is_filled_and_keeps_its_annotations() {
    let (client, ns) = setup("certs-empty").await;
    let secrets = secrets(&client, &ns);
    secrets.create(&PostParams::default(), &secret_with(&[])).await.unwrap();
    let replica = Replica::start(&client, config(ns.name())).await.expect("certificates start");
    let secret = secrets.get("l4proxy-ca").await.unwrap();
    assert_eq!(secret.metadata.annotations.unwrap()["example.com/note"], "kept");
    assert_eq!(stored(&secrets).await["ca.crt"], replica.certs.ca_pem());
    replica.stop().await;
}

#[tokio::test]
async fn an_unusable_secret_is_refused_naming_it_and_the_key_and_left_as_it_was() {
    let (client, ns) = setup("certs-unusable").await;
    let secrets = secrets(&client, &ns);
    let now = std::time::SystemTime::now();
    let (ca, other) = (Ca::generate(3650 * DAY, now).unwrap(), Ca::generate(3650 * DAY, now).unwrap());
    let policy = ServingPolicy::new(ServingNames::new(["a.svc"]).unwrap(), 90 * DAY, 30 * DAY).unwrap();
    let serving = policy.issue(&ca, now).unwrap();
    let cases = [
        (vec![("ca.crt", "garbage"), ("ca.key", "garbage")], "ca.crt"),
        (vec![("ca.crt", ca.pem().cert.as_str()), ("ca.key", other.pem().key.as_str())], "ca.key"),
        (
            vec![
                ("ca.crt", ca.pem().cert.as_str()),
                ("ca.key", ca.pem().key.as_str()),
                ("tls.crt", serving.cert.as_str()),
            ],
            "tls.key",
        ),
    ];
    for (data, key) in cases {
        let _ = secrets.delete("l4proxy-ca", &DeleteParams::default()).await;
        let written = secrets.create(&PostParams::default(), &secret_with(&data)).await.unwrap();
        let err = match Replica::start(&client, config(ns.name())).await {
            Ok(_) => panic!("started on an unusable Secret (bad {key})"),
            Err(err) => err,
        };
        assert_eq!(err.label(), "unusable");
        let message = err.to_string();
        assert!(message.starts_with(&format!("Secret {}/l4proxy-ca, key {key}: ", ns.name())), "{message}");
        let after = secrets.get("l4proxy-ca").await.unwrap();
        assert_eq!(after.metadata.resource_version, written.metadata.resource_version, "left as it was: {key}");
    }
}
