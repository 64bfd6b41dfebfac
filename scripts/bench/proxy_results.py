"""Reads what scripts/bench/proxy.sh leaves in its scratch directory: wrk's HTTP results, the
WebSocket echo results of bench_ws, memory per idle WebSocket; the medians of the rounds; the
machine's setup. Used by the proxy benchmarks' report.py (components/sidecar/bench,
components/router/bench)."""
import json
import re
import subprocess

UNITS = {"us": 1.0, "ms": 1000.0, "s": 1_000_000.0}


def median(values):
    values = sorted(v for v in values if v is not None)
    return values[len(values) // 2] if values else None


def wrk(work, name, round_):
    """One round of wrk against `name`: req/s, p50 and p99 in µs, and its errors."""
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


def target(work, name, rounds):
    """Every round of HTTP and WebSocket echo load against `name`, and their medians."""
    http_rounds = [wrk(work, name, r) for r in range(1, rounds + 1)]
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


def idle_memory(work, name):
    """Resident memory of `name` before and while holding idle WebSockets (KiB)."""
    return json.load(open(f"{work}/mem-{name}.json"))


def setup(seconds, rounds, http_conns, ws_conns, **extra):
    """The setup every proxy report states, plus `extra`."""
    cpu = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    nginx_version = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip()
    return {
        "cores": int(cpu),
        "seconds_per_run": int(seconds),
        "rounds": rounds,
        "statistic": "median of the rounds",
        "http_connections": int(http_conns),
        "http_tool": "wrk -t1",
        "nginx_workers": 1,
        **extra,
        "websocket_echo_connections": int(ws_conns),
        "websocket_message_bytes": 64,
        "nginx": nginx_version,
    }


def print_http_rounds(results, columns, proxy, reference, rounds):
    """The table of every HTTP round (req/s, p99): `columns` maps names to headers; the last
    column is the req/s of `proxy` over `reference` in that round."""
    print(f"| round | {' | '.join(columns.values())} | {proxy}/{reference} req/s |")
    print("|---:|" + "---:|" * (len(columns) + 1))
    for i in range(rounds):
        row = [results[n]["rounds"]["http"][i] for n in columns]
        cells = [f"{h['requests_per_sec']:,.0f}, {h['p99_us']:,.0f} µs" for h in row]
        over = (
            results[proxy]["rounds"]["http"][i]["requests_per_sec"]
            / results[reference]["rounds"]["http"][i]["requests_per_sec"]
        )
        print(f"| {i + 1} | {' | '.join(cells)} | {over:.2f} |")


def warn_of_errors(results):
    """A warning for every target whose HTTP rounds saw non-2xx answers or socket errors."""
    for name, result in results.items():
        bad = [h for h in result["rounds"]["http"] if h["non_2xx"] or h["socket_errors"]]
        if bad:
            print(f"\nWARNING {name}: non-2xx or socket errors: {bad}")
