"""Logging and the process conventions every DVC stage script starts with (:func:`setup_stage`).

A stage that fails prints one line, ``<stage>: <error>``, not a traceback: set ``MIXQ_DEBUG=1``
for the full one. A stage exits when the process that started it (``dvc repro``) dies, so a
killed ``dvc`` never leaves a stage running that a re-run would race.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import TracebackType

PARENT_POLL_SECONDS = 1.0


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )


def one_line_errors(name: str) -> None:
    """Uncaught exceptions print ``<name>: <Type>: <message>`` (one line, the message's first)
    and exit 1, unless ``MIXQ_DEBUG`` is set; Ctrl-C keeps Python's own handling."""
    if os.environ.get("MIXQ_DEBUG"):
        return

    def hook(kind: type[BaseException], err: BaseException, tb: TracebackType | None) -> None:
        if issubclass(kind, KeyboardInterrupt):
            sys.__excepthook__(kind, err, tb)
            return
        message = str(err).strip().splitlines()[0] if str(err).strip() else ""
        print(f"{name}: {kind.__name__}: {message} (MIXQ_DEBUG=1 for the traceback)",
              file=sys.stderr)

    sys.excepthook = hook


def exit_with_parent() -> None:
    """SIGTERM this process once its parent is gone (it is re-parented): a daemon thread polls
    the parent PID every :data:`PARENT_POLL_SECONDS` (portable: Linux and macOS)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_SECONDS)
        logging.getLogger("mixq").error("the process that started this stage (%d) died: "
                                        "stopping", parent)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def terminate_cleanly(signum: int, frame: object) -> None:
    """SIGTERM raises SystemExit, so ``finally`` blocks and :func:`mixq.io.atomic_dir` remove
    what a stopped stage had half written."""
    raise SystemExit(128 + signum)


def setup_stage() -> None:
    """What every stage script calls first: logging, one-line errors named after the script,
    a clean exit on SIGTERM and when the parent dies."""
    setup_logging()
    one_line_errors(Path(sys.argv[0]).stem.replace("_", "-"))
    signal.signal(signal.SIGTERM, terminate_cleanly)
    exit_with_parent()
