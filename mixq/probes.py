"""Offline task probes with programmatic scoring, generated deterministically from a seed.

Five tasks, each a stream of :class:`Probe` drawn from ``random.Random(f"{task}:{seed}")`` (so the
first ``n`` probes of a seed do not depend on ``n``), built from the calibration generators:

* ``arithmetic``: word problems of :mod:`mixq.corpus_reasoning`; the final number must be exact.
* ``format``: questions with a format constraint of :mod:`mixq.corpus_constraints`, checked
  IFEval-style by a function per constraint.
* ``tool_call``: requests and JSON tool schemas of :mod:`mixq.corpus_tools`; the call's name and
  arguments must match (BFCL-style).
* ``hashhop``: HashHop-style chains of random hashes shuffled into a long context; the answer is
  the hash reached after ``hops`` assignments.
* ``code``: HumanEval-style functions with unit tests, run in :func:`mixq.sandbox.run_sandboxed`
  (the tests must return: an early exit fails).

Every probe carries a ``reference`` response that scores 1, so each scorer is testable.
"""

from __future__ import annotations

import json
import random
import re
import string
import textwrap
from dataclasses import dataclass
from fractions import Fraction
from functools import partial
from typing import Any, Callable, Optional

from mixq.config import EvalConfig
from mixq.corpus_constraints import CONSTRAINTS, FACTS, QUESTIONS, occurrences
from mixq.corpus_reasoning import PROBLEMS, worked_solution
from mixq.corpus_tools import EXCHANGES, SCHEMAS
from mixq.sandbox import run_sandboxed, sandbox_isolation

@dataclass(frozen=True)
class Probe:
    """One prompt (a chat, plus the JSON tool schemas it offers) and what :func:`score` checks
    (``target``, JSON-serializable). ``reference`` is a response that scores 1."""

    task: str
    messages: list[dict]
    target: Any
    reference: str
    tools: Optional[list[dict]] = None
    max_tokens: Optional[int] = None  # a task's own cap on the answer length


