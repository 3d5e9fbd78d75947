//! `l4proxy-echo`: the end-to-end tests' stand-in for an app, one static binary in a `FROM
//! scratch` image (no shell), so every command a test runs in a pod is a subcommand here.
//!
//! - `serve [PORT]` (the default; PORT 7000): echoes TCP and UDP. A TCP connection whose first
//!   line is `WHO` and a UDP datagram `WHO` are answered with the pod's name (`$POD_NAME`, else
//!   the host name), so a client can tell which replica it reached. One log line per connection.
//! - `who ADDR [COUNT]`: COUNT (1) new TCP connections to ADDR, each asking `WHO`; prints each
//!   answer on its own line. Exit 1 if any fails.
//! - `udp-who ADDR [COUNT]`: the same with datagrams.
//! - `hold ADDR COUNT SECONDS`: opens COUNT connections, prints `open COUNT` once every one has
//!   completed an echo round trip, then round-trips on each every second for SECONDS; exit 1
//!   (naming the connection) as soon as one fails: an open connection was dropped.
//!
//! ADDR is `HOST:PORT`, HOST an IP address or a name (`echo.NAMESPACE.svc`: the pod's resolver,
//! i.e. cluster DNS; the first address it returns is used).
//!
//! Every I/O has a 5 s timeout: nothing here hangs a test. (Name resolution is bounded by the
//! resolver's own timeout, `resolv.conf`'s.)

use std::{
    env,
    io::{self, BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream, ToSocketAddrs, UdpSocket},
    process::ExitCode,
    sync::atomic::{AtomicUsize, Ordering},
    thread,
    time::{Duration, Instant},
};

const TIMEOUT: Duration = Duration::from_secs(5);
/// Most TCP connections served at once (a thread each); beyond, a new one is closed at once.
const MAX_CONNECTIONS: usize = 4096;
static OPEN: AtomicUsize = AtomicUsize::new(0);

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let arg = |i: usize| args.get(i).map(String::as_str);
    let number =
        |i: usize, default: u64| arg(i).map_or(Ok(default), |a| a.parse::<u64>().map_err(|e| format!("{a:?}: {e}")));
    let result = match arg(0).unwrap_or("serve") {
        "serve" => number(1, 7000).and_then(|port| serve(port as u16).map_err(|e| e.to_string())),
        "who" => match (arg(1), number(2, 1)) {
            (Some(addr), Ok(count)) => who(addr, count),
            _ => Err(usage()),
        },
        "udp-who" => match (arg(1), number(2, 1)) {
            (Some(addr), Ok(count)) => udp_who(addr, count),
            _ => Err(usage()),
        },
        "hold" => match (arg(1), number(2, 1), number(3, 10)) {
            (Some(addr), Ok(count), Ok(seconds)) => hold(addr, count, seconds),
            _ => Err(usage()),
        },
        _ => Err(usage()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(why) => {
            eprintln!("l4proxy-echo: {why}");
            ExitCode::FAILURE
        }
    }
}

fn usage() -> String {
    "usage: l4proxy-echo [serve [PORT] | who ADDR [COUNT] | udp-who ADDR [COUNT] | hold ADDR COUNT SECONDS]".into()
}

fn name() -> String {
    env::var("POD_NAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok().map(|h| h.trim().to_owned()))
        .unwrap_or_else(|| "unknown".into())
}

fn serve(port: u16) -> io::Result<()> {
    let tcp = TcpListener::bind(("0.0.0.0", port))?;
    let udp = UdpSocket::bind(("0.0.0.0", port))?;
    let me = name();
    println!("l4proxy-echo {me}: serving TCP and UDP on port {port}");
    let udp_name = me.clone();
    thread::spawn(move || {
        let mut buf = [0u8; 65536];
        loop {
            let Ok((n, peer)) = udp.recv_from(&mut buf) else { continue };
            let reply: &[u8] = if &buf[..n] == b"WHO" { udp_name.as_bytes() } else { &buf[..n] };
            let _ = udp.send_to(reply, peer);
        }
    });
    for stream in tcp.incoming() {
        let Ok(stream) = stream else { continue };
        if OPEN.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
            OPEN.fetch_sub(1, Ordering::AcqRel);
            eprintln!("refused a connection: {MAX_CONNECTIONS} open");
            continue;
        }
        let me = me.clone();
        thread::spawn(move || {
            let peer = stream.peer_addr().map(|p| p.to_string()).unwrap_or_default();
            println!("tcp connection from {peer}");
            let _ = echo(stream, &me);
            OPEN.fetch_sub(1, Ordering::AcqRel);
        });
    }
    Ok(())
}

