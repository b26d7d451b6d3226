"""Tool calling as TGI does it (``router/src/infer/tool_grammar.rs``, ``chat.rs``): the tools
become one JSON-schema grammar, the model writes ``{"function": {"_name": NAME, ...arguments}}``,
and the answer comes back as OpenAI ``tool_calls``.

``tool_choice``: ``auto`` adds a ``no_tool`` function (choosing it re-runs the request without
tools, so the model answers in text), ``required`` offers the tools alone, a function name offers
that one, ``none`` offers none (a plain chat request). Difference from TGI, on purpose: the
grammar says ``"type": "object"`` and requires ``function`` (TGI's schema has neither: outlines'
regex conversion reads ``properties`` as an object anyway, but JSON Schema itself, as llguidance
reads it, would then allow any number or ``{}``, answers that are no call).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from .errors import ToolError
from .openai_schemas import FunctionName, Tool

NO_TOOL = "no_tool"
DEFAULT_TOOL_PROMPT = (
    "\nGiven the functions available, please respond with a JSON for a function call with its "
    "proper arguments that best answers the given prompt. Respond in the format {name: function "
    "name, parameters: dictionary of argument name and its value}.Do not use variables.\n"
)


def _no_tool() -> Tool:
    return Tool.model_validate(
        {
            "type": "function",
            "function": {
                "name": NO_TOOL,
                "description": "Open ended response with no specific tool selected",
                "arguments": {"type": "object"},
            },
        }
    )


def tools_to_use(tools: list[Tool], choice: str | FunctionName) -> list[Tool]:
    """``ToolGrammar::apply``'s choice of tools; empty means: no grammar, no tools."""
    if isinstance(choice, FunctionName):
        for tool in tools:
            if tool.function.name == choice.name:
                return [tool]
        raise ToolError(f"Tool with name {choice.name} not found")
    if choice == "required":
        return list(tools)
    if choice == "auto":
        return [*tools, _no_tool()]
    return []  # "none"


def tool_schema(tools: list[Tool]) -> dict:
    """The JSON schema the answer must follow: one ``$functions`` entry per tool, each an object
    with ``_name`` fixed to the tool's name plus the tool's own properties."""
    functions = {}
    for tool in tools:
        f = tool.function
        properties: dict[str, Any] = {"_name": {"type": "string", "const": f.name}}
        required: list[Any] = ["_name"]
        entry: dict[str, Any] = {"description": f.description or ""}
        if isinstance(f.arguments, dict):
            if isinstance(f.arguments.get("properties"), dict):
                properties.update(f.arguments["properties"])
            if isinstance(f.arguments.get("required"), list):
                required.extend(f.arguments["required"])
            # NOTE: TGI's check: only the *string* "true" allows additional properties.
            entry["additionalProperties"] = f.arguments.get("additionalProperties") == "true"
        entry["type"] = "object"
        entry["properties"] = properties
        entry["required"] = required
        functions[f.name] = entry
    return {
        "$functions": functions,
        "type": "object",
        "properties": {
            "function": {"anyOf": [{"$ref": f"#/$functions/{t.function.name}"} for t in tools]}
        },
        "required": ["function"],
    }


def tool_json(tool: Tool) -> dict:
    """A tool as TGI serializes it for the chat template (``arguments`` as a JSON string)."""
    f = tool.function
    return {
        "type": tool.type,
        "function": {
            "description": f.description,
            "name": f.name,
            "arguments": json.dumps(f.arguments, separators=(",", ":")),
        },
    }


def tools_prompt_text(tools: list[Tool], tool_prompt: str, template_uses_tools: bool) -> str:
    """Appended to the last message: the tools (when the template cannot show them) and the
    tool prompt (``ChatTemplate::apply``)."""
    if template_uses_tools:
        return f"\n---\n{tool_prompt}"
    tools_str = json.dumps([tool_json(t) for t in tools], separators=(",", ":"))
    return f"\n---\n{tools_str}\n{tool_prompt}"


def _call(text: str) -> tuple[str, dict] | None:
    """``{"function": {"_name": ..., **arguments}}`` -> (name, arguments), or None."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    function = value.get("function") if isinstance(value, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("_name"), str):
        return None
    arguments = {k: v for k, v in function.items() if k != "_name"}
    return function["_name"], arguments


def parse_output(text: str) -> dict | None:
    """The tool call in a generated text (an OpenAI ``tool_calls`` item), None for ``no_tool``;
    ``ToolError`` when the text is not a call (e.g. it stopped at ``max_tokens``)."""
    call = _call(text)
    if call is None:
        raise ToolError(f"Failed to parse generated text: {text!r}")
    name, arguments = call
    if name == NO_TOOL:
        return None
    return {
        "id": "0",
        "type": "function",
        "function": {
            "description": None,
            "name": name,
            "arguments": json.dumps(arguments, separators=(",", ":")),
        },
    }


_HEAD = re.compile(r'\s*\{\s*"function"\s*:\s*\{\s*"_name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,?\s*')


@dataclass
class ToolStream:
    """Streamed tool calls (TGI's ``ChatState``): tokens are buffered until the function name
    is complete, then the arguments are sent as they grow: the first delta carries the name and
    ``{``, and the deltas join into the arguments' JSON (the wrapper's closing brace dropped).

    ``push`` returns ``("no_tool", None)`` when the model chose ``no_tool``, else a list of
    ``(name or None, arguments piece)`` deltas to send (empty while buffering)."""

    text: str = ""
    name: str | None = None
    sent: str = ""  # the arguments text sent so far
    done: bool = False

    def _arguments(self, body: str, complete: bool) -> str:
        if complete:
            body = body.rstrip()
            body = body.removesuffix("}")  # the wrapper's brace
        return "{" + body

    def push(self, token_text: str) -> tuple[str, None] | list[tuple[str | None, str]]:
        if self.done:
            return []
        self.text += token_text
        complete = _call(self.text) is not None
        head = _HEAD.match(self.text)
        if head is None:
            if not complete:
                return []
            # a call whose name is not its first key: send it whole
            name, arguments = _call(self.text)
            self.done = True
            if name == NO_TOOL:
                return NO_TOOL, None
            return [(name, json.dumps(arguments, separators=(",", ":")))]
        out: list[tuple[str | None, str]] = []
        if self.name is None:
            self.name = json.loads(f'"{head.group(1)}"')
            if self.name == NO_TOOL:
                self.done = True
                return NO_TOOL, None
            out.append((self.name, ""))
        arguments = self._arguments(self.text[head.end() :], complete)
        piece = arguments[len(self.sent) :] if arguments.startswith(self.sent) else ""
        self.sent += piece
        self.done = complete
        if out:
            out[0] = (self.name, piece)
        elif piece:
            out.append((None, piece))
        return out
