"""Turns the raw outputs of bench/run.sh into target/bench/sidecar.json and a Markdown table."""
import json
import re
import subprocess
import sys

work, out, seconds, http_conns, ws_conns, idle, rounds = sys.argv[1:8]
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


results = {}
for name in ["app", "sidecar", "nginx"]:
    mem = json.load(open(f"{work}/mem-{name}.json"))
    per_1000 = (mem["rss_idle_kib"] - mem["rss_before_kib"]) * 1000 / mem["idle_connections"]
    http_rounds = [wrk(name, r) for r in range(1, rounds + 1)]
    ws_rounds = [json.load(open(f"{work}/ws-{name}-{r}.json")) for r in range(1, rounds + 1)]
    results[name] = {
        "http": {
            k: median([h[k] for h in http_rounds])
            for k in ["requests_per_sec", "p50_us", "p99_us"]
        },
        "websocket_echo": {
            k: median([w[k] for w in ws_rounds]) for k in ["messages_per_sec", "p50_us", "p99_us"]
        },
        "memory": {**mem, "kib_per_1000_idle_websockets": round(per_1000, 1)},
        "rounds": {"http": http_rounds, "websocket_echo": ws_rounds},
    }

cpu = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
nginx_version = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip()
report = {
    "setup": {
        "cores": int(cpu),
        "seconds_per_run": int(seconds),
        "rounds": rounds,
        "statistic": "median of the rounds",
        "http_connections": int(http_conns),
        "http_tool": "wrk -t1",
        "nginx_workers": 1,
        "sidecar": "spawner sidecar (release)",
        "websocket_echo_connections": int(ws_conns),
        "websocket_message_bytes": 64,
        "idle_websockets": int(idle),
        "nginx": nginx_version,
    },
    "results": results,
}
with open(out, "w") as f:
    json.dump(report, f, indent=2)

print(f"| target | HTTP req/s | HTTP p50 | HTTP p99 | WS echo msg/s | WS p50 | WS p99 | KiB per 1,000 idle WS |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
for name, label in [("app", "application directly"), ("sidecar", "spawner sidecar"), ("nginx", "nginx")]:
    r = results[name]
    h, w, m = r["http"], r["websocket_echo"], r["memory"]
    print(
        f"| {label} | {h['requests_per_sec']:,.0f} | {h['p50_us']:.0f} µs | {h['p99_us']:.0f} µs "
        f"| {w['messages_per_sec']:,.0f} | {w['p50_us']} µs | {w['p99_us']} µs "
        f"| {m['kib_per_1000_idle_websockets']:,.0f} |"
    )
print("\nEvery HTTP round (req/s, p99), rounds interleaved app → sidecar → nginx:\n")
print("| round | app | spawner sidecar | nginx | sidecar/nginx req/s |")
print("|---:|---:|---:|---:|---:|")
for i in range(rounds):
    row = [results[n]["rounds"]["http"][i] for n in ["app", "sidecar", "nginx"]]
    cells = [f"{h['requests_per_sec']:,.0f}, {h['p99_us']:,.0f} µs" for h in row]
    ratio = row[1]["requests_per_sec"] / row[2]["requests_per_sec"]
    print(f"| {i + 1} | {' | '.join(cells)} | {ratio:.2f} |")
print(f"\nwritten: {out}")
