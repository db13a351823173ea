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

from tests.harness import HttpServer, SshServer, free_port

HOST = "mlflowserver"


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


def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="tunneld-demo-"))
    env = dict(os.environ, TUNNELD_HOME=str(workdir / "tunneld"))
    sshd = SshServer(workdir / "server")
    mlflow = HttpServer()
    local_port = free_port()
    config = workdir / "ssh_config"
    try:
        say("A throwaway OpenSSH server and an MLflow stand-in, both on loopback (nothing touches ~/.ssh)")
        sshd.start()
        print(f"sshd on 127.0.0.1:{sshd.port} (pid {sshd.proc.pid if sshd.proc else '?'}), "
              f"MLflow stand-in on 127.0.0.1:{mlflow.port}")  # fmt: skip
        config.write_text(sshd.client_config(HOST, [f"LocalForward {local_port} localhost:{mlflow.port}"]))
        say(f"The demo's ssh_config ({config}); on your machine this is ~/.ssh/config with LocalForward 5000 ...")
        print(textwrap.indent(config.read_text(), "    "), end="")
        f = ("-F", str(config))

        say("What tunneld would do")
        tunneld("show", HOST, *f, env=env)
        say("Start it in the background: returns once the forward works")
        if tunneld("start", HOST, *f, env=env) != 0:
            return 1
        tunneld("status", env=env)
        fetch(local_port)

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
        say("Stop it: no ps | grep, no pkill")
        tunneld("stop", HOST, env=env)
        tunneld("status", HOST, env=env)
        print("\nDemo done: everything it started is stopped and its files are removed.")
        return 0
    finally:
        subprocess.run([sys.executable, "-m", "tunneld", "stop", HOST], env=env, capture_output=True, check=False)
        sshd.stop()
        mlflow.close()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
