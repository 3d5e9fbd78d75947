#!/usr/bin/env python3
"""Markdown report for bench/udp.sh: results.tsv (test path round metric value) + meta.tsv."""
import statistics
import sys
from collections import defaultdict

results_path, meta_path = sys.argv[1], sys.argv[2]
meta = {}
for line in open(meta_path):
    k, _, v = line.rstrip("\n").partition("\t")
    meta[k] = v
data = defaultdict(list)  # (test, path, metric) -> [(round, value)]
for line in open(results_path):
    test, path, rnd, metric, value = line.rstrip("\n").split("\t")
    data[(test, path, metric)].append((int(rnd), float(value)))

PATHS = meta.get("paths", "").split()
SPATHS = meta.get("session_paths", "").split()
NAMES = {"direct": "direct", "l4proxy": "l4proxy", "nginx": "nginx stream", "socat": "socat",
         "nginx-bind4": "nginx stream, 4 source IPs"}


def med(test, path, metric):
    v = [x for _, x in data.get((test, path, metric), [])]
    return statistics.median(v) if v else None


def per_round(test, path, f):
    """median over rounds of f(round -> metric dict)"""
    rounds = defaultdict(dict)
    for (t, p, m), vals in data.items():
        if t == test and p == path:
            for r, x in vals:
                rounds[r][m] = x
    vals = [f(d) for d in rounds.values()]
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def fmt(v, kind):
    if v is None:
        return "–"
    if kind == "pps":
        return f"{v:,.0f}"
    if kind == "pct":
        return f"{100 * v:.2f} %"
    if kind == "f2":
        return f"{v:.2f}"
    if kind == "int":
        return f"{v:,.0f}"
    return str(v)


def ratio(a, b):
    if a is None or b is None or b == 0:
        return "–"
    return f"{a / b:.2f}×"


tests = []
for (t, _, _) in data:
    if t != "sessions" and t not in tests:
        tests.append(t)


def test_key(t):
    kind, size = t.rsplit("_", 1)
    size = int(size.rstrip("B"))
    if kind == "flood":
        return (size, 1, 0)
    return (size, 0, int(kind[4:]))


tests.sort(key=test_key)


def label(t):
    kind, size = t.rsplit("_", 1)
    if kind == "flood":
        return f"flood, {size}"
    return f"{int(kind[4:]):,} pps offered, {size}"


out = []
w = out.append
w("# l4proxy UDP benchmark results\n")
w(f"Run {meta.get('date')} on {meta.get('cpu')} ({meta.get('nproc')} CPUs), kernel {meta.get('kernel')}; "
  f"l4proxy {meta.get('l4proxy_rev')}, nginx {meta.get('nginx')} (stream module), socat {meta.get('socat')}; "
  f"load generator and echo backend: bench/udp (Rust, sendmmsg/recvmmsg).\n")
mode = "quick" if meta.get("quick") == "1" else "full"
w(f"Mode: {mode}: {meta.get('rounds')} interleaved round(s) (path order rotates every round), "
  f"{meta.get('duration')} s per run, {meta.get('clients')} client sockets (= sessions) per run, "
  f"{meta.get('workers')} l4proxy worker threads / nginx worker processes. Values are medians over the rounds. "
  "Delivered = echoed replies received by the client (both directions pass the proxy); "
  "loss = 1 − received/sent. Proxies, load generator and echo backend all share the same CPUs.\n")

