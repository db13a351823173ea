"""`tunneld check HOST`: a step-by-step diagnosis, one verdict per step, whether or not the host runs."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from tunneld.config import Forward, TunnelSpec, resolve_host
from tunneld.engines import Link, LinkEvents, make_engine
from tunneld.errors import AuthError, HostKeyError, PortInUseError, TunneldError
from tunneld.ports import listeners_of, port_in_use_error, port_is_free
from tunneld.status import HostReport, collect
from tunneld.supervisor import tcp_answers

PASS = "ok"  # noqa: S105 - a verdict, not a password
FAIL = "FAIL"
SKIP = "skip"
TARGET_SETTLE_S = 1.5


@dataclass(frozen=True)
class Step:
    """One line of the diagnosis."""

    name: str
    verdict: str
    detail: str
    hint: str | None = None


def run_checks(host: str, ssh_config: str | None, engine_name: str) -> Iterator[Step]:
    """Yield each step's verdict in order; later steps are skipped once one they need has failed."""
    try:
        spec = resolve_host(host, ssh_config)
    except TunneldError as error:
        yield Step("config", FAIL, error.message, error.hint)
        return
    yield Step(
        "config",
        PASS,
        f"{spec.alias} resolves to {spec.user}@{spec.hostname}:{spec.port}, "
        f"{len(spec.forwards)} forward(s): " + ", ".join(str(f) for f in spec.forwards),
    )
    report = collect(host)
    ports = list(_local_port_steps(spec, report))
    yield from ports
    yield from _network_steps(spec)
    if report.is_up:
        yield Step("host key", PASS, f"accepted by the running tunnel (pid {report.pid})")
        yield Step("auth", PASS, f"the running tunnel is authenticated (pid {report.pid})")
        yield Step("forwards", PASS, "listening: " + ", ".join(_listen_of(f) for f in report.forwards))
        yield from _target_steps(spec)
        return
    if any(step.verdict == FAIL for step in ports):
        for name in ("host key", "auth", "forwards", "target"):
            yield Step(name, SKIP, "a local port is taken; fix that first")
        return
    yield from _connect_steps(spec, engine_name)


def _listen_of(forward: dict[str, object]) -> str:
    listen = forward.get("listen")
    return str(listen[0]) if isinstance(listen, list) and listen else str(forward.get("forward"))


def _local_port_steps(spec: TunnelSpec, report: HostReport) -> Iterator[Step]:
    ours = [listeners_of(pid) for pid in (report.pid, *report.children) if pid] if report.running else []
    for forward in spec.local_forwards:
        listen = forward.listen
        if any(listen.port in mine.tcp or listen.path in mine.unix for mine in ours):
            yield Step("local port", PASS, f"{listen} is held by this host's running tunnel (pid {report.pid})")
            continue
        if listen.path is not None:
            free = not _unix_socket_answers(listen.path)
        else:
            bind = {"*": "0.0.0.0", None: "127.0.0.1", "localhost": "127.0.0.1"}.get(listen.host, listen.host)
            free = port_is_free(listen.port or 0, str(bind))
        if free:
            yield Step("local port", PASS, f"{listen} is free")
        else:
            error = port_in_use_error(str(listen), port=listen.port, path=listen.path)
            holder = f" by {error.holder}" if error.holder else ""
            yield Step("local port", FAIL, f"{listen} is already in use{holder}", error.hint)


def _unix_socket_answers(path: str) -> bool:
    with socket.socket(socket.AF_UNIX) as sock:
        try:
            sock.connect(path)
        except OSError:
            return False
    return True


def _network_steps(spec: TunnelSpec) -> Iterator[Step]:
    hop = spec.first_hop()
    if hop is None:
        yield Step("dns", SKIP, f"reached through ProxyCommand {spec.proxy_command}")
        yield Step("tcp", SKIP, "reached through ProxyCommand")
        return
    host, port = hop
    try:
        addresses = sorted({str(info[4][0]) for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)})
    except OSError as exc:
        yield Step("dns", FAIL, f"{host} does not resolve: {exc}", "check HostName / ProxyJump and your network")
        yield Step("tcp", SKIP, "no address to connect to")
        return
    yield Step("dns", PASS, f"{host} -> {', '.join(addresses)}")
    if tcp_answers(hop):
        yield Step("tcp", PASS, f"{host}:{port} accepts TCP connections")
    else:
        yield Step(
            "tcp",
            FAIL,
            f"{host}:{port} does not accept TCP connections",
            "is the server up, sshd running, and the port right? a firewall or VPN may be in the way",
        )


def _connect_steps(spec: TunnelSpec, engine_name: str) -> Iterator[Step]:
    """Bring a throwaway link up (the host is not running) and read each step off how far it got."""
    try:
        events = LinkEvents(stop=threading.Event(), changed=threading.Event())
        engine = make_engine(engine_name, spec.alias)
        link: Link = engine.connect(spec, lambda _text: None, events)
    except HostKeyError as error:
        yield Step("host key", FAIL, error.message, error.hint)
        yield Step("auth", SKIP, "the host key must be accepted first")
        return
    except AuthError as error:
        yield Step("host key", PASS, f"{spec.hostname}'s key matches known_hosts")
        yield Step("auth", FAIL, error.message, error.hint)
        return
    except PortInUseError as error:
        yield Step("host key", PASS, f"{spec.hostname}'s key matches known_hosts")
        yield Step("auth", PASS, f"authenticated as {spec.user}")
        yield Step("forwards", FAIL, error.message, error.hint)
        return
    except TunneldError as error:
        yield Step("host key", FAIL, error.message, error.hint)
        return
    try:
        yield Step("host key", PASS, f"{spec.hostname}'s key matches known_hosts")
        yield Step("auth", PASS, f"authenticated as {spec.user}")
        yield Step("forwards", PASS, "listening: " + ", ".join(s.listen[0] for s in link.stats() if s.listen))
        yield from _target_steps(spec)
    finally:
        link.close()
        engine.close()


def _target_steps(spec: TunnelSpec) -> Iterator[Step]:
    for forward in spec.forwards:
        if forward.kind != "local":
            continue
        verdict, detail = _probe_target(forward)
        hint = None
        if verdict == FAIL:
            hint = f"the tunnel works but nothing accepts connections at {forward.target} on the server side"
        yield Step("target", verdict, detail, hint)


def _probe_target(forward: Forward) -> tuple[str, str]:
    """Connect through the forward: ssh closes our side at once when the remote target refuses."""
    listen = forward.listen
    try:
        if listen.path is not None:
            sock = socket.socket(socket.AF_UNIX)
            sock.settimeout(5)
            sock.connect(listen.path)
        else:
            host = "127.0.0.1" if listen.host in (None, "*", "localhost") else str(listen.host)
            sock = socket.create_connection((host, listen.port or 0), timeout=5)
    except OSError as exc:
        return FAIL, f"cannot connect to the local end {listen}: {exc}"
    with sock:
        sock.settimeout(TARGET_SETTLE_S)
        try:
            data = sock.recv(1)
        except TimeoutError:
            return PASS, f"{forward.target} accepted a connection through {listen}"
        except OSError as exc:
            return FAIL, f"{forward.target} through {listen}: {exc}"
    if data:
        return PASS, f"{forward.target} answered through {listen}"
    return FAIL, f"{forward.target} refused or closed the connection made through {listen}"
