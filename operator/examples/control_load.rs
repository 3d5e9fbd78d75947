//! Many proxies in one process, for `bench/control.sh`: each one a real client of the config
//! service (the real protocol over TLS, a real token), subscribing to one of R resources,
//! acknowledging every version at once and reporting stats every interval, like `l4proxy run
//! --control-plane` without the data plane.
//!
//!     cargo run --release -p l4proxy-operator --example control_load -- \
//!         --url https://127.0.0.1:8443 --ca ca.crt --token token --namespace bench \
//!         --resources 1 --proxies 100 [--prefix p-] [--stats-interval 10s] [--busy true]
//!
//! Prints one JSON line per (resource, version) when every proxy of that resource has
//! received it: `{"resource":"p-0","version":"…","proxies":100,"complete_ms":<unix ms>}`, and
//! `{"connected":N}` once all N streams are up.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use l4proxy::control::{
    MAX_MESSAGE_BYTES,
    proto::{
        Ack, Hello, ListenerReport, PoolStats, ProxyMessage, StatsReport, config_service_client::ConfigServiceClient,
        operator_message, proxy_message,
    },
};
use tokio::sync::mpsc;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

struct Args {
    url: String,
    ca: String,
    token: String,
    namespace: String,
    prefix: String,
    resources: usize,
    proxies: usize,
    stats_interval: Duration,
    /// Counters that grow with every report (a proxy with traffic), instead of standing still.
    busy: bool,
}

fn args() -> Args {
    let mut values: HashMap<String, String> = HashMap::new();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        values.insert(flag.trim_start_matches("--").to_owned(), value);
    }
    let get = |key: &str, default: Option<&str>| {
        values.get(key).cloned().or(default.map(str::to_owned)).unwrap_or_else(|| panic!("--{key} is required"))
    };
    let read = |key: &str| std::fs::read_to_string(get(key, None)).unwrap_or_else(|e| panic!("--{key}: {e}"));
    Args {
        url: get("url", None),
        ca: read("ca"),
        token: read("token").trim().to_owned(),
        namespace: get("namespace", None),
        prefix: get("prefix", Some("p-")),
        resources: get("resources", Some("1")).parse().expect("--resources"),
        proxies: get("proxies", Some("100")).parse().expect("--proxies"),
        stats_interval: humantime::parse_duration(&get("stats-interval", Some("10s"))).expect("--stats-interval"),
        busy: get("busy", Some("false")).parse().expect("--busy true|false"),
    }
}

/// Per (resource, version): how many of the resource's proxies have it.
type Received = Arc<Mutex<HashMap<(String, String), usize>>>;

#[tokio::main]
async fn main() {
    let args = Arc::new(args());
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&args.ca)).domain_name("127.0.0.1");
    let endpoint = Endpoint::from_shared(args.url.clone()).expect("--url").tls_config(tls).expect("TLS");
    let received: Received = Arc::default();
    let (connected_tx, mut connected) = mpsc::channel(args.proxies);
    for i in 0..args.proxies {
        let resource = format!("{}{}", args.prefix, i % args.resources);
        let per_resource =
            args.proxies / args.resources + usize::from(i % args.resources < args.proxies % args.resources);
        tokio::spawn(proxy(
            endpoint.clone(),
            args.clone(),
            i,
            resource,
            per_resource,
            received.clone(),
            connected_tx.clone(),
        ));
    }
    for _ in 0..args.proxies {
        connected.recv().await;
    }
    println!("{{\"connected\":{}}}", args.proxies);
    std::future::pending::<()>().await;
}

/// One proxy: subscribe, ack every version, report every interval; reconnect if the stream ends.
async fn proxy(
    endpoint: Endpoint,
    args: Arc<Args>,
    index: usize,
    resource: String,
    per_resource: usize,
    received: Received,
    connected: mpsc::Sender<()>,
) {
    let mut announced = false;
    loop {
        let Ok(channel) = endpoint.connect().await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let mut client = ConfigServiceClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let (tx, rx) = mpsc::channel(8);
        let hello = Hello {
            namespace: args.namespace.clone(),
            name: resource.clone(),
            proxy: format!("bench/proxy-{index}"),
            ..Default::default()
        };
        let _ = tx.send(ProxyMessage { message: Some(proxy_message::Message::Hello(hello)) }).await;
        let outgoing = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
        let mut request = tonic::Request::new(outgoing);
        request.metadata_mut().insert("authorization", format!("Bearer {}", args.token).parse().expect("a header"));
        let Ok(response) = client.subscribe(request).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        if !announced {
            announced = true;
            let _ = connected.send(()).await;
        }
        let mut updates = response.into_inner();
        let mut stats = tokio::time::interval(args.stats_interval);
        let mut reports = 0u64;
        loop {
            tokio::select! {
                update = updates.message() => {
                    let Ok(Some(message)) = update else { break };
                    let Some(operator_message::Message::Config(config)) = message.message else { continue };
                    let ack = Ack { version: config.version.clone(), nonce: config.nonce, applied: true, error: String::new() };
                    let _ = tx.send(ProxyMessage { message: Some(proxy_message::Message::Ack(ack)) }).await;
                    let mut counts = received.lock().expect("not poisoned");
                    let count = counts.entry((resource.clone(), config.version.clone())).or_default();
                    *count += 1;
                    if *count == per_resource {
                        let now = SystemTime::now().duration_since(UNIX_EPOCH).expect("after 1970").as_millis();
                        println!(
                            "{{\"resource\":\"{resource}\",\"version\":\"{}\",\"proxies\":{per_resource},\"complete_ms\":{now}}}",
                            config.version
                        );
                    }
                }
                _ = stats.tick() => {
                    reports += 1;
                    let accepted = if args.busy { reports } else { 1 };
                    let report = StatsReport {
                        applied_version: String::new(),
                        listeners: vec![ListenerReport {
                            name: "web".into(),
                            pool_stats: Some(PoolStats { size: 1, max_size: 100, expired_count: 0, average_age_seconds: 1.0 }),
                            active: 1,
                            accepted,
                            ..Default::default()
                        }],
                    };
                    let _ = tx.send(ProxyMessage { message: Some(proxy_message::Message::Stats(report)) }).await;
                }
            }
        }
    }
}
