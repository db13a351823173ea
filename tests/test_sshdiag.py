"""The OpenSSH engine's reading of ssh's stderr (engines/sshstderr.py, sshhops.py, sshdiag.py), over records
captured from real ssh runs.

tests/data/ssh_stderr/*.json were captured by tests/ssh_transcripts.py: OpenSSH 9.2's ssh with the
engine's own argv against real sshd on loopback (and tests/evil.py's ScriptedPeer playing a device on
the path), read through sshstderr.StderrChannel exactly as the engine reads it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ssh_transcripts import DATA
from tunneld.config.spec import TunnelSpec
from tunneld.engines.sshdiag import Diagnosis
from tunneld.engines.sshhops import Stage
from tunneld.engines.sshstderr import LineRecords, Record, StderrChannel
from tunneld.errors import (
    AuthError,
    ConnectError,
    HandshakeStalledError,
    HostKeyError,
    PortInUseError,
    RefusedByServerError,
    TunneldError,
    UnreachableError,
)
from tunneld.safetext import PEER_TEXT_MAX_CHARS, quote_peer


@pytest.fixture(autouse=True)
def key_files(monkeypatch: pytest.MonkeyPatch) -> None:
    """The key files of the captured runs are gone; the one named locked_key was encrypted (a transcript carries
    ssh's words, not the file the classifier looks at to tell a locked key from a missing one)."""
    monkeypatch.setattr("tunneld.engines.sshdiag.needs_passphrase", lambda path: path.endswith("locked_key"))


def load(case: str) -> dict[str, object]:
    data = json.loads((DATA / f"{case}.json").read_text())
    assert isinstance(data, dict)
    return data


def spec_of(data: dict[str, object]) -> TunnelSpec:
    fields = data["spec"]
    assert isinstance(fields, dict)
    return TunnelSpec(forwards=(), **fields)


def records_of(data: dict[str, object], with_pids: bool = True) -> list[Record]:
    pairs = data["records"]
    assert isinstance(pairs, list)
    return [Record(text, pid if with_pids else None) for pid, text in pairs]


def diagnose(case: str, with_pids: bool = True) -> tuple[Diagnosis, TunneldError]:
    """Feed a captured run to a Diagnosis; `with_pids` False reads it as a platform that cannot name writers."""
    data = load(case)
    main_pid = data["main_pid"]
    assert isinstance(main_pid, int)
    diagnosis = Diagnosis(spec_of(data), main_pid if with_pids else None)
    for record in records_of(data, with_pids):
        diagnosis.feed(record)
    returncode = data["returncode"]
    assert isinstance(returncode, int)
    return diagnosis, diagnosis.error(returncode)


# case -> (error class, words the message must contain); the same whether or not records name their writer
VERDICTS: dict[str, tuple[type[TunneldError], tuple[str, ...]]] = {
    "auth_refused": (AuthError, ("refused authentication", "Permission denied (publickey)")),
    "locked_key": (AuthError, ("locked_key needs a passphrase and no agent holds it",)),
    "host_key_changed": (HostKeyError, ("has CHANGED", "known_hosts_changed line 1")),
    "host_key_changed_strict_no": (HostKeyError, ("has CHANGED",)),
    "host_key_revoked": (HostKeyError, ("REVOKED",)),
    "host_key_unknown": (HostKeyError, ("not in known_hosts",)),
    "local_port_in_use": (PortInUseError, ("already in use on 127.0.0.1",)),
    "remote_forward_refused": (ConnectError, ("remote port forwarding failed",)),
    "connection_refused": (UnreachableError, ("Connection refused",)),
    "unresolvable": (UnreachableError, ("Could not resolve hostname nonexistent.invalid",)),
    "banner_timeout": (HandshakeStalledError, ("Connection timed out during banner exchange",)),
    "closed_before_banner": (RefusedByServerError, ("refuses new connections for now (rate limit?)", "closed")),
    "reset_at_accept": (RefusedByServerError, ("refuses new connections for now (rate limit?)", "reset")),
    "reset_before_banner": (RefusedByServerError, ("refuses new connections for now (rate limit?)", "reset")),
    "too_many_auth_failures": (AuthError, ("Too many authentication failures", "MaxAuthTries")),
    "server_stopped_after_up": (ConnectError, ("Connection to 127.0.0.1 closed by remote host.",)),
    "up_then_stopped": (ConnectError, ("ssh was killed (SIGTERM)",)),
    "banner_mimics_verdicts": (AuthError, ("refused authentication", "Permission denied (publickey)")),
    "jump_unreachable": (UnreachableError, ("Connection refused",)),
    "jump_host_key_changed": (HostKeyError, ("host key of jump host 127.0.0.1:", "has CHANGED")),
    "jump_target_down": (ConnectError, ("jump host 127.0.0.1:", "could not reach 127.0.0.1:", "connect failed")),
    "target_auth_refused_via_jump": (AuthError, ("refused authentication",)),
}
# Through a ProxyJump, some verdicts need to know which ssh wrote a line (Linux names the writer of each record).
NEEDS_WRITERS: dict[str, tuple[type[TunneldError], tuple[str, ...]]] = {
    "jump_auth_refused": (AuthError, ("jump host root@127.0.0.1:", "refused authentication")),
    "target_closed_before_banner_via_jump": (RefusedByServerError, ("refuses new connections for now",)),
}


@pytest.mark.parametrize("with_pids", [True, False], ids=["writers-named", "writers-unknown"])
@pytest.mark.parametrize("case", sorted(VERDICTS))
def test_each_real_failure_gets_its_class_and_words(case: str, with_pids: bool) -> None:
    _, error = diagnose(case, with_pids)
    kind, needles = VERDICTS[case]
    assert type(error) is kind, error.message
    for needle in needles:
        assert needle in error.message, error.message


def test_a_key_whose_private_half_is_missing_is_not_called_locked(monkeypatch: pytest.MonkeyPatch) -> None:
    """ssh offers an IdentityFile's .pub and cannot sign when the private key is missing too: not a passphrase."""
    monkeypatch.setattr("tunneld.engines.sshdiag.needs_passphrase", lambda path: None)
    _, error = diagnose("locked_key")
    assert type(error) is AuthError and "needs a passphrase" not in error.message, error.message


@pytest.mark.parametrize("case", sorted(NEEDS_WRITERS))
def test_a_jump_hops_verdict_is_told_from_the_targets_by_its_writer(case: str) -> None:
    _, error = diagnose(case)
    kind, needles = NEEDS_WRITERS[case]
    assert type(error) is kind, error.message
    for needle in needles:
        assert needle in error.message, error.message


@pytest.mark.parametrize("case", sorted(NEEDS_WRITERS))
def test_without_named_writers_a_jump_hops_failure_is_at_worst_transient(case: str) -> None:
    _, error = diagnose(case, with_pids=False)
    assert isinstance(error, ConnectError) and error.retryable, error.message


PEER_CASES = {
    "peer_says_permission_denied": '"Permission denied (publickey)."',
    "peer_says_host_key_changed": '"@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@" (and 3 more lines)',
    "peer_forges_lines": '"bye\\x0d\\x0aroot@127.0.0.1: Permission denied (publickey)."',
}


@pytest.mark.parametrize("with_pids", [True, False], ids=["writers-named", "writers-unknown"])
@pytest.mark.parametrize(("case", "peer_said"), sorted(PEER_CASES.items()))
def test_what_a_peer_says_before_its_host_key_is_verified_is_transient_and_quoted(
    case: str, peer_said: str, with_pids: bool
) -> None:
    diagnosis, error = diagnose(case, with_pids)
    assert isinstance(error, ConnectError) and error.retryable, error.message
    if case.startswith("peer_says"):  # lines instead of a banner, then closed: how OpenSSH 9.8+ refuses an address
        assert isinstance(error, RefusedByServerError), error.message
    assert peer_said in error.message, error.message
    assert diagnosis.target.stage < Stage.VERIFIED and not diagnosis.authenticated


def test_lines_forged_inside_a_peers_debug_message_advance_nothing() -> None:
    """The peer's SSH2_MSG_DEBUG carried `Server host key`, the CHANGED warning, NEWKEYS and `Authenticated
    to` as separate lines of ssh's stderr (ssh does not escape newlines there): one record, the peer's."""
    data = load("peer_forges_lines")
    forged = [r for r in records_of(data) if "Authenticated to" in r.text]
    assert len(forged) == 1 and forged[0].line.startswith("Remote: ")
    diagnosis, error = diagnose("peer_forges_lines")
    assert diagnosis.target.stage == Stage.BANNER
    assert not diagnosis.target.changed and not diagnosis.target.unknown
    assert "before its host key was verified" in error.message


def test_a_servers_banner_that_mimics_verdicts_never_decides() -> None:
    """The Banner (printed raw by ssh before login) says `Permission denied` and `Host key verification failed.`:
    the login works anyway, and a refusal is read from ssh's own last line."""
    diagnosis, error = diagnose("banner_mimics_verdicts_up")
    assert diagnosis.authenticated and not diagnosis.target.unknown
    assert error.retryable, error.message
    diagnosis, error = diagnose("banner_mimics_verdicts")
    assert isinstance(error, AuthError) and "needs a passphrase" not in error.message


def test_only_the_targets_own_login_counts_as_authenticated() -> None:
    diagnosis, _ = diagnose("jump_target_down")  # the jump host logged in; the target was never reached
    assert diagnosis.tcp_up and not diagnosis.authenticated
    assert [hop.stage for hop in diagnosis.jumps()] == [Stage.AUTHENTICATED]
    diagnosis, _ = diagnose("jump_up")
    assert diagnosis.authenticated


@pytest.mark.parametrize(
    ("case", "tcp_up"),
    [("connection_refused", False), ("unresolvable", False), ("jump_unreachable", False),
     ("closed_before_banner", True), ("banner_timeout", True), ("jump_target_down", True), ("auth_refused", True)],
)  # fmt: skip
def test_tcp_up_means_the_first_hop_accepted_tcp(case: str, tcp_up: bool) -> None:
    diagnosis, _ = diagnose(case)
    assert diagnosis.tcp_up is tcp_up


def test_debug_chatter_cannot_push_a_verdict_out() -> None:
    data = load("host_key_changed")
    diagnosis = Diagnosis(spec_of(data), None)
    records = records_of(data, with_pids=False)
    for record in records[:-1]:
        diagnosis.feed(record)
    for number in range(5000):
        diagnosis.feed(Record(f"debug1: chatter {number}"))
    diagnosis.feed(records[-1])
    assert isinstance(diagnosis.error(255), HostKeyError)


def test_a_pipe_keeps_the_peers_lines_with_the_line_that_quotes_them() -> None:
    """Where records are not kept (no SOCK_SEQPACKET), a write of ssh's still arrives whole in one read of the pipe:
    everything after a line quoting the peer in that read stays with it."""
    data = load("peer_forges_lines")
    lines = LineRecords()
    records = []
    for record in records_of(data, with_pids=False):
        records += lines.feed((record.text + "\r\n").encode())
    records += lines.feed(b"", end=True)
    assert [r.text for r in records] == [r.text for r in records_of(data, with_pids=False)]
    diagnosis = Diagnosis(spec_of(data), None)
    for record in records:
        diagnosis.feed(record)
    assert type(diagnosis.error(255)) is ConnectError and diagnosis.target.stage == Stage.BANNER


def test_the_channel_keeps_each_write_whole_and_names_its_writer() -> None:
    channel = StderrChannel()
    code = "import os; os.write(2, b'Remote: x\\r\\nAuthenticated to h\\r\\n'); os.write(2, b'second\\r\\n')"
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=channel.child_fd)
    channel.spawned()
    records = list(channel.records())
    assert proc.wait(10) == 0
    assert [r.text for r in records] == ["Remote: x\r\nAuthenticated to h", "second"]
    if channel.knows_writers:
        assert {r.pid for r in records} == {proc.pid}


