//! UDP benchmark helpers for bench/udp.sh. Linux only; meant for 127.0.0.0/8 only.
//!
//!   udpbench echo     --listen ADDR [--threads 1] [--max-seconds 7200]
//!       Echo backend: every datagram goes back to its sender (recvmmsg/sendmmsg, 64 per call).
//!   udpbench load     --target ADDR [--clients 16] [--size 64] [--rate PPS|0] [--duration 5]
//!                     [--drain-ms 300] [--batch 32] [--bind-ip 127.0.0.1]
//!       Load generator: CLIENTS connected sockets (= CLIENTS proxy sessions); one sender
//!       thread (sendmmsg, round-robin over the sockets; RATE 0 = flood, else paced in 1-ms
//!       ticks) and one receiver thread (epoll + recvmmsg) counting the echoed replies.
//!       Every client is warmed up first (one answered datagram each, so sessions exist).
//!       Prints one JSON line.
//!   udpbench sessions --target ADDR [--count 100000] [--size 64] [--window 2000]
//!                     [--timeout-ms 300] [--final-wait-ms 3000] [--base-ip 127.10.0.1]
//!                     [--port-lo 2000] [--port-hi 29999]
//!       COUNT sockets, each from its own source address (ports PORT_LO..=PORT_HI on BASE_IP,
//!       then on the next IP, and so on; ports that cannot be bound are skipped), each sending one datagram, at most WINDOW
//!       unanswered at a time (a datagram unanswered after TIMEOUT_MS leaves the window; a later
//!       reply still counts as answered). Prints one JSON line.
//!
//! Every loop is bounded in time.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

struct Opts(HashMap<String, String>);

impl Opts {
    fn parse(args: &[String]) -> Opts {
        let mut map = HashMap::new();
        let mut it = args.iter();
        while let Some(k) = it.next() {
            let key = k.strip_prefix("--").unwrap_or_else(|| die(&format!("unexpected argument {k}")));
            let v = it.next().unwrap_or_else(|| die(&format!("--{key} needs a value")));
            map.insert(key.to_string(), v.clone());
        }
        Opts(map)
    }
    fn get<T: FromStr>(&self, key: &str, default: T) -> T {
        match self.0.get(key) {
            None => default,
            Some(v) => v.parse().unwrap_or_else(|_| die(&format!("bad value for --{key}: {v}"))),
        }
    }
    fn req<T: FromStr>(&self, key: &str) -> T {
        let v = self.0.get(key).unwrap_or_else(|| die(&format!("--{key} is required")));
        v.parse().unwrap_or_else(|_| die(&format!("bad value for --{key}: {v}")))
    }
}

fn die(msg: &str) -> ! {
    eprintln!("udpbench: {msg}");
    std::process::exit(2)
}

fn check_loopback(addr: &SocketAddr) {
    if !addr.ip().is_loopback() {
        die(&format!("{addr} is not a loopback address; this tool only talks to 127.0.0.0/8"));
    }
}

fn set_buffers(fd: RawFd, bytes: libc::c_int) {
    for (force, plain) in [(libc::SO_RCVBUFFORCE, libc::SO_RCVBUF), (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF)] {
        let p = &bytes as *const libc::c_int as *const libc::c_void;
        let len = size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: plain setsockopt with an int option.
        unsafe {
            if libc::setsockopt(fd, libc::SOL_SOCKET, force, p, len) != 0 {
                libc::setsockopt(fd, libc::SOL_SOCKET, plain, p, len);
            }
        }
    }
}

fn raise_nofile() {
    // SAFETY: getrlimit/setrlimit on our own process.
    unsafe {
        let mut r: libc::rlimit = zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage on our own process.
    unsafe {
        let mut u: libc::rusage = zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut u);
        let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
        t(u.ru_utime) + t(u.ru_stime)
    }
}

/// `n` message headers, each with its own buffer of `cap` bytes and its own address slot.
/// The vectors are never resized after `new`, so the raw pointers between them stay valid.
struct Batch {
    _bufs: Vec<u8>,
    iovs: Vec<libc::iovec>,
    _addrs: Vec<libc::sockaddr_storage>,
    hdrs: Vec<libc::mmsghdr>,
    cap: usize,
}

