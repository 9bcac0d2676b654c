"""Escape attempts against mixq.sandbox: each attack is a real program run in the sandbox (network
attacks only ever against 127.0.0.1), and each test asserts that the attack failed and that the
result says why. Every attack runs under the strongest isolation available here and under the
forced ``weak`` fallback, which claims less (skipped where it does not claim a property: see
``weak_cannot``). Passes as root (CI) and as an ordinary user where the kernel allows user
namespaces: ``python -m pytest tests/test_sandbox.py --noconftest``."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import mixq.sandbox
from mixq.sandbox import (
    Isolation,
    SandboxUnavailable,
    available_isolation,
    policy,
    probe,
    run_all,
    run_sandboxed,
)

ROOT = os.geteuid() == 0
STRONG = available_isolation().mode if available_isolation().mode in ("namespaces",
                                                                       "seatbelt") else None
WEAK_PROBLEM = probe("weak")
MODES = [
    pytest.param(STRONG, marks=pytest.mark.skipif(STRONG is None, reason=str(
        available_isolation())), id="strong"),
    pytest.param("weak", marks=pytest.mark.skipif(WEAK_PROBLEM is not None, reason=str(
        WEAK_PROBLEM)), id="weak"),
]


def weak_cannot(mode: str, what: str, as_root: bool = True, linux: bool = True) -> None:
    """Skip: the weak fallback does not claim to ``what`` (when root either, if ``as_root``;
    on Linux either, if ``linux``)."""
    if mode == "weak" and (as_root or not ROOT) and (linux or sys.platform != "linux"):
        pytest.skip(f"the weak sandbox does not {what}{'' if as_root else ' when not root'}")


def attack(code: str, mode: str, tests: str = "", timeout: float = 10.0, **limits):
    return run_sandboxed(textwrap.dedent(code), tests, timeout, mode=mode, **limits)


TRY = """
def attempt(what, action):
    try:
        print(what, "->", repr(action())[:200])
    except BaseException as error:
        print(what, "-> blocked:", type(error).__name__, error)
"""


@pytest.mark.parametrize("mode", MODES)
def test_no_secret_in_any_environ(mode):
    """The harness has HF_TOKEN; the program finds it neither in its own environment nor in
    /proc/<pid>/environ of its parent chain or of the harness. Control: the same program run
    unsandboxed by the harness does find it."""
    weak_cannot(mode, "hide the caller's environ", as_root=False)
    token = f"hf_{secrets.token_hex(12)}"
    program = TRY + """
import os, re
def token_in(path):  # the value of HF_TOKEN in an environ file
    return re.findall(rb"HF_TOKEN=([^\\0]*)", open(path, "rb").read())
attempt("own environ", lambda: os.environ.get("HF_TOKEN"))
pid = os.getpid()
for _ in range(6):
    attempt(f"environ of {pid}", lambda: token_in(f"/proc/{pid}/environ"))
    try:
        pid = int(open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()[1])
    except OSError:
        pid = os.getppid() if pid == os.getpid() else 1
attempt("harness environ", lambda: token_in(f"/proc/{HARNESS}/environ"))
"""
    harness = """
