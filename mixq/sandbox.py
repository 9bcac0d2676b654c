"""Run untrusted (model-written) Python and its tests in a sandbox, never in this process.

:func:`run_sandboxed` runs ``program`` then ``tests`` in one namespace of a fresh interpreter
(``python -I -S``, started by :mod:`mixq.sandbox_launcher`) and passes only when the tests
returned: the runner prints a per-run random nonce, which it read from a pipe closed before the
program ran, after the tests; exiting early (``sys.exit()``, ``os._exit(0)``, a fake "passed")
cannot print it. Isolation (:func:`sandbox_isolation`):

* ``namespaces`` (Linux): fresh PID, mount, network, IPC and UTS namespaces (and a user namespace
  when not root); a private root file system holding only the interpreter's library directories
  and shared libraries (read-only), /dev/{null,zero,random,urandom} and a writable 64 MB tmpfs
  ``/sandbox`` (no /etc, /home, /proc, /tmp, shells); root runs the program as a uid of its own
  (``UID_BASE`` + random) without groups, a user namespace drops every capability; a seccomp
  filter denies exec, socket, ptrace and mount/namespace calls; rlimits on CPU seconds, address
  space, file size, open files and processes; the namespace's init dies after the program, and
  the kernel kills every process left in it (also setsid/double-forked ones).
* ``seatbelt`` (macOS): ``sandbox-exec`` with a deny-by-default profile (reads of the Python
  installation and system libraries only, writes in a fresh directory only, no network, no
  fork, exec of the Python installation only, no signals or process info but its own), rlimits
  on CPU seconds and file size.
* ``weak``: what remains when the kernel refuses namespaces (or macOS lacks sandbox-exec):
  rlimits, an empty environment and, on Linux, the seccomp filter, a uid of its own when root
  and a subreaper that kills every descendant; the program sees the whole file system (as that
  uid) and, when not root, runs as the caller. Refused unless ``MIXQ_SANDBOX_ALLOW_WEAK=1``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import marshal
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

log = logging.getLogger(__name__)

MEMORY_BYTES = 1 << 30  # address space of the program's process
OUTPUT_BYTES = 1 << 20  # stdout + stderr, and any one file it writes
DISK_BYTES = 64 << 20  # its writable directory (namespaces)
PROCESSES = 16  # processes and threads it may have at once
OUTPUT_TAIL = 2000  # characters of output kept in the result
GRACE = 1.0  # seconds the launcher gets to clean up after the timeout, before SIGKILL
UID_BASE = 1 << 30  # as root, each run gets uid UID_BASE + randbelow(2**24)
ALLOW_WEAK = "MIXQ_SANDBOX_ALLOW_WEAK"
LAUNCHER = Path(__file__).with_name("sandbox_launcher.py")
SIGNALS = {signal.SIGXCPU: "the CPU time limit", signal.SIGXFSZ: "the file size limit",
           signal.SIGKILL: "the hard CPU time limit, or out of memory"}
PROBE = "import json, math\n"  # imports a pure and a compiled stdlib module

SEATBELT_PROFILE = """(version 1)
(deny default)
(allow process-exec (subpath (param "PREFIX")))
(allow file-read* (subpath (param "PREFIX")) (subpath (param "WORKDIR"))
  (subpath "/System") (subpath "/usr/lib") (subpath "/usr/share") (subpath "/private/var/db/dyld")
  (subpath "/Library/Frameworks") (subpath "/opt/homebrew") (subpath "/usr/local")
  (literal "/dev/null") (literal "/dev/zero") (literal "/dev/random") (literal "/dev/urandom"))
