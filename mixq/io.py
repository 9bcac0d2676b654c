"""Small file helpers shared by the stages."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_dir(out_dir: Path) -> Iterator[Path]:
    """Yield a fresh ``<out_dir>.tmp`` to fill; on success it replaces ``out_dir``, on error it
    is removed and ``out_dir`` is left as it was (a crash never leaves a half-written output)."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        logging.getLogger("mixq").warning("removing %s: what a killed run of this stage had "
                                          "written (never a result)", tmp)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)


def write_json(path: Path, obj: Any) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=1) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())
