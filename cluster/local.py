"""A local Ray head for development and tests, with token authentication on.

    python -m cluster.local start [--num-cpus 4] [--dashboard-port 8265]
    python -m cluster.local env      # the variables a client (ray job submit) needs
    python -m cluster.local stop     # stops the head `start` started, nothing else

Ray 2.60 turns token authentication on by default; this helper keeps it on: it generates a token
into ``runs/cluster/auth_token`` (mode 0600) and starts the head with ``RAY_AUTH_MODE=token`` and
``RAY_AUTH_TOKEN_PATH`` pointing at it. ``--no-auth`` switches authentication off, for a
throw-away dev cluster only.

Other Ray sessions may run on the same machine: the head gets free ports for every service (GCS,
dashboard agent, metrics, runtime-env agent; the dashboard's 8265 only when it is free) and runs as
``ray start --block`` in a process group of its own, recorded in ``runs/cluster/head.json``.
``stop`` ends that process group only (never Ray's host-wide force stop, which ends every Ray process
on the machine) and says what it stopped.
"""

from __future__ import annotations

import argparse
import json
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
HEAD_FILE = "head.json"  # in the state folder: the head `start` started (pid, process group, ports)
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


def node_ip() -> str:
    """The address Ray gives this host's node (what its GCS address starts with)."""
    from ray.util import get_node_ip_address  # no cluster contacted, no auth settings loaded

    return get_node_ip_address()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalHead:
    """A head whose processes live and die with this object (``ray start --block`` in its own
    process group), so tests can run one beside other Ray sessions without ``ray stop``.

        with LocalHead(num_cpus=2) as address:  # its ports: free ones, found when it is made
            JobSubmissionClient(address).submit_job(...)
    """

    def __init__(self, num_cpus: int = 2, dashboard_port: int | None = None, gcs_port: int | None = None,
                 auth: bool = True, token_file: Path = TOKEN_FILE, ready_timeout_s: float = 180.0,
                 log: Path | None = None) -> None:
        dashboard_port = free_port() if dashboard_port is None else dashboard_port
        gcs_port = free_port() if gcs_port is None else gcs_port
        self.gcs_port = gcs_port
        self.log = log
        self.command = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={gcs_port}",
                        f"--num-cpus={num_cpus}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                        f"--dashboard-port={dashboard_port}", "--disable-usage-stats",
                        # Ports of its own, so it can run beside another Ray session on the machine.
                        f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                        f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]
        self.env = _ray_env(auth_env(auth, token_file))
        # Every process of this head (workers, job drivers' actors, Ray Train's cleaner) finds this cluster, not
        # the host's newest one: Ray's state client otherwise guesses (README, Notes for Ray).
        self.env["RAY_ADDRESS"] = f"{node_ip()}:{gcs_port}"
        self.client_env = auth_env(auth, token_file)  # what a client of this head needs
        self.address = f"http://127.0.0.1:{dashboard_port}"
        self.ready_timeout_s = ready_timeout_s
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> str:
        out = subprocess.DEVNULL
        if self.log is not None:
            self.log.parent.mkdir(parents=True, exist_ok=True)
            out = open(self.log, "wb")  # noqa: SIM115 - the head outlives this call; the child keeps the file
        self.process = subprocess.Popen(self.command, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        deadline = time.time() + self.ready_timeout_s
        while time.time() < deadline:
            if self.process.poll() is not None:
                tail = self.log.read_text(errors="replace")[-2000:] if self.log is not None else ""
                raise RuntimeError(f"ray start exited with {self.process.returncode}\n{tail}")
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


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def start_head(num_cpus: int = 4, dashboard_port: int | None = None, auth: bool = True,
               state_dir: Path = STATE_DIR) -> dict:
    """Starts a local head in a process group of its own, on free ports; returns what ``head.json`` records.

    Args:
        dashboard_port: the job server's port; None = 8265 when free, else a free one.
    Raises:
        RuntimeError: a head started by this helper is still running (stop it first), or the head
            did not come up (its log tail in the message).
    """
    state_dir = Path(state_dir)
    record = read_head(state_dir)
    if record is not None and _alive(record["pgid"]):
        raise RuntimeError(f"a head started by cluster.local is already running at {record['address']} "
                           f"(process group {record['pgid']}); `python -m cluster.local stop` first")
    if dashboard_port is None:
        dashboard_port = DEFAULT_DASHBOARD_PORT if port_is_free(DEFAULT_DASHBOARD_PORT) else free_port()
    head = LocalHead(num_cpus=num_cpus, dashboard_port=dashboard_port, gcs_port=free_port(), auth=auth,
                     token_file=state_dir / TOKEN_FILE.name, log=state_dir / "head.log")
    address = head.__enter__()
    record = {"pid": head.process.pid, "pgid": os.getpgid(head.process.pid), "address": address,
              "gcs_address": f"127.0.0.1:{head.gcs_port}", "auth": auth}
    (state_dir / HEAD_FILE).write_text(json.dumps(record, indent=2))
    return record


def read_head(state_dir: Path = STATE_DIR) -> dict | None:
    path = Path(state_dir) / HEAD_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _alive(pgid: int) -> bool:
    """Whether any process of the group still runs (zombies, exited but not reaped, do not count)."""
    proc = Path("/proc")
    if proc.is_dir():
        for stat in proc.glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()  # after "(comm)": state, ppid, pgrp, ...
            except (OSError, IndexError):
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
        return False
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's group under a recycled id: not ours to signal
        return False
    return True


def _reap(pid: int) -> None:
    """Collects the head's exit status when it is this process's child (else its zombie looks alive)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def stop_head(state_dir: Path = STATE_DIR, timeout_s: float = 15.0) -> str:
    """Stops the head ``start_head`` recorded in ``state_dir`` (its process group only); returns what it did."""
    record = read_head(state_dir)
    if record is None:
        return f"no head started by cluster.local in {state_dir}: nothing stopped (other Ray sessions are left alone)"
    pgid = record["pgid"]
    (Path(state_dir) / HEAD_FILE).unlink()
    if not _alive(pgid):
        return f"the head at {record['address']} (process group {pgid}) had already exited"
    os.killpg(pgid, signal.SIGTERM)
    deadline = time.time() + timeout_s
    while _alive(pgid) and time.time() < deadline:
        _reap(record["pid"])
        time.sleep(0.5)
    if _alive(pgid):  # a process that ignored SIGTERM (seen: one of the dashboard's)
        os.killpg(pgid, signal.SIGKILL)
        deadline = time.time() + 10.0
        while _alive(pgid) and time.time() < deadline:
            _reap(record["pid"])
            time.sleep(0.2)
    return f"stopped the head at {record['address']} (process group {pgid}, gcs {record['gcs_address']})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.local", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["start", "stop", "env"])
    parser.add_argument("--num-cpus", type=int, default=4, help="CPUs the head advertises (default 4; see README)")
    parser.add_argument("--dashboard-port", type=int, default=None,
                        help=f"job server port (default {DEFAULT_DASHBOARD_PORT} when free, else a free one)")
    parser.add_argument("--state-dir", type=Path, default=STATE_DIR,
                        help=f"where the token and head.json live (default {STATE_DIR})")
    parser.add_argument("--no-auth", action="store_true", help="switch token authentication off (throw-away dev only)")
    args = parser.parse_args(argv)
    token = args.state_dir / TOKEN_FILE.name
    if args.action == "start":
        try:
            record = start_head(args.num_cpus, args.dashboard_port, auth=not args.no_auth, state_dir=args.state_dir)
        except (RuntimeError, TimeoutError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"Ray head started (process group {record['pgid']}); submit jobs to {record['address']}")
        print("Client environment (eval \"$(python -m cluster.local env)\"):")
    if args.action in ("start", "env"):
        for key, value in auth_env(not args.no_auth, token).items():
            print(f"export {key}={value}")
        record = read_head(args.state_dir)
        if record is not None:
            print(f"export RAY_ADDRESS={record['address']}")
    if args.action == "stop":
        print(stop_head(args.state_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
