"""`python -m trainer.cache.from_api DUMP --tokenizer MODEL --out DIR --teacher NAME`: responses that
came from elsewhere (an API, another framework) as a dataset, plus a teacher cache when the dump
carries per-token log-probabilities.

Each line of DUMP is a data row, `{"prompt", "response"}` or `{"messages": [...]}` (the response is
the last assistant turn), optionally with `"logprobs"` in the OpenAI chat-completions shape: a list
(or `{"content": [...]}`) with one entry per response token,

    {"token": " Paris", "logprob": -0.02, "top_logprobs": [{"token": " Paris", "logprob": -0.02}, ...]}

Writes `DIR/train.jsonl` (the rows without logprobs) and, if any row has logprobs, `DIR/cache/`, a
teacher cache for that file; train with

    python -m trainer data.train=DIR/train.jsonl teacher.cache=DIR/cache teacher.path=null student.path=MODEL

A row's log-probabilities are used only where the API's tokens are, one for one, the tokens MODEL's
tokenizer gives the response (the API's model must share the student's tokenizer); other rows keep
their text and contribute no KD term, and are counted. Positions the API did not score (the
end-of-sequence token) carry no teacher either.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from trainer.cache.store import CacheError, Manifest, RowTopK, SplitInfo, shard_path, write_manifest, write_shard
from trainer.data.examples import load_examples, tokenizer_fingerprint
from trainer.data.sources import DataError, read_rows
from trainer.data.tokenize import encode_text
from trainer.files import write_text_atomically
from trainer.losses import PADDING_ID
from trainer.losses.settings import IGNORE_INDEX
from trainer.models.loading import ModelError, load_tokenizer

log = logging.getLogger(__name__)

SHARD_ROWS = 1024


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        report = import_dump(Path(args.dump), args.tokenizer, Path(args.out), args.teacher, args.seq_len, args.top_k)
    except (DataError, ModelError, CacheError) as error:
        print(f"distill: error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    print(json.dumps(report), flush=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer.cache.from_api", description=__doc__.split("\n\n")[0])
    parser.add_argument("dump", help="JSONL of prompt/response or messages rows, optionally with logprobs")
    parser.add_argument("--tokenizer", required=True, help="the student's model folder or hub id (its tokenizer)")
    parser.add_argument("--out", required=True, help="folder to write train.jsonl and cache/ into (must be new)")
    parser.add_argument("--teacher", required=True, help="the model that wrote the responses, recorded as the teacher")
    parser.add_argument("--seq-len", type=int, default=512, help="train.seq_len of the runs that will read it")
    parser.add_argument("--top-k", type=int, default=0, help="log-probabilities kept per position (0: as many as given)")
    return parser


def import_dump(dump: Path, tokenizer_path: str, out: Path, teacher: str, seq_len: int, top_k: int = 0) -> dict:
    """Write the dataset and, when the dump has logprobs, its cache; returns counts for the log."""
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out} is not empty; nothing was overwritten: choose a new --out folder.")
    tokenizer = load_tokenizer("student", _ModelRef(tokenizer_path))
    entries = [(origin, *_split_row(row, origin)) for origin, row in read_rows(str(dump), key="dump")]
    dataset = out / "train.jsonl"
    write_text_atomically(dataset, "".join(json.dumps(row, ensure_ascii=False) + "\n" for _, row, _ in entries))
    report = {"rows": len(entries), "dataset": str(dataset), "rows_with_logprobs": sum(lp is not None for *_, lp in entries)}
    if report["rows_with_logprobs"]:
        report.update(_write_cache(entries, dataset, tokenizer, out / "cache", teacher, str(dump), seq_len, top_k))
    return report


class _ModelRef:
    """The fields `load_tokenizer` reads from a model config."""

    def __init__(self, path: str):
        self.path, self.revision, self.trust_remote_code = path, None, False


def _split_row(row, origin: str) -> tuple[dict, list | None]:
    """The data row (without logprobs) and the response's per-token entries, if any."""
    if not isinstance(row, dict):
        raise DataError(f"dump row {origin} is not a JSON object; write one object per line.")
    row = dict(row)
    logprobs = row.pop("logprobs", None)
    if isinstance(logprobs, dict):
        logprobs = logprobs.get("content")
    if logprobs is not None and not (isinstance(logprobs, list) and all(
            isinstance(e, dict) and isinstance(e.get("token"), str) and isinstance(e.get("logprob"), (int, float))
            for e in logprobs)):
        raise DataError(f"dump row {origin} has logprobs that are not a list of {{token, logprob, top_logprobs}} "
                        "entries; write them in the OpenAI chat-completions shape or drop them.")
    return row, logprobs


def _response_text(row: dict) -> str:
    if "response" in row:
        return row["response"]
    return row["messages"][-1]["content"]


