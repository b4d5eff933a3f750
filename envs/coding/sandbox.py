"""Run untrusted programs in a kernel-enforced sandbox, one fresh process tree per program.

Mechanism: bubblewrap (``bwrap``, Debian/Ubuntu package ``bubblewrap``). Each run gets
new PID, network, IPC, UTS and mount namespaces; a root filesystem holding only read-only
``/usr`` (plus the interpreter's prefix when it lives elsewhere); a fresh size-capped tmpfs
``/work`` as its only writable directory; an empty environment; ``no_new_privs``. Inside, a
small supervisor (``_supervisor.py``) writes the program's files, starts it with CPU-time,
address-space, process-count, file-size and open-file limits, enforces the wall-time and
output limits, and reports as JSON. When the supervisor exits the namespace's init exits and
the kernel kills every process left in it, including children that started their own
session; the caller also kills the whole tree when the supervisor overruns.

Privileges: run as an ordinary user, bwrap makes an unprivileged user namespace (the kernel
must allow them). Run as root, bwrap needs no user namespace; the supervisor keeps only
CAP_SETUID/CAP_SETGID/CAP_KILL and starts the program under a throwaway uid (unique per
concurrent run), so the process-count limit applies and the program cannot signal it.

Where bwrap is missing or cannot create namespaces (e.g. a container without the needed
capabilities), ``on_unavailable="refuse"`` (default) raises `SandboxUnavailable`;
``on_unavailable="warn"`` runs programs with resource limits, a scrubbed environment and a
temporary directory only, after a loud warning: that is *not* a security boundary (no
filesystem, network or process-tree isolation; detached children can outlive the run).
"""

from __future__ import annotations

import functools
import json
import logging
import marshal
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import uuid
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

log = logging.getLogger(__name__)

SUPERVISOR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_supervisor.py")
WORKDIR = "/work"
STATUSES = ("ok", "failed", "timeout", "error")
ON_UNAVAILABLE = ("refuse", "warn")
_STARTUP_GRACE = 5.0  # seconds the caller allows beyond the wall limit for namespace and interpreter start
_UID_BASE = 1_800_000_000 + (os.getpid() % 65536) * 1024  # throwaway uids (root only), a range per process
_uid_lock = threading.Lock()
_free_uids: list[int] = []
_used_uids = [0]


class SandboxUnavailable(RuntimeError):
    """bubblewrap is missing or cannot create the namespaces on this machine."""


@dataclass(frozen=True)
class Limits:
    """Per-program limits. Times in seconds, sizes in bytes unless the name says otherwise."""

    wall_time: float = 4.0
    cpu_time: int = 2
    memory_mb: int = 512
    processes: int = 16
    output_bytes: int = 64 * 1024
    file_bytes: int = 4 * 1024 * 1024
    disk_bytes: int = 16 * 1024 * 1024
    open_files: int = 64

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"sandbox: limit {name!r} must be a positive number, got {value!r}")
        if self.memory_mb < 64:
            raise ValueError(f"sandbox: limit 'memory_mb' must be >= 64 (for the interpreter), got {self.memory_mb}")


@dataclass(frozen=True)
class Program:
    """What to run: files written into the working directory, and the command line.

    ``argv[0] == "python"`` means the sandbox's interpreter. ``collect`` names files whose text
    is read back after the run; ``check`` names files whose existence is reported.
    """

    files: dict[str, str | bytes]
    argv: Sequence[str]
    collect: Sequence[str] = ()
    check: Sequence[str] = ()


@dataclass(frozen=True)
class RunResult:
    """How a program ended: ``status`` is ``ok`` (exit 0), ``failed`` (other exit status),
    ``timeout`` (wall or CPU limit) or ``error`` (killed by a signal or a limit, or no report)."""

    status: str
    exit_code: int | None = None
    signal: int | None = None
    reason: str = ""
    stdout: str = ""
    stderr: str = ""
    files: dict[str, str | None] = field(default_factory=dict)
    exists: dict[str, bool] = field(default_factory=dict)
    elapsed: float = 0.0


def _interpreter(python: str | None) -> tuple[str, str]:
    """(real path of the interpreter, its installation prefix)."""
    exe = os.path.realpath(python or getattr(sys, "_base_executable", None) or sys.executable)
    if not os.access(exe, os.X_OK):
        raise ValueError(f"sandbox: python {exe!r} is not an executable file")
    return exe, os.path.dirname(os.path.dirname(exe))