def test_where_there_are_no_records_a_pipe_keeps_a_quoting_line_whole() -> None:
    channel = StderrChannel(records=False)
    code = "import os; os.write(2, b'first\\r\\n'); os.write(2, b'debug1: Remote: x\\r\\nAuthenticated to h\\r\\n')"
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=channel.child_fd)
    channel.spawned()
    records = list(channel.records())
    assert proc.wait(10) == 0 and not channel.knows_writers
    assert [r.text for r in records] == ["first", "debug1: Remote: x\r\nAuthenticated to h"]


def test_peer_text_is_escaped_bounded_and_quoted() -> None:
    shown = quote_peer('\x1b]52;c;ZXZpbA==\x07 "hi" ' + "A" * 300)
    assert shown.startswith('"\\x1b]52;c;ZXZpbA==\\x07 \\"hi\\" ') and shown.endswith('..."')
    assert "\x1b" not in shown and len(shown) <= PEER_TEXT_MAX_CHARS + 5


def test_a_log_line_quotes_what_ssh_quotes_from_the_peer() -> None:
    record = Record("debug1: kex_exchange_identification: banner line 0: \x1b[2JPermission denied (publickey).")
    assert record.shown() == 'kex_exchange_identification: banner line 0: "\\x1b[2JPermission denied (publickey)."'
    forged = Record("Received disconnect from 1.2.3.4 port 22:2: bye\r\nroot@h: Permission denied (publickey).")
    assert (
        forged.shown()
        == 'Received disconnect from 1.2.3.4 port 22:2: "bye\\x0d\\x0aroot@h: Permission denied (publickey)."'
    )


