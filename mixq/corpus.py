"""Builtin calibration documents: real prose and code that ship with Python, plus generated chats.

Every domain is an iterator of documents drawn from a seeded :class:`random.Random`, so
:func:`builtin_documents` is deterministic and prefix-stable (the first ``n`` documents of a seed
do not depend on ``count``). Prose and code come from the Python installation itself (stdlib
docstrings and sources, licence and package metadata texts), so they change only with the
Python version and the installed packages; the manifest's content hashes record which text was
used.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import itertools
import os
import random
import re
import sysconfig
import textwrap
from pathlib import Path
from typing import Callable, Iterator

from mixq.corpus_agent import agent_documents
from mixq.corpus_constraints import constraint_documents
from mixq.corpus_reasoning import reasoning_documents
from mixq.corpus_tools import tool_call_documents

# Stdlib folders of tests, demos, Python 2 code or vendored packages rather than library code.
SKIPPED_STDLIB_DIRS = {
    "__pycache__",
    "site-packages",
    "test",
    "tests",
    "idlelib",
    "lib2to3",
    "turtledemo",
    "ensurepip",
    "pydoc_data",
}
STOPWORDS = set(
    "the of and to a in is that for it with as be on by this are or an not from which if can "
    "will when all its was any has have may should must they their these than other".split()
)
# A paragraph with such a line is a list, a table, a heading, a doctest or a code block.
NON_PROSE_LINE = re.compile(
    r"\s{4}|\s*(>>>|\.\.\.|[-*+]\s|\d+[.)]\s|:\w+|\w+:\s|\w+\s+--\s|[|#=~`^]|Copyright|\S+:\s*$)"
)
DEFINITIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
PROSE_WORDS = (25, 250)
PARAGRAPHS_PER_PROSE_DOCUMENT = 4
CODE_CHARS = (300, 4000)


def builtin_documents(domain: str, seed: int, count: int) -> list[dict]:
    """``count`` documents of ``domain`` for ``seed``: ``{"text"}`` for prose and code,
    ``{"messages"}`` (and ``"tools"``) chats for the others. Prose and code return fewer
    only when the installation has no more text."""
    if domain not in GENERATORS:
        raise ValueError(f"unknown calibration domain {domain!r} (known: {', '.join(GENERATORS)})")
    rng = random.Random(f"{domain}:{seed}")
    return list(itertools.islice(GENERATORS[domain](rng), count))


def stdlib_sources() -> list[Path]:
    """The standard library's own ``.py`` files (no tests, demos or site-packages), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [name for name in subfolders if name not in SKIPPED_STDLIB_DIRS]
        found += [Path(folder, name) for name in files if name.endswith(".py")]
    return sorted(found)


def text_sources() -> list[Path]:
    """Python's own licence text. Only what ships with Python, so the calibration set depends
    on the Python version alone, not on which packages happen to be installed."""
    return [Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"]


def is_prose(paragraph: str) -> bool:
    """True for a mostly-English prose paragraph of reasonable length (not a list/table/code)."""
    if any(NON_PROSE_LINE.match(line) for line in paragraph.splitlines()):
        return False
    words = paragraph.split()
    if not PROSE_WORDS[0] <= len(words) <= PROSE_WORDS[1]:
        return False
    letters = sum(c.isalpha() or c.isspace() for c in paragraph)
    english = sum(word.lower() in STOPWORDS for word in words)
    return letters >= 0.85 * len(paragraph) and english >= 0.2 * len(words) and paragraph.isascii()


@functools.cache
def prose_paragraphs(path: Path) -> tuple[str, ...]:
    """The prose paragraphs (whitespace-joined) of one source: its docstrings or its text."""
    try:
        text = path.read_text("utf-8")
        blocks = docstrings(text) if path.suffix == ".py" else [text]
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
        return ()
    paragraphs = (textwrap.dedent(p) for block in blocks for p in re.split(r"\n\s*\n", block))
    return tuple(" ".join(p.split()) for p in paragraphs if is_prose(p.strip("\n")))


def docstrings(source: str) -> list[str]:
    """The module, class and function docstrings of a Python source."""
    tree = ast.parse(source)
    nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, DEFINITIONS))]
    return [doc for doc in map(ast.get_docstring, nodes) if doc]


