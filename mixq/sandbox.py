"""Run untrusted (model-written) Python in a subprocess, never in this process.

The program runs as ``python -I`` in a fresh temporary directory with an empty environment, no
stdin, and a wall-clock timeout (the whole process group is killed). A small launcher sets
``setrlimit`` limits on CPU time, address space, file size and core dumps, then execs the
program: limits set in a ``preexec_fn`` would make ``subprocess`` fork this process, and a fork
of a process whose OpenBLAS threads have run deadlocks in OpenBLAS's fork handler (without a
``preexec_fn`` CPython uses vfork, which runs no fork handlers). Network: ``unshare -n`` (a new
network namespace with no usable interface) when the system allows it, else import guards that
make the socket, HTTP and subprocess modules unimportable (weaker: a program can undo them).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

MEMORY_BYTES = 1 << 30
OUTPUT_BYTES = 1 << 20  # stdout+stderr beyond this kill the program (SIGXFSZ)
OUTPUT_TAIL = 2000  # characters of output kept in the result
BLOCKED_MODULES = (
    "socket", "_socket", "ssl", "_ssl", "select", "selectors", "asyncio", "socketserver",
    "http", "urllib", "ftplib", "smtplib", "poplib", "imaplib", "xmlrpc",
    "subprocess", "_posixsubprocess", "multiprocessing",
)
GUARDS = f"import sys\nfor _m in {BLOCKED_MODULES!r}:\n    sys.modules[_m] = None\ndel sys, _m\n"


@dataclass(frozen=True)
class SandboxResult:
    status: str  # "passed" (exit code 0), "failed" or "timeout"
    output: str  # the end of stdout + stderr
    isolation: str  # "unshare" or "guards"

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@functools.cache
def unshare_command() -> Optional[tuple[str, ...]]:
    """``unshare -n`` (as root) or ``unshare -rn`` (user namespaces) if either works here."""
    exe = shutil.which("unshare")
    for flags in ("-n", "-rn") if exe else ():
        if subprocess.run([exe, flags, "true"], capture_output=True).returncode == 0:
            return exe, flags
    return None


def network_isolation() -> str:
    """How :func:`run_sandboxed` cuts the network by default: "unshare" or "guards"."""
    return "unshare" if unshare_command() else "guards"


# argv: CPU seconds, address-space bytes, file-size bytes, then the command to exec.
LAUNCHER = """import os, resource, sys
cpu, memory, output = map(int, sys.argv[1:4])
for limit, value in ((resource.RLIMIT_CPU, cpu), (resource.RLIMIT_AS, memory),
                     (resource.RLIMIT_FSIZE, output), (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(limit, (value, value))
os.execv(sys.argv[4], sys.argv[4:])
"""


def run_sandboxed(code: str, timeout: float, isolation: Optional[str] = None) -> SandboxResult:
    """Run the Python program ``code`` with a ``timeout`` in seconds (wall clock; CPU time is
    capped one second above it) and ``isolation`` (default :func:`network_isolation`)."""
    isolation = isolation or network_isolation()
    if isolation not in ("unshare", "guards") or (isolation == "unshare" and not unshare_command()):
        raise ValueError(f"network isolation {isolation!r} is not available here")
    with tempfile.TemporaryDirectory(prefix="mixq-sandbox-") as tmp:
        program, output = Path(tmp, "program.py"), Path(tmp, "output.txt")
        program.write_text((GUARDS if isolation == "guards" else "") + code)
        limits = [str(math.ceil(timeout) + 1), str(MEMORY_BYTES), str(OUTPUT_BYTES)]
        command = [sys.executable, "-I", "-c", LAUNCHER, *limits,
                   sys.executable, "-I", "-B", str(program)]
        if isolation == "unshare":
            command = [*unshare_command(), *command]
        with open(output, "wb") as sink:
            proc = subprocess.Popen(
                command, cwd=tmp, env={"PATH": os.defpath, "LANG": "C.UTF-8"},
                stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                status = "passed" if proc.wait(timeout=timeout) == 0 else "failed"
            except subprocess.TimeoutExpired:
                status = "timeout"
            finally:  # the program and anything it started
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        text = output.read_bytes()[-4 * OUTPUT_TAIL:].decode("utf-8", "replace")[-OUTPUT_TAIL:]
    return SandboxResult(status, text, isolation)
