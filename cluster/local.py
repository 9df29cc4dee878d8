"""A local Ray head for development and tests, with token authentication on.

    python -m cluster.local start [--num-cpus 4] [--dashboard-port 8265]
    python -m cluster.local env      # the variables a client (ray job submit) needs
    python -m cluster.local stop

Ray 2.60 turns token authentication on by default; this helper keeps it on: it generates a token
into ``runs/cluster/auth_token`` (mode 0600) and starts the head with ``RAY_AUTH_MODE=token`` and
``RAY_AUTH_TOKEN_PATH`` pointing at it. ``--no-auth`` switches authentication off, for a
throw-away dev cluster only.
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

STATE_DIR = Path("runs/cluster")
TOKEN_FILE = STATE_DIR / "auth_token"
DEFAULT_DASHBOARD_PORT = 8265


def ensure_token(path: Path = TOKEN_FILE) -> Path:
    """Creates a random token file (0600) unless one exists; returns its absolute path."""
    path = path.resolve()
    if not path.is_file() or not path.read_text().strip():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_hex(32))
        path.chmod(0o600)
    return path


def auth_env(auth: bool = True, token_file: Path = TOKEN_FILE) -> dict[str, str]:
    """Environment variables that make a Ray process (head or client) use the cluster's auth mode."""
    if not auth:
        return {"RAY_AUTH_MODE": "disabled"}
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(ensure_token(token_file))}


def _ray_env(extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_AUTH_TOKEN", None)  # the token file is the single source
    env.update(extra)
    # Jobs run `python -m ...` with the head's PATH: put this interpreter's environment first.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def start_head(num_cpus: int = 4, dashboard_port: int = DEFAULT_DASHBOARD_PORT, auth: bool = True) -> str:
    """Starts a local head with the dashboard (job server) on 127.0.0.1; returns the job address."""
    command = [str(Path(sys.executable).parent / "ray"), "start", "--head", f"--num-cpus={num_cpus}",
               "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
               "--disable-usage-stats"]
    result = subprocess.run(command, env=_ray_env(auth_env(auth)), capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"ray start failed ({result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return f"http://127.0.0.1:{dashboard_port}"


def _answers(address: str) -> bool:
    """Whether the dashboard answers HTTP at all (401/403 included: it is up, with auth on).

    Plain HTTP on purpose: Ray's own client would load this process's auth settings, which then
    stick for the life of the process (a later ``ray.init`` of another cluster would reuse them).
    """
    try:
        urllib.request.urlopen(f"{address}/api/version", timeout=2)
        return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalHead:
    """A head whose processes live and die with this object (``ray start --block`` in its own
    process group), so tests can run one beside other Ray sessions without ``ray stop``.

        with LocalHead(num_cpus=2, dashboard_port=8299, gcs_port=6390) as address:
            JobSubmissionClient(address).submit_job(...)
    """

    def __init__(self, num_cpus: int = 2, dashboard_port: int = DEFAULT_DASHBOARD_PORT, gcs_port: int = 6390,
                 auth: bool = True, token_file: Path = TOKEN_FILE, ready_timeout_s: float = 180.0) -> None:
        self.command = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={gcs_port}",
                        f"--num-cpus={num_cpus}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                        f"--dashboard-port={dashboard_port}", "--disable-usage-stats",
                        # Ports of its own, so it can run beside another Ray session on the machine.
                        f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                        f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]
        self.env = _ray_env(auth_env(auth, token_file))
        self.client_env = auth_env(auth, token_file)  # what a client of this head needs
        self.address = f"http://127.0.0.1:{dashboard_port}"
        self.ready_timeout_s = ready_timeout_s
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> str:
        self.process = subprocess.Popen(self.command, env=self.env, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + self.ready_timeout_s
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.process.returncode}")
            if _answers(self.address):
                return self.address
            time.sleep(1.0)
        self.__exit__(None, None, None)
        raise TimeoutError(f"the Ray head at {self.address} was not ready after {self.ready_timeout_s:.0f} s")

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)


def stop_head() -> None:
    subprocess.run([str(Path(sys.executable).parent / "ray"), "stop", "--force"], env=_ray_env({}),
                   capture_output=True, text=True, check=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.local", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["start", "stop", "env"])
    parser.add_argument("--num-cpus", type=int, default=4, help="CPUs the head advertises (default 4; see README)")
    parser.add_argument("--dashboard-port", type=int, default=DEFAULT_DASHBOARD_PORT)
    parser.add_argument("--no-auth", action="store_true", help="switch token authentication off (throw-away dev only)")
    args = parser.parse_args(argv)
    if args.action == "start":
        address = start_head(args.num_cpus, args.dashboard_port, auth=not args.no_auth)
        print(f"Ray head started; submit jobs to {address}")
        print("Client environment (eval \"$(python -m cluster.local env)\"):")
    if args.action in ("start", "env"):
        for key, value in auth_env(not args.no_auth).items():
            print(f"export {key}={value}")
    if args.action == "stop":
        stop_head()
        print("Ray stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