(allow file-read-metadata)
(allow file-write* (subpath (param "WORKDIR")) (literal "/dev/null"))
(allow sysctl-read)
(allow process-info* (target self))
(allow signal (target self))
"""


class SandboxUnavailable(RuntimeError):
    """This machine cannot isolate model-written code as required (the message says why)."""


@dataclass(frozen=True)
class Isolation:
    mode: str  # "namespaces", "seatbelt", "weak" or "none"
    detail: str  # one line: what isolates the program, and what is missing

    def __str__(self) -> str:
        return f"{self.mode} ({self.detail})"


@dataclass(frozen=True)
class SandboxResult:
    status: str  # "passed" (the tests returned), "failed" or "timeout"
    reason: str  # one line: why
    output: str  # the end of stdout + stderr
    mode: str  # the isolation it ran under
    seconds: float  # wall clock, launcher start to cleanup

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@functools.cache
def launcher_source() -> str:
    return LAUNCHER.read_text()


def interpreter() -> str:
    """The base interpreter (a venv's adds nothing to ``python -I -S``)."""
    return getattr(sys, "_base_executable", None) or sys.executable


def command(mode: str, cpu_seconds: int, memory_bytes: int, status_fd: int,
            workdir: Optional[str]) -> list:
    uid = UID_BASE + secrets.randbelow(1 << 24) if sys.platform == "linux" and os.geteuid() == 0 \
        else -1
    limits = [cpu_seconds, memory_bytes, OUTPUT_BYTES, DISK_BYTES, PROCESSES, uid, status_fd]
    argv = [interpreter(), "-I", "-S", "-c", launcher_source(), mode, *map(str, limits)]
    if mode != "seatbelt":
        return argv
    prefix = os.path.realpath(sys.base_prefix)
    return ["/usr/bin/sandbox-exec", "-p", SEATBELT_PROFILE, "-D", f"PREFIX={prefix}",
            "-D", f"WORKDIR={os.path.realpath(workdir)}", *argv]


def verdict(report: dict, output: bytes, nonce: str, timeout: float, cpu: int) -> tuple[str, str]:
    """(status, reason) of a run from the launcher's ``report`` and the program's ``output``."""
    if f"\n{nonce}\n".encode() in output:
        return "passed", "the tests returned"
    if report.get("timeout"):
        return "timeout", f"timed out after {timeout:g} s (wall clock)"
    if "error" in report:
        return "error", f"sandbox {report['error']}"
    code = report.get("exit")
    if code is None:
        return "failed", "the launcher died without a report"
    if code < 0:
        name = signal.Signals(-code).name if -code in set(signal.Signals) else f"signal {-code}"
        cause = f" ({SIGNALS[-code]})" if -code in SIGNALS else ""
        return "failed", f"killed by {name}{cause}; CPU limit {cpu} s"
    if code == 0:
        return "failed", "exited with code 0 before the tests returned (early exit)"
    lines = output.decode("utf-8", "replace").strip().splitlines()
    return "failed", f"exit code {code}: {lines[-1] if lines else 'no output'}"


def run_once(mode: str, program: str, tests: str, timeout: float, cpu_seconds: Optional[int],
             memory_bytes: int) -> SandboxResult:
    """One run under ``mode``; the result's status is "error" when the sandbox failed."""
    cpu = cpu_seconds or int(timeout) + 1
    nonce = secrets.token_hex(16)
    started = time.perf_counter()
    own_dir = sys.platform != "linux"  # macOS: the runner's directory (Linux: the launcher's)
    with (tempfile.TemporaryDirectory(prefix="mixq-sandbox-") if own_dir else
          contextlib.nullcontext()) as workdir, tempfile.TemporaryFile() as sink:
        read_end, write_end = os.pipe()
        with open(read_end, "rb") as status:
            try:
                proc = subprocess.Popen(
                    command(mode, cpu, memory_bytes, write_end, workdir),
                    stdin=subprocess.PIPE, stdout=sink, stderr=subprocess.STDOUT,
                    pass_fds=(write_end,), cwd=workdir, start_new_session=True,
                    env={"LANG": "C.UTF-8", "TMPDIR": tempfile.gettempdir()},
                )
            finally:
                os.close(write_end)
            try:
                with contextlib.suppress(BrokenPipeError):  # the launcher failed: see its report
                    proc.stdin.write(marshal.dumps((program, tests, nonce)))
                with contextlib.suppress(BrokenPipeError):
                    proc.stdin.close()
                try:
                    proc.wait(timeout=timeout)
                    timed_out = False
                except subprocess.TimeoutExpired:  # the launcher kills the run and reports
                    timed_out = True
                    proc.send_signal(signal.SIGTERM)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=GRACE)
            finally:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raw = status.read()
        report = marshal.loads(raw) if raw else {}
        if sys.platform != "linux":  # no launcher: the process was the runner
            report = {"exit": proc.returncode}
        report["timeout"] = timed_out
        sink.seek(0)
        output = sink.read()
    status, reason = verdict(report, output, nonce, timeout, cpu)
    text = output.replace(f"\n{nonce}\n".encode(), b"").decode("utf-8", "replace")
    return SandboxResult(status, reason, text[-OUTPUT_TAIL:], mode, time.perf_counter() - started)


