"""Turns the raw outputs of bench/run.sh into target/bench/router.json and Markdown tables."""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "../../../scripts/bench"))
import proxy_results  # noqa: E402

work, out, seconds, http_conns, ws_conns, rounds, big_cache, trace_lines = sys.argv[1:9]
rounds = int(rounds)

NAMES = ["app", "sidecar", "router", "router-traced", "nginx", "router-10", "router-big"]
results = {name: proxy_results.target(work, name, rounds) for name in NAMES}
memory = {}
for name in ["router", "nginx"]:
    mem = proxy_results.idle_memory(work, name)
    held = mem["idle_connections"]
    mem["kib_per_idle_websocket"] = (
        round((mem["rss_idle_kib"] - mem["rss_before_kib"]) / held, 2) if held else None
    )
    memory[name] = mem

traced_messages = sum(w["messages"] for w in results["router-traced"]["rounds"]["websocket_echo"])
report = {
    "setup": proxy_results.setup(
        seconds,
        rounds,
        http_conns,
        ws_conns,
        router="spawner router (release), path mode, session cookie on every request",
        big_cache_backends=int(big_cache),
    ),
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
proxy_results.print_http_rounds(
    results,
    {
        "app": "app",
        "sidecar": "sidecar",
        "router": "router",
        "router-traced": "router traced",
        "nginx": "nginx",
    },
    "router",
    "nginx",
    rounds,
)
proxy_results.warn_of_errors(results)
print(f"\nwritten: {out}")
