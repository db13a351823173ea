"""The supervisor's decisions, fast: a fake engine and link, an injected probe, clock, address source and rng.

Delays are milliseconds; what is asserted is which step the backoff drew from (recorded by the rng),
how many attempts were made, and what was published, never how long something took.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial

import pytest

from tests.harness import wait_for
from tunneld.config.credentials import CredentialWatch
from tunneld.config.settings import HostSettings
from tunneld.config.spec import LOCAL, Endpoint, Forward, TunnelSpec
from tunneld.engines.link import ChildProcess, ForwardStatus, LinkEvents, LinkLost, ProgressCallback
from tunneld.engines.streams import Stream
from tunneld.errors import (
    AuthError,
    ConfigError,
    ConnectError,
    HandshakeStalledError,
    PortInUseError,
    RefusedByServerError,
    TunneldError,
    UnreachableError,
)
from tunneld.runtime.probes import Environment, PathWatch, PreauthBudget, Wakeups
from tunneld.runtime.supervisor import Backoff, Supervisor, TunnelStatus

SPEC = TunnelSpec(alias="fake", hostname="127.0.0.1", port=9, user="u", forwards=())
REFUSALS_WINDOW_S = 0.6  # at most 2 refused logins within it (a minute in tunneld)
HANG = "hang"
TCP_UP_HANG = "tcp-up-hang"
LINK = "link"
STEP_S = 0.02


class RecordingRandom(random.Random):
    """Draws the longest delay a step allows and records each step's ceiling."""

    def __init__(self) -> None:
        super().__init__(0)
        self.ceilings: list[float] = []

    def uniform(self, a: float, b: float) -> float:
        self.ceilings.append(round(b, 6))
        return b


class FakeLink:
    """A link that lasts until the test ends it."""

    def __init__(self, events: LinkEvents) -> None:
        self.events = events
        self.error: TunneldError | None = None
        self.ended = threading.Event()
        self.closed = False

    def end(self, error: TunneldError) -> None:
        self.error = error
        self.ended.set()
        self.events.changed.set()

    def wait(self, timeout: float) -> LinkLost | None:
        if self.ended.wait(timeout) and self.error is not None:
            return LinkLost(self.error)
        return None

    def settling(self) -> bool:
        return False

    def close(self) -> None:
        self.closed = True

    def stats(self) -> list[ForwardStatus]:
        return []

    def children(self) -> list[ChildProcess]:
        return []

    def open_probe(self, forward: object, timeout: float, settle: bool) -> Stream:
        raise ConnectError("no forwards to check")


@dataclass
class FakeEngine:
    """Plays a script: an exception to raise, LINK for a link, HANG to block until the attempt is cancelled."""

    script: list[object]
    name: str = "fake"
    links: list[FakeLink] = field(default_factory=list)
    calls: int = 0
    cancelled: int = 0
    times: list[float] = field(default_factory=list)

    def connect(self, spec: TunnelSpec, progress: ProgressCallback, events: LinkEvents) -> FakeLink:
        self.calls += 1
        self.times.append(time.monotonic())
        item = self.script.pop(0) if self.script else LINK
        if isinstance(item, BaseException):
            if not isinstance(item, UnreachableError):
                events.tcp_up.set()  # every other failure happened after TCP to the server connected
            raise item
        if item == TCP_UP_HANG:  # TCP connected, then nothing (a frozen server's backlog)
            events.tcp_up.set()
            item = HANG
        if item == HANG:
            events.stop.wait(10)
            self.cancelled += 1
            raise ConnectError("stopped while connecting")
        events.tcp_up.set()
        events.first_hop_authenticated.set()
        events.authenticated.set()
        link = FakeLink(events)
        self.links.append(link)
        return link

    def close(self) -> None:
        pass


class Recorder:
    """Collects what the supervisor publishes."""

    def __init__(self) -> None:
        self.statuses: list[TunnelStatus] = []

    def publish(self, status: TunnelStatus) -> None:
        self.statuses.append(status)

    def progress(self, text: str) -> None:
        pass

    @property
    def last(self) -> TunnelStatus:
        return self.statuses[-1]


