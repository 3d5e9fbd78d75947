#!/usr/bin/env python3
"""Parsing and reporting for bench/run.sh (standard library only).

    report.py wrk FILE          -> "<requests/s> <p99 ms> <errors> <requests>"  from `wrk --latency`
    report.py iperf FILE        -> "<Gbit/s received> <retransmits> <bytes received>"  from `iperf3 -J`
    report.py sockperf FILE     -> "<p50 µs> <p99 µs> <p99.9 µs> <mean µs> <round trips>"  from
                                   `sockperf ping-pong --full-rtt`
    report.py table RESULTS META -> Markdown report on stdout

RESULTS is a TSV of `test path round metric value` lines written by run.sh; META is a TSV of
`key value` lines (machine, versions, parameters).
"""

import json
import re
import statistics
import sys
from collections import defaultdict

UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def parse_wrk(path: str) -> str:
    text = open(path, encoding="utf-8", errors="replace").read()
    rps = re.search(r"^Requests/sec:\s+([0-9.]+)", text, re.M)
    p99 = re.search(r"^\s+99(?:\.000)?%\s+([0-9.]+)(us|ms|s|m|h)\s*$", text, re.M)
    if not rps or not p99:
        raise SystemExit(f"cannot parse wrk output {path}")
    errors = 0
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if sock:
        errors += sum(int(x) for x in sock.groups())
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if non2xx:
        errors += int(non2xx.group(1))
    p99_ms = float(p99.group(1)) * UNITS_MS[p99.group(2)]
    total = re.search(r"^\s*(\d+) requests in", text, re.M)
    return f"{float(rps.group(1)):.1f} {p99_ms:.4f} {errors} {total.group(1) if total else 0}"


def parse_iperf(path: str) -> str:
    data = json.load(open(path, encoding="utf-8"))
    if "error" in data:
        raise SystemExit(f"iperf3 error in {path}: {data['error']}")
    end = data["end"]
    bps = end["sum_received"]["bits_per_second"]
    retr = end.get("sum_sent", {}).get("retransmits", 0)
    return f"{bps / 1e9:.3f} {retr} {end['sum_received']['bytes']}"


def parse_sockperf(path: str) -> str:
    text = open(path, encoding="utf-8", errors="replace").read()

    def pct(p):
        m = re.search(rf"percentile {re.escape(p)} =\s*([0-9.]+)", text)
        if not m:
            raise SystemExit(f"cannot parse sockperf output {path} (no percentile {p})")
        return float(m.group(1))

    avg = re.search(r"avg-(?:rtt|latency)=([0-9.]+)", text)
    total = re.search(r"Total (\d+) observations", text)
    if not avg or not total:
        raise SystemExit(f"cannot parse sockperf output {path}")
    return f"{pct('50.000'):.3f} {pct('99.000'):.3f} {pct('99.900'):.3f} {float(avg.group(1)):.3f} {total.group(1)}"


PATHS = ["direct", "haproxy", "nginx", "l4proxy"]
PROXIES = ["haproxy", "nginx", "l4proxy"]
NAMES = {"direct": "direct", "haproxy": "HAProxy", "nginx": "nginx stream", "l4proxy": "l4proxy"}

# (test, metric, label, unit, higher_is_better, decimals)
ROWS = [
    ("iperf1", "gbps", "iperf3 throughput, 1 stream", "Gbit/s", True, 2),
    ("iperf8", "gbps", "iperf3 throughput, 8 streams", "Gbit/s", True, 2),
    ("close", "rps", "new connections (`Connection: close`)", "req/s = conn/s", True, 0),
    ("close", "p99_ms", "new connections: p99 latency", "ms", False, 3),
    ("keepalive", "rps", "keep-alive requests", "req/s", True, 0),
    ("keepalive", "p99_ms", "keep-alive: p99 latency", "ms", False, 3),
    ("mem", "anon_kib_per_conn", "user-space memory per idle connection (Anonymous)", "KiB", False, 2),
    ("mem", "privdirty_kib_per_conn", "same, Private_Dirty", "KiB", False, 2),
    ("mem", "rss_kib_per_conn", "same, VmRSS", "KiB", False, 2),
]

