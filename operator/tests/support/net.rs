//! Traffic and tokens for the tests that run real proxies: an echo upstream, round trips,
//! a minimal HTTP GET, and ServiceAccount tokens from the TokenRequest API.

use std::{net::SocketAddr, time::Duration};

use k8s_openapi::api::{
    authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec},
    core::v1::ServiceAccount,
};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// A real upstream on 127.0.0.1 that echoes what it reads.
pub async fn echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    address
}

/// Connects to `address` and checks one echo round trip; the stream stays open.
pub async fn round_trip(address: SocketAddr) -> Option<TcpStream> {
    let mut stream = TcpStream::connect(address).await.ok()?;
    ping(&mut stream).await.then_some(stream)
}

pub async fn ping(stream: &mut TcpStream) -> bool {
    let mut reply = [0u8; 4];
    stream.write_all(b"ping").await.is_ok()
        && matches!(tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut reply)).await, Ok(Ok(_)))
        && &reply == b"ping"
}

/// A minimal HTTP/1.0 GET: (status, body).
pub async fn http_get(address: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(address).await.ok()?;
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: admin\r\n\r\n").as_bytes()).await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    let code = response.split(' ').nth(1)?.parse().ok()?;
    Some((code, response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default()))
}

/// A ServiceAccount token for `account` in `namespace`, with `audience`.
pub async fn token(client: &Client, namespace: &str, account: &str, audience: &str) -> String {
    token_bound(client, namespace, account, audience, None).await
}

/// Creates ServiceAccount `account` in `namespace` unless it exists.
pub async fn service_account(client: &Client, namespace: &str, account: &str) {
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let account_object = ServiceAccount {
        metadata: ObjectMeta { name: Some(account.into()), ..Default::default() },
        ..Default::default()
    };
    match accounts.create(&PostParams::default(), &account_object).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => panic!("creating ServiceAccount {account}: {e}"),
    }
}

/// A token for `account` (created if missing) with `audience`, bound to `pod` (name, uid)
/// when given, as the kubelet's projected tokens are.
pub async fn token_bound(
    client: &Client,
    namespace: &str,
    account: &str,
    audience: &str,
    pod: Option<(&str, &str)>,
) -> String {
    service_account(client, namespace, account).await;
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: Some(vec![audience.into()]),
            expiration_seconds: Some(3600),
            bound_object_ref: pod.map(|(name, uid)| BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(name.into()),
                uid: Some(uid.into()),
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let issued = accounts.create_token_request(account, &PostParams::default(), &request).await.expect("a token");
    issued.status.and_then(|s| s.token).expect("a token in the answer")
}
