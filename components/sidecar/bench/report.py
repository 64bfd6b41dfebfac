"""Turns the raw outputs of bench/run.sh into target/bench/sidecar.json and a Markdown table."""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "../../../scripts/bench"))
import proxy_results  # noqa: E402

work, out, seconds, http_conns, ws_conns, idle, rounds = sys.argv[1:8]
rounds = int(rounds)

results = {}
for name in ["app", "sidecar", "nginx"]:
    mem = proxy_results.idle_memory(work, name)
    per_1000 = (mem["rss_idle_kib"] - mem["rss_before_kib"]) * 1000 / mem["idle_connections"]
    results[name] = {
        **proxy_results.target(work, name, rounds),
        "memory": {**mem, "kib_per_1000_idle_websockets": round(per_1000, 1)},
    }

report = {
    "setup": proxy_results.setup(
        seconds,
        rounds,
        http_conns,
        ws_conns,
        sidecar="spawner sidecar (release)",
        idle_websockets=int(idle),
    ),
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
proxy_results.print_http_rounds(
    results, {"app": "app", "sidecar": "spawner sidecar", "nginx": "nginx"}, "sidecar", "nginx", rounds
)
proxy_results.warn_of_errors(results)
print(f"\nwritten: {out}")