// SAFETY: the pointers only refer to the Batch's own heap data.
unsafe impl Send for Batch {}

impl Batch {
    fn new(n: usize, cap: usize, fill: u8) -> Batch {
        let mut bufs = vec![fill; n * cap];
        let mut addrs: Vec<libc::sockaddr_storage> = (0..n).map(|_| unsafe { zeroed() }).collect();
        let mut iovs: Vec<libc::iovec> = (0..n)
            .map(|i| libc::iovec { iov_base: bufs[i * cap..].as_mut_ptr() as *mut libc::c_void, iov_len: cap })
            .collect();
        let hdrs = (0..n)
            .map(|i| {
                // SAFETY: an all-zero mmsghdr is valid.
                let mut h: libc::mmsghdr = unsafe { zeroed() };
                h.msg_hdr.msg_iov = &mut iovs[i];
                h.msg_hdr.msg_iovlen = 1;
                h.msg_hdr.msg_name = &mut addrs[i] as *mut _ as *mut libc::c_void;
                h.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as u32;
                h
            })
            .collect();
        Batch { _bufs: bufs, iovs, _addrs: addrs, hdrs, cap }
    }

    /// For sending on a connected socket: no address, `len` bytes each.
    fn for_send(n: usize, len: usize) -> Batch {
        let mut b = Batch::new(n, len.max(1), 0x5a);
        for i in 0..n {
            b.iovs[i].iov_len = len;
            b.hdrs[i].msg_hdr.msg_name = std::ptr::null_mut();
            b.hdrs[i].msg_hdr.msg_namelen = 0;
        }
        b
    }

    fn recv(&mut self, fd: RawFd, flags: libc::c_int) -> io::Result<usize> {
        for i in 0..self.hdrs.len() {
            self.iovs[i].iov_len = self.cap;
            self.hdrs[i].msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as u32;
            self.hdrs[i].msg_len = 0;
        }
        // SAFETY: the headers point into self's buffers.
        let r = unsafe {
            libc::recvmmsg(fd, self.hdrs.as_mut_ptr(), self.hdrs.len() as u32, flags, std::ptr::null_mut())
        };
        if r < 0 { Err(io::Error::last_os_error()) } else { Ok(r as usize) }
    }

    /// Sends headers `from..from+n` (as prepared).
    fn send(&mut self, fd: RawFd, from: usize, n: usize, flags: libc::c_int) -> io::Result<usize> {
        // SAFETY: the headers point into self's buffers.
        let r = unsafe { libc::sendmmsg(fd, self.hdrs[from..].as_mut_ptr(), n as u32, flags) };
        if r < 0 { Err(io::Error::last_os_error()) } else { Ok(r as usize) }
    }
}

fn transient(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EINTR))
}

// ------------------------------------------------------------------------------------------
fn echo(o: &Opts) {
    let listen: SocketAddr = o.req("listen");
    check_loopback(&listen);
    let threads: usize = o.get("threads", 1);
    let max = Duration::from_secs(o.get("max-seconds", 7200));
    let sock = UdpSocket::bind(listen).unwrap_or_else(|e| die(&format!("bind {listen}: {e}")));
    set_buffers(sock.as_raw_fd(), 8 << 20);
    sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let sock = Arc::new(sock);
    let deadline = Instant::now() + max;
    let handles: Vec<_> = (0..threads.max(1))
        .map(|_| {
            let sock = sock.clone();
            thread::spawn(move || {
                let fd = sock.as_raw_fd();
                let mut b = Batch::new(64, 2048, 0);
                while Instant::now() < deadline {
                    match b.recv(fd, libc::MSG_WAITFORONE) {
                        Ok(n) => {
                            for i in 0..n {
                                b.iovs[i].iov_len = b.hdrs[i].msg_len as usize;
                            }
                            let mut off = 0;
                            while off < n {
                                match b.send(fd, off, n - off, 0) {
                                    Ok(k) if k > 0 => off += k,
                                    Ok(_) => break,
                                    // A failed destination (e.g. ECONNREFUSED from ICMP): skip it.
                                    Err(e) if transient(&e) => continue,
                                    Err(_) => off += 1,
                                }
                            }
                        }
                        Err(e) if transient(&e) => {}
                        Err(_) => {} // e.g. ECONNREFUSED reported by an earlier ICMP; keep going
                    }
                }
            })
        })
        .collect();
    for h in handles {
        let _ = h.join();
    }
}

