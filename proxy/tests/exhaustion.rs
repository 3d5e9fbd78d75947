//! Running out of file descriptors: the proxy's own failure, never its backend's. One test per
//! binary, because it lowers this process's open-file limit.

mod support;

use std::os::fd::AsRawFd;

use support::*;

/// The lowest descriptor number not in use: the next one the kernel hands out.
fn lowest_free_descriptor() -> u64 {
    let probe = std::fs::File::open("/dev/null").unwrap();
    probe.as_raw_fd() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_backend_connects_fail_as_local_errors_and_never_eject_the_backend() {
    let echo = Echo::start().await;
    let yaml = format!(
        "admin: {{address: 127.0.0.1:0}}\nlisteners:\n- name: web\n  address: 127.0.0.1:0\n  backends: [{{address: '{}'}}]\n  limits: {{maxConnections: 10000}}\n",
        echo.address
    );
    let proxy = start_proxy(&yaml).await;
    let address = proxy.listener_address("web").unwrap();
    drop(echo_through(address).await);
    wait_until("the warm-up connection is closed", || proxy.stats().listeners[0].active == 0).await;

    // Client sockets made while descriptors remain; then the limit leaves exactly one, which
    // the proxy's accept takes, so its connect to the backend finds none.
    let clients: Vec<socket2::Socket> =
        (0..6).map(|_| socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap()).collect();
    let (soft, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap();
    rlimit::setrlimit(rlimit::Resource::NOFILE, lowest_free_descriptor() + 1, hard).unwrap();
    let target = socket2::SockAddr::from(address);
    for (i, client) in clients.iter().enumerate() {
        client.connect(&target).unwrap();
        wait_until("the connection fails as a local error", || {
            proxy.stats().listeners[0].closed["local_error"] == i as u64 + 1
        })
        .await;
    }
    let stats = proxy.stats();
    rlimit::setrlimit(rlimit::Resource::NOFILE, soft, hard).unwrap();

    let web = &stats.listeners[0];
    assert_eq!((web.backends[0].ejected, web.backends[0].consecutive_failures), (false, 0), "{web:?}");
    assert_eq!(web.closed["connect_failed"] + web.closed["no_backend"], 0, "{web:?}");
    drop(clients);
    // The pressure is over: the next connection goes through at once.
    drop(echo_through(address).await);
    assert_eq!(proxy.stats().listeners[0].closed["no_backend"], 0);
}