def _write_cache(entries: list, dataset: Path, tokenizer, folder: Path, teacher: str, dump: str, seq_len: int,
                 top_k: int) -> dict:
    tokenizer_hash = tokenizer_fingerprint(tokenizer)
    examples = load_examples(dataset, tokenizer, seq_len, cache_dir=None, key="data.train", tokenizer_hash=tokenizer_hash)
    rows = examples.rows
    k = top_k or max(len(_listed_tokens(e)) for _, _, lp in entries if lp for e in lp)
    pieces = _piece_ids(tokenizer)
    cached, aligned_rows, positions = [], 0, 0
    for (origin, row, logprobs), tokenized in zip(entries, rows):
        row_topk, used = _row_top_k(tokenized, row, logprobs, tokenizer, pieces, k)
        cached.append(row_topk)
        aligned_rows += used > 0
        positions += used
    unaligned = sum(lp is not None for *_, lp in entries) - aligned_rows
    if unaligned:
        log.warning("from_api: %d rows with logprobs did not align with the tokenizer's tokens; they train on text only.",
                    unaligned)
    manifest = Manifest(
        key={"teacher": f"api:{teacher}", "tokenizer": tokenizer_hash, "top_k": k},
        teacher={"api": teacher, "dump": dump}, dtype="float32", vocab_size=len(tokenizer),
        splits={"train": SplitInfo(data=examples.fingerprint,
                                   source=str(dataset), rows=len(rows), shard_rows=SHARD_ROWS)},
    )
    for shard in range(manifest.splits["train"].num_shards):
        write_shard(shard_path(folder, "train", shard), cached[shard * SHARD_ROWS:(shard + 1) * SHARD_ROWS], torch.float32)
    manifest.complete = True
    write_manifest(folder, manifest)
    return {"cache": str(folder), "top_k": k, "aligned_rows": aligned_rows, "unaligned_rows": unaligned,
            "scored_positions": positions}


def _listed_tokens(entry: dict) -> set:
    """The sampled token and its alternatives: the tokens whose log-probability the API gave."""
    return {entry["token"]} | {alternative.get("token") for alternative in entry.get("top_logprobs") or []}


def _piece_ids(tokenizer) -> dict[str, int]:
    """Each token's decoded text -> its id, for the texts exactly one token decodes to (APIs report text,
    not ids; byte pieces that decode to a replacement character are ambiguous and left out)."""
    seen: dict[str, list[int]] = {}
    for token_id in range(len(tokenizer)):
        seen.setdefault(tokenizer.decode([token_id]), []).append(token_id)
    return {piece: ids[0] for piece, ids in seen.items() if len(ids) == 1}


def _row_top_k(tokenized, row: dict, logprobs: list | None, tokenizer, pieces: dict, k: int) -> tuple[RowTopK, int]:
    """The row's cached teacher (all padding where the API said nothing) and how many positions it scored."""
    supervised_targets = [label for label in tokenized.labels[1:] if label != IGNORE_INDEX]
    count = len(supervised_targets)
    values = torch.zeros(count, k)
    ids = torch.full((count, k), PADDING_ID, dtype=torch.int32)
    target_logprobs = torch.zeros(count)
    start = _response_start(supervised_targets, row, logprobs, tokenizer) if logprobs else None
    if start is None:
        return RowTopK(values, ids, target_logprobs), 0
    used = min(len(logprobs), count - start)
    for offset, entry in enumerate(logprobs[:used]):
        listed = {supervised_targets[start + offset]: float(entry["logprob"])}
        for alternative in entry.get("top_logprobs") or []:
            token_id = pieces.get(alternative.get("token"))
            if token_id is not None:
                listed.setdefault(token_id, float(alternative["logprob"]))
        best = sorted(listed.items(), key=lambda item: -item[1])[:k]
        ids[start + offset, :len(best)] = torch.tensor([token_id for token_id, _ in best], dtype=torch.int32)
        values[start + offset, :len(best)] = torch.tensor([value for _, value in best])
        target_logprobs[start + offset] = float(entry["logprob"])
    return RowTopK(values, ids, target_logprobs), used


def _response_start(supervised_targets: list[int], row: dict, logprobs: list, tokenizer) -> int | None:
    """Where the response's tokens begin among the row's supervised targets, if the API's tokens are
    exactly the tokenizer's tokens of the response; None otherwise."""
    response_ids = encode_text(tokenizer, _response_text(row))
    if [tokenizer.decode([token_id]) for token_id in response_ids] != [entry["token"] for entry in logprobs]:
        return None
    # The response is the last supervised span; search from the end (a chat row supervises earlier turns too).
    for start in range(len(supervised_targets) - len(response_ids), -1, -1):
        if supervised_targets[start:start + len(response_ids)] == response_ids:
            return start
    return None


if __name__ == "__main__":
    main()