/// Echoes `stream`; a first line `WHO` is answered with `me` instead.
fn echo(stream: TcpStream, me: &str) -> io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    let first = reader.fill_buf()?.to_vec();
    if first.starts_with(b"WHO\n") {
        reader.consume(4);
        writer.write_all(format!("{me}\n").as_bytes())?;
    }
    io::copy(&mut reader, &mut writer)?;
    Ok(())
}

fn connect(addr: &str) -> Result<TcpStream, String> {
    let address = addr
        .to_socket_addrs()
        .map_err(|e| format!("resolving {addr:?} (HOST:PORT): {e}"))?
        .next()
        .ok_or_else(|| format!("{addr:?} resolves to no address"))?;
    let stream = TcpStream::connect_timeout(&address, TIMEOUT).map_err(|e| format!("connecting to {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(TIMEOUT)))
        .map_err(|e| e.to_string())?;
    Ok(stream)
}

fn who(addr: &str, count: u64) -> Result<(), String> {
    for i in 0..count {
        let mut stream = connect(addr)?;
        stream.write_all(b"WHO\n").map_err(|e| format!("connection {i}: {e}"))?;
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).map_err(|e| format!("connection {i}: {e}"))?;
        if line.is_empty() {
            return Err(format!("connection {i}: closed without an answer"));
        }
        print!("{line}");
    }
    Ok(())
}

fn udp_who(addr: &str, count: u64) -> Result<(), String> {
    let socket = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
    socket.set_read_timeout(Some(TIMEOUT)).map_err(|e| e.to_string())?;
    socket.connect(addr).map_err(|e| format!("{addr}: {e}"))?;
    let mut buf = [0u8; 512];
    for i in 0..count {
        socket.send(b"WHO").map_err(|e| format!("datagram {i}: {e}"))?;
        let n = socket.recv(&mut buf).map_err(|e| format!("datagram {i}: no answer: {e}"))?;
        println!("{}", String::from_utf8_lossy(&buf[..n]));
    }
    Ok(())
}

/// One echo round trip on `stream`.
fn ping(stream: &mut TcpStream) -> io::Result<()> {
    stream.write_all(b"ping")?;
    let mut reply = [0u8; 4];
    stream.read_exact(&mut reply)?;
    if &reply == b"ping" { Ok(()) } else { Err(io::Error::other("a wrong echo")) }
}

// A plain std program (no runtime, no paused-time tests): pacing one round trip per second on
// every connection is this command's job, not a wait for something to happen.
#[allow(clippy::disallowed_methods)]
fn hold(addr: &str, count: u64, seconds: u64) -> Result<(), String> {
    let mut streams = Vec::new();
    for i in 0..count {
        let mut stream = connect(addr)?;
        ping(&mut stream).map_err(|e| format!("connection {i}: {e}"))?;
        streams.push(stream);
    }
    println!("open {count}");
    io::stdout().flush().map_err(|e| e.to_string())?;
    let end = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < end {
        thread::sleep(Duration::from_secs(1));
        for (i, stream) in streams.iter_mut().enumerate() {
            ping(stream).map_err(|e| format!("connection {i} was dropped: {e}"))?;
        }
    }
    println!("held {count} for {seconds}s");
    Ok(())
}