def readable_by_others(path: str) -> bool:
    """Whether any user can read ``path`` (every directory on the way is world-searchable)."""
    parts = Path(path).resolve().parts
    return all(os.stat(Path(*parts[:i])).st_mode & 0o001 for i in range(1, len(parts) + 1))


def probe(mode: str) -> Optional[str]:
    """Why ``mode`` cannot run a program here (None: it can)."""
    if mode == "seatbelt" and not os.path.exists("/usr/bin/sandbox-exec"):
        return "/usr/bin/sandbox-exec not found"
    if mode == "weak" and sys.platform == "linux" and os.geteuid() == 0 and not \
            readable_by_others(sys.base_prefix):
        return f"its uid cannot read the Python installation {sys.base_prefix}"
    result = run_once(mode, PROBE, "", 30.0, None, MEMORY_BYTES)
    return None if result.passed else result.reason


STRONG = {
    "namespaces": "PID/mount/net/IPC/UTS namespaces, a private read-only root, own uid or no "
                  "capabilities, seccomp, rlimits",
    "seatbelt": "sandbox-exec deny-by-default profile: no fork/network, reads and exec of the "
                "Python installation only, rlimits",
}


def weak_detail() -> str:
    """What the weak fallback has, and what it lacks, here."""
    if sys.platform != "linux":
        return "rlimits, empty environment, process-group kill; missing: sandbox-exec's profile"
    if os.geteuid() == 0:
        return ("seccomp, rlimits, own uid, subreaper kill; missing: a private file system view, "
                "PID/network namespaces")
    return ("seccomp, rlimits, subreaper kill; missing: a private file system view, PID/network "
            "namespaces, a uid other than the caller's, a process limit")


@functools.cache
def available_isolation() -> Isolation:
    """The strongest isolation that works here (probed once by running a small program)."""
    strong = "seatbelt" if sys.platform == "darwin" else "namespaces"
    failure = probe(strong)
    if failure is None:
        return Isolation(strong, STRONG[strong])
    weak_failure = probe("weak")
    if weak_failure:
        return Isolation("none", f"{strong}: {failure}; weak: {weak_failure}")
    return Isolation("weak", f"{weak_detail()} ({strong}: {failure})")


def policy(isolation: Isolation) -> Isolation:
    """``isolation`` if model-written code may run under it: a strong one, or ``weak`` with
    ``MIXQ_SANDBOX_ALLOW_WEAK=1`` (logged); else :class:`SandboxUnavailable` saying why."""
    allowed = isolation.mode in STRONG or (isolation.mode == "weak"
                                           and os.environ.get(ALLOW_WEAK) == "1")
    if not allowed:
        hint = f"; set {ALLOW_WEAK}=1 to run it anyway" if isolation.mode == "weak" else ""
        raise SandboxUnavailable(f"cannot isolate model-written code here: {isolation.detail}"
                                 f"{hint}, or drop the code task")
    if isolation.mode == "weak":
        log.warning("model-written code runs in a weak sandbox: %s", isolation.detail)
    return isolation


@functools.cache
def sandbox_isolation() -> Isolation:
    """The isolation :func:`run_sandboxed` uses here (:func:`policy` of the strongest)."""
    return policy(available_isolation())


def run_sandboxed(
    program: str, tests: str = "", timeout: float = 10.0, *, cpu_seconds: Optional[int] = None,
    memory_bytes: int = MEMORY_BYTES, mode: Optional[str] = None,
) -> SandboxResult:
    """Run ``program``, then ``tests`` (e.g. HumanEval's ``check(candidate)``) in its namespace;
    "passed" only if the tests returned within ``timeout`` seconds (wall clock). CPU time is
    capped at ``cpu_seconds`` (default: the timeout + 1), the address space at
    ``memory_bytes``. ``mode`` forces an isolation (tests use "weak" to check the fallback)."""
    result = run_once(mode or sandbox_isolation().mode, program, tests, timeout, cpu_seconds,
                      memory_bytes)
    if result.status == "error":
        raise SandboxUnavailable(result.reason)
    return result


def run_all(
    jobs: Sequence[tuple[str, str]], timeout: float = 10.0, workers: int = 2,
    mode: Optional[str] = None,
) -> list[SandboxResult]:
    """:func:`run_sandboxed` on each ``(program, tests)``, ``workers`` at a time, in order."""
    mode = mode or sandbox_isolation().mode  # refuse (or warn) once, before any run
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda job: run_sandboxed(*job, timeout=timeout, mode=mode), jobs))
