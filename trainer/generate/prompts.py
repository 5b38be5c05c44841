"""Prompt rows for generation: what the teacher is asked, and how its answer becomes a data row."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trainer.data.sources import DataError
from trainer.data.tokenize import check_messages, encode_text, render_chat, special_ids


@dataclass
class Prompt:
    origin: str
    """file.jsonl:LINE, for error messages."""
    ids: list[int]
    """Exactly the tokens the trainer will put before the response when it reads the written row."""
    prompt: str | None = None
    messages: list | None = None

    def as_row(self, response: str) -> dict:
        """The data row (a contract format) that teaches the student this response."""
        if self.messages is not None:
            return {"messages": [*self.messages, {"role": "assistant", "content": response}]}
        return {"prompt": self.prompt, "response": response}


def read_prompt(row: Any, origin: str, tokenizer) -> Prompt:
    """A {prompt} row (any response is dropped) or a {messages} row (a final assistant turn is dropped)."""
    if isinstance(row, dict) and isinstance(row.get("prompt"), str):
        # As data/tokenize.py tokenizes a prompt/response row's prompt: bos (when the tokenizer adds one), then the text.
        return Prompt(origin, special_ids(tokenizer).bos + encode_text(tokenizer, row["prompt"]), prompt=row["prompt"])
    if isinstance(row, dict) and row.get("messages") is not None:
        check_messages(row["messages"], origin)
        messages = list(row["messages"])
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if not messages:
            raise DataError(f"prompt row {origin} has no message before its assistant turn; give it a user message.")
        if not tokenizer.chat_template:
            raise DataError(f"prompt row {origin} has messages but the teacher's tokenizer has no chat template; "
                            "use {prompt} rows.")
        rendered = render_chat(tokenizer, messages, origin, add_generation_prompt=True)
        return Prompt(origin, tokenizer(rendered, add_special_tokens=False)["input_ids"], messages=messages)
    keys = sorted(row) if isinstance(row, dict) else type(row).__name__
    raise DataError(f"prompt row {origin} has neither a 'prompt' string nor 'messages' (got {keys}); "
                    "give each row one of them.")
