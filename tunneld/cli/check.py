"""`tunneld check HOST`: a step-by-step diagnosis, one verdict per step, whether or not the host runs."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from tunneld.cli.render import proxy_command_shown
from tunneld.config.credentials import host_auth_plan
from tunneld.config.listen import ListenPlan, plan_spec
from tunneld.config.ports import Listeners, listeners_of, port_in_use_error, port_is_free, socket_path_error
from tunneld.config.resolve import resolve_host
from tunneld.config.settings import host_settings
from tunneld.config.spec import TunnelSpec
from tunneld.engines import make_engine, select_engine_name
from tunneld.engines.link import Link, LinkEvents
from tunneld.engines.streams import LocalProber
from tunneld.errors import AuthError, HostKeyError, PortInUseError, TunneldError, UnreachableError
from tunneld.runtime.health import check_health_keys, checks_for, run_check
from tunneld.state.status import HostReport, collect
from tunneld.states import NEEDS_AUTH

PASS = "ok"  # noqa: S105 - a verdict, not a password
FAIL = "FAIL"
SKIP = "skip"


@dataclass(frozen=True)
class Step:
    """One line of the diagnosis."""

    name: str
    verdict: str
    detail: str
    hint: str | None = None


STEPS = ("config", "local port", "dns", "tcp", "host key", "auth", "forwards", "target")


def _skip_from(first: str, why: str) -> Iterator[Step]:
    for name in STEPS[STEPS.index(first) :]:
        yield Step(name, SKIP, why)


def run_checks(host: str, ssh_config: str | None, engine_name: str) -> Iterator[Step]:
    """Yield each step's verdict in order: a failure is reported at its own step, and every later step
    that needs it is `[skip]`, so one problem is never reported twice under two names."""
    try:
        spec = resolve_host(host, ssh_config)
        check_health_keys(spec, host_settings(host))  # tunneld.toml is part of the configuration
        select_engine_name(engine_name, host)
    except TunneldError as error:
        yield Step("config", FAIL, error.message, error.hint)
        yield from _skip_from("local port", "the configuration must be fixed first")
        return
    yield Step(
        "config",
        PASS,
        f"{spec.alias} resolves to {spec.user}@{spec.hostname}:{spec.port}, "
        f"{len(spec.forwards)} forward(s): " + ", ".join(str(f) for f in spec.forwards),
    )
    report = collect(host)
    ours = _ours(report)
    ports = list(_local_port_steps(spec, report, ours))
    yield from ports
    dns = _dns_step(spec)
    yield dns
    if dns.verdict == FAIL:
        yield from _skip_from("tcp", "the server's name does not resolve")
        return
    if report.is_up:
        yield Step("tcp", PASS, f"the running tunnel (pid {report.pid}) is connected")
        yield Step("host key", PASS, f"accepted by the running tunnel (pid {report.pid})")
        yield Step("auth", PASS, f"the running tunnel is authenticated (pid {report.pid})")
        yield Step("forwards", PASS, "listening: " + "; ".join(_listen_of(f) for f in report.forwards))
        yield from _target_steps(spec, ours)
        return
    if report.running and report.state == NEEDS_AUTH:
        yield from _waiting_steps(report)
        return
    if any(step.verdict == FAIL for step in ports):
        # Connecting only to find out whether TCP works would cost a connection that ends before authentication.
        yield from _skip_from("tcp", "a local port is taken; fix that first (check connects only when it can log in)")
        return
    yield from _connect_steps(spec, engine_name)


def _waiting_steps(report: HostReport) -> Iterator[Step]:
    """The tunnel waits for credentials (needs-auth): report why, without a login attempt of check's own (the
    server penalises refused logins, and the tunnel itself tries again as soon as the credentials change)."""
    error = report.last_error or {}
    yield Step("tcp", PASS, f"the running tunnel (pid {report.pid}) reached the server at its last attempt")
    yield Step("host key", PASS, "accepted at the last login")
    yield Step("auth", FAIL, str(error.get("message", "the tunnel waits for credentials")),
               str(error["hint"]) if error.get("hint") else None)  # fmt: skip
    yield from _skip_from("forwards", "the tunnel waits for credentials (needs-auth)")


def _listen_of(forward: dict[str, object]) -> str:
    listen = forward.get("listen")
    shown = ", ".join(map(str, listen)) if isinstance(listen, list) and listen else str(forward.get("forward"))
    return shown + ("  (reachable from the network)" if forward.get("exposed") else "")


def _ours(report: HostReport) -> Listeners:
    """Return what this host's running tunnel (supervisor and ssh child) listens on."""
    tcp: dict[int, tuple[str, ...]] = {}
    unix: set[str] = set()
    for pid in (report.pid, *report.children) if report.running else ():
        if pid:
            mine = listeners_of(pid)
            unix |= mine.unix
            for port, addresses in mine.tcp.items():
                tcp[port] = tcp.get(port, ()) + addresses
    return Listeners(tcp, frozenset(unix))


