"""Turn bench/results/latest.json into docs/benchmarks.md (tables) and docs/benchmarks.png (chart)."""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
Row = dict[str, dict[str, object]]
PEERS_OF = {"tunneld (openssh)": "ssh -N -L", "tunneld (paramiko)": "sshtunnel"}


def _metric(rounds: list[Row], name: str, pick: Callable[[dict[str, object]], float]) -> list[float]:
    return [pick(r[name]) for r in rounds if name in r]


def _spread(values: list[float], digits: int) -> str:
    if not values:
        return "-"
    med = statistics.median(values)
    return f"{med:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def _ratio(rounds: list[Row], name: str, peer: str, pick: Callable[[dict[str, object]], float]) -> str:
    ratios = [pick(r[name]) / pick(r[peer]) for r in rounds if name in r and peer in r and pick(r[peer])]
    return f"{statistics.median(ratios):.2f}x" if ratios else "-"


METRICS: list[tuple[str, Callable[[dict[str, object]], float], int, bool]] = [
    ("bulk up MB/s", lambda m: float(m["up_mbs"]), 0, True),  # type: ignore[arg-type]
    ("bulk down MB/s", lambda m: float(m["down_mbs"]), 0, True),  # type: ignore[arg-type]
    ("round trip p50 ms", lambda m: float(m["rtt_ms"]["p50"]), 3, False),  # type: ignore[index]
    ("round trip p99 ms", lambda m: float(m["rtt_ms"]["p99"]), 3, False),  # type: ignore[index]
    ("new connection p50 ms", lambda m: float(m["new_conn_ms"]["p50"]), 2, False),  # type: ignore[index]
    ("new connection p99 ms", lambda m: float(m["new_conn_ms"]["p99"]), 2, False),  # type: ignore[index]
    ("1000 concurrent: wall s", lambda m: float(m["concurrent_wall_s"]), 1, False),  # type: ignore[arg-type]
    ("1000 concurrent: failures", lambda m: float(m["concurrent_failures"]), 0, False),  # type: ignore[arg-type]
    ("CPU s per GiB moved", lambda m: float(m["cpu_s_per_gib"] or 0), 2, False),  # type: ignore[arg-type]
]


