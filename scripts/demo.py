"""`make demo`: the MLflow scenario end to end on loopback, with a throwaway sshd; cleans up after itself."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.harness import ControlledHttpServer, SshServer, free_port

HOST = "mlflowserver"
ON_DEMAND = "tensorboard"
IDLE_TIMEOUT_S = 3


def say(text: str) -> None:
    print(f"\n# {text}", flush=True)


def tunneld(*args: str, env: dict[str, str]) -> int:
    """Run a tunneld command the way a user would, echoing it and its output."""
    shown = " ".join(shlex.quote(a) for a in args)
    print(f"$ tunneld {shown}", flush=True)
    done = subprocess.run([sys.executable, "-m", "tunneld", *args], env=env, check=False, stdin=subprocess.DEVNULL)
    return done.returncode


def fetch(port: int) -> str:
    """GET /health through the tunnel, as an MLflow client's health check would."""
    url = f"http://127.0.0.1:{port}/health"
    print(f"$ curl {url}", flush=True)
    with urllib.request.urlopen(url, timeout=10) as response:
        body = str(response.read().decode())
    print(body, flush=True)
    return body


def wait_for_state(env: dict[str, str], state: str, timeout_s: float = 20.0) -> None:
    """Poll `status --json` (bounded) until the host reaches `state`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done = subprocess.run(
            [sys.executable, "-m", "tunneld", "status", HOST, "--json"],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if f'"state": "{state}"' in done.stdout:
            return
        time.sleep(0.2)


def show_health_check(mlflow: ControlledHttpServer, env: dict[str, str]) -> None:
    """MLflow answers 503 for a while: the host turns degraded, then up again, with no reconnect."""
    say("MLflow stops answering (503) while the SSH link is fine: the health check notices")
    mlflow.set_mode("503")
    wait_for_state(env, "degraded")
    tunneld("status", env=env)
    mlflow.set_mode("ok")
    say("MLflow is back: `wait` returns once the health check passes again")
    tunneld("wait", HOST, "--timeout", "20", env=env)


def sessions(sshd: SshServer) -> int:
    """How many SSH connections the server holds (one forked sshd each)."""
    import psutil

    return len(psutil.Process(sshd.proc.pid).children()) if sshd.proc else 0


def show_on_demand(sshd: SshServer, port: int, env: dict[str, str], f: tuple[str, str]) -> None:
    """An on-demand host: listening from `start`, an SSH session only while a client uses it."""
    say(f"On demand: {ON_DEMAND} listens from `start` but opens its SSH session only for a client")
    if tunneld("start", ON_DEMAND, *f, env=env) != 0:
        return
    time.sleep(0.5)
    print(f"SSH sessions on the server: {sessions(sshd)} ({HOST}'s; {ON_DEMAND} checked its login and closed)",
          flush=True)  # fmt: skip
    say("The first client connects: it waits while the link comes up, and is served")
    fetch(port)
    print(f"SSH sessions on the server: {sessions(sshd)} ({HOST}'s and {ON_DEMAND}'s)", flush=True)
    say(f"No connection for {IDLE_TIMEOUT_S} s: the link closes, the port keeps listening")
    deadline = time.monotonic() + IDLE_TIMEOUT_S + 15
    while sessions(sshd) > 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    tunneld("status", "@ml", env=env)


def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="tunneld-demo-"))
    env = dict(os.environ, TUNNELD_HOME=str(workdir / "tunneld"))
    sshd = SshServer(workdir / "server")
    mlflow = ControlledHttpServer()
    local_port, demand_port = free_port(), free_port()
    config = workdir / "ssh_config"
    try:
        say("A throwaway OpenSSH server and an MLflow stand-in, both on loopback (nothing touches ~/.ssh)")
        sshd.start()
        print(f"sshd on 127.0.0.1:{sshd.port} (pid {sshd.proc.pid if sshd.proc else '?'}), "
              f"MLflow stand-in on 127.0.0.1:{mlflow.port}")  # fmt: skip
        config.write_text(
            sshd.client_config(HOST, [f"LocalForward {local_port} localhost:{mlflow.port}"])
            + sshd.client_config(ON_DEMAND, [f"LocalForward {demand_port} localhost:{mlflow.port}"])
        )
        say(f"The demo's ssh_config ({config}); on your machine this is ~/.ssh/config with LocalForward 5000 ...")
        print(textwrap.indent(config.read_text(), "    "), end="")
        f = ("-F", str(config))
        settings = workdir / "tunneld" / "config" / "tunneld.toml"
        settings.parent.mkdir(parents=True)
        settings.write_text(
            f'[hosts.{HOST}]\nhealth_interval_s = 2\n\n[hosts.{HOST}.health]\n"{local_port}" = "/health"\n\n'
            f"[hosts.{ON_DEMAND}]\non_demand = true\nidle_timeout_s = {IDLE_TIMEOUT_S}\n\n"
            f'[groups]\nml = ["{HOST}", "{ON_DEMAND}"]\n'
        )
        say(f"tunneld's settings ({settings}): a health check through the tunnel (GET /health every 2 s), "
            f"an on-demand host, a group")  # fmt: skip
        print(textwrap.indent(settings.read_text(), "    "), end="")

        say("What tunneld would do")
        tunneld("show", HOST, *f, env=env)
        say("Start it in the background: returns once the forward works")
        if tunneld("start", HOST, *f, env=env) != 0:
            return 1
        tunneld("status", env=env)
        fetch(local_port)

        show_health_check(mlflow, env)

        say("The server restarts (sshd killed, back 2 s later): tunneld notices and reconnects by itself")
        sshd.stop()
        time.sleep(2)
        sshd.start()
        tunneld("wait", HOST, "--timeout", "20", env=env)
        tunneld("status", env=env)
        fetch(local_port)
        say("What the log says")
        tunneld("logs", HOST, "-n", "12", env=env)

        say("Diagnose it step by step")
        tunneld("check", HOST, *f, env=env)

        show_on_demand(sshd, demand_port, env, f)

        say("Stop the whole group: no ps | grep, no pkill")
        tunneld("stop", "@ml", env=env)
        tunneld("status", env=env)
        print("\nDemo done: everything it started is stopped and its files are removed.")
        return 0
    finally:
        subprocess.run([sys.executable, "-m", "tunneld", "stop", HOST, ON_DEMAND], env=env, capture_output=True,
                       check=False)  # fmt: skip
        sshd.stop()
        mlflow.close()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