@dataclass
class Path:
    """The probe's answer, switched by the test; counts the probes, and those that found it dead."""

    answers: bool = True
    failures: int = 0
    calls: int = 0

    def __call__(self, hop: tuple[str, int]) -> bool:
        self.calls += 1
        if not self.answers:
            self.failures += 1
        return self.answers


class Clock:
    """A clock the test moves (the budget's window)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Harness:
    engine: FakeEngine
    supervisor: Supervisor
    recorder: Recorder
    wakeups: Wakeups
    rng: RecordingRandom
    path: Path
    thread: threading.Thread
    result: list[int]

    def until(self, predicate: Callable[[], bool], what: str) -> None:
        wait_for(predicate, 5, what, interval=0.005)

    def state(self) -> str:
        return self.recorder.last.state if self.recorder.statuses else ""


@pytest.fixture(autouse=True)
def short_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    """An attempt's own TCP connect gets 1 s before its path is probed; here a tenth of that."""
    monkeypatch.setattr("tunneld.runtime.supervisor.ATTEMPT_GRACE_S", 0.1)


@pytest.fixture
def run() -> Iterator[Callable[..., Harness]]:
    """Start a supervisor on a thread with fakes; it is stopped afterwards."""
    started: list[Harness] = []

    def make(
        script: list[object],
        backoff: Backoff | None = None,
        environment: Environment | None = None,
        path: Path | None = None,
        fail_fast: bool = False,
        budget: PreauthBudget | None = None,
        credentials: CredentialWatch | None = None,
        logged_in_to: str | None = None,
        engine: FakeEngine | None = None,
        config: FakeConfig | None = None,
        spec: TunnelSpec = SPEC,
        drift_every_s: float | None = None,
    ) -> Harness:
        recorder, wakeups, rng = Recorder(), Wakeups(), RecordingRandom()
        engine = engine or FakeEngine(script)
        path = path or Path()
        supervisor = Supervisor(
            spec, engine, recorder, wakeups, fail_fast=fail_fast, rng=rng, probe=path, config=config,
            backoff=backoff or Backoff(base_s=STEP_S, cap_s=4 * STEP_S, stable_s=0.2, refused_s=STEP_S,
                                       refused_logins_window_s=REFUSALS_WINDOW_S),
            environment=environment or Environment(addresses=frozenset),
            budget=budget or PreauthBudget(limit=1000),
            credentials=credentials or CredentialWatch(None, identities=lambda _path: None),
            logged_in_to=logged_in_to,
        )  # fmt: skip
        if drift_every_s is not None and supervisor.reloader is not None:
            supervisor.reloader.watch.every_s = drift_every_s
        result: list[int] = []
        thread = threading.Thread(target=lambda: result.append(supervisor.run()), daemon=True)
        harness = Harness(engine, supervisor, recorder, wakeups, rng, path, thread, result)
        started.append(harness)
        thread.start()
        return harness

    yield make
    for harness in started:
        harness.wakeups.request_stop()
        harness.thread.join(5)
        assert not harness.thread.is_alive(), "the supervisor did not stop"


def links_up(h: Harness, count: int) -> Callable[[], bool]:
    """Return a predicate: the harness has made `count` links and the last one is up."""
    return lambda: len(h.engine.links) == count and h.state() == "up"


def transient(text: str = "connect to host: Connection refused") -> ConnectError:
    return ConnectError(text)