// ------------------------------------------------------------------------------------------
fn connected_socket(bind_ip: Ipv4Addr, target: SocketAddr) -> io::Result<UdpSocket> {
    let s = UdpSocket::bind((bind_ip, 0))?;
    s.connect(target)?;
    s.set_nonblocking(true)?;
    Ok(s)
}

fn poll_in(fd: RawFd, ms: i32) -> bool {
    let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: one pollfd.
    unsafe { libc::poll(&mut p, 1, ms) > 0 }
}

fn drain(fd: RawFd, b: &mut Batch) -> u64 {
    let mut got = 0;
    for _ in 0..10_000 {
        match b.recv(fd, libc::MSG_DONTWAIT) {
            Ok(n) if n > 0 => got += n as u64,
            _ => break,
        }
    }
    got
}

fn load(o: &Opts) {
    let target: SocketAddr = o.req("target");
    check_loopback(&target);
    let clients: usize = o.get("clients", 16);
    let size: usize = o.get("size", 64);
    let rate: f64 = o.get("rate", 0.0);
    let duration: f64 = o.get("duration", 5.0);
    let drain_ms: u64 = o.get("drain-ms", 300);
    let batch: usize = o.get("batch", 32);
    let bind_ip: Ipv4Addr = o.get("bind-ip", Ipv4Addr::LOCALHOST);
    if size > 2048 || duration <= 0.0 || duration > 600.0 || clients == 0 || clients > 1024 {
        die("size <= 2048, 0 < duration <= 600 and 1 <= clients <= 1024");
    }

    let socks: Vec<UdpSocket> = (0..clients)
        .map(|_| connected_socket(bind_ip, target).unwrap_or_else(|e| die(&format!("socket: {e}"))))
        .collect();
    for s in &socks {
        set_buffers(s.as_raw_fd(), 8 << 20);
    }
    let fds: Vec<RawFd> = socks.iter().map(|s| s.as_raw_fd()).collect();

    // Warm-up: one answered datagram per client, so every session exists before timing.
    let mut tx = Batch::for_send(batch.max(1), size);
    let mut rx = Batch::new(64, 2048, 0);
    let mut warm_failed = 0;
    for &fd in &fds {
        let mut ok = false;
        for _ in 0..20 {
            let _ = tx.send(fd, 0, 1, libc::MSG_DONTWAIT);
            if poll_in(fd, 250) && drain(fd, &mut rx) > 0 {
                ok = true;
                break;
            }
        }
        if !ok {
            warm_failed += 1;
        }
    }
    thread::sleep(Duration::from_millis(100));
    for &fd in &fds {
        drain(fd, &mut rx);
    }

    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let receiver = {
        let (received, stop, fds) = (received.clone(), stop.clone(), fds.clone());
        thread::spawn(move || {
            // SAFETY: epoll over our own sockets.
            let ep = unsafe { libc::epoll_create1(0) };
            for (i, &fd) in fds.iter().enumerate() {
                let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: i as u64 };
                unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) };
            }
            let mut evs = vec![libc::epoll_event { events: 0, u64: 0 }; fds.len()];
            let mut rx = Batch::new(64, 2048, 0);
            while !stop.load(Ordering::Relaxed) {
                let n = unsafe { libc::epoll_wait(ep, evs.as_mut_ptr(), evs.len() as i32, 20) };
                for ev in evs.iter().take(n.max(0) as usize) {
                    let fd = fds[ev.u64 as usize];
                    for _ in 0..64 {
                        match rx.recv(fd, libc::MSG_DONTWAIT) {
                            Ok(k) => {
                                received.fetch_add(k as u64, Ordering::Relaxed);
                                if k < 64 {
                                    break;
                                }
                            }
                            Err(_) => break,
                        }
                    }
                }
            }
            unsafe { libc::close(ep) };
        })
    };

    let mut sent: u64 = 0;
    let mut send_errors: u64 = 0;
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(duration);
    let mut next_sock = 0;
    if rate <= 0.0 {
        while Instant::now() < end {
            match tx.send(fds[next_sock], 0, batch, libc::MSG_DONTWAIT) {
                Ok(k) => sent += k as u64,
                Err(_) => send_errors += 1,
            }
            next_sock = (next_sock + 1) % clients;
        }
    } else {
        let tick = Duration::from_millis(1);
        let mut next_tick = start;
        let mut attempted: u64 = 0;
        loop {
            let now = Instant::now();
            if now >= end {
                break;
            }
            let due = (rate * (now - start).as_secs_f64()) as u64;
            while attempted < due {
                let k = ((due - attempted) as usize).min(batch);
                match tx.send(fds[next_sock], 0, k, libc::MSG_DONTWAIT) {
                    Ok(s) => {
                        sent += s as u64;
                        send_errors += (k - s) as u64;
                    }
                    Err(_) => send_errors += k as u64,
                }
                attempted += k as u64;
                next_sock = (next_sock + 1) % clients;
            }
            next_tick += tick;
            let now = Instant::now();
            if next_tick > now {
                thread::sleep(next_tick - now);
            }
        }
    }
    let send_secs = start.elapsed().as_secs_f64();
    thread::sleep(Duration::from_millis(drain_ms));
    stop.store(true, Ordering::Relaxed);
    let _ = receiver.join();
    let got = received.load(Ordering::Relaxed);
    let loss = if sent > 0 { 1.0 - got as f64 / sent as f64 } else { 1.0 };
    println!(
        "{{\"target\":\"{target}\",\"clients\":{clients},\"size\":{size},\"rate\":{rate},\"duration\":{send_secs:.3},\
\"sent\":{sent},\"received\":{got},\"send_errors\":{send_errors},\"sent_pps\":{:.1},\"recv_pps\":{:.1},\
\"loss\":{loss:.6},\"warmup_failed\":{warm_failed},\"cpu_s\":{:.3}}}",
        sent as f64 / send_secs,
        got as f64 / send_secs,
        cpu_seconds()
    );
}