import json, os, subprocess, sys
from mixq.sandbox import run_sandboxed
program = sys.argv[1].replace("HARNESS", str(os.getpid()))
result = run_sandboxed(program, "", 10.0, mode=sys.argv[2])
control = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True)
print(json.dumps({"result": result.__dict__, "control": control.stdout}))
"""
    env = {**os.environ, "HF_TOKEN": token,
           "PYTHONPATH": str(Path(mixq.sandbox.__file__).parents[1])}
    done = subprocess.run([sys.executable, "-c", harness, program, mode], env=env,
                          capture_output=True, text=True, check=True)
    report = json.loads(done.stdout)
    assert token in report["control"]  # the attack works outside the sandbox
    output = report["result"]["output"]
    assert report["result"]["status"] == "passed" and token not in output
    assert "harness environ -> blocked:" in output, output  # FileNotFoundError or PermissionError


@pytest.fixture
def canaries(tmp_path):
    """Readable secret files outside the sandbox: {path: content}. One in a world-readable
    directory, one in the home directory when it is writable (removed afterwards)."""
    files = {tmp_path / "canary.txt": f"secret-{secrets.token_hex(8)}"}
    home = Path.home() / f".mixq-sandbox-canary-{secrets.token_hex(4)}"
    if os.access(Path.home(), os.W_OK):
        files[home] = f"secret-{secrets.token_hex(8)}"
    tmp_path.chmod(0o755)
    for path, text in files.items():
        path.write_text(text)
        path.chmod(0o644)
    yield files
    home.unlink(missing_ok=True)


def home_listing_is_empty(output: str, home: Path) -> bool:
    """The program's listing of ``home`` failed, or shows no more than the way to the Python
    installation (bound read-only at its own path, e.g. /root/.pyenv)."""
    on_the_way = sorted({Path(p).relative_to(home).parts[0] for p in sys.path
                         if Path(p).is_relative_to(home) and Path(p) != home})
    listing = output.split("home listing -> ")[1].splitlines()[0]
    return listing.startswith("blocked:") or listing == repr(on_the_way)


@pytest.mark.parametrize("mode", MODES)
def test_files_outside_are_not_readable(mode, canaries):
    weak_cannot(mode, "hide world-readable files")
    paths = ["/etc/passwd", *(["/etc/shadow"] if ROOT else []), *map(str, canaries)]
    program = TRY + "".join(f"attempt({p!r}, lambda: open({p!r}).read())\n" for p in paths) + \
        f"attempt('home listing', lambda: __import__('os').listdir({str(Path.home())!r}))\n"
    result = attack(program, mode)
    assert result.passed
    assert "root:" not in result.output and "secret-" not in result.output
    assert all(f"{p} -> blocked:" in result.output for p in paths), result.output
    assert home_listing_is_empty(result.output, Path.home())


@pytest.mark.parametrize("mode", MODES)
def test_root_secrets_are_not_readable(mode):
    """Weak as root still keeps root-only files away (a uid of its own)."""
    if not ROOT:
        pytest.skip("needs root")
    result = attack(TRY + "attempt('shadow', lambda: open('/etc/shadow').read())\n"
                    "attempt('home listing', lambda: __import__('os').listdir('/root'))\n", mode)
    assert "shadow -> blocked:" in result.output and "root:" not in result.output
    assert home_listing_is_empty(result.output, Path("/root")), result.output


@pytest.mark.parametrize("mode", MODES)
def test_writes_outside_its_directory_fail(mode, tmp_path):
    weak_cannot(mode, "hide world-writable directories")
    tmp_path.chmod(0o777)  # the permissions would allow it: only the sandbox stops it
    tag = secrets.token_hex(4)
    targets = [f"/tmp/mixq-escape-{tag}", f"/dev/shm/mixq-escape-{tag}", f"/etc/mixq-escape-{tag}",
               str(tmp_path / "escape"), str(Path.home() / f"mixq-escape-{tag}")]
    program = TRY + "".join(f"attempt({t!r}, lambda: open({t!r}, 'w').write('x'))\n"
                            for t in [*targets, "mine"])
    result = attack(program, mode)
    assert result.passed and "mine -> 1" in result.output, result.output  # its own directory
    for target in targets:
        assert f"{target} -> blocked:" in result.output and not os.path.exists(target)


@pytest.mark.parametrize("mode", MODES)
def test_no_shell(mode):
    weak_cannot(mode, "deny exec on macOS", linux=False)
    program = TRY + """
import os, subprocess
attempt("os.system", lambda: os.system("echo shell-ran"))
attempt("subprocess", lambda: subprocess.run(["/bin/sh", "-c", "echo shell-ran"]))
attempt("execv", lambda: os.execv("/bin/sh", ["sh", "-c", "echo shell-ran"]))
"""
    result = attack(program, mode)
    assert "shell-ran" not in result.output
    assert "subprocess -> blocked:" in result.output and "execv -> blocked:" in result.output
    assert "os.system -> 0" not in result.output  # it returned a failure status (or raised)


@pytest.mark.parametrize("mode", MODES)
def test_fork_bomb_is_capped(mode):
    weak_cannot(mode, "cap the number of processes", as_root=False)
    program = """
import os, time
started = 0
try:
    for _ in range(40):
        if os.fork() == 0:
            time.sleep(30)
            os._exit(0)
        started += 1
except OSError as error:
    print("fork refused:", type(error).__name__, error)