if tests:
    hdr = "| Test | Metric | " + " | ".join(NAMES[p] for p in PATHS) + " | l4proxy / nginx | l4proxy / direct |"
    w(hdr)
    w("|---|---|" + "--:|" * (len(PATHS) + 2))
    for t in tests:
        for metric, unit, kind in (("recv_pps", "delivered pps", "pps"), ("loss", "loss", "pct")):
            vals = {p: med(t, p, metric) for p in PATHS}
            r1 = ratio(vals.get("l4proxy"), vals.get("nginx")) if metric == "recv_pps" else "–"
            r2 = ratio(vals.get("l4proxy"), vals.get("direct")) if metric == "recv_pps" else "–"
            w(f"| {label(t)} | {unit} | " + " | ".join(fmt(vals[p], kind) for p in PATHS) + f" | {r1} | {r2} |")
    w("")
    proxies = [p for p in PATHS if p != "direct"]
    w("Proxy CPU (all processes of the proxy over the whole run, warm-up and drain included) and the cost per "
      "delivered datagram (proxy CPU-µs per echoed datagram, each of which the proxy handled twice: up and down):\n")
    w("| Test | " + " | ".join(f"{NAMES[p]} cores" for p in proxies) + " | "
      + " | ".join(f"{NAMES[p]} µs/dgram" for p in proxies) + " | l4proxy / nginx µs/dgram | load gen cores | echo cores |")
    w("|---|" + "--:|" * (2 * len(proxies) + 3))
    for t in tests:
        cores = [fmt(med(t, p, "proxy_cores"), "f2") for p in proxies]
        cost = {}
        for p in proxies:
            cost[p] = per_round(
                t, p, lambda d: (d["proxy_cores"] / d["recv_pps"] * 1e6) if d.get("recv_pps") else None)
        lg = med(t, "l4proxy", "loadgen_cores")
        ec = med(t, "l4proxy", "echo_cores")
        w(f"| {label(t)} | " + " | ".join(cores) + " | " + " | ".join(fmt(cost[p], "f2") for p in proxies)
          + f" | {ratio(cost.get('l4proxy'), cost.get('nginx'))} | {fmt(lg, 'f2')} | {fmt(ec, 'f2')} |")
    w("")
    w("(µs/dgram uses the run's CPU over the whole run, warm-up/drain included, divided by the delivered rate "
      "over the send phase; it slightly overstates the cost at low rates.)\n")
    foreign = [x for (t, p, m), v in data.items() if m == "foreign_cores" for _, x in v]
    if foreign:
        w(f"Other load on the machine during the runs (\"foreign\" CPU: machine busy CPU minus proxy, echo and "
          f"load generator; includes kernel softirq work not charged to them), cores: median "
          f"{statistics.median(foreign):.2f}, max {max(foreign):.2f}.\n")

if SPATHS and any(t == "sessions" for (t, _, _) in data):
    w(f"## Sessions: {int(float(meta.get('sessions_offered', 0))):,} clients, one datagram each\n")
    w(f"Each client socket has its own source address (127.10.0.x, ports 2000–29999); fresh proxy per run; "
      f"memory = after − before, divided by the sessions held (l4proxy: poolStats.size; nginx: answered). "
      f"Ephemeral port range: {meta.get('port_range')}; open-files limit {meta.get('nofile')}.\n")
    if meta.get("sessions_wanted") and meta.get("sessions_wanted") != meta.get("sessions_offered"):
        w(f"**Scaled down:** {int(meta['sessions_wanted']):,} sessions were wanted, but the open-files hard limit "
          f"is {meta.get('nofile')} and could not be raised (no CAP_SYS_RESOURCE), and each proxy needs one socket "
          f"per session.\n")
    w("| Metric | " + " | ".join(NAMES[p] for p in SPATHS) + " | l4proxy / nginx |")
    w("|---|" + "--:|" * (len(SPATHS) + 1))
    rows = (("offered", "clients offered", "int"), ("answered", "answered", "int"), ("sessions", "sessions held", "int"),
            ("pdirty_per_session_b", "Private_Dirty per session (B)", "int"),
            ("anon_per_session_b", "Anonymous per session (B)", "int"),
            ("rss_per_session_b", "VmRSS per session (B)", "int"),
            ("pdirty_delta_kib", "Private_Dirty growth (KiB)", "int"),
            ("rss_delta_kib", "VmRSS growth (KiB)", "int"),
            ("base_rss_kib", "VmRSS before (KiB)", "int"),
            ("fds_after", "open fds after", "int"))
    for m, name, kind in rows:
        vals = {p: med("sessions", p, m) for p in SPATHS}
        w(f"| {name} | " + " | ".join(fmt(vals[p], kind) for p in SPATHS) + f" | {ratio(vals.get('l4proxy'), vals.get('nginx'))} |")
    w("")

