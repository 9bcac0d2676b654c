"""The builtin calibration corpus (mixq.corpus*): seeded, prefix-stable documents per domain
whose code parses, whose reasoning answers are right, whose constraint answers meet their
constraints and whose tool calls match their schemas."""

from __future__ import annotations

import ast
import datetime
import json
import re
from fractions import Fraction

import numpy as np
import pytest

from mixq.config import DOMAINS
from mixq.corpus import builtin_documents


@pytest.mark.parametrize("domain", DOMAINS)
def test_builtin_documents_are_seeded_and_prefix_stable(domain):
    documents = builtin_documents(domain, 3, 12)
    assert len(documents) == 12
    assert builtin_documents(domain, 3, 12) == documents
    assert builtin_documents(domain, 3, 5) == documents[:5]
    assert builtin_documents(domain, 4, 12) != documents
    assert len({json.dumps(d, sort_keys=True) for d in documents}) > 8


COMMON_WORDS = set(
    "the of and to a in is it that for with as be on by this are or not all no will have if".split()
)


def test_prose_is_english_paragraphs():
    for document in builtin_documents("prose", 0, 30):
        for paragraph in document["text"].split("\n\n"):
            words = paragraph.split()
            assert 25 <= len(words) <= 250 and paragraph.isascii()
            assert sum(w.lower() in COMMON_WORDS for w in words) >= 0.1 * len(words)
            assert ">>>" not in paragraph


def test_code_is_whole_stdlib_definitions():
    for document in builtin_documents("code", 0, 30):
        tree = ast.parse(document["text"])
        assert len(tree.body) == 1
        assert isinstance(tree.body[0], (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))


ARITHMETIC = re.compile(r"(-?\$?[\d,.]+(?: [-+x/] -?\$?[\d,.]+)+) = \$?(-?[\d,]+(?:\.\d+)?)")


def test_reasoning_solutions_are_correct():
    checked = 0
    for document in builtin_documents("reasoning", 0, 200):
        for message in document["messages"]:
            if message["role"] != "assistant":
                continue
            assert "Final answer: " in message["content"]
            for expression, value in ARITHMETIC.findall(message["content"]):
                terms = expression.replace("$", "").replace(",", "").replace(" x ", " * ")
                exact = eval(re.sub(r"[\d.]+", lambda m: f"Fraction('{m[0]}')", terms))
                assert abs(exact - Fraction(value.replace(",", ""))) <= Fraction(1, 200), expression
                checked += 1
    assert checked > 200


def occurrences(word: str, text: str) -> int:
    return len(re.findall(rf"\b{word}\b", text, re.IGNORECASE))


CONSTRAINT_CHECKS = {
    r"exactly (\d+) bullet points": lambda a, n: (
        a.split("\n") == [line for line in a.split("\n") if line.startswith("- ")]
        and len(a.split("\n")) == int(n)
    ),
    r"exactly (\d+) numbered points": lambda a, n: (
        [line.split(".")[0] for line in a.split("\n")] == [str(i) for i in range(1, int(n) + 1)]
    ),
    r"exactly (\d+) sentences": lambda a, n: len(re.findall(r"[.!?](?:\s|$)", a)) == int(n),
    r"(in lowercase letters)": lambda a, _: a == a.lower(),
    r"(in capital letters)": lambda a, _: a == a.upper(),
    r"fewer than (\d+) words": lambda a, n: len(a.split()) < int(n),
    r"End your answer with the exact phrase '(.+?)'": lambda a, p: a.endswith(p),
    r"Start your answer with the word '(\w+)'": lambda a, w: a.split()[0].strip(".,!") == w,
    r"exactly (\d+) paragraphs separated by the markdown divider": lambda a, n: (
        len(a.split("\n\n***\n\n")) == int(n)
    ),
    r"(Do not use any commas)": lambda a, _: "," not in a,
    r"(double angular brackets)": lambda a, _: re.match(r"<<[^<>\n]+>>\n", a) is not None,
    r"Use the word '(\w+)' exactly twice": lambda a, w: occurrences(w, a) == 2,
    r"exactly the keys ([\w, ]+)\.": lambda a, keys: set(json.loads(a)) == set(keys.split(", ")),
}


def test_constraint_answers_meet_their_constraints():
    used = set()
    for document in builtin_documents("constraints", 0, 400):
        request, answer = (m["content"] for m in document["messages"])
        matches = [(p, m) for p in CONSTRAINT_CHECKS if (m := re.search(p, request))]
        assert len(matches) == 1, request
        pattern, match = matches[0]
        assert CONSTRAINT_CHECKS[pattern](answer, match[1]), (request, answer)
        used.add(pattern)
    assert used == set(CONSTRAINT_CHECKS)


def check_schema(value, schema: dict) -> None:
    """A small JSON Schema check: types, required and unknown properties, enum, bounds,
    pattern, format."""
    kind = schema["type"]
    if kind == "object":
        assert set(schema["required"]) <= set(value) <= set(schema["properties"])
        for key, item in value.items():
            check_schema(item, schema["properties"][key])
    elif kind == "array":
        assert isinstance(value, list)
        for item in value:
            check_schema(item, schema["items"])
    else:
        types = {"string": str, "integer": int, "number": (int, float)}[kind]
        assert isinstance(value, types) and not isinstance(value, bool)
    assert value in schema.get("enum", [value])
    assert (
        schema.get("minimum", -np.inf)
        <= (value if kind in ("integer", "number") else 0)
        <= schema.get("maximum", np.inf)
    )
    if "pattern" in schema:
        assert re.fullmatch(schema["pattern"].strip("^$"), value)
    if schema.get("format") == "date":
        datetime.date.fromisoformat(value)
    if schema.get("format") == "email":
        assert re.fullmatch(r"[\w.]+@[\w.]+", value)


@pytest.mark.parametrize("domain", ["tool_call", "agent"])
def test_tool_calls_match_their_schemas_and_get_results(domain):
    for document in builtin_documents(domain, 0, 60):
        schemas = {t["function"]["name"]: t["function"]["parameters"] for t in document["tools"]}
        messages = document["messages"]
        calls = 0
        for index, message in enumerate(messages):
            for number, tool_call in enumerate(message.get("tool_calls", [])):
                check_schema(
                    tool_call["function"]["arguments"], schemas[tool_call["function"]["name"]]
                )
                reply = messages[index + 1 + number]
                assert reply["role"] == "tool" and reply["name"] == tool_call["function"]["name"]
                json.loads(reply["content"])
                calls += 1
        assert calls >= (2 if domain == "agent" else 1)
        assert messages[-1]["role"] == "assistant" and messages[-1]["content"]
