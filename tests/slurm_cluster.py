"""A throw-away single-node Slurm cluster on localhost (munged + slurmctld + slurmd, all state in one temp
dir), for tests/test_slurm.py and for trying launch/slurm.sbatch by hand:

    python -m tests.slurm_cluster        # prints `export SLURM_CONF=...`; Ctrl-C tears it down

Needs root and Debian's `slurm-wlm` + `munge` packages (`apt-get install slurm-wlm munge`). Nothing outside
the temp dir is touched: its own munge key and socket, its own ports, `SLURM_CONF` pointing at its own
slurm.conf (clients find the cluster through that variable only).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "scancel", "squeue", "srun")
# How long a requeued job waits before it may start again is the job credential's lifetime (Slurm's
# default 120 s); a short one keeps the test fast and still covers launching job steps on a busy machine.
CRED_EXPIRE_S = 10
# Once eligible, a pending job waits for the next pass of the main scheduling loop (default every 60 s).
SCHED_INTERVAL_S = 2


class SlurmUnavailable(RuntimeError):
    """Slurm cannot run here; the message says why (tests skip with it)."""


def missing_reason() -> str | None:
    """Why a local cluster cannot be started here, or None."""
    missing = [p for p in (*DAEMONS, "munge", *CLIENTS) if shutil.which(p) is None]
    if missing:
        return f"not installed: {' '.join(missing)} (apt-get install slurm-wlm munge; .ci/run does)"
    if os.geteuid() != 0:
        return "needs root (slurmd runs jobs as the submitting user and must be able to switch to it)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_hardware() -> str:
    """The `CPUs=... RealMemory=...` part of `slurmd -C` (this machine's real counts)."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=30).stdout
    line = next((ln for ln in out.splitlines() if ln.startswith("NodeName=")), "")
    fields = [
        f
        for f in line.split()
        if f.split("=")[0]
        in ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore", "RealMemory")
    ]
    if not any(f.startswith("CPUs=") for f in fields):
        raise SlurmUnavailable(f"`slurmd -C` printed no node line: {out.strip()!r}")
    return " ".join(fields)


def _alive(pid: int) -> bool:
    """Running (a daemon that exited but is not reaped yet - its parent is init - counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class LocalSlurm:
    """Start with `up()`, stop with `down()` (or use as a context manager); `env` is what clients need."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="longctx-slurm-"))
        self.conf = self.dir / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.pids: dict[str, int] = {}

    def __enter__(self) -> LocalSlurm:
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def logs(self, tail: int = 30) -> str:
        parts = []
        for name in ("munged", "slurmctld", "slurmd"):
            path = self.dir / f"{name}.log"
            if path.exists():
                lines = path.read_text(errors="replace").splitlines()[-tail:]
                parts.append(f"--- {path}\n" + "\n".join(lines))
        return "\n".join(parts)

    def _write_config(self) -> None:
        d = self.dir
        for sub in ("state", "spool"):
            (d / sub).mkdir()
        key = d / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        # munged checks that every directory on its socket's path is reachable by all users.
        d.chmod(0o755)
        self.conf.write_text(
            f"""ClusterName=longctxtest
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d}/munge.sock,cred_expire={CRED_EXPIRE_S}
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
SchedulerParameters=sched_interval={SCHED_INTERVAL_S}
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
NodeName=localhost NodeAddr=127.0.0.1 {_node_hardware()} State=UNKNOWN
PartitionName=test Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""
        )

    def _start(self, name: str, cmd: list[str]) -> None:
        res = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        pid_file = self.dir / f"{name}.pid"
        deadline = time.monotonic() + 20
        while res.returncode == 0 and not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        if res.returncode != 0 or not pid_file.exists():
            raise SlurmUnavailable(
                f"{name} did not start (rc {res.returncode}): {(res.stderr or res.stdout).strip()}\n{self.logs()}"
            )
        self.pids[name] = int(pid_file.read_text().split()[0])

    def up(self, timeout_s: float = 60) -> None:
        reason = missing_reason()
        if reason:
            raise SlurmUnavailable(reason)
        try:
            self._write_config()
            d = self.dir
            self._start(
                "munged",
                [
                    "munged",
                    "--force",
                    f"--key-file={d}/munge.key",
                    f"--socket={d}/munge.sock",
                    f"--log-file={d}/munged.log",
                    f"--pid-file={d}/munged.pid",
                    f"--seed-file={d}/munged.seed",
                ],
            )
            self._start("slurmctld", ["slurmctld", "-i"])  # -i: ignore state from an earlier run
            self._start("slurmd", ["slurmd", "-N", "localhost"])
            deadline = time.monotonic() + timeout_s
            state = ""
            while time.monotonic() < deadline:
                state = self.scontrol("show", "node", "localhost", check=False)
                if re.search(r"State=IDLE\b", state):
                    return
                time.sleep(0.5)
            raise SlurmUnavailable(f"node localhost never became idle:\n{state}\n{self.logs()}")
        except BaseException:
            self.down()
            raise

    def scontrol(self, *args: str, check: bool = True) -> str:
        res = subprocess.run(["scontrol", *args], env=self.env, capture_output=True, text=True, timeout=30)
        if check and res.returncode != 0:
            raise RuntimeError(f"scontrol {' '.join(args)}: {res.stderr.strip()}")
        return res.stdout

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ...); empty once the job is forgotten."""
        text = self.scontrol("show", "job", job_id, check=False)
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def cancel_all(self, timeout_s: float = 60) -> None:
        """Cancel every job of this cluster and wait until slurmd has reaped them."""

        def jobs() -> list[str]:
            res = subprocess.run(
                ["squeue", "-h", "-o", "%i"], env=self.env, capture_output=True, text=True, timeout=30
            )
            return res.stdout.split() if res.returncode == 0 else []

        ids = jobs()
        if ids:
            subprocess.run(["scancel", "--full", *ids], env=self.env, capture_output=True, timeout=30)
        deadline = time.monotonic() + timeout_s
        while ids and time.monotonic() < deadline:
            time.sleep(0.5)
            ids = jobs()

    def down(self) -> None:
        """Cancel the jobs, stop the daemons (slurmd first) and remove the temp dir."""
        if "slurmctld" in self.pids:
            try:
                self.cancel_all()
            except (OSError, subprocess.TimeoutExpired):
                pass  # the daemons are killed below either way
        for name in reversed(DAEMONS):
            pid = self.pids.pop(name, None)
            if pid is None:
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            for _ in range(100):
                if not _alive(pid):
                    break
                time.sleep(0.1)
            else:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        shutil.rmtree(self.dir, ignore_errors=True)


def _stop(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    # Also when started in the background (SIGINT ignored there) or stopped with kill: tear down.
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    with LocalSlurm() as cluster:
        print(
            f"export SLURM_CONF={cluster.conf}\n(logs in {cluster.dir}; Ctrl-C stops the cluster)", flush=True
        )
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