print("started", started)
"""
    result = attack(program, mode, timeout=20.0)
    started = int(result.output.split("started ")[1].split()[0])
    assert started < 40 and "fork refused" in result.output, result.output


@pytest.mark.parametrize("mode", MODES)
def test_cannot_signal_outside(mode):
    """SIGKILL to a process of the caller, the parent, init and everything (-1): the sentinel
    and the harness survive, and the run still reports."""
    weak_cannot(mode, "protect the caller's processes", as_root=False)
    sentinel = subprocess.Popen(["sleep", "60"])
    try:
        program = TRY + f"""
import os, signal
for target in ({sentinel.pid}, os.getppid(), 1, -1):
    attempt(f"kill {{target}}", lambda: os.kill(target, signal.SIGKILL))
print("still here")
"""
        result = attack(program, mode)
        assert sentinel.poll() is None and result.passed and "still here" in result.output
        assert f"kill {sentinel.pid} -> blocked:" in result.output, result.output
    finally:
        sentinel.kill()
        sentinel.wait()


ESCAPEE = """
import ctypes, os, time
ready_r, ready_w = os.pipe()
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:  # the double-forked, setsid grandchild: reparented, own session
        ctypes.CDLL(None).prctl(15, b"NAME", 0, 0, 0)  # PR_SET_NAME, visible in /proc/*/comm
        os.write(ready_w, b"1")
        while True:
            time.sleep(0.05)
    os._exit(0)
os.read(ready_r, 1)
print("escapee ready")
"""


def processes_named(name: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        try:
            if Path(f"/proc/{entry}/comm").read_text().strip() == name:
                found.append(int(entry))
        except (OSError, ValueError):
            continue
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("ending", ["exit", "timeout"])
@pytest.mark.parametrize("mode", MODES)
def test_no_descendant_survives(mode, ending):
    name = f"esc{secrets.token_hex(5)}"
    program = ESCAPEE.replace("NAME", name) + ("while True:\n    pass\n" if ending == "timeout"
                                               else "")
    result = attack(program, mode, timeout=5.0)
    assert "escapee ready" in result.output, result.output  # it did start
    assert result.status == ("timeout" if ending == "timeout" else "passed")
    assert processes_named(name) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("mode", MODES)
def test_a_dying_harness_ends_the_run(mode):
    """SIGKILL the process that called run_sandboxed: the program (which would sleep for an
    hour) and its escapee go too."""
    name = f"esc{secrets.token_hex(5)}"
    program = ESCAPEE.replace("NAME", name) + "time.sleep(3600)\n"
    harness = subprocess.Popen(
        [sys.executable, "-c", "import sys; from mixq.sandbox import run_sandboxed; "
         "run_sandboxed(sys.argv[1], '', 3600.0, mode=sys.argv[2])", program, mode],
        env={**os.environ, "PYTHONPATH": str(Path(mixq.sandbox.__file__).parents[1])})
    try:
        deadline = time.monotonic() + 30
        while not processes_named(name) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert processes_named(name), "the escapee never started"
    finally:
        harness.kill()
        harness.wait()
    deadline = time.monotonic() + 5
    while processes_named(name) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_named(name) == []


@pytest.fixture
def listener():
    """A TCP listener on 127.0.0.1 (it accepts nothing by itself): (socket, port)."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.5)
    yield server, server.getsockname()[1]
    server.close()


@pytest.mark.parametrize("mode", MODES)
def test_network_is_cut(mode, listener):
    weak_cannot(mode, "cut the network on macOS", linux=False)
    server, port = listener
    with socket.create_connection(("127.0.0.1", port), 2):  # reachable from here
        server.accept()[0].close()
    program = TRY + f"""
import socket
attempt("tcp", lambda: socket.create_connection(("127.0.0.1", {port}), 2))
udp = lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("127.0.0.1", {port}))
attempt("udp", udp)
"""
    result = attack(program, mode)
    assert "tcp -> blocked:" in result.output and "udp -> blocked:" in result.output, result.output
    with pytest.raises(TimeoutError):
        server.accept()  # nobody connected


@pytest.mark.parametrize("mode", MODES)
def test_memory_cpu_and_file_limits(mode):
    if sys.platform == "linux":  # macOS does not enforce RLIMIT_AS
        memory = attack("x = bytearray(2 << 30)\n", mode, memory_bytes=1 << 30)
        assert memory.status == "failed" and "MemoryError" in memory.reason
    cpu = attack("while True:\n    pass\n", mode, timeout=30.0, cpu_seconds=1)
    assert cpu.status == "failed" and "CPU time limit" in cpu.reason  # not the wall clock
    big = attack("open('big', 'wb').write(bytes(2 << 20))\n", mode)
    assert big.status == "failed" and "File too large" in big.reason
    flood = attack("print('x' * (2 << 20))\n", mode)
    assert flood.status == "failed" and len(flood.output) <= mixq.sandbox.OUTPUT_TAIL


