"""A supervisor lives all day, one per host: what it loads is kept few, and stays so.

Each module named here was once loaded by every supervisor for a side purpose (click for argument
parsing, platformdirs for two paths, shutil for a terminal width, the idna tables for an ASCII name,
logging.handlers for log rotation). `python -X importtime` lists what a process imported, so these
tests see the real processes' imports, not a model of them.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

from tests.harness import EchoServer, SshServer, free_port
from tests.helpers import read_log, run_cli, write_config, write_settings
from tunneld.errors import EXIT_CONFIG

HEAVY = ("click", "platformdirs", "shutil", "logging.handlers", "encodings.idna", "paramiko")


def imported(importtime_output: str) -> set[str]:
    """Return the module names in `python -X importtime` lines."""
    return {m.group(1) for m in re.finditer(r"^import time:\s+\d+ \|\s+\d+ \|\s+(\S+)$", importtime_output, re.M)}


def test_a_detached_supervisor_loads_none_of_the_heavy_modules(
    tmp_path: Path, sshd: SshServer, echo: EchoServer
) -> None:
    port = free_port()
    config = write_config(tmp_path, sshd.client_config("light", [f"LocalForward {port} 127.0.0.1:{echo.port}"]))
    env = dict(os.environ, PYTHONPROFILEIMPORTTIME="1")  # the detached child's stderr is its log
    started = run_cli("start", "light", "-F", str(config), "--engine", "openssh", env=env)
    try:
        assert started.returncode == 0, started.stderr
        modules = imported(read_log("light"))
        assert {"tunneld.runtime.daemon", "tunneld.engines.openssh", "psutil"} <= modules  # the listing is real
        assert not modules & set(HEAVY), sorted(modules & set(HEAVY))
    finally:
        run_cli("stop", "light")


def test_the_command_service_managers_run_skips_click_and_says_the_same(tmp_path: Path) -> None:
    config = write_config(tmp_path, "Host other\n  LocalForward 5000 localhost:5000\n")
    env = dict(os.environ, TUNNELD_SSH_CONFIG=str(config))
    light = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "tunneld", "run", "nosuchhost"],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    through_click = run_cli("run", "nosuchhost", "--engine", "auto", env=env)  # any other argument: the CLI
    assert light.returncode == through_click.returncode == EXIT_CONFIG
    said = [line for line in light.stderr.splitlines() if not line.startswith("import time:")]
    assert said == through_click.stderr.splitlines() and "nosuchhost" in through_click.stderr
    assert "click" not in imported(light.stderr) and "tunneld.runtime.detached" in imported(light.stderr)


def test_a_broken_ssh_config_in_the_environment_goes_through_the_cli(tmp_path: Path) -> None:
    env = dict(os.environ, TUNNELD_SSH_CONFIG=str(tmp_path / "missing"))
    done = run_cli("run", "somehost", env=env)
    assert done.returncode == EXIT_CONFIG and "does not exist" in done.stderr, done.stderr


# Run in a fresh interpreter: what `import tunneld` and the first use of its API load, and which files they open.
IMPORT_PROBE = """
import os, sys

touched = []
homes = (os.environ["HOME"], os.environ["TUNNELD_HOME"])


def audit(event, args):
    path = str(args[0]) if event.startswith(("open", "os.")) and args and isinstance(args[0], (str, bytes)) else ""
    if event == "open" and not path.endswith((".py", ".pyc", ".so")) and not path.startswith("/proc/"):
        touched.append(path)  # any file but Python's modules (and the /proc files psutil reads to load)
    elif path.startswith(homes):
        touched.append(f"{event} {path}")  # where tunneld keeps its files and reads its settings


sys.addaudithook(audit)
import tunneld

after_import = list(touched)
tunneld.ensure, tunneld.status, tunneld.tunnel, tunneld.Tunnel, tunneld.TunneldError
print(repr((after_import, touched)), file=sys.stderr)
"""


def test_import_tunneld_and_a_look_at_its_api_load_neither_click_nor_paramiko_and_touch_no_file(
    tmp_path: Path,
) -> None:
    write_settings("[hosts.ml.env]\nURI = 'http://{local}'\n")  # there to be read, if anything did
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", IMPORT_PROBE],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    modules = imported(done.stderr)
    assert {"tunneld", "tunneld.api", "tunneld.errors"} <= modules  # the listing is real
    assert not modules & {"click", "paramiko", "platformdirs"}, sorted(modules & {"click", "paramiko", "platformdirs"})
    after_import, after_api = ast.literal_eval(done.stderr.splitlines()[-1])  # the repr printed last
    assert after_import == [] and after_api == [], (after_import, after_api)


def test_every_error_of_the_tree_is_exported_and_documented() -> None:
    import tunneld
    from tunneld import errors

    tree = {
        name for name, obj in vars(errors).items() if isinstance(obj, type) and issubclass(obj, errors.TunneldError)
    }
    assert {"NeedsAuthError", "RefusedByServerError"} <= tree  # the listing is real
    assert tree <= set(tunneld.__all__), sorted(tree - set(tunneld.__all__))
    assert all(getattr(tunneld, name) is getattr(errors, name) for name in tree)
    reference = (Path(__file__).parent.parent / "docs" / "python.md").read_text().split("### Errors", 1)[1]
    assert not {name for name in tree if not re.search(rf"\b{name}\b", reference)}, "docs/python.md's error table"


def test_dir_of_tunneld_lists_the_api_without_loading_it() -> None:
    probe = (
        "import sys, tunneld\nprint(repr((dir(tunneld), sorted(m for m in sys.modules if m.startswith('tunneld')))))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    names, loaded = ast.literal_eval(done.stdout)
    assert {"ensure", "tunnel", "status", "stop", "Tunnel", "ForwardAddress", "TunneldError", "NeedsAuthError"} <= set(
        names
    )
    assert loaded == ["tunneld"]  # tab completion sees the names; nothing behind them is imported


def test_status_loads_neither_the_engines_nor_ssh_config_resolution(tmp_path: Path) -> None:
    """`tunneld status` is run often (prompts, watch loops): it reads pid and state files and nothing else. The
    start path (runtime.launch) resolves ssh_config and reaches the engines; a module-level import of it from a
    verb module put all of that under every `status`."""
    env = dict(os.environ, TUNNELD_HOME=str(tmp_path / "home"))
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "tunneld", "status"],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    modules = imported(done.stderr)
    assert {"tunneld.cli.report", "tunneld.state.status", "psutil"} <= modules  # the listing is real
    heavy = {
        m for m in modules if m.startswith(("tunneld.engines", "tunneld.runtime.launch", "tunneld.config.resolve"))
    }
    assert not heavy | (modules & set(HEAVY) - {"click", "platformdirs", "shutil"}), sorted(heavy)
