//! A short tour of the connection-management API, self-contained on loopback:
//! connections through a `TcpConnectionManager`, the connection limit being hit, a connect
//! error, and the metrics each connection collected, recorded as the running proxy records
//! them (`connection::record`: the listener's metrics and one access-log line).
//!
//!     cargo run -p l4proxy --example connection_management_demo

use std::net::SocketAddr;

use l4proxy::{
    ConnectionManager, ConnectionMetrics, ListenerManager, ListenerSettings, TcpConnectionManager, config::parse_yaml,
    connection::record, metrics::Metrics,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // An upstream that answers "echo: <request>" and closes.
    let upstream = TcpListener::bind("127.0.0.1:0").await?;
    let upstream_addr = upstream.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = upstream.accept().await {
            tokio::spawn(async move {
                let mut request = Vec::new();
                if stream.read_to_end(&mut request).await.is_ok() {
                    let _ = stream.write_all(b"echo: ").await;
                    let _ = stream.write_all(&request).await;
                }
            });
        }
    });

    let metrics = Metrics::new();
    let manager = |backend: SocketAddr, max: u32| -> anyhow::Result<TcpConnectionManager> {
        let yaml = format!(
            "listeners:\n- name: demo\n  address: 127.0.0.1:0\n  backends: [{{address: '{backend}'}}]\n  limits: {{maxConnections: {max}, connectTimeout: 1s}}\n"
        );
        let listener = l4proxy::config::check(&parse_yaml(&yaml)?)?.listeners.remove(0);
        Ok(TcpConnectionManager::new(ListenerSettings::new(listener, None, &metrics), CancellationToken::new()))
    };

    let front = TcpListener::bind("127.0.0.1:0").await?;
    let front_addr = front.local_addr()?;
    let demo = manager(upstream_addr, 2)?;
    println!("manager for listener \"demo\": limit {} connections, backend {upstream_addr}\n", demo.max_connections());

    // 1. Two connections through the manager.
    println!("1. two connections through the manager");
    for request in ["hello", "world!"] {
        let (client, accepted, peer) = pair(&front, front_addr).await?;
        let connection = demo.create_connection(accepted, peer, front_addr)?;
        let id = connection.context.id;
        let (reply, measured) = tokio::join!(exchange(client, request), demo.handle_connection(connection));
        println!("   connection {id}: sent {request:?}, got {:?}", reply?);
        print_metrics(&measured);
        record(&demo.settings().metrics, &measured);
    }

    // 2. The limit: hold two connections open, the third is refused.
    println!("\n2. the limit: two held open, a third arrives");
    let mut held = Vec::new();
    for _ in 0..2 {
        let (client, accepted, peer) = pair(&front, front_addr).await?;
        held.push((client, demo.create_connection(accepted, peer, front_addr)?));
    }
    println!(
        "   connection_count = {}, can_accept_connection = {}",
        demo.connection_count(),
        demo.can_accept_connection()
    );
    let (_client, accepted, peer) = pair(&front, front_addr).await?;
    match demo.create_connection(accepted, peer, front_addr) {
        Ok(_) => println!("   unexpected: admitted"),
        Err(e) => println!("   refused: {e}  [metric reason: {}]", e.close_reason().label()),
    }
    held.clear();
    println!("   after closing them: connection_count = {}", demo.connection_count());

    // 3. An error: a backend where nothing listens.
    println!("\n3. a backend that refuses");
    let dead = TcpListener::bind("127.0.0.1:0").await?.local_addr()?;
    let broken = manager(dead, 2)?;
    let (_client, accepted, peer) = pair(&front, front_addr).await?;
    let connection = broken.create_connection(accepted, peer, front_addr)?;
    let measured = broken.handle_connection(connection).await;
    match &measured.error {
        None => println!("   unexpected: connected"),
        Some(e) => {
            println!("   failed: {e}  [metric reason: {}]", measured.close_reason.label());
            if let Some(source) = std::error::Error::source(e) {
                println!("   caused by: {source}");
            }
        }
    }
    record(&broken.settings().metrics, &measured);

    println!("\n4. the listener's Prometheus metrics (excerpt)");
    for line in metrics.encode().lines().filter(|l| !l.starts_with('#') && !l.ends_with(" 0") && !l.contains("_bucket"))
    {
        println!("   {line}");
    }
    Ok(())
}

async fn pair(front: &TcpListener, addr: SocketAddr) -> anyhow::Result<(TcpStream, TcpStream, SocketAddr)> {
    let client = TcpStream::connect(addr).await?;
    let (accepted, peer) = front.accept().await?;
    Ok((client, accepted, peer))
}

async fn exchange(mut client: TcpStream, request: &str) -> anyhow::Result<String> {
    client.write_all(request.as_bytes()).await?;
    client.shutdown().await?;
    let mut reply = String::new();
    client.read_to_string(&mut reply).await?;
    Ok(reply)
}

fn print_metrics(m: &ConnectionMetrics) {
    let ms = |d: Option<std::time::Duration>| d.map_or("-".to_owned(), |d| format!("{:.2}ms", d.as_secs_f64() * 1e3));
    println!(
        "     backend {}, {} bytes in, {} bytes out, connect {}, lifetime {}, closed: {}",
        m.backend.map_or("-".to_owned(), |b| b.to_string()),
        m.bytes_received,
        m.bytes_sent,
        ms(m.connect_time),
        ms(Some(m.lifetime)),
        m.close_reason.label()
    );
    println!(
        "     lifecycle: backend connected {}, client finished {}, backend finished {}, closed {}",
        ms(m.lifecycle.backend_connected),
        ms(m.lifecycle.client_finished),
        ms(m.lifecycle.backend_finished),
        ms(m.lifecycle.closed)
    );
}