@pytest.mark.parametrize("mode", MODES)
def test_disk_is_capped(mode):
    weak_cannot(mode, "cap its directory's size")
    if mode == "seatbelt":
        pytest.skip("seatbelt does not cap its directory's size")
    result = attack("for i in range(100):\n    open(f'f{i}', 'wb').write(bytes(1 << 20))\n", mode)
    assert result.status == "failed" and "No space left on device" in result.reason


CHEATS = {
    "os._exit": "import os\nprint('ok')\nos._exit(0)\n",
    "sys.exit": "import sys\nsys.exit()\n",
    "SystemExit": "raise SystemExit\n",
    "exit in the function": "import sys\ndef add(a, b):\n    sys.exit(0)\n",
    "fake marker": f"import os\nprint('\\n{secrets.token_hex(16)}')\nos._exit(0)\n",
    "stdin": "import sys, os\nprint(sys.stdin.read())\nos._exit(0)\n",
}


@pytest.mark.parametrize("cheat", CHEATS)
@pytest.mark.parametrize("mode", MODES)
def test_early_exit_cheats_fail(mode, cheat):
    result = attack(CHEATS[cheat], mode, tests="assert add(1, 2) == 3\n")
    assert result.status == "failed" and "early exit" in result.reason, result


HUMANEVAL_TEST = """
def check(candidate):
    assert candidate(1, 2) == 3
    assert candidate(-1, 1) == 0

check(add)
"""


@pytest.mark.parametrize("mode", MODES)
def test_right_passes_wrong_fails_and_timeouts_say_so(mode):
    right = attack("def add(a, b):\n    return a + b\n", mode, HUMANEVAL_TEST)
    assert right.status == "passed" and right.mode == mode
    wrong = attack("def add(a, b):\n    return a - b\n", mode, HUMANEVAL_TEST)
    assert wrong.status == "failed" and wrong.reason.endswith("AssertionError")
    broken = attack("def add(a, b:\n", mode, HUMANEVAL_TEST)
    assert broken.status == "failed" and "SyntaxError" in broken.reason
    started = time.perf_counter()
    slow = attack("import time\ndef add(a, b):\n    time.sleep(60)\n", mode, HUMANEVAL_TEST,
                  timeout=1.0)
    assert slow.status == "timeout" and "timed out after 1 s" in slow.reason
    assert time.perf_counter() - started < 10.0


def test_run_all_runs_several_at_once_in_order(monkeypatch):
    if STRONG is None:
        if WEAK_PROBLEM:
            pytest.skip(str(available_isolation()))
        monkeypatch.setenv(mixq.sandbox.ALLOW_WEAK, "1")
    jobs = [(f"def add(a, b):\n    return a + b + {i % 2}\n", HUMANEVAL_TEST) for i in range(6)]
    results = run_all(jobs, timeout=10.0, workers=3)
    assert [r.status for r in results] == ["passed", "failed"] * 3


def test_policy_refuses_weak_unless_allowed(monkeypatch):
    weak = Isolation("weak", "seccomp, rlimits; missing namespaces: unshare: EPERM")
    monkeypatch.delenv(mixq.sandbox.ALLOW_WEAK, raising=False)
    with pytest.raises(SandboxUnavailable, match="unshare: EPERM; set MIXQ_SANDBOX_ALLOW_WEAK=1"):
        policy(weak)
    with pytest.raises(SandboxUnavailable, match="cannot isolate"):
        policy(Isolation("none", "namespaces: EPERM; weak: EPERM"))
    monkeypatch.setenv(mixq.sandbox.ALLOW_WEAK, "1")
    assert policy(weak) == weak
    strong = Isolation("namespaces", "all")
    assert policy(strong) == strong


def test_sandbox_never_forks_this_process():
    """No preexec_fn, so CPython vforks: a fork of a process whose OpenBLAS threads have run can
    deadlock in OpenBLAS's fork handler (seen in the eval stage)."""
    forks = []
    os.register_at_fork(before=lambda: forks.append(1))
    assert run_sandboxed("print(1)\n", mode=STRONG or "weak").passed and forks == []
