"""Turns the raw outputs of bench/run.sh into target/bench/router.json and Markdown tables."""
import json
import re
import subprocess
import sys

work, out, seconds, http_conns, ws_conns, rounds, big_cache, trace_lines = sys.argv[1:9]
rounds = int(rounds)
UNITS = {"us": 1.0, "ms": 1000.0, "s": 1_000_000.0}


def median(values):
    values = sorted(v for v in values if v is not None)
    return values[len(values) // 2] if values else None


def wrk(name, round_):
    text = open(f"{work}/wrk-{name}-{round_}.txt").read()
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
    lat = {}
    for pct, value, unit in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", text, re.M):
        lat[pct] = float(value) * UNITS[unit]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    socket_errors = re.search(r"Socket errors: (.*)", text)
    return {
        "requests_per_sec": rps,
        "p50_us": lat.get("50"),
        "p99_us": lat.get("99"),
        "non_2xx": int(errors.group(1)) if errors else 0,
        "socket_errors": socket_errors.group(1) if socket_errors else None,
    }


def target(name):
    http_rounds = [wrk(name, r) for r in range(1, rounds + 1)]
    ws_rounds = [json.load(open(f"{work}/ws-{name}-{r}.json")) for r in range(1, rounds + 1)]
    return {
        "http": {
            k: median([h[k] for h in http_rounds])
            for k in ["requests_per_sec", "p50_us", "p99_us"]
        },
        "websocket_echo": {
            k: median([w[k] for w in ws_rounds]) for k in ["messages_per_sec", "p50_us", "p99_us"]
        },
        "rounds": {"http": http_rounds, "websocket_echo": ws_rounds},
    }


NAMES = ["app", "sidecar", "router", "router-traced", "nginx", "router-10", "router-big"]
results = {name: target(name) for name in NAMES}
memory = {}
for name in ["router", "nginx"]:
    mem = json.load(open(f"{work}/mem-{name}.json"))
    held = mem["idle_connections"]
    mem["kib_per_idle_websocket"] = (
        round((mem["rss_idle_kib"] - mem["rss_before_kib"]) / held, 2) if held else None
    )
    memory[name] = mem

cpu = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
nginx_version = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip()
traced_messages = sum(w["messages"] for w in results["router-traced"]["rounds"]["websocket_echo"])
report = {
    "setup": {
        "cores": int(cpu),
        "seconds_per_run": int(seconds),
        "rounds": rounds,
        "statistic": "median of the rounds",
        "http_connections": int(http_conns),
        "http_tool": "wrk -t1",
        "nginx_workers": 1,
        "router": "spawner router (release), path mode, session cookie on every request",
        "websocket_echo_connections": int(ws_conns),
        "websocket_message_bytes": 64,
        "big_cache_backends": int(big_cache),
        "nginx": nginx_version,
    },
    "results": results,
    "memory": memory,
    "trace": {"lines_written": int(trace_lines), "messages_sent": traced_messages},
}
with open(out, "w") as f:
    json.dump(report, f, indent=2)

LABELS = {
    "app": "application directly",
    "sidecar": "sidecar alone",
    "router": "router -> sidecar",
    "router-traced": "router -> sidecar, --record-trace",
    "nginx": "nginx -> sidecar",
}
print("| target | HTTP req/s | HTTP p50 | HTTP p99 | WS echo msg/s | WS p50 | WS p99 |")
print("|---|---:|---:|---:|---:|---:|---:|")
for name, label in LABELS.items():
    h, w = results[name]["http"], results[name]["websocket_echo"]
    print(
        f"| {label} | {h['requests_per_sec']:,.0f} | {h['p50_us']:.0f} µs | {h['p99_us']:.0f} µs "
        f"| {w['messages_per_sec']:,.0f} | {w['p50_us']} µs | {w['p99_us']} µs |"
    )
added = results["router"]["http"]["p50_us"] - results["sidecar"]["http"]["p50_us"]
print(f"\nrouter's added HTTP p50 over the sidecar alone: {added:.0f} µs")
print("\n| idle WebSockets held | through | RSS before | RSS holding | KiB per idle WebSocket |")
print("|---:|---|---:|---:|---:|")
for name in ["router", "nginx"]:
    m = memory[name]
    print(
        f"| {m['idle_connections']:,} | {name} | {m['rss_before_kib']:,} KiB "
        f"| {m['rss_idle_kib']:,} KiB | {m['kib_per_idle_websocket']} |"
    )
print(f"\n| router cache | HTTP req/s | HTTP p50 | HTTP p99 |")
print("|---|---:|---:|---:|")
for name, label in [("router-10", "10 backends"), ("router-big", f"{int(big_cache):,} backends")]:
    h = results[name]["http"]
    print(f"| {label} | {h['requests_per_sec']:,.0f} | {h['p50_us']:.0f} µs | {h['p99_us']:.0f} µs |")
print(
    f"\n--record-trace: {int(trace_lines):,} trace lines written for {traced_messages:,} WebSocket "
    "messages sent through the traced router (plus a connect and a disconnect per connection)"
)
print("\nEvery HTTP round (req/s, p99), rounds interleaved:\n")
print("| round | app | sidecar | router | router traced | nginx | router/nginx req/s |")
print("|---:|---:|---:|---:|---:|---:|---:|")
for i in range(rounds):
    row = [results[n]["rounds"]["http"][i] for n in ["app", "sidecar", "router", "router-traced", "nginx"]]
    cells = [f"{h['requests_per_sec']:,.0f}, {h['p99_us']:,.0f} µs" for h in row]
    ratio = row[2]["requests_per_sec"] / row[4]["requests_per_sec"]
    print(f"| {i + 1} | {' | '.join(cells)} | {ratio:.2f} |")
for name in NAMES:
    bad = [h for h in results[name]["rounds"]["http"] if h["non_2xx"] or h["socket_errors"]]
    if bad:
        print(f"\nWARNING {name}: non-2xx or socket errors: {bad}")
print(f"\nwritten: {out}")
