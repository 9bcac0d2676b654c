"""Chat rendering (mixq.chat) for tokenizers with a template, with one that rejects some roles
(Gemma 3's), and without one; and what calibrate and convert make of it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from mixq.calibration import build_calibration, manifest, preview
from mixq.chat import alternating, chat_tokens, plain_chat
from mixq.config import CalibrationConfig
from mixq.convert import smoke_test
from mixq.corpus import builtin_documents
from test_calibration import MAX_CONTEXT, small_tokenizer

# google/gemma-3-270m-it's chat template (tokenizer_config.json): system folded into the first
# user turn, and anything but strictly alternating user/assistant turns rejected
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}{%- if messages[0]['content'] is "
    "string -%}{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- else -%}"
    "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set first_user_prefix = \"\" -%}"
    "{%- set loop_messages = messages -%}{%- endif -%}{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}{{ raise_exception("
    "\"Conversation roles must alternate user/assistant/user/assistant/...\") }}{%- endif -%}"
    "{%- if (message['role'] == 'assistant') -%}{%- set role = \"model\" -%}{%- else -%}"
    "{%- set role = message['role'] -%}{%- endif -%}{{ '<start_of_turn>' + role + '\n' + "
    "(first_user_prefix if loop.first else \"\") }}{%- if message['content'] is string -%}"
    "{{ message['content'] | trim }}{%- elif message['content'] is iterable -%}{%- for item in "
    "message['content'] -%}{%- if item['type'] == 'text' -%}{{ item['text'] | trim }}"
    "{%- endif -%}{%- endfor -%}{%- else -%}{{ raise_exception(\"Invalid content type\") }}"
    "{%- endif -%}{{ '<end_of_turn>\n' }}{%- endfor -%}{%- if add_generation_prompt -%}"
    "{{'<start_of_turn>model\n'}}{%- endif -%}"
)
TOOL_CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Oslo?"},
    {"role": "assistant", "content": "",
     "tool_calls": [{"type": "function",
                     "function": {"name": "weather", "arguments": {"city": "Oslo"}}}]},
    {"role": "tool", "name": "weather", "content": '{"c": 3}'},
    {"role": "tool", "name": "weather", "content": '{"wind": 5}'},
    {"role": "assistant", "content": "3 C, windy."},
]


@pytest.fixture(scope="module")
def gemma_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = small_tokenizer(GEMMA3_TEMPLATE)
    tokenizer.bos_token = "<|im_start|>"
    return tokenizer


def test_plain_format_without_a_template():
    tokenizer = small_tokenizer(chat_template=None)
    ids, rendering = chat_tokens(tokenizer, TOOL_CHAT[:2], add_generation_prompt=True)
    assert rendering == "plain"
    assert tokenizer.decode(ids) == "System: Be brief.\n\nUser: Weather in Oslo?\n\nAssistant:"
    ids, _ = chat_tokens(tokenizer, TOOL_CHAT, tools=[{"name": "weather"}])
    text = tokenizer.decode(ids)
    assert text.startswith('System: Be brief.\n\nYou can call these functions')
    assert '\n\nAssistant: <tool_call>\n{"name": "weather", ' in text
    assert '\n\nTool: {"c": 3}\n\nTool: {"wind": 5}\n\nAssistant: 3 C, windy.' in text


def test_template_that_rejects_tool_roles_gets_alternating_turns(gemma_tokenizer):
    with pytest.raises(Exception, match="roles must alternate"):
        gemma_tokenizer.apply_chat_template(TOOL_CHAT, tokenize=False)
    ids, rendering = chat_tokens(gemma_tokenizer, TOOL_CHAT)
    assert rendering == "template-alternating"
    text = gemma_tokenizer.decode(ids)
    assert text.count("<start_of_turn>user\n") == 2 and text.count("<start_of_turn>model\n") == 2
    assert '<tool_response>\n{"c": 3}\n</tool_response>\n\n<tool_response>' in text
    simple, rendering = chat_tokens(gemma_tokenizer, TOOL_CHAT[:2], add_generation_prompt=True)
    assert rendering == "template"
    assert gemma_tokenizer.decode(simple).endswith("Weather in Oslo?<end_of_turn>\n"
                                                   "<start_of_turn>model\n")


def test_alternating_joins_same_role_turns():
    turns = alternating([{"role": "system", "content": "s"}, {"role": "user", "content": "a"},
                         {"role": "system", "content": "b"}, {"role": "tool", "content": "c"},
                         {"role": "assistant", "content": "d"}])
    assert [t["role"] for t in turns] == ["system", "user", "assistant"]
    assert turns[1]["content"] == "a\n\nb\n\n<tool_response>\nc\n</tool_response>"
    assert plain_chat(turns, add_generation_prompt=False).startswith("System: s\n\nUser: a")


@pytest.mark.parametrize("template,chats", [(None, {"plain"}),
                                            (GEMMA3_TEMPLATE, {"template-alternating"})])
def test_calibration_records_how_each_domain_was_rendered(gemma_tokenizer, template, chats):
    tokenizer = gemma_tokenizer if template else small_tokenizer(chat_template=None)
    cfg = CalibrationConfig(domains=["prose", "agent", "tool_call"], samples_per_domain=1,
                            heldout_per_domain=1, seq_len=128)
    cal = build_calibration(tokenizer, cfg, MAX_CONTEXT)
    info = manifest(cal, "test", cfg)
    assert set(info["renderings"]["prose"]) == {"text"}
    assert set(info["renderings"]["agent"]) == set(info["renderings"]["tool_call"]) == chats
    assert sum(info["renderings"]["agent"].values()) == sum(
        info["per_domain"]["agent"][s]["documents"] for s in ("calibration", "refine", "heldout"))
    table = preview(info)
    assert f"| {next(iter(chats))} {info['renderings']['agent'][next(iter(chats))]} |" in table
    assert info["plain_chat_format"] in table


def test_reasoning_chats_keep_the_template(gemma_tokenizer):
    document = builtin_documents("reasoning", 0, 1)[0]
    assert chat_tokens(gemma_tokenizer, document["messages"])[1] == "template"


def test_smoke_test_failure_is_reported_not_raised(tmp_path: Path, caplog):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    with caplog.at_level(logging.WARNING, logger="mixq"):
        assert smoke_test(tmp_path) is False
    assert "smoke test (stock mlx_lm.load + generate) failed" in caplog.text