// ------------------------------------------------------------------------------------------
fn sessions(o: &Opts) {
    let target: SocketAddr = o.req("target");
    check_loopback(&target);
    let count: usize = o.get("count", 100_000);
    let size: usize = o.get("size", 64);
    let window: usize = o.get("window", 2000);
    let timeout = Duration::from_millis(o.get("timeout-ms", 300));
    let final_wait = Duration::from_millis(o.get("final-wait-ms", 3000));
    let base_ip: Ipv4Addr = o.get("base-ip", Ipv4Addr::new(127, 10, 0, 1));
    // Fixed source ports outside the ephemeral range (32768-60999 by default), so the client
    // sockets do not take ports the proxy's own upstream sockets (bound to 0.0.0.0:0) need.
    let port_lo: u16 = o.get("port-lo", 2000);
    let port_hi: u16 = o.get("port-hi", 29999);
    let cap = Duration::from_secs(o.get("max-seconds", 300));
    if !base_ip.is_loopback() || count > 1_000_000 || port_lo == 0 || port_hi < port_lo {
        die("base-ip must be in 127.0.0.0/8, count <= 1000000, 0 < port-lo <= port-hi");
    }
    raise_nofile();
    let t_bind = Instant::now();
    let mut socks: Vec<Option<UdpSocket>> = Vec::with_capacity(count);
    let mut bind_failed = 0usize;
    let mut first_err = String::new();
    let (mut ip, mut port) = (base_ip, port_lo);
    let max_attempts = 2 * count + 1000;
    let mut attempts = 0;
    while socks.len() < count && attempts < max_attempts && ip.is_loopback() {
        attempts += 1;
        let addr = SocketAddr::from((ip, port));
        let r = UdpSocket::bind(addr).and_then(|s| {
            s.connect(target)?;
            s.set_nonblocking(true)?;
            Ok(s)
        });
        match r {
            Ok(s) => socks.push(Some(s)),
            Err(e) => {
                if first_err.is_empty() {
                    first_err = format!("{addr}: {e}");
                }
                bind_failed += 1;
            }
        }
        if port == port_hi {
            port = port_lo;
            ip = Ipv4Addr::from(u32::from(ip) + 1);
        } else {
            port += 1;
        }
    }
    let count = socks.len();
    let bind_secs = t_bind.elapsed().as_secs_f64();
    // SAFETY: epoll over our own sockets.
    let ep = unsafe { libc::epoll_create1(0) };
    for (i, s) in socks.iter().enumerate() {
        if let Some(s) = s {
            let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: i as u64 };
            unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, s.as_raw_fd(), &mut ev) };
        }
    }
    // 0 unsent, 1 in flight, 2 answered, 3 timed out, 4 answered late, 5 send failed
    let mut state = vec![0u8; count];
    let mut pending: VecDeque<(usize, Instant)> = VecDeque::new();
    let (mut inflight, mut sent, mut answered, mut late, mut send_failed) = (0usize, 0usize, 0usize, 0usize, 0usize);
    let mut tx = Batch::for_send(1, size);
    let mut rx = Batch::new(8, 2048, 0);
    let mut evs = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
    let start = Instant::now();
    let mut next = 0usize;
    let mut all_sent_at: Option<Instant> = None;
    loop {
        let now = Instant::now();
        if now - start > cap {
            break;
        }
        while inflight < window && next < count {
            if let Some(s) = &socks[next] {
                match tx.send(s.as_raw_fd(), 0, 1, libc::MSG_DONTWAIT) {
                    Ok(1) => {
                        state[next] = 1;
                        inflight += 1;
                        sent += 1;
                        pending.push_back((next, Instant::now()));
                    }
                    _ => {
                        state[next] = 5;
                        send_failed += 1;
                    }
                }
            }
            next += 1;
        }
        if next >= count && all_sent_at.is_none() {
            all_sent_at = Some(Instant::now());
        }
        let n = unsafe { libc::epoll_wait(ep, evs.as_mut_ptr(), evs.len() as i32, 5) };
        for ev in evs.iter().take(n.max(0) as usize) {
            let i = ev.u64 as usize;
            let fd = socks[i].as_ref().unwrap().as_raw_fd();
            if drain(fd, &mut rx) > 0 {
                match state[i] {
                    1 => {
                        state[i] = 2;
                        inflight -= 1;
                        answered += 1;
                    }
                    3 => {
                        state[i] = 4;
                        answered += 1;
                        late += 1;
                    }
                    _ => {}
                }
            }
        }
        let now = Instant::now();
        while let Some(&(i, t)) = pending.front() {
            if state[i] != 1 {
                pending.pop_front();
            } else if now - t > timeout {
                state[i] = 3;
                inflight -= 1;
                pending.pop_front();
            } else {
                break;
            }
        }
        if let Some(t) = all_sent_at {
            if answered == sent || now - t > final_wait.max(timeout) {
                break;
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    println!(
        "{{\"target\":\"{target}\",\"count\":{count},\"bound\":{},\"bind_failed\":{bind_failed},\"bind_error\":\"{}\",\
\"bind_s\":{bind_secs:.3},\"sent\":{sent},\"send_failed\":{send_failed},\"answered\":{answered},\"answered_late\":{late},\
\"unanswered\":{},\"elapsed_s\":{elapsed:.3},\"cpu_s\":{:.3}}}",
        count,
        first_err.replace('"', "'"),
        count - answered,
        cpu_seconds()
    );
    unsafe { libc::close(ep) };
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let opts = Opts::parse(args.get(2..).unwrap_or(&[]));
    match args.get(1).map(String::as_str) {
        Some("echo") => echo(&opts),
        Some("load") => load(&opts),
        Some("sessions") => sessions(&opts),
        _ => die("usage: udpbench echo|load|sessions --option value ... (see the source header)"),
    }
}