def _local_port_steps(spec: TunnelSpec, report: HostReport, ours: Listeners) -> Iterator[Step]:
    """One step per forward: every address it listens on must be free or held by this host's tunnel."""
    for plan in plan_spec(spec):
        exposed = "  (reachable from the network)" if plan.exposed else ""
        failures = []
        held = 0
        for address, ip in _addresses(plan):
            if (plan.path is not None and plan.path in ours.unix) or address in ours.tcp.get(plan.port, ()):
                held += 1
            elif plan.path is not None and (problem := socket_path_error(plan.path)) is not None:
                failures.append((address, problem))
            elif plan.path is None and not port_is_free(plan.port, ip):
                failures.append((address, port_in_use_error(port=plan.port, ip=ip)))
        for address, error in failures:
            if isinstance(error, PortInUseError):
                by = f" by {error.holder}" if error.holder else ""
                yield Step("local port", FAIL, f"{address} is already in use{by}", error.hint)
            else:
                yield Step("local port", FAIL, error.message, error.hint)
        if failures:
            continue
        shown = ", ".join(plan.addresses)
        skipped = f"; skipped {', '.join(plan.skipped)}" if plan.skipped else ""
        if held:
            yield Step("local port", PASS, f"{shown} held by this host's running tunnel (pid {report.pid}){exposed}")
        else:
            yield Step("local port", PASS, f"{shown} free{exposed}{skipped}")


def _addresses(plan: ListenPlan) -> list[tuple[str, str]]:
    """Return (shown address, ip) pairs of a plan; a socket path is its own address."""
    if plan.path is not None:
        return [(plan.path, "")]
    return list(zip(plan.addresses, plan.ips, strict=True))


def _dns_step(spec: TunnelSpec) -> Step:
    """Resolve the first hop's name (no connection is made: the connect step tells whether TCP works)."""
    hop = spec.first_hop()
    if hop is None:
        via = proxy_command_shown(spec) or "(of the first ProxyJump hop)"
        return Step("dns", SKIP, f"reached through ProxyCommand {via}")
    host, port = hop
    try:
        addresses = sorted({str(info[4][0]) for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)})
    except OSError as exc:
        return Step("dns", FAIL, f"{host} does not resolve: {exc}", "check HostName / ProxyJump and your network")
    return Step("dns", PASS, f"{host} -> {', '.join(addresses)}")


def _connect_steps(spec: TunnelSpec, engine_name: str) -> Iterator[Step]:
    """Bring a throwaway link up (the host is not running) and read each step off how far it got: no probe
    connection is made, the attempt's own TCP connect is the tcp step."""
    hop = spec.first_hop()
    events = LinkEvents(stop=threading.Event(), changed=threading.Event())
    try:
        engine = make_engine(engine_name, spec.alias)
        link: Link = engine.connect(spec, lambda _text: None, events)
    except UnreachableError as error:
        yield Step("tcp", FAIL, error.message, error.hint or "is the server up, sshd running, and the port right?")
        yield from _skip_from("host key", "the server cannot be reached")
        return
    except TunneldError as error:
        yield _tcp_step(hop, events)
        yield from _failure_steps(spec, error)
        return
    yield _tcp_step(hop, events)
    try:
        yield Step("host key", PASS, f"{spec.hostname}'s key matches known_hosts")
        yield Step("auth", PASS, f"authenticated as {spec.user} ({host_auth_plan(spec).summary})")
        listening = "; ".join(_listen_of(s.to_dict()) for s in link.stats())
        yield Step("forwards", PASS, "listening: " + listening)
        yield from _target_steps(spec)
    finally:
        link.close()
        engine.close()


def _tcp_step(hop: tuple[str, int] | None, events: LinkEvents) -> Step:
    if hop is None:
        return Step("tcp", SKIP, "reached through a ProxyCommand")
    if not events.tcp_up.is_set():
        return Step("tcp", SKIP, f"not known whether {hop[0]}:{hop[1]} accepts TCP: the attempt ended before")
    return Step("tcp", PASS, f"{hop[0]}:{hop[1]} accepts TCP connections")


def _failure_steps(spec: TunnelSpec, error: TunneldError) -> Iterator[Step]:
    """File an attempt's failure under the step it belongs to; the steps after it are skipped."""
    if isinstance(error, HostKeyError):
        yield Step("host key", FAIL, error.message, error.hint)
        yield from _skip_from("auth", "the host key must be accepted first")
        return
    if isinstance(error, (AuthError, PortInUseError)):
        yield Step("host key", PASS, f"{spec.hostname}'s key matches known_hosts")
    if isinstance(error, AuthError):
        yield Step("auth", FAIL, f"{error.message} ({host_auth_plan(spec).summary})", error.hint)
        yield from _skip_from("forwards", "authentication must succeed first")
    elif isinstance(error, PortInUseError):
        yield Step("auth", PASS, f"authenticated as {spec.user}")
        yield Step("forwards", FAIL, error.message, error.hint)
        yield from _skip_from("target", "a forward could not listen")
    else:  # the handshake itself failed (stalled, closed, refused): the host-key step is where it stopped
        yield Step("host key", FAIL, error.message, error.hint)
        yield from _skip_from("auth", "no SSH session could be opened")


def _target_steps(spec: TunnelSpec, ours: Listeners | None = None) -> Iterator[Step]:
    """Reach each forward's target through every local address, with the host's configured health check."""
    checks = checks_for(spec, host_settings(spec.alias))
    plans = {plan.forward: plan for plan in plan_spec(spec)}
    for check in checks:
        plan = plans[check.forward]
        for address, ip in _addresses(plan):
            if ours is not None and plan.path is None and address not in ours.tcp.get(plan.port, ()):
                error = port_in_use_error(port=plan.port, ip=ip)
                detail = f"connections to {address} do not reach the tunnel: {error.message}"
                yield Step("target", FAIL, detail, error.hint)
                continue
            where: tuple[str, int] | str = plan.path if plan.path is not None else (ip, plan.port)
            result = run_check(LocalProber(where), check)
            detail = f"through {address}: {result.detail}"
            if result.ok:
                yield Step("target", PASS, detail)
            else:
                hint = f"the tunnel works but {check.forward.target} on the server side does not answer as expected"
                yield Step("target", FAIL, detail, hint)