# Latency rows: (test, metric, label)
LAT_ROWS = [
    ("lat_tcp", "p50_us", "TCP, p50"),
    ("lat_tcp", "p99_us", "TCP, p99"),
    ("lat_tcp", "p999_us", "TCP, p99.9"),
    ("lat_udp", "p50_us", "UDP, p50"),
    ("lat_udp", "p99_us", "UDP, p99"),
    ("lat_udp", "p999_us", "UDP, p99.9"),
    ("lat_tcp_cpu0", "p50_us", "TCP, all on CPU 0, p50"),
    ("lat_tcp_cpu0", "p99_us", "TCP, all on CPU 0, p99"),
    ("lat_tcp_cpu0", "p999_us", "TCP, all on CPU 0, p99.9"),
    ("lat_udp_cpu0", "p50_us", "UDP, all on CPU 0, p50"),
    ("lat_udp_cpu0", "p99_us", "UDP, all on CPU 0, p99"),
    ("lat_udp_cpu0", "p999_us", "UDP, all on CPU 0, p99.9"),
]

# Proxy CPU cost: CPU seconds of the proxy process during the run, normalised.
CPU_ROWS = [
    ("iperf1", "cpu_s_per_gb", "iperf3 1 stream: proxy CPU per GB moved", "CPU-ms/GB", 1000.0),
    ("iperf8", "cpu_s_per_gb", "iperf3 8 streams: proxy CPU per GB moved", "CPU-ms/GB", 1000.0),
    ("close", "cpu_s_per_req", "new connections: proxy CPU per connection", "CPU-µs/conn", 1e6),
    ("keepalive", "cpu_s_per_req", "keep-alive: proxy CPU per request", "CPU-µs/req", 1e6),
    ("lat_tcp", "cpu_s_per_req", "TCP ping-pong: proxy CPU per round trip", "CPU-µs/RT", 1e6),
    ("lat_udp", "cpu_s_per_req", "UDP ping-pong: proxy CPU per round trip", "CPU-µs/RT", 1e6),
    ("lat_tcp_cpu0", "cpu_s_per_req", "TCP ping-pong, all on CPU 0: proxy CPU per round trip", "CPU-µs/RT", 1e6),
    ("lat_udp_cpu0", "cpu_s_per_req", "UDP ping-pong, all on CPU 0: proxy CPU per round trip", "CPU-µs/RT", 1e6),
    ("close", "cpu_util", "new connections: proxy CPU use", "cores", 1.0),
    ("keepalive", "cpu_util", "keep-alive: proxy CPU use", "cores", 1.0),
]


def fmt(v, decimals):
    if v is None:
        return "–"
    if decimals == 0:
        return f"{v:,.0f}"
    return f"{v:,.{decimals}f}"


def ratio(a, b):
    if a is None or b is None or b == 0:
        return "–"
    return f"{a / b:.2f}×"


def pos_ratio(a, b):
    """Ratio of two added latencies; meaningless unless both are positive."""
    if a is None or b is None or a <= 0 or b <= 0:
        return "–"
    return ratio(a, b)