def test_backoff_grows_from_at_once_to_its_cap() -> None:
    backoff = Backoff(base_s=0.5, cap_s=30.0)
    ceilings = []
    for _ in range(10):
        ceilings.append(backoff.ceiling())
        backoff = backoff.next()
    assert ceilings == [0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert Backoff(attempt=0).delay(random.Random(1)) == 0.0
    assert all(0 <= Backoff(attempt=5).delay(random.Random(seed)) <= 8.0 for seed in range(50))


def test_a_stable_link_resets_the_backoff_and_a_flapping_one_does_not() -> None:
    grown = Backoff(stable_s=5.0, attempt=6)
    assert grown.after_link(5.0).attempt == 0
    assert grown.after_link(4.9).attempt == 6  # unchanged: the wait that follows counts the flap


def test_consecutive_failures_draw_from_growing_steps_up_to_the_cap(run: Callable[..., Harness]) -> None:
    h = run([transient()] * 6)
    h.until(lambda: h.state() in ("up", "degraded"), "the link after six failures")
    assert h.rng.ceilings == [STEP_S, 2 * STEP_S, 4 * STEP_S, 4 * STEP_S, 4 * STEP_S]  # the first retry is at once
    assert h.engine.calls == 7
    assert h.recorder.last.reconnects == 0, "a first link after failed attempts is not a reconnect"
    assert h.recorder.last.attempts == 0 and h.recorder.last.last_error is None
    assert h.recorder.last.previous_error is not None and "Connection refused" in str(h.recorder.last.previous_error)


def test_a_link_that_held_is_retried_at_once_after_every_loss(run: Callable[..., Harness]) -> None:
    h = run([transient(), transient(), transient()])
    for loss in range(1, 4):
        h.until(links_up(h, loss), f"link {loss}")
        time.sleep(0.25)  # longer than stable_s
        h.engine.links[-1].end(ConnectError("ssh was killed (SIGKILL)"))
    h.until(lambda: len(h.engine.links) == 4 and h.state() == "up", "link 4")
    assert h.rng.ceilings == [STEP_S, 2 * STEP_S], "losses of stable links must not grow the backoff"
    assert h.recorder.last.reconnects == 3


def test_a_flapping_server_still_backs_off(run: Callable[..., Harness]) -> None:
    h = run([])
    for loss in range(1, 4):
        h.until(links_up(h, loss), f"link {loss}")
        h.engine.links[-1].end(ConnectError("Connection closed by remote host"))  # within a moment of login
    h.until(lambda: len(h.engine.links) == 4, "link 4")
    assert h.rng.ceilings == [STEP_S, 2 * STEP_S]


def unreachable() -> UnreachableError:
    return UnreachableError("connect to host 198.18.77.2 port 22: Connection refused")


def test_the_path_coming_back_ends_a_long_wait(run: Callable[..., Harness]) -> None:
    path = Path(answers=False)
    h = run([unreachable(), unreachable()], backoff=Backoff(base_s=60.0, cap_s=60.0), path=path)
    h.until(lambda: h.state() == "backoff", "the 60 s wait")
    # Each of the two attempts' watches may still finish one probe late; a third failure is the wait's own.
    seen = path.failures
    h.until(lambda: path.failures >= seen + 3, "a probe during the wait to find the path dead")
    path.answers = True
    h.until(lambda: h.state() == "up", "the retry the probe started")
    assert h.rng.ceilings == [60.0]


def test_after_an_unreachable_attempt_the_first_answer_ends_the_wait(run: Callable[..., Harness]) -> None:
    """The attempt found no route (a stale ARP failure, say) but the path is back: no probe has to fail first."""
    unreachable = UnreachableError("connect to host 198.18.77.2 port 22: No route to host")
    h = run([unreachable, unreachable], backoff=Backoff(base_s=60.0, cap_s=60.0))
    h.until(lambda: h.state() == "up", "the retry the first answering probe started")
    assert h.rng.ceilings == [60.0] and h.engine.calls == 3


@pytest.mark.parametrize(
    "failure",
    [
        ConnectError("remote port forwarding failed for listen port 5000"),  # logged in; the server said no
        AuthError("u@127.0.0.1:9 refused authentication"),
        HandshakeStalledError("Connection timed out during banner exchange"),
        RefusedByServerError("the server refuses new connections for now (rate limit?)"),
    ],
    ids=["forward refused", "auth refused", "stalled", "refused before banner"],
)
def test_a_server_that_answers_tcp_is_never_probed(run: Callable[..., Harness], failure: TunneldError) -> None:
    """Every probe of a live sshd is a connection that ends before authentication: OpenSSH 9.8+ penalises it."""
    path = Path()
    budget = PreauthBudget(limit=1000)
    h = run([failure] * 3 if failure.retryable else [], backoff=Backoff(base_s=0.3, cap_s=0.3, refused_s=0.3),
            path=path, budget=budget)  # fmt: skip
    if failure.retryable:
        h.until(lambda: h.state() == "up", "the link after the failures")
    else:
        h.engine.script[:] = [failure]
        h.thread.join(5)
    assert path.calls == 0, f"{path.calls} probes of a server that answered TCP all along"


@pytest.mark.parametrize("how", ["SIGUSR1", "clock jump", "network change"])
def test_a_wakeup_ends_the_backoff_wait(run: Callable[..., Harness], how: str) -> None:
    jump = [0.0]
    addresses = [frozenset({"192.0.2.1"})]
    environment = Environment(wall=lambda: time.time() + jump[0], addresses=lambda: addresses[0], check_every_s=0.0)
    h = run([transient(), transient()], backoff=Backoff(base_s=60.0, cap_s=60.0), environment=environment)
    h.until(lambda: h.state() == "backoff", "the 60 s wait")
    if how == "SIGUSR1":
        h.wakeups.request_retry()
    elif how == "clock jump":
        jump[0] = 3600.0  # the wall clock moved an hour while the monotonic one did not: the machine slept
    else:
        addresses[0] = frozenset({"198.51.100.7"})
    h.until(lambda: h.state() == "up", f"the retry after the {how}")


def test_an_attempt_whose_tcp_connected_is_not_probed(run: Callable[..., Harness]) -> None:
    """A frozen server's backlog accepted TCP: the path works, probing it would only cost connections."""
    path = Path()
    h = run([TCP_UP_HANG], path=path)
    h.until(lambda: h.engine.calls == 1, "the attempt")
    time.sleep(0.4)  # four probe periods past the grace
    assert path.calls == 0
    h.wakeups.request_stop()
    h.thread.join(5)


def test_the_first_answer_ends_the_probing(run: Callable[..., Harness]) -> None:
    path = Path(answers=False)
    h = run([unreachable(), unreachable()], backoff=Backoff(base_s=60.0, cap_s=60.0), path=path)
    h.until(lambda: path.failures >= 2, "probes that find the path dead")
    path.answers = True
    h.until(lambda: h.state() == "up", "the retry the first answer started")
    answered = path.calls - path.failures
    time.sleep(0.4)
    assert path.calls - path.failures == answered, "probing went on after the path answered"
    assert answered <= 4, f"{answered} probes answered: more than the overlapping ones in flight"


def test_an_attempt_stuck_on_a_dead_path_is_abandoned_when_the_path_returns(run: Callable[..., Harness]) -> None:
    path = Path(answers=False)
    h = run([HANG], path=path)
    h.until(lambda: h.engine.calls == 1, "the stuck attempt")
    h.until(lambda: path.failures > 0, "a probe to find the path dead")
    path.answers = True
    h.until(lambda: h.state() == "up", "a fresh attempt once the path answers")
    assert h.engine.cancelled == 1 and h.engine.calls == 2
    assert h.recorder.last.reconnects == 0 and h.rng.ceilings == [], "an abandoned attempt is not a failure"


def test_a_stalled_handshake_on_a_port_that_answers_is_retried_at_once(run: Callable[..., Harness]) -> None:
    stalled = HandshakeStalledError("no SSH handshake within 10 s")
    h = run([stalled, stalled, stalled], backoff=Backoff(base_s=60.0, cap_s=60.0))
    h.until(lambda: h.state() == "up", "the link once the server answers")
    assert h.engine.calls == 4 and h.rng.ceilings == []


def test_a_server_that_refuses_in_words_before_its_banner_is_left_alone_for_refused_s(
    run: Callable[..., Harness],
) -> None:
    """sshd's own refusal (OpenSSH 9.8+: `Not allowed at this time`, then closed): the next try waits refused_s."""
    path = Path()
    said = RefusedByServerError.before_banner("127.0.0.1:9", "closed", '"Not allowed at this time"')
    h = run([said], path=path, backoff=Backoff(base_s=STEP_S, cap_s=STEP_S, refused_s=60.0))
    h.until(lambda: h.state() == "backoff", "the wait")
    next_try = h.recorder.last.next_try_at
    assert next_try is not None and next_try - time.time() > 55, "less than refused_s after a refusal"
    assert "rate limit?" in str(h.recorder.last.last_error)
    time.sleep(0.3)
    assert h.engine.calls == 1 and path.calls == 0


def test_a_bare_close_before_the_banner_is_tried_once_more_before_the_server_is_left_alone(
    run: Callable[..., Harness],
) -> None:
    """A connection closed or reset without a word is also what a server going down does to a connection in its
    accept queue: one more try after a base step (a restart is then found at once), refused_s when it repeats."""
    path = Path()
    bare = RefusedByServerError.before_banner("127.0.0.1:9", "reset")
    h = run([bare, bare], path=path, backoff=Backoff(base_s=STEP_S, cap_s=STEP_S, refused_s=60.0))
    h.until(lambda: h.engine.calls == 2 and h.state() == "backoff", "the second refusal's wait")
    next_try = h.recorder.last.next_try_at
    assert next_try is not None and next_try - time.time() > 55, "less than refused_s after a repeated refusal"
    assert path.calls == 0


def test_a_bare_close_after_a_login_is_tried_once_more_again(run: Callable[..., Harness]) -> None:
    """The first bare refusal of each episode gets its one quick retry: a login in between starts the count over,
    also where no backoff wait follows the login (the link ended for credentials: needs-auth, then SIGUSR1)."""
    bare = RefusedByServerError.before_banner("127.0.0.1:9", "closed")
    h = run([bare, LINK, bare, LINK], backoff=Backoff(base_s=STEP_S, cap_s=STEP_S, stable_s=0.0, refused_s=60.0))
    h.until(lambda: h.engine.calls == 2 and h.state() == "up", "the refusal retried after a step, and the link")
    h.engine.links[-1].end(AuthError("u@127.0.0.1:9 refused authentication"))  # e.g. the agent was emptied
    h.until(lambda: h.state() == "needs-auth", "the wait for credentials")
    h.wakeups.request_retry()  # SIGUSR1: the attempt meets a bare close, then one quick retry brings the link
    h.until(lambda: h.engine.calls == 4 and h.state() == "up", "the next refusal retried after a step, and the link")


def test_the_budget_bounds_connections_that_end_before_authentication(run: Callable[..., Harness]) -> None:
    """Whatever the failure pattern (here: every attempt reaches TCP and fails at once, retried at once as a
    stalled handshake is), at most `limit` may end before authentication per window."""
    clock = Clock()
    budget = PreauthBudget(limit=6, window_s=60.0, clock=clock)
    stalled = HandshakeStalledError("Connection timed out during banner exchange")
    h = run([stalled] * 9, budget=budget)
    h.until(lambda: h.engine.calls == 6 and h.state() == "backoff", "the wait for the budget")
    time.sleep(0.3)
    assert h.engine.calls == 6, "a seventh connection within the window"
    assert budget.spent() == 6
    clock.now += 30  # half the window: still used up
    time.sleep(0.3)
    assert h.engine.calls == 6
    clock.now += 31  # the first six leave the window
    h.until(lambda: h.state() == "up", "the link once the budget allows")
    assert h.engine.calls == 10 and budget.spent() == 3, "the link authenticated: its slot was given back"


def probed(watch: PathWatch) -> bool:
    return watch.started >= 1 and (watch.answered.is_set() or watch.failures >= 1)


def test_a_probe_that_answers_spends_a_slot_and_one_that_fails_does_not() -> None:
    clock = Clock()
    budget = PreauthBudget(limit=2, window_s=60.0, clock=clock)
    for answers in (False, True, False, True):
        watch = PathWatch(("192.0.2.1", 22), lambda: None, probe=Path(answers), budget=budget).start()
        wait_for(partial(probed, watch), 5, "a probe")
        watch.stop()
        wait_for(lambda: budget.wait_s() == 0 or budget.spent() == 2, 5, "the probe to end")
    assert budget.spent() == 2
    blocked = PathWatch(("192.0.2.1", 22), lambda: None, probe=lambda _hop: True, budget=budget).start()
    time.sleep(0.3)
    blocked.stop()
    assert blocked.started == 0, "a probe was started with the budget used up"
    clock.now += 61
    assert budget.wait_s() == 0 and budget.take()


def test_stop_cancels_an_attempt_in_progress(run: Callable[..., Harness]) -> None:
    h = run([HANG])
    h.until(lambda: h.engine.calls == 1, "the attempt")
    h.wakeups.request_stop()
    h.thread.join(5)
    assert h.result == [0] and h.engine.cancelled == 1 and h.state() == "stopped"


def test_a_fatal_error_ends_after_one_attempt(run: Callable[..., Harness]) -> None:
    h = run([AuthError("u@127.0.0.1:9 refused authentication: Permission denied")])
    h.thread.join(5)
    assert h.result == [78] and h.engine.calls == 1 and h.state() == "failed"


def test_a_port_taken_is_fatal_at_start_but_retried_after_a_link(run: Callable[..., Harness]) -> None:
    taken = PortInUseError("local port 5000 is already in use on ::1 by python3 (pid 4711)")
    first = run([taken])
    first.thread.join(5)
    assert first.result == [78]
    later = run([])
    later.until(lambda: later.state() == "up", "the first link")
    later.engine.script[:] = [taken, taken]
    time.sleep(0.25)
    later.engine.links[-1].end(ConnectError("Connection closed by remote host"))
    later.until(lambda: len(later.engine.links) == 2 and later.state() == "up", "the link once the port is free")
    assert later.engine.calls == 4 and later.recorder.last.reconnects == 1


def test_fail_fast_ends_on_the_first_transient_failure(run: Callable[..., Harness]) -> None:
    h = run([transient()], fail_fast=True)
    h.thread.join(5)
    assert h.result == [69] and h.engine.calls == 1


class Agent:
    """The agent's identity list as the test sets it (None: no agent answers)."""

    def __init__(self, keys: tuple[bytes, ...] | None) -> None:
        self.keys = keys
        self.asked = 0

    def __call__(self, _path: str | None) -> tuple[bytes, ...] | None:
        self.asked += 1
        return self.keys


@dataclass
class ListeningEngine(FakeEngine):
    """An engine that keeps its ports between links (the paramiko engine): records refuse_clients calls."""

    refusing: list[bool] = field(default_factory=list)

    def listening(self) -> list[ForwardStatus]:
        return [ForwardStatus("localhost:5000 -> localhost:5000", ("127.0.0.1:5000",), "localhost:5000")]

    def refuse_clients(self, refusing: bool) -> None:
        self.refusing.append(refusing)


def asked_again(agent: Agent, times: int) -> bool:
    return agent.asked >= times


def refused() -> AuthError:
    return AuthError("u@127.0.0.1:9 refused authentication: Permission denied (publickey)")


def test_a_login_refused_after_a_link_waits_for_the_agent_to_change(run: Callable[..., Harness]) -> None:
    """needs-auth: no retry on a timer (one attempt per change of the agent's keys), the ports stay held and
    their clients are refused at once."""
    agent = Agent((b"key-1",))
    watch = CredentialWatch(None, identities=agent, every_s=0.0)
    engine = ListeningEngine([])
    h = run([], credentials=watch, engine=engine)
    h.until(links_up(h, 1), "the first link")
    agent.keys = ()  # the agent is emptied (ssh-add -D, a lock, a key lifetime)
    engine.script[:] = [refused(), refused()]
    h.engine.links[-1].end(ConnectError("Connection closed by remote host"))
    h.until(lambda: h.state() == "needs-auth", "needs-auth")
    assert h.engine.calls == 2
    error = h.recorder.last.last_error or {}
    assert "the agent has no key for u@127.0.0.1:9" in str(error.get("message")), error
    assert "ssh-add" in str(error.get("hint"))
    assert h.recorder.last.forwards and engine.refusing == [True], "the ports are kept, clients refused at once"
    asked = agent.asked
    h.until(lambda: agent.asked >= asked + 3, "three looks at the agent")
    assert h.engine.calls == 2, "a retry against the server without a change of credentials"
    agent.keys = (b"key-2", b"key-1")  # the server refuses them this time: one attempt, then back to waiting
    h.until(lambda: h.engine.calls == 3 and h.state() == "needs-auth", "one attempt for the change")
    assert "refused the agent's 2 key(s)" in str((h.recorder.last.last_error or {}).get("message"))
    for same in ((b"key-1", b"key-2"), None, (b"key-1",), (b"key-2", b"key-1")):  # reordered, gone, fewer: no help
        agent.keys = same
        h.until(partial(asked_again, agent, agent.asked + 2), "two looks at the agent")
    assert h.engine.calls == 3, "a retry although the agent offers nothing new"
    agent.keys = (b"key-1", b"key-2", b"key-3")
    h.until(links_up(h, 2), "the link once a new key is there")
    assert h.engine.calls == 4 and engine.refusing == [True, False, True, False]


def test_retries_requested_in_a_storm_make_at_most_two_refused_logins_a_window(run: Callable[..., Harness]) -> None:
    """`tunneld start HOST` (SIGUSR1) pressed again and again: OpenSSH 9.8+ adds 5 s of penalty per refused login and
    blocks past 15 s, so at most 2 may be refused per window, whatever asks for the attempts."""
    h = run([refused()] * 5, logged_in_to="u@127.0.0.1:9", credentials=CredentialWatch(None, identities=Agent(())))
    h.until(lambda: h.state() == "needs-auth", "needs-auth")
    for _ in range(16):
        h.wakeups.request_retry()
        time.sleep(REFUSALS_WINDOW_S / 8)
    times = h.engine.times
    assert len(times) >= 3, "the retries were not made at all"
    crowded = [later - earlier for earlier, later in zip(times, times[2:], strict=False)]
    assert min(crowded) >= REFUSALS_WINDOW_S * 0.95, f"3 refused logins within {min(crowded):.2f} s"


def test_a_login_refused_at_the_first_attempt_stays_fatal_without_a_previous_login(
    run: Callable[..., Harness],
) -> None:
    h = run([refused()], logged_in_to="someone@elsewhere:22")  # another target's login does not count
    h.thread.join(5)
    assert h.result == [78] and h.state() == "failed"


def test_a_login_recorded_by_an_earlier_run_makes_the_first_refusal_wait(run: Callable[..., Harness]) -> None:
    """Autostart at login before the agent has its keys: the host worked yesterday, so it waits."""
    agent = Agent(())
    h = run([refused()], logged_in_to="u@127.0.0.1:9", credentials=CredentialWatch(None, identities=agent))
    h.until(lambda: h.state() == "needs-auth", "needs-auth")
    h.wakeups.request_retry()  # SIGUSR1 (or `tunneld start HOST`): one attempt now
    h.until(lambda: h.state() == "up", "the link after the retry")
    assert h.engine.calls == 2


def test_an_interactive_start_fails_at_once_even_after_an_earlier_login(run: Callable[..., Harness]) -> None:
    h = run([refused()], logged_in_to="u@127.0.0.1:9", fail_fast=True)
    h.thread.join(5)
    assert h.result == [78] and h.state() == "failed"


class FakeConfig:
    """What the files say: the test edits `spec`, `settings` or `broken`, and touches `file` like an editor."""

    def __init__(self, file: pathlib.Path) -> None:
        self.spec, self.settings, self.broken = SPEC, HostSettings(), False
        self.file = file
        file.write_text("v1")

    def load(self) -> tuple[TunnelSpec, HostSettings]:
        if self.broken:
            raise ConfigError("ssh_config line 3: Bad configuration option: Prot")
        return self.spec, self.settings

    def files(self) -> list[pathlib.Path]:
        return [self.file]

    def edit(self, **changes: object) -> None:
        for key, value in changes.items():
            setattr(self, key, value)
        stamp = self.file.stat().st_mtime + 2
        os.utime(self.file, (stamp, stamp))


@dataclass
class InPlaceEngine(FakeEngine):
    """An engine that takes forwards and settings without a new link (the paramiko engine)."""

    forwards: list[TunnelSpec] = field(default_factory=list)
    hold: list[float] = field(default_factory=list)

    def change_forwards(self, spec: TunnelSpec) -> None:
        self.forwards.append(spec)

    def change_settings(self, settings: HostSettings) -> None:
        self.hold.append(settings.hold_connections_s)


FORWARD_5000 = Forward(LOCAL, Endpoint(port=5000), Endpoint("localhost", 5000))
FORWARD_5001 = Forward(LOCAL, Endpoint(port=5001), Endpoint("localhost", 5000))


def reload_and_wait(h: Harness, what: str) -> None:
    before = len(h.recorder.statuses)
    h.wakeups.request_reload()
    h.until(lambda: not h.wakeups.reload.is_set() and len(h.recorder.statuses) > before, what)


def test_a_reload_of_settings_keeps_the_link(run: Callable[..., Harness], tmp_path: pathlib.Path) -> None:
    config = FakeConfig(tmp_path / "tunneld.toml")
    h = run([], config=config)
    h.until(links_up(h, 1), "the link")
    config.edit(settings=HostSettings(health_interval_s=7.0, env=(("MLFLOW_TRACKING_URI", "http://{local}"),)))
    reload_and_wait(h, "the reload")
    assert len(h.engine.links) == 1 and not h.engine.links[0].closed, "a settings change dropped the link"
    assert h.recorder.last.config["health_interval_s"] == ["7"] and h.recorder.last.config_changed == ()
    assert h.supervisor.settings.health_interval_s == 7.0


def test_a_reload_of_the_connection_replaces_the_link(run: Callable[..., Harness], tmp_path: pathlib.Path) -> None:
    config = FakeConfig(tmp_path / "ssh_config")
    h = run([], config=config)
    h.until(links_up(h, 1), "the link")
    config.edit(spec=dataclasses.replace(SPEC, hostname="127.0.0.2"))
    h.wakeups.request_reload()
    h.until(links_up(h, 2), "a new link with the new HostName")
    assert h.engine.links[0].closed and h.supervisor.spec.hostname == "127.0.0.2"
    assert h.recorder.last.config["HostName"] == ["127.0.0.2"]


def test_a_reload_of_forwards_changes_listeners_in_place(run: Callable[..., Harness], tmp_path: pathlib.Path) -> None:
    config = FakeConfig(tmp_path / "ssh_config")
    config.spec = dataclasses.replace(SPEC, forwards=(FORWARD_5000,))
    engine = InPlaceEngine([])
    h = run([], config=config, engine=engine, spec=config.spec)
    h.until(links_up(h, 1), "the link")
    config.edit(spec=dataclasses.replace(SPEC, forwards=(FORWARD_5000, FORWARD_5001)))
    reload_and_wait(h, "the reload")
    assert len(h.engine.links) == 1 and not h.engine.links[0].closed
    assert engine.forwards == [config.spec] and h.supervisor.spec.forwards == (FORWARD_5000, FORWARD_5001)


def test_an_edit_is_reported_until_reloaded_and_a_broken_one_is_not_applied(
    run: Callable[..., Harness], tmp_path: pathlib.Path
) -> None:
    config = FakeConfig(tmp_path / "ssh_config")
    h = run([], config=config, drift_every_s=0.0)
    h.until(links_up(h, 1), "the link")
    config.edit(spec=dataclasses.replace(SPEC, port=2222))
    h.wakeups.wake.set()
    h.until(lambda: h.recorder.last.config_changed == ("Port 9 -> 2222",), "the drift to be published")
    config.edit(broken=True)
    h.wakeups.wake.set()
    h.until(lambda: "cannot be used" in " ".join(h.recorder.last.config_changed), "the broken edit to be reported")
    reload_and_wait(h, "the reload of a broken config")
    assert "not applied: ssh_config line 3" in h.recorder.last.config_changed[0]
    assert len(h.engine.links) == 1 and h.state() == "up", "a broken config must not cost the running link"