# Targets.
w("## Targets\n")
floods = [t for t in tests if t.startswith("flood")]
for t in floods:
    a, b = med(t, "l4proxy", "recv_pps"), med(t, "nginx", "recv_pps")
    if a is not None and b:
        ok = a >= 1.2 * b
        w(f"- Flood throughput ≥ 1.2× nginx ({label(t)}): {'met' if ok else 'missed'} — {a / b:.2f}× "
          f"({a:,.0f} vs {b:,.0f} pps).")
for size in sorted({t.rsplit('_', 1)[1] for t in tests if t.startswith("rate")}, key=lambda s: int(s.rstrip("B"))):
    ok_rates = [t for t in tests if t.startswith("rate") and t.endswith("_" + size)
                and (med(t, "nginx", "loss") or 0) < 0.01 and med(t, "nginx", "loss") is not None]
    if ok_rates:
        t = max(ok_rates, key=test_key)
        la, lb = med(t, "l4proxy", "loss"), med(t, "nginx", "loss")
        w(f"- < 1 % loss at a rate nginx sustains ({label(t)}; nginx {100 * lb:.2f} %): "
          f"{'met' if la is not None and la < 0.01 else 'missed'} — l4proxy {100 * la:.2f} %.")
    else:
        w(f"- < 1 % loss at a rate nginx sustains ({size}): no tested rate had nginx below 1 % loss.")
if SPATHS:
    off, ans = med("sessions", "l4proxy", "offered"), med("sessions", "l4proxy", "answered")
    if off:
        w(f"- Every one of {off:,.0f} sessions answered: {'met' if ans == off else 'missed'} — {ans:,.0f} answered "
          f"({off - ans:,.0f} unanswered, {100 * ans / off:.2f} %).")
    pd = med("sessions", "l4proxy", "pdirty_per_session_b")
    an = med("sessions", "l4proxy", "anon_per_session_b")
    if pd is not None:
        w(f"- ≤ 2 KiB user-space per session: {'met' if max(pd, an or 0) <= 2048 else 'missed'} — "
          f"Private_Dirty {pd:,.0f} B, Anonymous {an:,.0f} B per session.")
w("")

# Every round.
w("<details><summary>Every round (delivered pps / loss / proxy cores / kernel receive-buffer drops)</summary>\n")
w("| Test | Round | " + " | ".join(NAMES[p] for p in PATHS) + " |")
w("|---|--:|" + "---|" * len(PATHS))
for t in tests:
    rounds = sorted({r for p in PATHS for r, _ in data.get((t, p, "recv_pps"), [])})
    for r in rounds:
        cells = []
        for p in PATHS:
            d = {m: x for (tt, pp, m), v in data.items() if tt == t and pp == p for rr, x in v if rr == r}
            if "recv_pps" in d:
                cells.append(f"{d['recv_pps']:,.0f} / {100 * d['loss']:.2f} % / {d.get('proxy_cores', 0):.2f} / "
                             f"{d.get('rcvbuf_errors', 0):,.0f}")
            else:
                cells.append("–")
        w(f"| {label(t)} | {r} | " + " | ".join(cells) + " |")
sess_rounds = sorted({r for p in SPATHS for r, _ in data.get(("sessions", p, "answered"), [])})
for r in sess_rounds:
    for p in SPATHS:
        d = {m: x for (tt, pp, m), v in data.items() if tt == "sessions" and pp == p for rr, x in v if rr == r}
        if d:
            w(f"\nsessions round {r}, {NAMES[p]}: " + ", ".join(f"{k} {v:,.0f}" for k, v in sorted(d.items())))
w("\n</details>")
print("\n".join(out))
