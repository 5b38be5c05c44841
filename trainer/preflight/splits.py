"""The data splits an entry point reads: their sources, their tokenized rows (each split's fingerprint
computed once, with them), and the rows a training job trains and evaluates on."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from trainer.data.examples import Examples, load_examples, split_holdout, supervised_only
from trainer.data.packing import pack_rows
from trainer.data.tokenize import TokenizedRow
from trainer.metric_names import teacher_forced
from trainer.models import checks
from trainer.preflight import onpolicy as onpolicy_checks
from trainer.ranks import RankInfo

log = logging.getLogger(__name__)


def data_sources(data_cfg) -> dict:
    """The job's splits by name: `train`, and `eval` when held-out data is given separately."""
    return {"train": data_cfg.train, **({"eval": data_cfg.eval} if data_cfg.eval else {})}


def load_splits(data_cfg, seq_len: int, cache_dir: Path, tokenizer, tokenizer_hash: str,
                rank: RankInfo, teacher_tokenizer=None) -> dict[str, Examples]:
    """Tokenized rows of each split: rank 0 tokenises and caches in `cache_dir`, then the other ranks
    read the cache. Each split's fingerprint is computed here, once per rank (it names the cache file).
    With `teacher_tokenizer` (distilling across tokenizers) each row is tokenised by both, and aligned."""
    for turn in ("main", "others"):
        if (turn == "main") == rank.is_main:
            splits = {name: load_examples(source, tokenizer, seq_len, cache_dir, key=f"data.{name}",
                                          truncate=data_cfg.truncate, tokenizer_hash=tokenizer_hash,
                                          **({"teacher_tokenizer": teacher_tokenizer} if teacher_tokenizer else {}))
                      for name, source in data_sources(data_cfg).items()}
        dist.barrier()
    return splits


@dataclass
class TrainingRows:
    """What a training job steps and evaluates on."""

    train: list[TokenizedRow]
    """Rows with a token to learn (or, with onpolicy.fraction=1, prompt-only rows with room for a
    response); packed up to train.seq_len with data.pack."""
    eval: list[TokenizedRow]
    """At most data.max_eval_rows held-out rows."""
    eval_split: str
    """The split the held-out rows index (a cache reads them by index): `eval`, or `train` when
    they were held out of the training data."""


def training_rows(splits: dict[str, Examples], data_cfg, train_cfg, onpolicy_cfg,
                  position_limits: dict[str, int | None], is_main: bool) -> TrainingRows:
    """The training rows (held-out part split off when there is no eval split, rows with nothing to
    learn dropped, packed with data.pack) and the held-out rows; warns about rows past a model's
    positions. data.train's rows are first checked against onpolicy.fraction (prompt-only rows only at
    1, a prompt in every row above 0: trainer/preflight/onpolicy.py)."""
    train = splits["train"]
    onpolicy_checks.check_training_rows(train, data_cfg.train, onpolicy_cfg)
    if "eval" in splits:
        train_rows, eval_rows = train.rows, splits["eval"].rows
    else:
        train_rows, eval_rows = split_holdout(train.rows, data_cfg.eval_fraction, train_cfg.seed)
    supervised = supervised_only(train_rows, train_cfg.seq_len, prompts_too=onpolicy_cfg.fraction == 1)
    eval_rows = eval_rows[: data_cfg.max_eval_rows]
    if is_main:  # before packing: a packed row's positions restart at each of its documents
        warn_past_positions(position_limits, [*supervised, *eval_rows])
        onpolicy_checks.warn_about_room(supervised, onpolicy_cfg, train_cfg.seq_len)
        _warn_without_supervised_eval_tokens(eval_rows, train_cfg.metric)
    if len(supervised) < len(train_rows):
        log.warning("data: dropped %d of %d training rows with no token to learn (no response or assistant "
                    "turn, or one cut off by train.seq_len=%d, or a prompt-only row whose prompt fills it)",
                    len(train_rows) - len(supervised), len(train_rows), train_cfg.seq_len)
    packed = _packed(supervised, train_cfg.seq_len) if data_cfg.pack else supervised
    log.info("data: %d training rows (%d truncated to train.seq_len=%d), %d held-out rows",
             len(packed), train.num_truncated, train_cfg.seq_len, len(eval_rows))
    return TrainingRows(packed, eval_rows, "eval" if "eval" in splits else "train")


def _warn_without_supervised_eval_tokens(eval_rows: list[TokenizedRow], metric: str) -> None:
    """Held-out rows that are all prompt-only (or cut off) leave the teacher-forced metrics nothing
    to average: they are NaN (see trainer/train/evaluation.py). Said once at start-up, with what it
    means for train.metric, rather than found in summary.json after the run."""
    if any(row.num_supervised for row in eval_rows):
        return
    named = (f"; train.metric={metric} is one of them, so the job would return NaN to a sweeper: set train.metric "
             "to another" if teacher_forced(metric) else "")
    log.warning("data: no held-out row has a response token (prompt-only rows, or responses cut off by "
                "train.seq_len), so the teacher-forced eval/* metrics will be NaN%s", named)


def _packed(rows: list[TokenizedRow], seq_len: int) -> list[TokenizedRow]:
    packed = pack_rows(rows, seq_len)
    tokens = sum(len(row.input_ids) for row in rows)
    log.info("data: %d training rows packed into %d rows of up to %d tokens (%.0f%% full)", len(rows),
             len(packed), seq_len, 100 * tokens / (len(packed) * seq_len))
    return packed


def warn_past_positions(position_limits: dict[str, int | None], rows: list[TokenizedRow]) -> None:
    """Rows longer than a model without a learned position table was made for (checked on the
    rows, not train.seq_len: the demo's teacher has 128 positions, its rows fewer, seq_len 512)."""
    longest = max((len(row.input_ids) for row in rows), default=0)
    for role, limit in position_limits.items():
        checks.warn_past_positions(role, limit, longest)
