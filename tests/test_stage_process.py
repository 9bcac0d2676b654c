"""How a stage process behaves when things go wrong: one line per error, exits with its
parent, one run per measurement journal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

from mixq.measure import journal_lock

ROOT = Path(__file__).resolve().parents[1]


def test_a_failing_stage_prints_one_line_naming_the_fix(tmp_path):
    """No params.yaml: one line saying what to run, no traceback; MIXQ_DEBUG=1 shows it."""
    run = subprocess.run([sys.executable, str(ROOT / "stages/allocate.py")], cwd=tmp_path,
                         capture_output=True, text=True, env={**os.environ, "MIXQ_DEBUG": ""})
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode == 1
    assert lines == ["allocate: FileNotFoundError: params.yaml not found: run `mixq compose` to "
                     "write it from conf/ (MIXQ_DEBUG=1 for the traceback)"]
    debug = subprocess.run([sys.executable, str(ROOT / "stages/allocate.py")], cwd=tmp_path,
                           capture_output=True, text=True, env={**os.environ, "MIXQ_DEBUG": "1"})
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr


def is_running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (an orphan's exit may wait to be reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_a_stage_exits_when_the_process_that_started_it_dies(tmp_path):
    """A stand-in for `dvc repro` starts a stage and is SIGKILLed: the stage stops too."""
    stage = "from mixq.log import setup_stage; setup_stage(); import time; time.sleep(120)"
    parent = textwrap.dedent(f"""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", {stage!r}])
        print(child.pid, flush=True)
        time.sleep(120)
    """)
    dvc = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True)
    child = int(dvc.stdout.readline())
    time.sleep(3)  # the stage is up and watching
    assert is_running(child)
    dvc.send_signal(signal.SIGKILL)
    dvc.wait()
    deadline = time.time() + 20
    while is_running(child) and time.time() < deadline:
        time.sleep(0.2)
    assert not is_running(child)


def test_a_second_run_waits_for_the_journal_of_the_first(tmp_path, caplog):
    journal = tmp_path / "rows.jsonl"
    order = []
    with journal_lock(journal):
        assert (tmp_path / "rows.jsonl.lock").read_text() == str(os.getpid())

        def second():
            with journal_lock(journal):
                order.append("second")

        thread = threading.Thread(target=second)
        with caplog.at_level("WARNING", logger="mixq"):
            thread.start()
            time.sleep(1)
            order.append("first done")
    thread.join(10)
    assert order == ["first done", "second"]
    assert f"in use by PID {os.getpid()}" in caplog.text