def markdown(results: dict[str, object]) -> str:
    rounds: list[Row] = results["rounds"]  # type: ignore[assignment]
    names = list(rounds[0]) if rounds else []
    names.sort(key=["direct", "ssh -N -L", "tunneld (openssh)", "tunneld (paramiko)", "sshtunnel"].index)
    machine: dict[str, str] = results["machine"]  # type: ignore[assignment]
    out = [
        "# Benchmarks",
        "",
        "Measured by `make bench` (`bench/run.py`): every forwarder in turn, in a rotating order, over "
        f"{len(rounds)} round(s), against a real OpenSSH sshd and a target service on loopback. Cells are "
        "median (min-max) over rounds; ratios are medians of per-round ratios to the peer measured in the "
        "same round. MB = 10^6 bytes. The endpoints send with sendfile and receive with splice, so they cost "
        "the forwarders almost no CPU. This machine (2 shared virtual cores) varies by up to +-30% between "
        "runs: compare forwarders within one run, not across runs.",
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in machine.items()),
        "",
        f"Command: `{results.get('command', 'python bench/run.py')}`",
        "",
        "| metric | " + " | ".join(names) + " | tunneld (openssh) / ssh -N -L | tunneld (paramiko) / sshtunnel |",
        "|---" * (len(names) + 3) + "|",
    ]
    for label, pick, digits, _higher in METRICS:
        cells = []
        for name in names:
            values = _metric(rounds, name, pick)
            cells.append("-" if label.startswith("CPU") and name == "direct" else _spread(values, digits))
        ratios = [_ratio(rounds, n, p, pick) for n, p in PEERS_OF.items()]
        if label.startswith("1000 concurrent: failures"):
            ratios = ["", ""]
        out.append(f"| {label} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    out += ["", "## Recovery, hang detection, resources, CLI", ""]
    recovery: dict[str, dict[str, float | None]] = results.get("recovery_s", {})  # type: ignore[assignment]
    for engine, cases in recovery.items():
        for outage, seconds in cases.items():
            shown = f"{seconds:.2f} s" if seconds is not None else "did not recover within 60 s"
            out.append(f"- recovery, tunneld ({engine}), after a {outage} outage: {shown} from the server "
                       "answering again to a working connection through the forward")  # fmt: skip
    hang: dict[str, float | None] = results.get("hang_detection_s", {})  # type: ignore[assignment]
    for engine, seconds in hang.items():
        shown = f"{seconds:.1f} s" if seconds is not None else "not detected within 60 s"
        out.append(f"- hang detection, tunneld ({engine}), default keepalive 3 s x 3: {shown} from SIGSTOP of sshd "
                   "to state `lost`")  # fmt: skip
    out.append("- `ssh -N -L` and sshtunnel do not reconnect at all: after a server restart they stay broken.")
    idle: dict[str, dict[str, float | None]] = results.get("idle_rss_mib", {})  # type: ignore[assignment]
    for name, roles in idle.items():
        parts = ", ".join(f"{role} {v:.1f} MiB" for role, v in roles.items() if v is not None)
        out.append(f"- idle RSS (VmRSS, 5 s after `start` returned), {name}: {parts}")
    for key, when in (
        ("peak_rss_mib_before_concurrency", "during bulk, round trips and new connections (first round)"),
        ("peak_rss_mib", "over the whole run, including 1000 connections at once"),
    ):
        rss: dict[str, dict[str, float | None]] = results.get(key, {})  # type: ignore[assignment]
        for name, roles in rss.items():
            parts = ", ".join(f"{role} {v:.1f} MiB" for role, v in roles.items() if v is not None)
            out.append(f"- peak RSS (VmHWM) {when}, {name}: {parts}")
    cli: dict[str, float] = results.get("cli_s", {})  # type: ignore[assignment]
    if cli:
        shown = ", ".join(f"{k}: {v * 1000:.0f} ms" for k, v in cli.items())
        base = cli.get("python -c 'import click, psutil'")
        status = cli.get("tunneld status (5 tunnels)")
        ratio = f" (status / import click, psutil = {status / base:.2f}x)" if base and status else ""
        out.append(f"- CLI wall time, median of runs: {shown}{ratio}")
    out += _long_path_lines(results) + _many_lines(results)
    skipped = results.get("skipped")
    if isinstance(skipped, list) and skipped:
        out.append(f"- not measured (time budget spent): {', '.join(str(s) for s in skipped)}")
    out += ["", "![throughput and latency per forwarder](benchmarks.png)", ""]
    return "\n".join(out)


def _long_path_lines(results: dict[str, object]) -> list[str]:
    rows: dict[str, dict[str, float]] = results.get("long_path_mbs", {})  # type: ignore[assignment]
    if not rows:
        return []
    base = rows.get("ssh -N -L", {}).get("down_mbs")
    out = ["", "### Long fat path: 40 ms round trip (a relay adds 20 ms each way in front of sshd)", "",
           "Median of three transfers per forwarder (96 MiB down, 48 MiB up, each on a new connection); the relay "
           "runs in a process of its own.", "",
           "| forwarder | download MB/s | upload MB/s | download vs ssh -N -L |", "|---|---|---|---|"]  # fmt: skip
    for name, row in rows.items():
        ratio = f"{row['down_mbs'] / base:.2f}x" if base else "-"
        out.append(f"| {name} | {row['down_mbs']:.0f} | {row['up_mbs']:.0f} | {ratio} |")
    return out


def _many_lines(results: dict[str, object]) -> list[str]:
    many: dict[str, float] = results.get("many_tunnels", {})  # type: ignore[assignment]
    if not many:
        return []
    count = int(many["count"])
    said: object = many.get("failures")
    failures = [str(line) for line in said] if isinstance(said, list) else []
    per_tunnel = many["tunneld_total_mib"] / count
    plain = many["plain_ssh_total_mib"] / count
    return [
        "", f"### {count} tunnels on one sshd (OpenSSH's default MaxStartups 10:30:100, OpenSSH engine)", "",
        f"- `tunneld start` of {count} hosts: {int(many['up'])} up in {many['start_wall_s']:.1f} s",
        f"- memory after 5 s idle: tunneld {many['tunneld_total_mib']:.0f} MiB in all ({per_tunnel:.1f} MiB per "
        f"tunnel: supervisor {many['supervisor_median_mib']:.1f} + ssh {many['ssh_median_mib']:.1f}), "
        f"{count} x `ssh -fN` {many['plain_ssh_total_mib']:.0f} MiB ({plain:.1f} MiB each)",
        *([f"- the same in PSS (shared pages such as libpython split among the processes that share them: what "
           f"they cost together): tunneld {many['tunneld_total_pss_mib']:.0f} MiB "
           f"({many['tunneld_total_pss_mib'] / count:.1f} per tunnel), {count} x `ssh -fN` "
           f"{many['plain_ssh_total_pss_mib']:.0f} MiB ({many['plain_ssh_total_pss_mib'] / count:.1f} each)"]
          if "tunneld_total_pss_mib" in many else []),
        *(f"- did not start: {line}" for line in failures[:5]),
    ]  # fmt: skip


def chart(results: dict[str, object], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds: list[Row] = results["rounds"]  # type: ignore[assignment]
    names = [
        n
        for n in ["direct", "ssh -N -L", "tunneld (openssh)", "tunneld (paramiko)", "sshtunnel"]
        if rounds and n in rounds[0]
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    panels = [
        ("bulk throughput, MB/s (higher is better)", [METRICS[0], METRICS[1]]),
        ("round trip on one connection, ms p50", [METRICS[2]]),
        ("new connection + round trip, ms p50", [METRICS[4]]),
    ]
    for axis, (title, metrics) in zip(axes, panels, strict=True):
        width = 0.8 / len(metrics)
        for i, (label, pick, _, _) in enumerate(metrics):
            values = [statistics.median(_metric(rounds, n, pick)) for n in names]
            axis.bar([x + i * width for x in range(len(names))], values, width, label=label)
        axis.set_xticks([x + width * (len(metrics) - 1) / 2 for x in range(len(names))])
        axis.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
        axis.set_title(title, fontsize=10)
        if len(metrics) > 1:
            axis.legend(fontsize=8)
        if "new connection" in title:
            axis.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "bench" / "results" / "latest.json"
    results = json.loads(source.read_text())
    (ROOT / "docs" / "benchmarks.md").write_text(markdown(results))
    chart(results, ROOT / "docs" / "benchmarks.png")
    print("wrote docs/benchmarks.md and docs/benchmarks.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