def prose_documents(rng: random.Random) -> Iterator[dict]:
    """Runs of up to four prose paragraphs, one run per source, sources in seeded order."""
    sources = stdlib_sources() + text_sources()
    rng.shuffle(sources)
    seen: set[str] = set()
    for path in sources:
        paragraphs = [p for p in prose_paragraphs(path) if p not in seen]
        if not paragraphs:
            continue
        start = rng.randrange(max(1, len(paragraphs) - PARAGRAPHS_PER_PROSE_DOCUMENT + 1))
        run = paragraphs[start : start + PARAGRAPHS_PER_PROSE_DOCUMENT]
        seen.update(run)
        yield {"text": "\n\n".join(run)}


@functools.cache
def code_definitions(path: Path) -> tuple[str, ...]:
    """The functions and classes (methods included, dedented, with decorators) of one source
    whose text is between 300 and 4000 characters."""
    try:
        source = path.read_text("utf-8")
        tree = ast.parse(source)
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
        return ()
    lines = source.splitlines()
    found = []
    for node in ast.walk(tree):
        if isinstance(node, DEFINITIONS):
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            text = textwrap.dedent("\n".join(lines[first - 1 : node.end_lineno]))
            if CODE_CHARS[0] <= len(text) <= CODE_CHARS[1]:
                found.append(text)
    return tuple(found)


def code_documents(rng: random.Random, sources: list[Path] | None = None) -> Iterator[dict]:
    """One whole function or class per source file (default: the stdlib's), files and picks
    in seeded order."""
    sources = stdlib_sources() if sources is None else sources
    rng.shuffle(sources)
    for path in sources:
        definitions = code_definitions(path)
        if definitions:
            yield {"text": rng.choice(definitions)}


GENERATORS: dict[str, Callable[[random.Random], Iterator[dict]]] = {
    "prose": prose_documents,
    "reasoning": reasoning_documents,
    "code": code_documents,
    "agent": agent_documents,
    "tool_call": tool_call_documents,
    "constraints": constraint_documents,
}


# Held-out text from other sources than the calibration mix (which is the standard library's
# docstrings and code plus generated chats): the documentation and the source code of the
# pinned, pure-Python packages mixq installs, so it is the same text on every machine.
OTHER_SOURCE_PACKAGES = ("mlx_lm", "hydra_core", "gguf")  # exact pins in pyproject.toml
OTHER_SOURCES = ("docs", "library_code")
SECTION_CHARS = (200, 6000)
HEADING = re.compile(r"^(?=#{1,3} )", re.MULTILINE)


def package_docs() -> list[str]:
    """The Markdown documents of :data:`OTHER_SOURCE_PACKAGES`: each package's long description
    (its README, the body of its ``METADATA``) and the ``.md`` files it ships, in a fixed order."""
    texts = []
    for name in OTHER_SOURCE_PACKAGES:
        dist = importlib.metadata.distribution(name)
        texts.append(dist.read_text("METADATA").partition("\n\n")[2])
        texts += [(dist.locate_file(f)).read_text("utf-8") for f in sorted(dist.files or [], key=str)
                  if f.suffix == ".md" and "dist-info" not in str(f)]
    return texts


def package_sources() -> list[Path]:
    """The ``.py`` files of :data:`OTHER_SOURCE_PACKAGES`, sorted."""
    found = []
    for name in OTHER_SOURCE_PACKAGES:
        dist = importlib.metadata.distribution(name)
        found += [Path(dist.locate_file(f)) for f in dist.files or [] if f.suffix == ".py"]
    return sorted(found)


def other_source_documents(source: str) -> Iterator[dict]:
    """Documents of one other source (:data:`OTHER_SOURCES`), in a fixed seeded order
    independent of the calibration settings: ``docs``, the packages' Markdown cut into
    sections at its headings (200 to 6000 characters); ``library_code``, one whole function or
    class per package source file."""
    rng = random.Random(f"heldout_other:{source}")
    if source == "docs":
        sections = [s.strip() for text in package_docs() for s in HEADING.split(text)]
        sections = [s for s in sections if SECTION_CHARS[0] <= len(s) <= SECTION_CHARS[1]]
        rng.shuffle(sections)
        yield from ({"text": s} for s in sections)
    elif source == "library_code":
        yield from code_documents(rng, package_sources())
    else:
        raise ValueError(f"unknown other source {source!r} (known: {', '.join(OTHER_SOURCES)})")
