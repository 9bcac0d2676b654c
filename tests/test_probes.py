"""Task probes: deterministic from the seed; every scorer accepts a right answer (each probe's
reference, and other right forms) and rejects wrong ones (the sandbox itself: test_sandbox.py)."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import mixq  # noqa: F401
import pytest

from mixq.config import EvalConfig
from mixq.config import EVAL_TASKS as TASKS
from mixq.probes import (
    CODE_TASKS,
    FORMAT_CHECKS,
    extract_code,
    hashes,
    make_probes,
    score,
)


def word_count(text: str) -> int:
    return len(text.split())


def probes_of(task: str, n: int, seed: int = 0, **options) -> list:
    cfg = EvalConfig(seed=seed, tasks=[task], samples_per_task=n, **options)
    return make_probes(cfg, word_count)


def test_probes_are_deterministic_from_the_seed():
    cfg = EvalConfig(samples_per_task=4)
    first, again = make_probes(cfg, word_count), make_probes(cfg, word_count)
    assert first == again
    assert [p.task for p in first] == [t for t in cfg.tasks for _ in range(4)]
    other = make_probes(replace(cfg, seed=1), word_count)
    assert all(a != b for a, b in zip(first, other))
    longer = make_probes(replace(cfg, samples_per_task=6), word_count)
    assert [p for p in longer if longer.index(p) % 6 < 4] == first  # prefix-stable per task
    with pytest.raises(ValueError, match="eval.tasks.*'poetry' is not one of"):
        make_probes(replace(cfg, tasks=["arithmetic", "poetry"]), word_count)


@pytest.mark.parametrize("task", [t for t in TASKS if t != "code"])
def test_every_reference_answer_scores_one(task):
    for seed in range(3):
        for probe in probes_of(task, 40, seed):
            assert score(probe, probe.reference) == 1.0, (probe.target, probe.reference)
            assert score(probe, "") == 0.0


def test_arithmetic_wants_the_exact_final_number():
    probe = next(p for p in probes_of("arithmetic", 40) if "." in p.target)
    value = float(probe.target.replace(",", ""))
    assert score(probe, f"So the final answer is ${value:,.2f} in total.") == 1.0
    assert score(probe, f"Step 1 gives 17. The result: {value:g}") == 1.0  # no "final answer"
    assert score(probe, f"Final answer: {value + 0.01:.2f}") == 0.0
    assert score(probe, f"It is {value:g}, or is it? Final answer: 17") == 0.0  # last one counts
    assert score(probe, "Final answer: I don't know") == 0.0


# A response that breaks each format check, made from the reference and the instruction.
BROKEN = {
    "bullets": lambda r, i: "\n".join(r.splitlines()[:-1]),
    "numbered": lambda r, i: r + "\n9. One more point.",
    "sentences": lambda r, i: r + " This sentence is one too many.",
    "lowercase": lambda r, i: "The " + r,
    "uppercase": lambda r, i: r + " and more",
    "word_limit": lambda r, i: r + " word" * 12,
    "closing_phrase": lambda r, i: r + " Bye.",
    "opening_word": lambda r, i: "Well, " + r,
    "paragraphs": lambda r, i: r + "\n\n***\n\nAnother paragraph.",
    "no_commas": lambda r, i: r + ", and more",
    "title": lambda r, i: re.sub(r"<<|>>", "", r),
    "keyword_twice": lambda r, i: f"{r} {re.search(chr(39) + '(.*)' + chr(39), i).group(1)}.",
    "json_object": lambda r, i: json.dumps({**json.loads(r), "extra": 1}),
}


def test_format_checks_reject_broken_answers():
    assert set(BROKEN) == set(FORMAT_CHECKS)
    seen = set()
    for probe in probes_of("format", 150):
        check, instruction = probe.target["check"], probe.target["instruction"]
        seen.add(check)
        broken = BROKEN[check](probe.reference, instruction)
        assert score(probe, broken) == 0.0, (check, broken)
    assert seen == set(FORMAT_CHECKS)


def test_tool_call_accepts_equivalent_calls_and_rejects_wrong_ones():
    probe = next(p for p in probes_of("tool_call", 40) if len(p.target["arguments"]) > 1)
    name, arguments = probe.target["name"], probe.target["arguments"]
    key = next(k for k, v in arguments.items() if isinstance(v, str))
    right = [
        json.dumps(probe.target),
        f"Sure! [{json.dumps({'name': name, 'parameters': arguments})}] done",
        json.dumps({"name": name, "arguments": json.dumps(arguments)}),
        json.dumps({"name": name, "arguments": {**arguments, key: arguments[key].upper()}}),
    ]
    wrong = [
        json.dumps({"name": name + "_v2", "arguments": arguments}),
        json.dumps({"name": name, "arguments": {**arguments, key: "somewhere else"}}),
        json.dumps({"name": name, "arguments": {k: v for k, v in arguments.items() if k != key}}),
        json.dumps({"name": name, "arguments": {**arguments, "extra": 1}}),
        f"I would call {name} for you.",
    ]
    assert [score(probe, r) for r in right] == [1.0] * len(right)
    assert [score(probe, w) for w in wrong] == [0.0] * len(wrong)


def test_hashhop_wants_the_end_of_the_chain_first():
    probe = probes_of("hashhop", 1, hashhop_tokens=300, hashhop_hops=3)[0]
    context = probe.messages[-1]["content"]
    start = re.search(r"Start from (\w+)", context).group(1)
    others = [h for h in hashes(context) if h not in (start, probe.target)]
    assert word_count(context) >= 300 and len(hashes(context)) > 20
    assert score(probe, f"The final hash is {probe.target}.") == 1.0
    assert score(probe, f"zz99zz99 then {probe.target}") == 1.0  # not a hash of the context
    assert score(probe, f"{others[0]}, or maybe {probe.target}") == 0.0
    assert score(probe, start) == 0.0


def test_code_references_pass_and_wrong_code_fails():
    probes = probes_of("code", 40)
    assert {p.reference.split("def ")[1].split("(")[0] for p in probes} == {
        make.__name__ for make in CODE_TASKS}
    for probe in probes:
        assert score(probe, probe.reference) == 1.0, probe.reference
    probe = probes[0]
    stub = extract_code(probe.reference).split('"""')
    assert score(probe, f'```python\n{stub[0]}"""{stub[1]}"""\n    return None\n```') == 0.0
    assert score(probe, "```python\ndef broken(:\n```") == 0.0
    assert score(probe, "I cannot write code.") == 0.0
    assert score(probe, "```python\nimport sys\nsys.exit(0)\n```") == 0.0  # exits early


def test_extract_code_takes_the_first_block_even_unclosed():
    assert extract_code("Here:\n```python\nx = 1\n```\nand\n```\ny = 2\n```") == "x = 1\n"
    assert extract_code("```py\ndef f():\n    return 1") == "def f():\n    return 1"
    assert extract_code("def f():\n    return 1") == "def f():\n    return 1"
