"""The production stack on one machine, on loopback, without containers.

    python infra/stack.py up   [--dir .stack]    (make stack)
    python infra/stack.py down [--dir .stack]    (make stack-down)
    source .stack/env                            (the endpoints and credentials, for your shell)

``up`` starts, each on a free loopback port:

- PostgreSQL (Debian's ``postgresql`` package) with databases ``mlflow`` and ``prefect``. It
  refuses to run as root, so as root it runs as the system user ``forgetless-pg`` (created once);
- an S3 API: the ``moto`` server (in memory: its buckets last as long as it runs), with the
  bucket ``forgetless``;
- ``mlflow server`` on that PostgreSQL, its artifacts in ``s3://forgetless/mlflow``;
- ``prefect server`` on that PostgreSQL;
- one process worker per work pool (``deploy.cpu_pool`` and ``deploy.gpu_pool`` of params.yaml).

Endpoints and generated credentials are written to ``<dir>/env`` (mode 600) and passed to the
servers and workers as environment variables: never on a command line, never in params.yaml.
``down`` stops exactly the processes ``up`` recorded in ``<dir>/stack.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PG_USER = "forgetless-pg"  # PostgreSQL will not run as root
PG_ROLE = "forgetless"
BUCKET = "forgetless"
QUIET = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}


class StackError(RuntimeError):
    """A part of the stack did not start; the message names it and its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_bin(tool: str) -> str:
    """A PostgreSQL server tool: on PATH, else Debian's versioned folder."""
    found = shutil.which(tool) or next(
        (str(p) for p in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{tool}"))), None
    )
    if not found:
        raise StackError(
            f"{tool} not found: install Debian's postgresql package "
            "(apt-get install postgresql), as `make stack` does"
        )
    return found


def pg_owner() -> str | None:
    """The user PostgreSQL runs as: ``forgetless-pg`` when we are root (created once), else us."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(PG_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--user-group", "--no-create-home"]
            + ["--shell", "/usr/sbin/nologin", PG_USER],
            check=True,
        )
    return PG_USER


def wait_http(url: str, proc: subprocess.Popen | None, what: str, log: Path, seconds: int) -> None:
    deadline = time.time() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            pass
        if proc is not None and proc.poll() is not None:
            raise StackError(f"{what} exited with {proc.returncode}: see {log}")
        if time.time() > deadline:
            raise StackError(f"{what} did not answer {url} in {seconds} s: see {log}")
        time.sleep(0.5)


class Stack:
    """The processes of one stack folder, recorded in ``stack.json`` as they start."""

    def __init__(self, folder: Path, ui: bool = True) -> None:
        self.folder = folder.resolve()
        self.ui = ui
        self.state_file = self.folder / "stack.json"
        self.env_file = self.folder / "env"
        self.logs = self.folder / "logs"

    def state(self) -> dict:
        return json.loads(self.state_file.read_text()) if self.state_file.exists() else {}

    def record(self, **entries) -> None:
        state = self.state() | entries
        self.state_file.write_text(json.dumps(state, indent=1))

    def env(self) -> dict[str, str]:
        """The stack's endpoints and credentials, read back from ``<dir>/env``."""
        out = {}
        for line in self.env_file.read_text().splitlines():
            if line.startswith("export "):
                key, _, value = line[len("export ") :].partition("=")
                out[key] = json.loads(value)
        return out

    def write_env(self, values: dict[str, str]) -> None:
        self.env_file.touch(mode=0o600)
        self.env_file.chmod(0o600)
        lines = [f"export {k}={json.dumps(v)}" for k, v in values.items()]
        self.env_file.write_text("\n".join(lines) + "\n")

    def spawn(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        """A server or worker in its own process group, its output in ``logs/<name>.log``."""
        self.logs.mkdir(parents=True, exist_ok=True)
        log = (self.logs / f"{name}.log").open("w")
        proc = subprocess.Popen(
            argv,
            env=env,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.record(**{name: {"pid": proc.pid, "argv0": Path(argv[0]).name}})
        return proc

    # -- up ---------------------------------------------------------------------------------

    def up(self, pools: list[str]) -> dict[str, str]:
        if self.state():
            raise StackError(f"{self.folder} already holds a stack: run `down` first")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.folder.chmod(0o755)  # PostgreSQL's own user must reach its data folder
        values = {
            "PGPASSWORD": secrets.token_urlsafe(18),
            "AWS_ACCESS_KEY_ID": "forgetless" + secrets.token_hex(4),
            "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(24),
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        try:
            pg_port = self.start_postgres(values["PGPASSWORD"])
            s3 = self.start_s3(values)
            values |= {"AWS_ENDPOINT_URL": s3, "MLFLOW_S3_ENDPOINT_URL": s3}
            mlflow_url = self.start_mlflow(pg_port, values)
            # Forgetless reads its own variable (flows/core/config.py); mlflow's CLI reads the other
            values |= {"FORGETLESS_TRACKING_URI": mlflow_url, "MLFLOW_TRACKING_URI": mlflow_url}
            values["PREFECT_API_URL"] = self.start_prefect(pg_port, values)
            self.write_env(values)
            for pool in pools:
                self.start_worker(pool, values)
        except BaseException:
            self.down()
            raise
        return values

    def start_postgres(self, password: str) -> int:
        owner = pg_owner()
        data = self.folder / "postgres"
        data.mkdir()
        pwfile = data / "pwfile"
        pwfile.write_text(password + "\n")
        if owner:
            shutil.chown(data, owner, owner)
            shutil.chown(pwfile, owner, owner)
        as_owner = {"user": owner} if owner else {}
        run = {"check": True, "capture_output": True, "text": True, **as_owner}
        subprocess.run(
            [pg_bin("initdb"), "-D", str(data / "db"), "-U", PG_ROLE, "--pwfile", str(pwfile)]
            + ["--auth-host=scram-sha-256", "--auth-local=scram-sha-256", "--encoding=UTF8"],
            **run,
        )
        pwfile.unlink()
        port = free_port()
        options = f"-h 127.0.0.1 -p {port} -k {data}"
        log = data / "postgres.log"
        done = subprocess.run(
            [pg_bin("pg_ctl"), "-D", str(data / "db"), "-l", str(log), "-o", options, "-w"]
            + ["start"],
            **{**run, "check": False},
        )
        if done.returncode:
            raise StackError(f"PostgreSQL did not start: {done.stderr.strip()} (see {log})")
        self.record(postgres={"data": str(data / "db"), "port": port, "owner": owner})
        env = os.environ | {"PGPASSWORD": password}
        for db in ("mlflow", "prefect"):
            subprocess.run(
                ["psql", "-h", "127.0.0.1", "-p", str(port), "-U", PG_ROLE, "-d", "postgres"]
                + ["-v", "ON_ERROR_STOP=1", "-q", "-c", f"CREATE DATABASE {db}"],
                env=env,
                check=True,
                capture_output=True,
            )
        return port

    def start_s3(self, values: dict[str, str]) -> str:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = self.spawn(
            "s3", [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], os.environ | QUIET
        )
        wait_http(f"{url}/moto-api/", proc, "the S3 server (moto)", self.logs / "s3.log", 60)
        import boto3

        boto3.client(
            "s3",
            endpoint_url=url,
            aws_access_key_id=values["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=values["AWS_SECRET_ACCESS_KEY"],
            region_name=values["AWS_DEFAULT_REGION"],
        ).create_bucket(Bucket=BUCKET)
        return url

    def start_mlflow(self, pg_port: int, values: dict[str, str], port: int | None = None) -> str:
        port = port or free_port()
        url = f"http://127.0.0.1:{port}"
        env = os.environ | QUIET | values  # libpq reads the password from PGPASSWORD
        proc = self.spawn(
            "mlflow",
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port)]
            + ["--workers", "1"]
            + ["--backend-store-uri", f"postgresql+psycopg2://{PG_ROLE}@127.0.0.1:{pg_port}/mlflow"]
            + ["--artifacts-destination", f"s3://{BUCKET}/mlflow"],
            env,
        )
        wait_http(f"{url}/health", proc, "mlflow server", self.logs / "mlflow.log", 180)
        self.record(mlflow={"pid": proc.pid, "argv0": "mlflow", "port": port})
        return url

    def start_prefect(self, pg_port: int, values: dict[str, str]) -> str:
        port = free_port()
        url = f"http://127.0.0.1:{port}/api"
        home = self.folder / "prefect"
        home.mkdir(exist_ok=True)
        env = (
            os.environ
            | QUIET
            | {
                "PREFECT_HOME": str(home),
                "PREFECT_UI_ENABLED": str(self.ui).lower(),
                "PREFECT_SERVER_DATABASE_CONNECTION_URL": (
                    f"postgresql+asyncpg://{PG_ROLE}:${{PREFECT_SERVER_DATABASE_PASSWORD}}"
                    f"@127.0.0.1:{pg_port}/prefect"
                ),
                "PREFECT_SERVER_DATABASE_PASSWORD": values["PGPASSWORD"],
            }
        )
        env.pop("PREFECT_API_URL", None)
        proc = self.spawn(
            "prefect",
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1"]
            + ["--port", str(port)]
            + ([] if self.ui else ["--no-ui"]),
            env,
        )
        wait_http(f"{url}/health", proc, "prefect server", self.logs / "prefect.log", 240)
        return url

    def start_worker(self, pool: str, values: dict[str, str]) -> None:
        env = os.environ | QUIET | values | {"PREFECT_HOME": str(self.folder / "prefect")}
        env["FORGETLESS_HOME"] = env.get("FORGETLESS_HOME", str(ROOT))  # where its flows run
        env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "1")
        subprocess.run(
            [str(BIN / "prefect"), "work-pool", "create", pool, "--type", "process"]
            + ["--overwrite"],
            env=env,
            check=True,
            capture_output=True,
        )
        self.spawn(
            f"worker-{pool}",
            [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process"]
            + ["--name", f"{pool}-{socket.gethostname()}"],
            env,
        )

    # -- one service ------------------------------------------------------------------------

    def stop_mlflow(self) -> None:
        """Stop the MLflow server alone (an outage: its store and artifacts stay)."""
        entry = self.state().get("mlflow")
        if not entry or not entry.get("pid"):
            raise StackError(f"no MLflow server recorded in {self.state_file}")
        stop_group(entry["pid"])
        self.record(mlflow=entry | {"pid": None})

    def start_mlflow_again(self) -> str:
        """Start the MLflow server again on its port, on the same PostgreSQL and bucket."""
        state = self.state()
        if state.get("mlflow", {}).get("pid"):
            raise StackError("the MLflow server is running")
        return self.start_mlflow(state["postgres"]["port"], self.env(), state["mlflow"]["port"])

    # -- down -------------------------------------------------------------------------------

    def down(self) -> list[str]:
        """Stop what ``up`` recorded (workers first, PostgreSQL last); the names stopped."""
        state = self.state()
        stopped = []
        for name, entry in reversed(state.items()):  # in the reverse order of starting
            if name == "postgres":
                subprocess.run(
                    [pg_bin("pg_ctl"), "-D", entry["data"], "-m", "fast", "-w", "stop"],
                    capture_output=True,
                    **({"user": entry["owner"]} if entry["owner"] else {}),
                )
            elif entry.get("pid"):
                stop_group(entry["pid"])
            stopped.append(name)
        self.state_file.unlink(missing_ok=True)
        return stopped


def stop_group(pid: int, seconds: float = 30) -> None:
    """SIGTERM a process group started by ``spawn``, then SIGKILL what is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def pools_from_params(params_file: Path) -> list[str]:
    deploy = (yaml.safe_load(params_file.read_text()) or {}).get("deploy") or {}
    return [deploy.get("cpu_pool", "cpu"), deploy.get("gpu_pool", "gpu")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "command",
        choices=["up", "down", "stop-mlflow", "start-mlflow"],
        help="stop-mlflow / start-mlflow: an MLflow outage and its end, the store kept",
    )
    parser.add_argument("--dir", type=Path, default=ROOT / ".stack")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--no-ui", action="store_true", help="the Prefect server without its UI")
    args = parser.parse_args(argv)
    stack = Stack(args.dir, ui=not args.no_ui)
    if args.command == "stop-mlflow":
        stack.stop_mlflow()
        return 0
    if args.command == "start-mlflow":
        print(f"mlflow server at {stack.start_mlflow_again()}")
        return 0
    if args.command == "down":
        stopped = stack.down()
        print(f"stopped: {', '.join(stopped) or 'nothing was running'}")
        return 0
    try:
        values = stack.up(pools_from_params(args.params))
    except (StackError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", None) or ""
        print(f"stack did not start: {err} {detail}".strip(), file=sys.stderr)
        return 1
    print(f"stack up in {stack.folder}; logs in {stack.logs}")
    for key in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "AWS_ENDPOINT_URL"):
        print(f"  {key}={values[key]}")
    if stack.ui:
        print(f"  Prefect UI: {values['PREFECT_API_URL'].removesuffix('/api')}")
    print(f"credentials in {stack.env_file}: `source {stack.env_file}` before forgetless")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