def table(results_path: str, meta_path: str) -> str:
    values = defaultdict(list)  # (test, path, metric) -> [values in round order]
    for line in open(results_path, encoding="utf-8"):
        parts = line.rstrip("\n").split("\t")
        if len(parts) != 5:
            continue
        test, path, rnd, metric, value = parts
        values[(test, path, metric)].append((int(rnd), float(value)))
    meta = {}
    for line in open(meta_path, encoding="utf-8"):
        if "\t" in line:
            k, v = line.rstrip("\n").split("\t", 1)
            meta[k] = v

    def med(test, path, metric):
        vs = [v for _, v in values.get((test, path, metric), [])]
        return statistics.median(vs) if vs else None

    def spread(test, path, metric, decimals):
        vs = [v for _, v in sorted(values.get((test, path, metric), []))]
        return ", ".join(fmt(v, decimals) for v in vs) if vs else "–"

    out = []
    out.append("# l4proxy benchmark results\n")
    out.append(
        f"Run {meta.get('date', '?')} on {meta.get('cpu', '?')} ({meta.get('nproc', '?')} CPUs), "
        f"kernel {meta.get('kernel', '?')}; l4proxy {meta.get('l4proxy_rev', '?')}, "
        f"{meta.get('haproxy', '?')}, {meta.get('nginx', '?')}, {meta.get('wrk', '?')}, {meta.get('iperf3', '?')}"
        + (f", {meta['sockperf']}" if "sockperf" in meta else "")
        + ".\n"
    )
    if "nginx_stream" in meta:
        out.append(f"nginx stream: {meta['nginx_stream']}.\n")
    out.append(
        f"Mode: {meta.get('mode', '?')}: {meta.get('rounds', '?')} interleaved round(s), "
        f"{meta.get('duration', '?')} s per iperf3/wrk run, wrk `{meta.get('wrk_args', '?')}`, "
        f"{meta.get('mem_conns', '?')} idle connections ({meta.get('mem_rounds', '?')} round(s), fresh proxy each). "
        "Values are medians over the rounds. Proxies, load generators and backends all share the same "
        "CPUs, so absolute numbers are machine-bound; the ratios are what matter. "
        f"Machine CPU busy before/after the run (idle baseline): {meta.get('busy_before', '?')}% / "
        f"{meta.get('busy_after', '?')}%.\n"
    )
    out.append(
        "| Test | Unit | direct | HAProxy | nginx stream | l4proxy | l4proxy / HAProxy | l4proxy / nginx | l4proxy / direct |"
    )
    out.append("|---|---|--:|--:|--:|--:|--:|--:|--:|")
    for test, metric, label, unit, _hib, dec in ROWS:
        m = {p: med(test, p, metric) for p in PATHS}
        if all(v is None for v in m.values()):
            continue
        out.append(
            f"| {label} | {unit} | {fmt(m['direct'], dec)} | {fmt(m['haproxy'], dec)} | {fmt(m['nginx'], dec)} "
            f"| {fmt(m['l4proxy'], dec)} | {ratio(m['l4proxy'], m['haproxy'])} | {ratio(m['l4proxy'], m['nginx'])} "
            f"| {ratio(m['l4proxy'], m['direct'])} |"
        )
    out.append("")

    # Latency: round trip per path, and what the proxy adds: (path - direct) in the same round,
    # median over rounds (the pairs share a round, so slow drift cancels).
    def added(test, path, metric):
        d = dict(values.get((test, "direct", metric), []))
        diffs = [v - d[r] for r, v in values.get((test, path, metric), []) if r in d]
        return statistics.median(diffs) if diffs else None

    if any(values.get((t, p, m)) for t, m, _ in LAT_ROWS for p in PATHS):
        out.append(
            f"Latency at low load: `{meta.get('lat_args', 'sockperf ping-pong')}`, one connection (UDP: one "
            "client socket, one session), 1 KiB messages, one in flight; round-trip times in µs, medians over "
            "the rounds. \"added\" = through the proxy − direct, per round (same round), median over rounds; "
            "a round trip crosses the proxy twice; a ratio of added latencies is shown only when both are positive. \"all on CPU 0\": client, server and the proxy under test pinned to "
            "CPU 0 (taskset) for the run, so no hop waits for an idle vCPU to wake.\n"
        )
        out.append(
            "| Ping-pong round trip | direct | HAProxy | nginx stream | l4proxy | added: HAProxy | added: nginx "
            "| added: l4proxy | l4proxy added / HAProxy added | l4proxy added / nginx added |"
        )
        out.append("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
        for test, metric, label in LAT_ROWS:
            m = {p: med(test, p, metric) for p in PATHS}
            if all(v is None for v in m.values()):
                continue
            a = {p: added(test, p, metric) for p in PROXIES}
            out.append(
                f"| {label} | {fmt(m['direct'], 1)} | {fmt(m['haproxy'], 1)} | {fmt(m['nginx'], 1)} | {fmt(m['l4proxy'], 1)} "
                f"| {fmt(a['haproxy'], 1)} | {fmt(a['nginx'], 1)} | {fmt(a['l4proxy'], 1)} "
                f"| {pos_ratio(a['l4proxy'], a['haproxy'])} | {pos_ratio(a['l4proxy'], a['nginx'])} |"
            )
        out.append("")

    out.append("Proxy CPU cost (CPU time of the proxy's processes during each run; nginx: master and workers; medians):\n")
    out.append("| Test | Unit | HAProxy | nginx stream | l4proxy | l4proxy / HAProxy | l4proxy / nginx |")
    out.append("|---|---|--:|--:|--:|--:|--:|")
    for test, metric, label, unit, scale in CPU_ROWS:
        c = {p: med(test, p, metric) for p in PROXIES}
        if all(v is None for v in c.values()):
            continue
        c = {p: (v * scale if v is not None else None) for p, v in c.items()}
        out.append(
            f"| {label} | {unit} | {fmt(c['haproxy'], 2)} | {fmt(c['nginx'], 2)} | {fmt(c['l4proxy'], 2)} "
            f"| {ratio(c['l4proxy'], c['haproxy'])} | {ratio(c['l4proxy'], c['nginx'])} |"
        )
    out.append("")

    errs = []
    for test in ("close", "keepalive"):
        for p in PATHS:
            e = sum(v for _, v in values.get((test, p, "errors"), []))
            if e:
                errs.append(f"{test}/{NAMES[p]}: {e:.0f}")
    out.append("wrk socket errors / non-2xx responses (sum over rounds): " + (", ".join(errs) if errs else "none") + ".\n")

    repeats, still_loaded, foreign_all = 0, [], []
    max_foreign = float(meta.get("max_foreign", "inf"))
    for (test, path, metric), vs in values.items():
        if metric == "attempts":
            repeats += sum(int(v) - 1 for _, v in vs)
        if metric == "foreign_cores":
            foreign_all += [v for _, v in vs]
            still_loaded += [f"{test}/{NAMES[path]} r{r} ({v:.2f})" for r, v in vs if v > max_foreign]
    if foreign_all:
        out.append(
            f"Other load on the machine during the runs (\"foreign\" CPU, cores): median {statistics.median(foreign_all):.2f}, "
            f"max {max(foreign_all):.2f}; {repeats} run(s) were repeated because it exceeded {max_foreign:g} cores"
            + (f"; kept although above the limit (repeats or the {meta.get('quiet_budget', '?')} s waiting budget used up): {', '.join(still_loaded)}" if still_loaded else "")
            + ".\n"
        )

    out.append("<details><summary>Every round (in round order)</summary>\n")
    out.append("| Test | Unit | direct | HAProxy | nginx stream | l4proxy |")
    out.append("|---|---|---|---|---|---|")
    rows = [(t, m, lab, u, d) for t, m, lab, u, _h, d in ROWS]
    rows += [(t, m, f"ping-pong {lab}", "µs", 1) for t, m, lab in LAT_ROWS]
    for test, metric, label, unit, dec in rows:
        if all(not values.get((test, p, metric)) for p in PATHS):
            continue
        out.append(f"| {label} | {unit} | " + " | ".join(spread(test, p, metric, dec) for p in PATHS) + " |")
    for test, label in (
        ("iperf1", "iperf3 1 stream"),
        ("iperf8", "iperf3 8 streams"),
        ("close", "new connections"),
        ("keepalive", "keep-alive"),
        ("lat_tcp", "TCP ping-pong"),
        ("lat_udp", "UDP ping-pong"),
        ("lat_tcp_cpu0", "TCP ping-pong, CPU 0"),
        ("lat_udp_cpu0", "UDP ping-pong, CPU 0"),
    ):
        if any(values.get((test, p, "foreign_cores")) for p in PATHS):
            out.append(f"| {label}: foreign load | cores | " + " | ".join(spread(test, p, "foreign_cores", 2) for p in PATHS) + " |")
    out.append("\nOrder of paths per round: " + meta.get("orders", "?") + "; UDP ping-pong: " + meta.get("orders_udp", "?") + "\n")
    out.append("</details>\n")
    return "\n".join(out)


def main() -> None:
    if len(sys.argv) >= 3 and sys.argv[1] == "wrk":
        print(parse_wrk(sys.argv[2]))
    elif len(sys.argv) >= 3 and sys.argv[1] == "iperf":
        print(parse_iperf(sys.argv[2]))
    elif len(sys.argv) >= 3 and sys.argv[1] == "sockperf":
        print(parse_sockperf(sys.argv[2]))
    elif len(sys.argv) >= 4 and sys.argv[1] == "table":
        print(table(sys.argv[2], sys.argv[3]))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
