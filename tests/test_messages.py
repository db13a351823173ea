"""What a new user reads at a first failure: a mistyped host, ssh -L syntax in ssh_config, the files that were read,
a server that is down at `start`, names tunneld never ran, a ProxyCommand as ssh runs it, a fixed tunneld.toml."""

from __future__ import annotations

import os
from pathlib import Path

from tests.harness import SshServer, free_port
from tests.helpers import read_state, run_cli, write_config
from tunneld.config import describe_sources
from tunneld.errors import EXIT_CONFIG, EXIT_NOT_RUNNING, EXIT_UNAVAILABLE

CONFIG = """\
Host mlflowserver
  HostName 127.0.0.1
  LocalForward 5000 localhost:5000
Host tensorboard
  HostName 127.0.0.1
  LocalForward 6006 localhost:6006
"""


def test_a_mistyped_host_under_a_host_star_block_is_not_named_and_gets_did_you_mean(tmp_path: Path) -> None:
    config = write_config(tmp_path, CONFIG + "Host *\n  ServerAliveInterval 5\n")
    done = run_cli("start", "mlflowsever", "-F", str(config))
    assert done.returncode == EXIT_CONFIG
    assert f"Error: no 'Host mlflowsever' entry in {config} (only 'Host *' matches it)" in done.stderr, done.stderr
    assert "hint: did you mean mlflowserver?" in done.stderr
    assert "has no LocalForward" not in done.stderr


def test_a_mistyped_host_without_wildcards_gets_did_you_mean_too(tmp_path: Path) -> None:
    config = write_config(tmp_path, CONFIG)
    done = run_cli("start", "tensorbord", "-F", str(config))
    assert done.returncode == EXIT_CONFIG
    assert f"Error: no 'Host tensorbord' entry in {config}\n" in done.stderr
    assert "hint: did you mean tensorboard?" in done.stderr


def test_show_of_a_mistyped_host_warns_with_did_you_mean(tmp_path: Path) -> None:
    config = write_config(tmp_path, CONFIG + "Host *\n  User me\n")
    done = run_cli("show", "mlflowsever", "-F", str(config))
    assert done.returncode == 0
    assert "warning: no 'Host mlflowsever' entry" in done.stderr and "did you mean mlflowserver?" in done.stderr


def test_list_and_the_no_forwards_error_name_the_files_read(tmp_path: Path) -> None:
    included = tmp_path / "more.conf"
    included.write_text("Host bare\n  HostName 127.0.0.1\n")
    config = write_config(tmp_path, f"Include {included}\n" + CONFIG)
    listed = run_cli("list", "-F", str(config))
    assert listed.returncode == 0
    assert f"ssh_config files read: {config}, {included}" in listed.stderr
    refused = run_cli("start", "bare", "-F", str(config))
    assert refused.returncode == EXIT_CONFIG
    assert f"host bare has no LocalForward, RemoteForward or DynamicForward in {config}, {included}" in refused.stderr
    empty = write_config(tmp_path, "Host nothing\n  HostName 127.0.0.1\n")
    none = run_cli("list", "-F", str(empty))
    assert f"no host in {empty} has a LocalForward" in none.stderr


def test_a_missing_user_config_is_named_as_not_existing(tmp_path: Path) -> None:
    """ssh reads ~/.ssh/config of the passwd entry's home; a home without one is named, not left out."""
    home = tmp_path / "somebody"
    (home / ".ssh").mkdir(parents=True)
    assert describe_sources(None, str(home)).startswith("~/.ssh/config (does not exist), /etc/ssh/ssh_config")
    (home / ".ssh" / "config").write_text("Host x\n")
    assert describe_sources(None, str(home)).startswith("~/.ssh/config, /etc/ssh/ssh_config")


def test_ssh_minus_l_syntax_in_local_forward_gets_the_two_argument_form(tmp_path: Path) -> None:
    config = write_config(tmp_path, "Host mlflowserver\n  LocalForward 5000:localhost:5050\n")
    for env in (None, dict(os.environ, PATH=str(tmp_path / "no-ssh-here"))):  # ssh -G, then the fallback reader
        done = run_cli("start", "mlflowserver", "-F", str(config), env=env)
        assert done.returncode == EXIT_CONFIG
        assert f"Error: {config} line 2: Missing target argument." in done.stderr
        assert "hint: LocalForward takes two arguments, not ssh -L's one: write `LocalForward 5000 localhost:5050`" in (
            done.stderr
        )


def test_a_server_down_at_a_plain_start_points_to_keep_trying(tmp_path: Path, sshd: SshServer, engine: str) -> None:
    config = write_config(tmp_path, sshd.client_config("down", [f"LocalForward {free_port()} 127.0.0.1:9"]))
    sshd.stop()
    done = run_cli("start", "down", "-F", str(config), "--engine", engine)
    assert done.returncode == EXIT_UNAVAILABLE, done.stderr
    assert "keeps retrying" not in done.stderr
    command = f"tunneld start down -F {config} --keep-trying"
    assert f"othing is left running: to keep retrying in the background until the server answers, run `{command}`" in (
        done.stderr
    )
    assert read_state("down").get("state") == "failed"  # what `status` shows: nothing runs
    assert run_cli("status", "down").returncode == EXIT_NOT_RUNNING
