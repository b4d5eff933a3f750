"""Security tests of the coding sandbox: each attack is contained, classified, and leaves nothing behind.

Every attack program exits with status 0 only if its attack worked, so a contained attack is
classified ``failed``, ``timeout`` or ``error``, never ``ok``. All attacks run at once on the
worker pool; the host-side checks (processes, files, listener, environment) follow the batch.
Needs bubblewrap (``apt-get install bubblewrap``): without it these tests fail, by design.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import socket
import tempfile
import textwrap
import time
import uuid
import warnings

import pytest

import envs.coding.sandbox as sandbox_mod
from envs.coding.problems import DATA
from envs.coding.sandbox import SUPERVISOR, Limits, Program, Sandbox, SandboxUnavailable, bwrap_status

LIMITS = Limits(wall_time=2.0, cpu_time=1, memory_mb=256, processes=8, output_bytes=16 * 1024,
                file_bytes=1 << 20, disk_bytes=4 << 20, open_files=32)
HARNESS = os.path.join(os.path.dirname(SUPERVISOR), "harness.py")
PROTECTED = (DATA, HARNESS, SUPERVISOR)
SECRET_VAR = "ROUTE_SANDBOX_TEST_SECRET"

PRELUDE = "import json, os, sys, time\nTOKEN = sys.argv[1]\nCTX = json.loads(sys.argv[2])\n"

def _attack(source: str, statuses: set[str]) -> tuple[str, set[str]]:
    return textwrap.dedent(source), statuses


ATTACKS: dict[str, tuple[str, set[str]]] = {
    "fork_bomb": _attack("""
        while True:
            try:
                os.fork()
            except OSError:
                pass
        """, {"timeout", "error", "failed"}),
    "memory_bomb": _attack("""
        hog = []
        try:
            for _ in range(1000):
                hog.append(bytearray(64 << 20))
        except MemoryError:
            sys.exit(1)
        sys.exit(0)
        """, {"failed", "error"}),
    "busy_loop": _attack("""
        while True:
            pass
        """, {"timeout"}),
    "sleep_past_limit": _attack("""
        time.sleep(60)
        sys.exit(0)
        """, {"timeout"}),
    "detached_child": _attack("""
        import subprocess
        pid = os.fork()
        if pid == 0:  # a daemon: new session, double fork, outlive the run and write to the host
            os.setsid()
            if os.fork() == 0:
                time.sleep(30)
                open(CTX["host_dir"] + "/daemon.txt", "w").write("alive")
            os._exit(0)
        os.waitpid(pid, 0)
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", TOKEN], start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        sys.exit(1)
        """, {"failed"}),
    "huge_output": _attack("""
        chunk = "x" * 65536
        for _ in range(100000):
            sys.stdout.write(chunk)
        sys.exit(0)
        """, {"error"}),
    "huge_file": _attack("""
        try:
            with open("big.bin", "wb") as f:
                for _ in range(1024):
                    f.write(b"x" * (1 << 20))
            sys.exit(0)
        except OSError:
            pass
        try:  # many files under the file-size limit, to fill the disk
            for i in range(1000):
                with open(f"part{i}", "wb") as f:
                    f.write(b"x" * 900_000)
        except OSError:
            sys.exit(1)
        sys.exit(0)
        """, {"failed", "error"}),
    "write_outside": _attack("""
        wrote = []
        for path in [CTX["host_dir"] + "/escaped.txt", "/escaped.txt", "/usr/escaped.txt", "/tmp/escaped.txt",
                     "/dev/escaped.txt", "/dev/shm/escaped.txt", "/sandbox/escaped.txt", "../escaped.txt",
                     "/etc/escaped.txt", "/proc/sys/kernel/hostname"]:
            try:
                with open(path, "w") as f:
                    f.write("x")
                wrote.append(path)
            except OSError:
                pass
        print(wrote)
        sys.exit(0 if wrote else 1)
        """, {"failed"}),
    "read_parent_env": _attack("""
        secret = CTX["secret"]
        found = secret in repr(dict(os.environ))
        for pid in [p for p in os.listdir("/proc") if p.isdigit()] + [str(CTX["caller_pid"])]:
            try:
                found = found or secret.encode() in open(f"/proc/{pid}/environ", "rb").read()
            except OSError:
                pass
        sys.exit(0 if found else 1)
        """, {"failed"}),
    "tamper_test_files": _attack("""
        hit = []
        for path in CTX["protected"] + ["/sandbox/supervisor.py"]:
            try:
                os.remove(path)
                hit.append(path)
            except OSError:
                pass
            try:
                with open(path, "a") as f:
                    f.write("# tampered")
                hit.append(path)
            except OSError:
                pass
        for name in ("tests.py", "main.py"):  # its own copies: allowed to fail or not, never a breach
            try:
                os.remove(name)
            except OSError:
                pass
        print(hit)
        sys.exit(0 if hit else 1)
        """, {"failed"}),
    "network": _attack("""
        import socket
        ok = []
        for addr in [("127.0.0.1", CTX["port"]), ("1.1.1.1", 53), ("8.8.8.8", 443)]:
            try:
                socket.create_connection(addr, timeout=0.5).close()
                ok.append(addr)
            except OSError:
                pass
        try:
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("1.1.1.1", 53))
            ok.append("udp")
        except OSError:
            pass
        print(ok)
        sys.exit(0 if ok else 1)
        """, {"failed"}),
    "kill_parent": _attack("""
        import signal
        for pid in (os.getppid(), 1, CTX["caller_pid"]):
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
        try:
            os.kill(-1, signal.SIGKILL)
        except OSError:
            pass
        time.sleep(0.2)
        sys.exit(1)
        """, {"failed", "error"}),
    "ignore_sigterm": _attack("""
        import signal
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)
        while True:
            time.sleep(0.05)
        """, {"timeout"}),
    "gain_privileges": _attack("""
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        hit = []
        if libc.mount(b"none", b"/usr", b"tmpfs", 0, None) == 0:
            hit.append("mount")
        if libc.setuid(0) == 0 and os.getuid() == 0 and CTX["caller_uid"] != 0:
            hit.append("setuid")
        if "CapEff:\\t0000000000000000" not in open("/proc/self/status").read():
            hit.append("capabilities")
        print(hit)
        sys.exit(0 if hit else 1)
        """, {"failed"}),
}


def _pids_with(token: str) -> list[int]:
    pids = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if token.encode() in f.read():
                        pids.append(int(pid))
            except OSError:
                pass
    return pids


def _digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope="module")
def sandbox():
    why = bwrap_status()
    if why is not None:
        pytest.fail(f"the bubblewrap sandbox does not work here ({why}); install bubblewrap")
    sb = Sandbox(LIMITS)
    assert sb.backend == "bwrap"
    yield sb
    sb.close()


@pytest.fixture(scope="module")
def attacks(sandbox, tmp_path_factory):
    host_dir = tmp_path_factory.mktemp("host")
    secret = uuid.uuid4().hex
    os.environ[SECRET_VAR] = secret
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    ctx = {"host_dir": str(host_dir), "secret": secret, "caller_pid": os.getpid(), "caller_uid": os.getuid(),
           "port": listener.getsockname()[1], "protected": list(PROTECTED)}
    before = {p: _digest(p) for p in PROTECTED}
    tokens = {name: f"route-attack-{name}-{uuid.uuid4().hex}" for name in ATTACKS}
    programs = [Program(files={"main.py": PRELUDE + src, "tests.py": "assert True\n"},
                        argv=["python", "main.py", tokens[name], json.dumps(ctx)])
                for name, (src, _) in ATTACKS.items()]
    try:
        results = dict(zip(ATTACKS, sandbox.run_many(programs)))
    finally:
        del os.environ[SECRET_VAR]
    deadline = time.monotonic() + 1.0
    leftovers = {name: _pids_with(t) for name, t in tokens.items()}
    while any(leftovers.values()) and time.monotonic() < deadline:
        time.sleep(0.05)
        leftovers = {name: _pids_with(t) for name, t in tokens.items()}
    time.sleep(0.1)
    listener.settimeout(0)
    try:
        conn, _ = listener.accept()
        conn.close()
        connected = True
    except OSError:
        connected = False
    listener.close()
    return {"results": results, "leftovers": leftovers, "host_files": sorted(os.listdir(host_dir)),
            "changed": [p for p in PROTECTED if _digest(p) != before[p]], "connected": connected,
            "secret": secret}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_is_contained_and_classified(attacks, name):
    result = attacks["results"][name]
    assert result.status in ATTACKS[name][1], result
    assert attacks["leftovers"][name] == [], f"processes left behind: {attacks['leftovers'][name]}"
    assert attacks["host_files"] == [] and attacks["changed"] == []
    assert attacks["secret"] not in result.stdout + result.stderr
    assert os.environ.get(SECRET_VAR) is None


def test_attack_specifics(attacks):
    r = attacks["results"]
    assert r["busy_loop"].reason in ("cpu time", "wall time")
    assert r["sleep_past_limit"].reason == r["ignore_sigterm"].reason == "wall time"
    assert r["huge_output"].reason == "output limit" and len(r["huge_output"].stdout) <= LIMITS.output_bytes
    assert r["detached_child"].elapsed < LIMITS.wall_time  # the run did not wait for its detached children
    assert r["memory_bomb"].exit_code == 1  # MemoryError at the address-space limit
    assert r["write_outside"].stdout.strip() == "[]"
    assert r["network"].stdout.strip() == "[]" and not attacks["connected"]
    assert r["gain_privileges"].stdout.strip() == "[]"
    assert not [n for n in os.listdir(tempfile.gettempdir()) if n.startswith("route-sbx-")]


def test_caller_keeps_working_after_attacks(attacks, sandbox):
    assert attacks["results"]
    results = sandbox.run_many([Program(files={"a.py": f"print({i} * 2)"}, argv=["python", "a.py"]) for i in range(4)])
    assert [(r.status, r.stdout.strip()) for r in results] == [("ok", str(2 * i)) for i in range(4)]


def test_program_sees_a_bare_private_system(sandbox):
    src = ("import os, socket\nst = open('/proc/self/status').read()\n"
           "print(repr((sorted(os.environ), os.getcwd(), os.getuid(), [p for p in os.listdir('/proc') if p.isdigit()],"
           " 'NoNewPrivs:\\t1' in st, sorted(os.listdir('/')), socket.gethostname())))")
    r = sandbox.run(Program(files={"p.py": src}, argv=["python", "p.py"], collect=["p.py", "absent"], check=["p.py"]))
    assert r.status == "ok", r
    env, cwd, uid, pids, nnp, root, host = ast.literal_eval(r.stdout)
    assert env == ["HOME", "LANG", "PATH", "TMPDIR"] and cwd == "/work"
    assert (uid != 0) if os.geteuid() == 0 else (uid == os.geteuid())
    assert len(pids) <= 3 and nnp and host == "sandbox"
    interpreter_top = sandbox.exe.strip("/").split("/")[0]
    assert set(root) <= {"bin", "dev", "lib", "lib32", "lib64", "libx32", "proc", "sandbox", "sbin", "usr", "work",
                         interpreter_top}
    assert r.files == {"p.py": src, "absent": None} and r.exists == {"p.py": True}


def test_caller_kills_the_whole_tree_when_the_supervisor_overruns(sandbox, monkeypatch):
    monkeypatch.setattr(sandbox_mod, "_STARTUP_GRACE", -1.5)  # the caller gives up before the supervisor would
    token = f"route-overrun-{uuid.uuid4().hex}"
    src = "import os, sys, time\nif os.fork() == 0:\n    os.setsid()\ntime.sleep(30)\n"
    start = time.monotonic()
    r = sandbox.run(Program(files={"m.py": src}, argv=["python", "m.py", token]))
    assert r.status == "timeout" and "overran" in r.reason and time.monotonic() - start < LIMITS.wall_time
    deadline = time.monotonic() + 1.0
    while _pids_with(token) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _pids_with(token) == []


def test_limits_validate():
    for bad in ({"wall_time": 0}, {"cpu_time": -1}, {"memory_mb": 8}, {"processes": "many"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            Limits(**bad)
    with pytest.raises(ValueError, match="on_unavailable"):
        Sandbox(on_unavailable="ignore")


def test_programs_validate(sandbox):
    with pytest.raises(ValueError, match="file names"):
        sandbox.run(Program(files={"../x": ""}, argv=["python", "-c", "pass"]))
    with pytest.raises(ValueError, match="argv"):
        sandbox.run(Program(files={}, argv=[]))


def test_without_bwrap_refuses_or_degrades_loudly(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    sandbox_mod._probe_bwrap.cache_clear()
    try:
        with pytest.raises(SandboxUnavailable, match="bubblewrap"):
            Sandbox(LIMITS)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sb = Sandbox(LIMITS, on_unavailable="warn")
        assert sb.backend == "none" and any("SANDBOX DISABLED" in str(w.message) for w in caught)
        ok, slow = sb.run_many([Program(files={"a.py": "print('hi')"}, argv=["python", "a.py"]),
                                Program(files={}, argv=["python", "-c", "import time; time.sleep(30)"])])
        assert (ok.status, ok.stdout) == ("ok", "hi\n") and slow.status == "timeout"
        assert not [n for n in os.listdir(tempfile.gettempdir()) if n.startswith("route-sbx-")]
    finally:
        sandbox_mod._probe_bwrap.cache_clear()
