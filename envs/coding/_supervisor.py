"""In-sandbox supervisor: runs one untrusted program under limits and reports on it as JSON.

This file is executed *inside* the sandbox by the interpreter found there, with ``-I -S``, so it
uses the standard library only, imports nothing from the project, and keeps to modules that load
fast (no json, signal or subprocess: start-up time is most of a run). It reads a spec (a dict,
``marshal`` version 4, written by the trusted caller) on stdin, writes the spec's files into the
working directory, starts the program as a child with resource limits (and, when started as
root, under a throwaway unprivileged uid), enforces the wall-time and output limits, then prints
one JSON summary on stdout and exits. When it exits, the sandbox's PID namespace ends and the
kernel kills whatever the program left behind.

Spec fields (``files`` values are text or bytes): workdir, argv, env, files {name: data},
collect [names to read back], check [names whose existence to report], uid (int or null),
nproc (RLIMIT_NPROC or null), limits {wall_time, cpu_time, memory_mb, output_bytes, file_bytes,
open_files, report_bytes}.
"""

import marshal
import os
import resource
import select
import sys
import time

SIGKILL, SIGXCPU, SIGXFSZ = 9, 24, 25  # Linux numbers; the signal module is slow to import


_ESCAPES = {i: f"\\u{i:04x}" for i in [*range(32), *range(0xD800, 0xE000)]} | {34: '\\"', 92: "\\\\"}


def dumps(value: object) -> str:
    """Minimal JSON encoder (None, bool, int, float, str, list, dict); the json module is slow to import."""
    if value is None or value is True or value is False:
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, (int, float)):
        return repr(value) if value == value and abs(value) != float("inf") else "null"
    if isinstance(value, str):
        return '"' + value.translate(_ESCAPES) + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(dumps(v) for v in value) + "]"
    return "{" + ",".join(dumps(str(k)) + ":" + dumps(v) for k, v in value.items()) + "}"


def _no_dump() -> None:
    """Hide this process from same-uid programs (/proc/<pid>/fd, ptrace) by making it non-dumpable."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE = 4
    except Exception:  # best effort; the namespace boundary does not depend on it
        pass


def _child(spec: dict, out_w: int, err_w: int) -> None:
    """In the forked child: own process group, limits, drop privileges, exec. Never returns."""
    try:
        lim = spec["limits"]
        os.setpgid(0, 0)
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.closerange(3, 65536)
        mb = 1024 * 1024
        limits = [
            (resource.RLIMIT_CPU, (int(lim["cpu_time"]), int(lim["cpu_time"]) + 1)),
            (resource.RLIMIT_AS, (int(lim["memory_mb"]) * mb,) * 2),
            (resource.RLIMIT_FSIZE, (int(lim["file_bytes"]),) * 2),
            (resource.RLIMIT_NOFILE, (int(lim["open_files"]),) * 2),
            (resource.RLIMIT_CORE, (0, 0)),
        ]
        if spec.get("nproc") is not None:  # the caller counts what else runs under the program's uid
            limits.append((resource.RLIMIT_NPROC, (int(spec["nproc"]),) * 2))
        for res, value in limits:
            resource.setrlimit(res, value)
        os.chdir(spec["workdir"])
        uid = spec.get("uid")
        if uid is not None:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
        os.umask(0o022)
        os.execve(spec["argv"][0], spec["argv"], spec["env"])
    except BaseException as e:
        os.write(2, f"sandbox: could not start the program: {e!r}\n".encode())
    os._exit(127)


def _read_capped(path: str, limit: int) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read(limit).decode("utf-8", "replace")
    except OSError:
        return None


def main() -> None:
    spec = marshal.loads(sys.stdin.buffer.read())
    if spec.get("uid") is None:  # the program runs under this process's own uid
        _no_dump()
    lim = spec["limits"]
    workdir = spec["workdir"]
    for name, data in spec["files"].items():
        with open(os.path.join(workdir, name), "wb") as f:
            f.write(data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        _child(spec, out_w, err_w)
    os.close(out_w)
    os.close(err_w)
    try:
        os.setpgid(pid, pid)
    except OSError:
        pass
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    deadline = start + float(lim["wall_time"])
    cap = int(lim["output_bytes"])
    bufs = {out_r: bytearray(), err_r: bytearray()}
    open_fds = {out_r, err_r}
    reason = ""
    status = None
    while status is None:
        left = deadline - time.monotonic()
        if left <= 0:
            reason = "wall time"
            break
        watch = list(open_fds) + ([pidfd] if pidfd is not None else [])
        ready, _, _ = select.select(watch, [], [], min(left, 0.05 if pidfd is None else left))
        for fd in ready:
            if fd in open_fds:
                chunk = os.read(fd, 65536)
                if not chunk:
                    open_fds.discard(fd)
                bufs[fd] += chunk
        if any(len(b) > cap for b in bufs.values()):
            reason = "output limit"
            break
        done, st, ru = os.wait4(pid, os.WNOHANG)
        if done:
            status = (st, ru)
    if status is None:
        try:
            os.killpg(pid, SIGKILL)
        except OSError:
            pass
        _, st, ru = os.wait4(pid, 0)
        status = (st, ru)
    else:
        for fd in list(open_fds):  # what the program wrote before exiting; never wait for its children
            while len(bufs[fd]) <= cap and select.select([fd], [], [], 0)[0]:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                bufs[fd] += chunk
        try:
            os.killpg(pid, SIGKILL)
        except OSError:
            pass
    elapsed = time.monotonic() - start
    st, ru = status
    cpu = ru.ru_utime + ru.ru_stime
    exit_code = os.waitstatus_to_exitcode(st)
    sig = -exit_code if exit_code < 0 else None
    if not reason and (sig == SIGXCPU or (sig == SIGKILL and cpu >= float(lim["cpu_time"]) - 0.05)):
        reason = "cpu time"
    elif not reason and sig == SIGXFSZ:
        reason = "file size limit"
    report_cap = int(lim.get("report_bytes", 1 << 20))
    summary = {
        "exit_code": None if sig is not None else exit_code,
        "signal": sig,
        "reason": reason,
        "elapsed": round(elapsed, 4),
        "cpu": round(cpu, 4),
        "stdout": bytes(bufs[out_r][:cap]).decode("utf-8", "replace"),
        "stderr": bytes(bufs[err_r][:cap]).decode("utf-8", "replace"),
        "files": {name: _read_capped(os.path.join(workdir, name), report_cap) for name in spec.get("collect", [])},
        "exists": {name: os.path.lexists(os.path.join(workdir, name)) for name in spec.get("check", [])},
    }
    sys.stdout.buffer.write(dumps(summary).encode("utf-8"))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