def user(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


# --- arithmetic ---------------------------------------------------------------------------------

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def parse_number(text: str) -> Fraction:
    return Fraction(text.replace(",", ""))


def final_number(response: str) -> Optional[Fraction]:
    """The first number after the last "Final answer", else the last number of ``response``."""
    _, found, tail = response.lower().rpartition("final answer")
    numbers = (NUMBER.findall(tail)[:1] if found else []) or NUMBER.findall(response)[-1:]
    return parse_number(numbers[0]) if numbers else None


def arithmetic_probe(rng: random.Random) -> Probe:
    """A word problem whose answer holds exactly one number (units and $ are ignored)."""
    while True:
        question, steps, answer = rng.choice(PROBLEMS)(rng)
        if len(NUMBER.findall(answer)) == 1:
            break
    prompt = f"{question} Solve it step by step, then end with 'Final answer: <number>'."
    return Probe("arithmetic", user(prompt), NUMBER.findall(answer)[0],
                 worked_solution(rng, steps, answer))


def score_arithmetic(probe: Probe, response: str) -> bool:
    return final_number(response) == parse_number(probe.target)


# --- format (IFEval-style) ----------------------------------------------------------------------


def quoted(instruction: str) -> str:
    return re.search(r"'(.*)'", instruction).group(1)


def count(instruction: str) -> int:
    return int(re.search(r"\d+", instruction).group())


def json_keys(response: str) -> Optional[set]:
    body = re.sub(r"^```(?:json)?\s*|\s*```$", "", response.strip())
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return None
    return set(value) if isinstance(value, dict) else None


# constraint name (a function of mixq.corpus_constraints) -> check(instruction, response)
FORMAT_CHECKS: dict[str, Callable[[str, str], bool]] = {
    "bullets": lambda i, r: len(re.findall(r"^\s*[-*•]\s+\S", r, re.M)) == count(i),
    "numbered": lambda i, r: len(re.findall(r"^\s*\d+[.)]\s+\S", r, re.M)) == count(i),
    "sentences": lambda i, r: len(re.findall(r"[^.!?\s][^.!?]*[.!?]+(?=\s|$)", r)) == count(i),
    "lowercase": lambda i, r: r == r.lower(),
    "uppercase": lambda i, r: r == r.upper(),
    "word_limit": lambda i, r: len(r.split()) < count(i),
    "closing_phrase": lambda i, r: r.rstrip().endswith(quoted(i)),
    "opening_word": lambda i, r: re.match(rf"\W*{re.escape(quoted(i))}\b", r, re.I) is not None,
    "paragraphs": lambda i, r: sum(
        bool(p.strip()) for p in re.split(r"\n\s*\*\*\*\s*\n", r.strip())
    ) == count(i),
    "no_commas": lambda i, r: "," not in r,
    "title": lambda i, r: re.search(r"<<[^<>\n]+>>", r) is not None,
    "keyword_twice": lambda i, r: occurrences(quoted(i), r) == 2,
    "json_object": lambda i, r: json_keys(r) == set(i.split("the keys ")[1][:-1].split(", ")),
}


def format_probe(rng: random.Random) -> Probe:
    topic = rng.choice(sorted(FACTS))
    facts = rng.sample(FACTS[topic], len(FACTS[topic]))
    constraint = rng.choice(CONSTRAINTS)
    instruction, answer = constraint(rng, topic, facts)
    prompt = f"{rng.choice(QUESTIONS).format(topic)} {instruction}"
    target = {"check": constraint.__name__, "instruction": instruction}
    return Probe("format", user(prompt), target, answer)


def score_format(probe: Probe, response: str) -> bool:
    """The constraint holds and the response has some text (an empty one meets "no commas")."""
    check = FORMAT_CHECKS[probe.target["check"]]
    return any(c.isalpha() for c in response) and check(probe.target["instruction"], response)


# --- tool_call (BFCL-style) ---------------------------------------------------------------------


def first_json(text: str) -> Any:
    """The first JSON object or array in ``text`` (None if there is none)."""
    decoder = json.JSONDecoder()
    for match in re.finditer(r"[{\[]", text):
        try:
            return decoder.raw_decode(text, match.start())[0]
        except json.JSONDecodeError:
            continue
    return None


def parse_call(response: str) -> Optional[dict]:
    """The first call ``{"name", "arguments"}`` of a response: inside ``<tool_call>`` if there is
    one, else the first JSON in it; a list counts as its first item, string arguments are parsed."""
    tagged = response.split("<tool_call>", 1)
    value = first_json(tagged[-1])
    value = value[0] if isinstance(value, list) and value else value
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        arguments = first_json(arguments)
    return {"name": value["name"], "arguments": arguments} if isinstance(arguments, dict) else None


def normalized(value: Any) -> Any:
    """Numbers as floats, strings case-folded and stripped, containers recursively."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        return value.strip().casefold()
    if isinstance(value, list):
        return [normalized(v) for v in value]
    if isinstance(value, dict):
        return {k: normalized(v) for k, v in value.items()}
    return value


def tool_call_probe(rng: random.Random) -> Probe:
    """A request, its tool and 0-3 unrelated tools; the target is the expected call."""
    schema, request, arguments, _, _ = rng.choice(EXCHANGES)(rng)
    tools = [schema, *rng.sample([s for s in SCHEMAS if s is not schema], rng.randint(0, 3))]
    rng.shuffle(tools)
    target = {"name": schema["function"]["name"], "arguments": arguments}
    reference = f"<tool_call>\n{json.dumps(target)}\n</tool_call>"
    return Probe("tool_call", user(request), target, reference, tools=tools)


def score_tool_call(probe: Probe, response: str) -> bool:
    call = parse_call(response)
    return call is not None and normalized(call) == normalized(probe.target)


# --- hashhop ------------------------------------------------------------------------------------

HASH_CHARS = string.ascii_lowercase + string.digits
HASH_LEN = 8
HASH = re.compile(rf"\b[a-z0-9]{{{HASH_LEN}}}\b")


def hashhop_probe(
    rng: random.Random, tokens: int, hops: int, count_tokens: Callable[[str], int]
) -> Probe:
    """Chains of ``hops + 1`` random hashes, written as shuffled ``a = b`` lines until the lines
    hold about ``tokens`` tokens (``count_tokens`` counts them); ask where the first chain ends."""
    seen: set[str] = set()

    def new_hash() -> str:
        while (h := "".join(rng.choices(HASH_CHARS, k=HASH_LEN))) in seen or h.isalpha():
            pass
        seen.add(h)
        return h

    chains, lines, used = [], [], 0
    while not chains or used < tokens:
        chain = [new_hash() for _ in range(hops + 1)]
        chains.append(chain)
        pairs = [f"{a} = {b}\n" for a, b in zip(chain, chain[1:])]
        lines += pairs
        used += sum(count_tokens(p) for p in pairs)
    rng.shuffle(lines)
    start, end = chains[0][0], chains[0][-1]
    prompt = (
        "Each line below assigns a hash to another hash.\n\n" + "".join(lines) + "\n"
        f"Start from {start} and follow the assignments {hops} times: at each step find the "
        "line whose left side is the current hash and move to its right side. "
        "Reply with the final hash only."
    )
    return Probe("hashhop", user(prompt), end, end, max_tokens=4 * HASH_LEN)


def hashes(text: str) -> list[str]:
    """The hash-shaped words of ``text`` (hashes always hold a digit, so no English word)."""
    return [h for h in HASH.findall(text) if not h.isalpha()]


def score_hashhop(probe: Probe, response: str) -> bool:
    """The first hash of the context that the response names is the chain's end."""
    known = set(hashes(probe.messages[-1]["content"]))
    named = [h for h in hashes(response) if h in known]
    return bool(named) and named[0] == probe.target


# --- code (HumanEval-style) ---------------------------------------------------------------------

# Each maker returns (signature, docstring, body, argument tuples for the tests).
CodeTask = tuple[str, str, str, list[tuple]]


def ints(rng: random.Random, low: int = -20, high: int = 20) -> list[int]:
    return [rng.randint(low, high) for _ in range(rng.randint(0, 7))]


def sentence(rng: random.Random) -> str:
    return rng.choice(rng.choice(list(FACTS.values())))


def scale(rng: random.Random) -> CodeTask:
    k = rng.randint(2, 9)
    return ("def scale(xs: list[int]) -> list[int]:",
            f"Return a new list with every number of xs multiplied by {k}.",
            f"return [x * {k} for x in xs]", [(ints(rng),) for _ in range(4)])


def count_letter(rng: random.Random) -> CodeTask:
    c = rng.choice("aeiorst")
    return ("def count_letter(s: str) -> int:",
            f"Count how many times the letter '{c}' occurs in s, ignoring case.",
            f"return s.lower().count('{c}')", [(sentence(rng),) for _ in range(4)])


def sum_multiples(rng: random.Random) -> CodeTask:
    a, b = rng.sample(range(2, 8), 2)
    return ("def sum_multiples(n: int) -> int:",
            f"Return the sum of the positive integers below n that are multiples of {a} or {b}.",
            f"return sum(i for i in range(1, n) if i % {a} == 0 or i % {b} == 0)",
            [(rng.randint(0, 60),) for _ in range(4)])


def clip(rng: random.Random) -> CodeTask:
    lo = rng.randint(-10, 0)
    hi = lo + rng.randint(3, 15)
    return ("def clip(xs: list[int]) -> list[int]:",
            f"Return xs with values below {lo} replaced by {lo} and values above {hi} by {hi}.",
            f"return [min(max(x, {lo}), {hi}) for x in xs]", [(ints(rng),) for _ in range(4)])


def every_nth(rng: random.Random) -> CodeTask:
    k = rng.randint(2, 4)
    return ("def every_nth(xs: list[int]) -> list[int]:",
            f"Return every {k}th element of xs, starting with the first one.",
            f"return xs[::{k}]", [(ints(rng),) for _ in range(4)])


def fizzbuzz(rng: random.Random) -> CodeTask:
    a, b = rng.sample([2, 3, 5, 7], 2)
    body = (f"if n % {a * b} == 0:\n    return 'FizzBuzz'\nif n % {a} == 0:\n    return 'Fizz'\n"
            f"if n % {b} == 0:\n    return 'Buzz'\nreturn str(n)")
    return ("def fizzbuzz(n: int) -> str:",
            f"Return 'FizzBuzz' if n is divisible by both {a} and {b}, 'Fizz' if only by {a}, "
            f"'Buzz' if only by {b}, and otherwise n as a string.",
            body, [(n,) for n in rng.sample([a, b, a * b, 2 * a * b, 1, 11, 13, a * 11], 5)])


def second_largest(rng: random.Random) -> CodeTask:
    return ("def second_largest(xs: list[int]) -> int | None:",
            "Return the second largest distinct value of xs, or None if there is none.",
            "values = sorted(set(xs))\nreturn values[-2] if len(values) > 1 else None",
            [(ints(rng, 0, 9),) for _ in range(4)] + [([4, 4],)])


def word_lengths(rng: random.Random) -> CodeTask:
    return ("def word_lengths(s: str) -> list[int]:",
            "Return the length of each whitespace-separated word of s, in order.",
            "return [len(w) for w in s.split()]", [(sentence(rng),) for _ in range(3)] + [("",)])


def longest_run(rng: random.Random) -> CodeTask:
    body = ("best = run = 0\nfor i, x in enumerate(xs):\n    run = run + 1 if i and x == xs[i - 1]"
            " else 1\n    best = max(best, run)\nreturn best")
    return ("def longest_run(xs: list[int]) -> int:",
            "Return the length of the longest run of equal consecutive values in xs (0 if empty).",
            body, [(ints(rng, 0, 2),) for _ in range(4)])


def caesar(rng: random.Random) -> CodeTask:
    k = rng.randint(1, 25)
    body = (f"return ''.join(chr((ord(c) - 97 + {k}) % 26 + 97) if 'a' <= c <= 'z' else c "
            "for c in s)")
    return ("def caesar(s: str) -> str:",
            f"Shift every lowercase letter of s {k} places forward in the alphabet, wrapping "
            "around from z to a; leave other characters unchanged.",
            body, [(sentence(rng),) for _ in range(3)])


CODE_TASKS: list[Callable[[random.Random], CodeTask]] = [
    scale, count_letter, sum_multiples, clip, every_nth, fizzbuzz, second_largest, word_lengths,
    longest_run, caesar,
]
FENCE = re.compile(r"```[^\n]*\n(.*?)(?:```|$)", re.DOTALL)


def call_text(name: str, args: tuple) -> str:
    return f"{name}({', '.join(map(repr, args))})"


def code_probe(rng: random.Random, timeout: float) -> Probe:
    """A function to complete (signature, docstring with one example) and its ``assert`` tests;
    expected values come from running the reference body here (trusted code)."""
    signature, doc, body, cases = rng.choice(CODE_TASKS)(rng)
    name = signature.split()[1].split("(")[0]
    namespace: dict = {}
    exec(f"{signature}\n{textwrap.indent(body, '    ')}", namespace)  # noqa: S102 (ours)
    expected = [namespace[name](*args) for args in cases]
    example = f">>> {call_text(name, cases[0])}\n{expected[0]!r}"
    docstring = textwrap.indent(f'"""{doc}\n\n{example}\n"""', "    ")
    stub = f"{signature}\n{docstring}"
    tests = "\n".join(f"assert {call_text(name, a)} == {e!r}" for a, e in zip(cases, expected))
    prompt = (f"Complete this Python function:\n\n```python\n{stub}\n```\n\n"
              "Reply with the whole function in a ```python code block.")
    reference = f"```python\n{stub}\n{textwrap.indent(body, '    ')}\n```"
    return Probe("code", user(prompt), {"tests": tests, "timeout": timeout}, reference)


def extract_code(response: str) -> str:
    """The first fenced code block of ``response`` (to its end if unclosed), else all of it."""
    match = FENCE.search(response)
    return match.group(1) if match else response


def score_code(probe: Probe, response: str) -> bool:
    return run_sandboxed(extract_code(response), probe.target["tests"],
                         probe.target["timeout"]).passed


# --- all tasks ----------------------------------------------------------------------------------

SCORERS: dict[str, Callable[[Probe, str], bool]] = {
    "arithmetic": score_arithmetic,
    "format": score_format,
    "tool_call": score_tool_call,
    "hashhop": score_hashhop,
    "code": score_code,
}


def make_probes(cfg: EvalConfig, count_tokens: Callable[[str], int]) -> list[Probe]:
    """``cfg.samples_per_task`` probes per task of ``cfg.tasks``, deterministic from
    ``cfg.seed``; ``count_tokens(text)`` sizes the hashhop context (``cfg.hashhop_tokens``).
    With the code task, first checks that model-written code can be sandboxed here."""
    if "code" in cfg.tasks:
        sandbox_isolation()  # SandboxUnavailable (one line) before any model work
    makers: dict[str, Callable[[random.Random], Probe]] = {
        "arithmetic": arithmetic_probe,
        "format": format_probe,
        "tool_call": tool_call_probe,
        "hashhop": partial(hashhop_probe, tokens=cfg.hashhop_tokens, hops=cfg.hashhop_hops,
                           count_tokens=count_tokens),
        "code": partial(code_probe, timeout=cfg.code_timeout),
    }
    probes = []
    for task in cfg.tasks:
        rng = random.Random(f"{task}:{cfg.seed}")
        probes += [makers[task](rng) for _ in range(cfg.samples_per_task)]
    return probes


def score(probe: Probe, response: str) -> float:
    """1.0 if ``response`` solves ``probe``, else 0.0."""
    return float(SCORERS[probe.task](probe, response))
