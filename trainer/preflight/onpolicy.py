"""On-policy distillation's start-up checks (onpolicy.fraction > 0), before any weights load: the
student can stop a rollout, every training row has a prompt to write a response to, and prompt-only
rows come only with onpolicy.fraction=1 (with less, some of their steps would need a response they
do not have)."""

from __future__ import annotations

import logging

from trainer.data.examples import Examples, origin_of
from trainer.data.sources import DataError
from trainer.data.tokenize import TokenizedRow
from trainer.errors import first_line
from trainer.models.files import ModelFiles
from trainer.models.loading import ModelError
from trainer.rollout.prompts import has_prompt, no_prompt_error, prompt_of

log = logging.getLogger(__name__)


def check_student_stops(onpolicy, tokenizer, student: ModelFiles, student_config) -> None:
    """Refuse a student without an EOS id: its rollouts would always run to max_new_tokens. The ids
    are the ones the rollout engine stops at: the tokenizer's EOS and its generation config's."""
    if onpolicy.fraction == 0 or tokenizer.eos_token_id is not None or _generation_eos_ids(student, student_config):
        return
    raise ModelError(f"onpolicy.fraction={onpolicy.fraction} needs a student that can end its response, but its "
                     "tokenizer has no eos_token and its generation config lists no eos_token_id, so a rollout could "
                     f"never stop; set eos_token in {_where(student)}tokenizer_config.json, or onpolicy.fraction=0.")


def _generation_eos_ids(student: ModelFiles, student_config) -> list[int]:
    """`generation_config.json`'s eos_token_id, or (where the folder has none) the one transformers
    derives from config.json, as `from_pretrained` does."""
    from transformers import GenerationConfig

    path = None if student.folder is None else student.folder / "generation_config.json"
    if path is None or not path.is_file():
        found = GenerationConfig.from_model_config(student_config).eos_token_id
    else:
        try:
            found = GenerationConfig.from_pretrained(student.folder).eos_token_id
        except (OSError, ValueError) as err:
            raise ModelError(f"the student's {path} is unreadable ({first_line(err)}); fix it or delete it.") from err
    return [] if found is None else [found] if isinstance(found, int) else list(found)


def _where(student: ModelFiles) -> str:
    return "" if student.folder is None else f"{student.folder}/"


def check_training_rows(train: Examples, source, onpolicy) -> None:
    """Refuse, naming the first (by file and line), a prompt-only row unless onpolicy.fraction=1, and
    a row without a prompt (a text row) when onpolicy.fraction > 0: any row may be drawn for a rollout
    at some step. Checked on the whole of data.train, held-out part included, so the row named does
    not depend on the split."""
    if onpolicy.fraction < 1:
        first = next((row for row in train.rows if row.prompt_only), None)
        if first is not None:
            raise DataError(
                f"data row {origin_of(source, first.index, 'data.train')} has a prompt and no response, which only "
                f"onpolicy.fraction=1 can train on (the student writes every response), not "
                f"onpolicy.fraction={onpolicy.fraction}; give it a response, or set onpolicy.fraction=1")
    if onpolicy.fraction > 0:
        first = next((row for row in train.rows if not has_prompt(row)), None)
        if first is not None:
            raise no_prompt_error(origin_of(source, first.index, "data.train"))


def warn_about_room(rows: list[TokenizedRow], onpolicy, seq_len: int) -> None:
    """Warn when prompts leave fewer than onpolicy.max_new_tokens positions within train.seq_len: their
    rollouts are cut to fit, so they count as truncated. A warning, not a refusal: the tokens that do
    fit are still the student's own and still graded (rows with no room at all are dropped before)."""
    if onpolicy.fraction == 0 or not rows:
        return
    cramped = sum(len(prompt_of(row)) + onpolicy.max_new_tokens > seq_len for row in rows)
    if cramped:
        log.warning("data: %d of %d training rows have prompts that leave fewer than onpolicy.max_new_tokens=%d "
                    "positions within train.seq_len=%d, so their rollouts are cut to fit; raise train.seq_len or "
                    "lower onpolicy.max_new_tokens", cramped, len(rows), onpolicy.max_new_tokens, seq_len)
