"""One row to token ids and a loss mask, for each row format (prompt/response, messages, text, and
prompt-only rows for on-policy distillation)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from trainer.data.sources import DataError
from trainer.errors import first_line
from trainer.losses.settings import IGNORE_INDEX  # the loss's mask value; see there why it lives in losses/

log = logging.getLogger(__name__)



_FORMATS = {
    "prompt/response": ("prompt", "response"),
    "messages": ("messages",),
    "text": ("text",),
}


_EXPECTED_FORMATS = "expected {prompt,response}, {messages}, {text}, or {prompt} under onpolicy.fraction=1"


# A row with a prompt and no response, whose response the student writes (onpolicy.fraction=1).
# It is the format of last resort: a row that fits another format as well is that format, as before
# prompt-only rows existed (so {"prompt", "text"} stays a text row).
PROMPT_ONLY = "prompt-only"
_FIELDS = {**_FORMATS, PROMPT_ONLY: ("prompt",)}


# The roles the loss and common chat templates know; the loss learns the "assistant" turns only.
CHAT_ROLES = ("system", "user", "assistant")


# Roles that templates of tool-using models render as well, beside the assistant's turns.
TOOL_ROLES = ("tool", "developer", "function", "ipython")


# ShareGPT writes turns as {"from", "value"} with these roles; what they are called here.
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


@dataclass(frozen=True)
class TeacherTokens:
    """The teacher's tokenisation of a row, for distillation across tokenizers (trainer/data/pairing.py)."""

    input_ids: list[int]
    """The teacher's ids of the row, its own bos/eos or chat markup included, cut at `seq_len`."""
    spans: list[tuple[int, int, int, int]]
    """(a, b, c, d): student tokens [a, b) spell what teacher tokens [c, d) spell, indices into each
    side's ids; a >= 1 and c >= 1 (a position before predicts them), all supervised on both sides."""
    truncated: bool = False
    """The teacher's tokens were cut at `seq_len` (the student's may not have been)."""
    prompt_length: int | None = None
    """How many of `input_ids` come before the row's last response (all of them in a prompt-only
    row): the teacher's side of the prompt a rollout answers (trainer/rollout/retokenize.py)."""


