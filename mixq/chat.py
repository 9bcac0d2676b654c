"""Chats as tokens for any tokenizer, with or without a chat template.

Calibration chats, eval probes, convert's smoke test and ``mixq generate`` all render chats
here, each document in the first of these ways that works (its name is what manifests report):

* ``template``: the tokenizer's chat template (tool schemas and calls passed to it if it renders
  them, else inlined: :func:`inline_tools`);
* ``template-alternating``: the template rejected the chat (Gemma's: "Conversation roles must
  alternate user/assistant"; many have no ``tool`` role), so it gets :func:`alternating`
  turns: each tool result becomes a user turn, consecutive turns of one role are joined;
* ``plain``: no template, or it rejects that too: :func:`plain_chat`, the documented plain
  format below, encoded with the tokenizer's own special tokens (a BOS where it adds one).

The plain format: each message as ``"<Role>: <content>"`` with Role ``System``, ``User``,
``Assistant`` or ``Tool``, messages separated by one blank line; tool schemas and calls inlined
as for a template without tool support; a prompt for an answer ends with ``"Assistant:"``.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from jinja2 import TemplateError

RENDERINGS = ("template", "template-alternating", "plain")
PLAIN_ROLES = {"system": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}
PLAIN_FORMAT = (
    "each message as '<Role>: <content>' (System, User, Assistant, Tool), separated by a blank "
    "line; tools as JSON in the system prompt, calls as <tool_call> JSON; answers follow "
    "'Assistant:'"
)


def has_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def supports_tools(tokenizer: Any) -> bool:
    """Whether the chat template renders ``tools`` and assistant ``tool_calls`` itself."""
    template = str(getattr(tokenizer, "chat_template", None) or "")
    return "tools" in template and "tool_calls" in template


def inline_tools(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """The chat for a template without tool support: tool schemas as JSON in the system prompt,
    each call as ``<tool_call>`` JSON in the assistant's content."""
    inlined = []
    for message in messages:
        calls = [
            f"<tool_call>\n{json.dumps(c['function'])}\n</tool_call>"
            for c in message.get("tool_calls", [])
        ]
        content = "\n".join(filter(None, [message.get("content") or "", *calls]))
        inlined.append({"role": message["role"], "content": content})
    if tools:
        schemas = (
            "You can call these functions; to call one, reply with <tool_call>{...}</tool_call>:\n"
        )
        schemas += "\n".join(json.dumps(tool) for tool in tools)
        if inlined[0]["role"] == "system":
            inlined[0]["content"] += "\n\n" + schemas
        else:
            inlined.insert(0, {"role": "system", "content": schemas})
    return inlined


def alternating(messages: list[dict]) -> list[dict]:
    """``messages`` (tools already inlined) as strictly alternating user/assistant turns after an
    optional leading system turn: a tool result becomes a user turn wrapped in
    ``<tool_response>``, consecutive turns of the same role are joined by a blank line."""
    turns: list[dict] = []
    for i, message in enumerate(messages):
        role, content = message["role"], message["content"]
        if role == "system" and i > 0:
            role = "user"
        if role == "tool":
            role, content = "user", f"<tool_response>\n{content}\n</tool_response>"
        if turns and turns[-1]["role"] == role:
            turns[-1] = {"role": role, "content": turns[-1]["content"] + "\n\n" + content}
        else:
            turns.append({"role": role, "content": content})
    return turns


def plain_chat(messages: list[dict], add_generation_prompt: bool) -> str:
    """The plain format of the module docstring (tools already inlined)."""
    lines = [f"{PLAIN_ROLES.get(m['role'], m['role'].title())}: {m['content']}" for m in messages]
    if add_generation_prompt:
        lines.append("Assistant:")
    return "\n\n".join(lines)


def chat_tokens(
    tokenizer: Any,
    messages: list[dict],
    tools: Optional[list[dict]] = None,
    add_generation_prompt: bool = False,
) -> tuple[list[int], str]:
    """``(token ids, rendering)`` of a chat (Hugging Face message format, ``tools`` as JSON
    schemas), rendering one of :data:`RENDERINGS` (see the module docstring)."""
    tools = tools or None
    uses_tools = tools or any("tool_calls" in m for m in messages)
    if has_template(tokenizer):
        if uses_tools and not supports_tools(tokenizer):
            first = ("template", inline_tools(messages, tools), None)
        else:
            first = ("template", messages, tools)
        retry = ("template-alternating", alternating(inline_tools(messages, tools)), None)
        for rendering, chat, chat_tools in (first, retry):
            try:
                text = tokenizer.apply_chat_template(
                    chat, tools=chat_tools, add_generation_prompt=add_generation_prompt,
                    tokenize=False,
                )
            except (TemplateError, ValueError, TypeError, KeyError):
                continue  # the template rejects this chat: try the next rendering
            return list(tokenizer.encode(text, add_special_tokens=False)), rendering
    text = plain_chat(inline_tools(messages, tools), add_generation_prompt)
    return list(tokenizer.encode(text)), "plain"