def test_every_captured_case_is_checked() -> None:
    checked = {*VERDICTS, *NEEDS_WRITERS, *PEER_CASES, "banner_mimics_verdicts_up", "jump_up"}
    assert {path.stem for path in Path(DATA).glob("*.json")} == checked


def test_a_verified_servers_banner_that_says_authenticated_is_undone_by_the_login_that_follows() -> None:
    """ssh prints the server's login Banner raw, after the host key was verified: a banner reading like ssh's own
    `Authenticated to ...` must not turn the refusal that follows into a transient failure (retried for ever)."""
    data = load("auth_refused")
    records = records_of(data)
    newkeys = next(i for i, r in enumerate(records) if r.text.endswith("SSH2_MSG_NEWKEYS sent"))
    pid = records[newkeys].pid
    forged = Record('Authenticated to 127.0.0.1 ([127.0.0.1]:22) using "publickey".', pid)
    diagnosis = Diagnosis(spec_of(data), data["main_pid"])  # type: ignore[arg-type]
    for record in [*records[: newkeys + 1], forged, *records[newkeys + 1 :]]:
        diagnosis.feed(record)
    error = diagnosis.error(int(data["returncode"]))  # type: ignore[call-overload]
    assert type(error) is AuthError and "Permission denied (publickey)" in error.message, error.message
    assert not diagnosis.authenticated