@dataclass
class TokenizedRow:
    """One tokenized row, at most `seq_len` tokens long.

    `labels` is aligned with `input_ids` (not shifted: the trainer shifts) and holds IGNORE_INDEX
    wherever the loss must not look.
    """

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    index: int = -1
    """The row's position in its source, which is how a teacher cache finds its entry."""
    empty_response: bool = False
    """Its response (its assistant turns, or its text) is empty or blank, so it teaches nothing but
    the end-of-sequence or end-of-turn marker."""
    prompt_only: bool = False
    """A `{"prompt"}` row: the prompt's tokens, none supervised; the student writes its response
    (on-policy distillation), so it is not one of the rows that lost their response to `seq_len`."""
    teacher: TeacherTokens | None = None
    """The teacher's own tokens of the row and their spans against these, when the two models have
    different tokenizers (trainer/data/pairing.py); None when they share one."""

    @property
    def num_supervised(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


@dataclass(frozen=True)
class SpecialIds:
    """The tokens that `tokenize_row` puts around prompt/response and text rows."""

    bos: list[int]
    eos: list[int]


def special_ids(tokenizer: Any) -> SpecialIds:
    """Which bos/eos ids to put around prompt/response and text rows.

    A bos id is added only when the tokenizer adds one by default (Llama, Mistral, Gemma), so rows
    look the way the model saw text in pre-training; Qwen and GPT-2 add none.
    """
    bos_id = tokenizer.bos_token_id
    with_specials = tokenizer.encode("a", add_special_tokens=True)
    without_specials = tokenizer.encode("a", add_special_tokens=False)
    adds_bos = bos_id is not None and with_specials[:1] == [bos_id] and without_specials[:1] != [bos_id]
    eos_id = tokenizer.eos_token_id
    return SpecialIds(bos=[bos_id] if adds_bos else [], eos=[] if eos_id is None else [eos_id])


def tokenize_row(
    row: Any, tokenizer: Any, seq_len: int, origin: str, *, specials: SpecialIds | None = None
) -> TokenizedRow:
    """Tokenize one row into at most `seq_len` tokens, with labels masked where the loss must not look.

    `specials` is `special_ids(tokenizer)`, computed here when not given; pass it when tokenizing
    many rows to save two tokenizer calls per row.
    """
    specials = special_ids(tokenizer) if specials is None else specials
    kind = row_format(row, origin)
    if kind == "prompt/response":
        ids, supervised = _tokenize_prompt_response(row, tokenizer, specials)
    elif kind == PROMPT_ONLY:
        ids, supervised = _tokenize_prompt_only(row["prompt"], tokenizer, specials, origin)
    elif kind == "messages":
        ids, supervised = _tokenize_messages(row["messages"], tokenizer, origin)
    else:
        ids, supervised = _tokenize_text(row["text"], tokenizer, specials)
    tokenized = _to_row(ids, supervised, seq_len)
    tokenized.empty_response = _has_empty_response(row, kind)
    tokenized.prompt_only = kind == PROMPT_ONLY
    return tokenized


def _has_empty_response(row: dict, kind: str) -> bool:
    """A blank response, text, or assistant turns that are all blank (a row without any assistant
    turn has nothing to learn at all, which `supervised_only` counts). A prompt-only row has no
    response to be empty: the student writes it."""
    if kind == PROMPT_ONLY:
        return False
    if kind == "prompt/response":
        return not row["response"].strip()
    if kind == "text":
        return not row["text"].strip()
    answers = [message["content"] for message in row["messages"] if message["role"] == "assistant"]
    return bool(answers) and not any(answer.strip() for answer in answers)


def row_format(row: Any, origin: str) -> str:
    """Name the one format `row` fits, after checking its field types.

    Fields besides the format's own (ids, sources, metadata) are ignored: real datasets carry them.
    A null field counts as absent, since Parquet and `datasets` fill missing columns with null.
    """
    if not isinstance(row, dict):
        kind = type(row).__name__
        raise DataError(f"data row {origin} fits no known format ({_EXPECTED_FORMATS}); got a {kind}, not an object; "
                        "make each row a JSON object")
    present = {field for field, value in row.items() if value is not None}
    fits = [kind for kind, fields in _FORMATS.items() if present.issuperset(fields)]
    if not fits and "prompt" in present:
        fits = [PROMPT_ONLY]
    if not fits:
        sharegpt = (" (ShareGPT's 'conversations' is 'messages' here, its turns {role, content} with the roles "
                    f"{_sharegpt_mapping()})") if "conversations" in present else ""
        raise DataError(f"data row {origin} fits no known format ({_EXPECTED_FORMATS}); got keys {sorted(row)}; "
                        f"rename its fields to one of those{sharegpt}")
    if len(fits) > 1:
        raise DataError(f"data row {origin} fits more than one format ({', '.join(fits)}); keep the fields of only one")
    _check_fields(row, fits[0], origin)
    return fits[0]


def _check_fields(row: dict, kind: str, origin: str) -> None:
    if kind == "messages":
        check_messages(row["messages"], origin)
        return
    for field in _FIELDS[kind]:
        if not isinstance(row[field], str):
            raise DataError(f"data row {origin} has a '{field}' of type {type(row[field]).__name__}; make it a string")


def check_messages(messages: Any, origin: str) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise DataError(
            f"data row {origin} has 'messages' that is not a non-empty list; "
            "make it a list of {role, content} objects"
        )
    for index, message in enumerate(messages):
        if isinstance(message, dict) and "from" in message and "value" in message and "role" not in message:
            raise DataError(
                f"data row {origin} has messages[{index}] in ShareGPT's form ('from'/'value'); rename the keys to "
                f"'role'/'content' and the roles {_sharegpt_mapping()}"
            )
        if not (isinstance(message, dict) and all(isinstance(message.get(f), str) for f in ("role", "content"))):
            raise DataError(
                f"data row {origin} has messages[{index}] without string 'role' and 'content'; give every message both"
            )


def _sharegpt_mapping() -> str:
    return ", ".join(f"{sharegpt}->{ours}" for sharegpt, ours in SHAREGPT_ROLES.items() if sharegpt != ours)


def _check_training_roles(messages: Sequence[dict], origin: str) -> None:
    """A conversation without an 'assistant' turn teaches nothing. When it also has roles no chat
    template knows, the assistant's turns are most likely under another name (ShareGPT's 'gpt'):
    refuse it by name rather than drop it with every row like it."""
    roles = list(dict.fromkeys(message["role"] for message in messages))
    unknown = [role for role in roles if role not in CHAT_ROLES + TOOL_ROLES]
    if "assistant" in roles or not unknown:
        return
    found = ", ".join(repr(role) for role in roles)
    hint = f" (ShareGPT's roles: {_sharegpt_mapping()})" if set(unknown) & set(SHAREGPT_ROLES) else ""
    raise DataError(
        f"data row {origin} has the roles {found} and no 'assistant' turn, so it has no token to learn; "
        f"name its roles {', '.join(CHAT_ROLES)}{hint}: the loss learns the 'assistant' turns"
    )


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """`text`'s tokens, no specials. Text that comes back as no tokens at all means the tokenizer
    transformers built does not fit the folder's files (transformers 5 builds a qwen2 folder's as its own
    Qwen2Tokenizer, which drops every word a word-level tokenizer.json knows): refused, not trained on."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if not ids and text.strip():
        raise DataError(
            f"the {type(tokenizer).__name__} tokenizer turns {text[:40]!r} into no tokens at all: it does not fit its "
            "model folder's tokenizer files; check AutoTokenizer.from_pretrained(that folder) on your text, and save "
            "the tokenizer the model was trained with into the folder")
    return ids


def _tokenize_prompt_response(row: dict, tokenizer: Any, specials: SpecialIds) -> tuple[list[int], list[bool]]:
    # Encoding the two parts separately puts the mask boundary exactly between them; encoding the
    # joined string could merge the last prompt character with the first response character.
    prompt = specials.bos + encode_text(tokenizer, row["prompt"])
    response = encode_text(tokenizer, row["response"]) + specials.eos
    return prompt + response, [False] * len(prompt) + [True] * len(response)


def _tokenize_prompt_only(prompt: str, tokenizer: Any, specials: SpecialIds,
                          origin: str) -> tuple[list[int], list[bool]]:
    """The prompt exactly as a prompt/response row starts (bos, then the prompt), nothing supervised:
    a rollout continues it where the response would begin."""
    if not prompt.strip():
        raise DataError(f"data row {origin} has neither a response nor a prompt to write one to; give it a "
                        "prompt (or a response), or drop it")
    ids = specials.bos + encode_text(tokenizer, prompt)
    return ids, [False] * len(ids)


def _tokenize_text(text: str, tokenizer: Any, specials: SpecialIds) -> tuple[list[int], list[bool]]:
    ids = specials.bos + encode_text(tokenizer, text) + specials.eos
    return ids, [True] * len(ids)


def _tokenize_messages(messages: Sequence[dict], tokenizer: Any, origin: str) -> tuple[list[int], list[bool]]:
    """Supervise exactly the tokens of the assistant turns, each with its end-of-turn marker.

    The template writes its own bos and turn markers into the text, so nothing is added around it.
    """
    rendered, spans = chat_turns(messages, tokenizer, origin)
    encoded = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
    supervised = [_within(offsets, spans) for offsets in encoded["offset_mapping"]]
    return list(encoded["input_ids"]), supervised


def chat_turns(messages: Sequence[dict], tokenizer: Any, origin: str) -> tuple[str, list[tuple[int, int]]]:
    """The conversation rendered with the tokenizer's chat template, and the character range
    `[start, end)` of each assistant turn in it, in order, its end-of-turn marker included."""
    if not tokenizer.chat_template:
        raise DataError(
            f"data row {origin} has 'messages' but the tokenizer has no chat template; "
            "use prompt/response rows or a tokenizer with a chat template"
        )
    _check_training_roles(messages, origin)
    if messages[0]["role"] == "assistant":
        # Its start is where the template's generation prompt for the turns before it ends, and a
        # template cannot render zero turns; templates that require user/assistant turns refuse it too.
        raise DataError(
            f"data row {origin} starts with an assistant turn, which has no turn before it to answer; "
            "put the user (or system) turn it answers first, or drop that assistant turn"
        )
    # Null fields (from Parquet) would read as "defined" to templates that test `message.tool_calls is defined`.
    messages = [{field: value for field, value in message.items() if value is not None} for message in messages]
    rendered = render_chat(tokenizer, messages, origin)
    return rendered, _assistant_spans(tokenizer, messages, rendered, origin)


def render_chat(tokenizer: Any, messages: list[dict], origin: str, add_generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as err:  # templates raise anything, e.g. jinja2 errors or raise_exception("...")
        raise DataError(
            f"the chat template could not render data row {origin} ({first_line(err)}); "
            "fix the row's messages or use prompt/response rows"
        ) from err


def _assistant_spans(tokenizer: Any, messages: list[dict], rendered: str, origin: str) -> list[tuple[int, int]]:
    """Character spans `[start, end)` of each assistant turn in `rendered`.

    A turn starts where the template's generation prompt ends and stops where the rendering of
    the conversation up to that turn stops, so the end-of-turn marker is supervised: the student
    must learn to stop.
    """
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_chat(tokenizer, messages[:index], origin, add_generation_prompt=True)
        through = render_chat(tokenizer, messages[: index + 1], origin)
        # Templates that render earlier turns differently (e.g. dropping past reasoning) break this.
        if not (through.startswith(before) and rendered.startswith(through)):
            raise DataError(
                f"the tokenizer's chat template is not prefix-consistent for data row {origin}, so its assistant "
                "tokens cannot be located; use prompt/response rows or a tokenizer with a prefix-consistent template"
            )
        spans.append((len(before), len(through)))
    return spans


def _within(offsets: Sequence[int], spans: list[tuple[int, int]]) -> bool:
    start, end = offsets
    return any(span_start <= start and end <= span_end for span_start, span_end in spans)


def _to_row(ids: list[int], supervised: list[bool], seq_len: int) -> TokenizedRow:
    labels = [token if keep else IGNORE_INDEX for token, keep in zip(ids, supervised)]
    # Nothing predicts the first token once the trainer shifts labels, so counting it as
    # supervised would overstate the token count and hide rows that add nothing to the loss.
    if labels:
        labels[0] = IGNORE_INDEX
    return TokenizedRow(ids[:seq_len], labels[:seq_len], truncated=len(ids) > seq_len)