def _bwrap_args(exe: str, prefix: str, limits: Limits, root: bool) -> list[str]:
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SandboxUnavailable("bwrap not found on PATH (install the 'bubblewrap' system package)")
    args = [bwrap, "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
            "--hostname", "sandbox", "--die-with-parent", "--new-session", "--clearenv",
            "--setenv", "PATH", "/usr/bin:/bin", "--ro-bind", "/usr", "/usr"]
    if not root:
        args += ["--unshare-user", "--disable-userns"]
    for d in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(d):
            args += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            args += ["--ro-bind", d, d]
    if not (prefix + "/").startswith("/usr/"):
        parts = prefix.strip("/").split("/")
        for i in range(1, len(parts)):
            args += ["--perms", "0755", "--dir", "/" + "/".join(parts[:i])]
        args += ["--ro-bind", prefix, prefix]
    args += ["--proc", "/proc", "--dev", "/dev",
             "--perms", "0755", "--dir", "/sandbox", "--ro-bind", SUPERVISOR, "/sandbox/supervisor.py",
             "--perms", "1777", "--size", str(int(limits.disk_bytes)), "--tmpfs", WORKDIR, "--chdir", WORKDIR,
             "--remount-ro", "/dev", "--remount-ro", "/"]
    if root:
        args += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_KILL"]
    return args + ["--", exe, "-I", "-S", "-B", "/sandbox/supervisor.py"]


@functools.cache
def _probe_bwrap(exe: str, prefix: str, root: bool) -> str | None:
    """None when a trivial program runs in the bwrap sandbox here, else why it does not."""
    try:
        sb = Sandbox(python=exe, on_unavailable="refuse", _check=False)
        r = sb.run(Program(files={}, argv=["python", "-c", "print(6 * 7)"]))
    except SandboxUnavailable as e:
        return str(e)
    if r.status != "ok" or r.stdout.strip() != "42":
        return f"a test program did not run ({r.status}: {r.reason}) {r.stderr.strip()[-400:]}"
    return None


