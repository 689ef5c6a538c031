"""Instruction JSONL in the three common layouts, normalised to chat messages; bad lines are counted by reason
and kept with their line number, never dropped silently.

Layouts (one JSON object per line):
- `{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}` (the last message is the
  assistant's answer; earlier assistant turns are learned too);
- `{"prompt": "...", "completion": "..."}`;
- `{"instruction": "...", "input": "...", "output": "..."}` (Alpaca; `input` optional, joined to the
  instruction with a blank line).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import fsspec

from dataprep.finetune.chat import ROLES

Messages = list[dict[str, str]]


class BadLine(ValueError):
    """A line that is not a usable example; `reason` is the short code it is counted under."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass
class InstructionSet:
    """The examples of one file, and the lines set aside with their reasons."""

    examples: list[Messages] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)

    @property
    def rejected_by_reason(self) -> dict[str, int]:
        return dict(sorted(Counter(row["reason"] for row in self.rejected).items()))


def _text(record: dict[str, Any], name: str, required: bool = True) -> str:
    value = record.get(name)
    if value is None:
        if required:
            raise BadLine("missing_field", f"field {name!r} is missing")
        return ""
    if not isinstance(value, str):
        raise BadLine("not_a_string", f"field {name!r} must be a string, not {type(value).__name__}")
    if required and not value.strip():
        raise BadLine("empty_field", f"field {name!r} is empty")
    return value


def _chat(record: dict[str, Any]) -> Messages:
    raw = record["messages"]
    if not isinstance(raw, list) or not raw:
        raise BadLine("bad_messages", "'messages' must be a non-empty list")
    messages: Messages = []
    for position, message in enumerate(raw):
        if not isinstance(message, dict):
            raise BadLine("bad_messages", f"messages[{position}] is not an object")
        role = message.get("role")
        if role not in ROLES:
            raise BadLine("bad_role", f"messages[{position}].role {role!r}: use one of {', '.join(ROLES)}")
        messages.append({"role": role, "content": _text(message, "content")})
    if messages[-1]["role"] != "assistant":
        raise BadLine("no_assistant_reply", "the last message must be the assistant's answer")
    return messages


def to_messages(record: Any) -> Messages:
    """One JSON value → chat messages, or BadLine naming the problem."""
    if not isinstance(record, dict):
        raise BadLine("not_an_object", f"a line must be a JSON object, not {type(record).__name__}")
    if "messages" in record:
        return _chat(record)
    if "prompt" in record or "completion" in record:
        return [{"role": "user", "content": _text(record, "prompt")},
                {"role": "assistant", "content": _text(record, "completion")}]
    if "instruction" in record or "output" in record:
        extra = _text(record, "input", required=False)
        instruction = _text(record, "instruction")
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(record, "output")}]
    raise BadLine("unknown_layout", "expected 'messages', 'prompt'/'completion' or 'instruction'/'output'")


def parse_lines(lines: list[str], source: str) -> InstructionSet:
    """Every non-blank line parsed; rejected lines keep source, line number, reason and detail."""
    parsed = InstructionSet()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            parsed.rejected.append({"source": source, "line": number, "reason": "invalid_json",
                                    "detail": str(error), "text": line[:500]})
            continue
        try:
            parsed.examples.append(to_messages(record))
        except BadLine as bad:
            parsed.rejected.append({"source": source, "line": number, "reason": bad.reason, "detail": str(bad),
                                    "text": line[:500]})
    return parsed


def read_instructions(location: str) -> InstructionSet:
    """A local path or fsspec URL (compression from the suffix) of instruction JSONL."""
    with fsspec.open(location, "rt", encoding="utf-8", compression="infer") as handle:
        return parse_lines(handle.read().splitlines(), location)