class Sandbox:
    """Runs `Program`s under `Limits`, one at a time (`run`) or on a thread pool (`run_many`).

    Args:
        limits: per-program limits (defaults: `Limits()`).
        on_unavailable: ``"refuse"`` raises `SandboxUnavailable` where bwrap cannot isolate;
            ``"warn"`` degrades to limits-only execution after a loud warning.
        workers: threads of the pool used by `run_many` (default: the number of CPUs).
        python: interpreter to run inside the sandbox (default: this one's base interpreter).
    """

    def __init__(self, limits: Limits | None = None, on_unavailable: str = "refuse", workers: int | None = None,
                 python: str | None = None, _check: bool = True):
        if on_unavailable not in ON_UNAVAILABLE:
            raise ValueError(f"sandbox: on_unavailable must be one of {list(ON_UNAVAILABLE)}, got {on_unavailable!r}")
        if workers is not None and (not isinstance(workers, int) or workers < 1):
            raise ValueError(f"sandbox: workers must be a positive integer, got {workers!r}")
        self.limits = limits or Limits()
        self.workers = workers or os.cpu_count() or 1
        self.root = os.geteuid() == 0
        self.exe, prefix = _interpreter(python)
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        why = _probe_bwrap(self.exe, prefix, self.root) if _check else None
        if why is None:
            self.backend = "bwrap"
            self._prefix = _bwrap_args(self.exe, prefix, self.limits, self.root)
        elif on_unavailable == "refuse":
            raise SandboxUnavailable(
                f"sandbox: bubblewrap isolation is unavailable: {why}. Install bubblewrap (apt-get install bubblewrap) "
                "and allow user namespaces (or run as root with CAP_SYS_ADMIN), or pass on_unavailable='warn' to run "
                "untrusted code WITHOUT isolation.")
        else:
            self.backend = "none"
            self._prefix = [self.exe, "-I", "-S", "-B", SUPERVISOR]
            msg = (f"SANDBOX DISABLED: {why}. Untrusted programs will run with resource limits only: no filesystem, "
                   "network or process-tree isolation. Do not use this for model-written code you do not trust.")
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            log.warning(msg)

    # ------------------------------------------------------------------ uids (root only)
    def _take_uid(self) -> int | None:
        """A uid no other running program of this process has (so RLIMIT_NPROC counts one program)."""
        if not self.root or (self.backend == "none" and not _others_can_run(self.exe)):
            return None
        with _uid_lock:
            if _free_uids:
                return _free_uids.pop()
            _used_uids[0] += 1
            return _UID_BASE + _used_uids[0]

    @staticmethod
    def _give_uid(uid: int | None) -> None:
        if uid is not None:
            with _uid_lock:
                _free_uids.append(uid)

    # ------------------------------------------------------------------ running
    def run(self, program: Program) -> RunResult:
        """Run one program to completion (or to its limits); never raises for anything the program does."""
        if not program.argv:
            raise ValueError("sandbox: Program.argv is empty")
        bad = [n for n in program.files if not n or "/" in n or n in (".", "..") or "\0" in n]
        if bad:
            raise ValueError(f"sandbox: Program.files names must be plain file names, got {bad}")
        lim = self.limits
        run_id = uuid.uuid4().hex
        uid = self._take_uid()
        workdir = WORKDIR if self.backend == "bwrap" else tempfile.mkdtemp(prefix="route-sbx-")
        if uid is not None and self.backend == "none":
            os.chmod(workdir, 0o1777)
        if self.backend == "bwrap":
            nproc = lim.processes if uid is not None else lim.processes + 2  # + bwrap's init and the supervisor
        else:
            nproc = lim.processes if uid is not None else None  # an ordinary user's own processes would count
        argv = [self.exe if i == 0 and a == "python" else str(a) for i, a in enumerate(program.argv)]
        spec = {
            "workdir": workdir, "argv": argv, "files": dict(program.files), "uid": uid, "nproc": nproc,
            "collect": list(program.collect), "check": list(program.check),
            "env": {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"},
            "limits": {**asdict(lim), "report_bytes": lim.file_bytes},
        }
        try:
            return self._launch(self._prefix + [run_id], marshal.dumps(spec, 4))
        finally:
            self._give_uid(uid)
            if self.backend == "none":
                _rmtree(workdir)

    def _launch(self, cmd: list[str], spec: bytes) -> RunResult:
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    env=env, cwd="/", start_new_session=True, close_fds=True)
        except OSError as e:
            return RunResult(status="error", reason=f"sandbox: could not start: {e}")
        try:
            out, err = proc.communicate(spec, timeout=self.limits.wall_time + _STARTUP_GRACE)
        except subprocess.TimeoutExpired:
            _killpg(proc.pid)
            proc.communicate()
            return RunResult(status="timeout", reason="wall time (supervisor overran)")
        finally:
            _killpg(proc.pid)
        try:
            s = json.loads(out.decode("utf-8", "replace"))
        except ValueError:
            tail = err.decode("utf-8", "replace").strip()[-500:]
            return RunResult(status="error", reason=f"sandbox: no report (exit {proc.returncode}): {tail}")
        reason, sig, code = s.get("reason", ""), s.get("signal"), s.get("exit_code")
        if reason in ("wall time", "cpu time"):
            status = "timeout"
        elif reason or sig is not None:
            status, reason = "error", reason or f"killed by signal {sig}"
        else:
            status = "ok" if code == 0 else "failed"
        return RunResult(status=status, exit_code=code, signal=sig, reason=reason, stdout=s.get("stdout", ""),
                         stderr=s.get("stderr", ""), files=s.get("files", {}), exists=s.get("exists", {}),
                         elapsed=float(s.get("elapsed", 0.0)))

    def run_many(self, programs: Sequence[Program]) -> list[RunResult]:
        """Run programs in parallel on the worker pool; results in input order."""
        programs = list(programs)
        if len(programs) <= 1 or self.workers == 1:
            return [self.run(p) for p in programs]
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="sandbox")
            pool = self._pool
        return list(pool.map(self.run, programs))

    def close(self) -> None:
        """Shut the worker pool down (runs already started finish first)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def bwrap_status(python: str | None = None) -> str | None:
    """None when the bwrap sandbox works on this machine, else the reason it does not."""
    exe, prefix = _interpreter(python)
    return _probe_bwrap(exe, prefix, os.geteuid() == 0)


def _others_can_run(exe: str) -> bool:
    """Whether a throwaway uid could run `exe` on the host (all parent directories searchable by others)."""
    path = exe
    while path != "/":
        if not os.stat(path).st_mode & 0o001:
            return False
        path = os.path.dirname(path)
    return True


def _killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass


def _rmtree(path: str) -> None:
    """Remove a run's directory even where the program made parts of it unreadable."""

    def fix(func, p, exc) -> None:  # (function, path, error) from shutil.rmtree
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=fix)
    else:
        shutil.rmtree(path, onerror=fix)
    if os.path.exists(path):
        shutil.rmtree(path, ignore_errors=True)
