"""Packed sequences: documents fill rows whole, attend only within themselves, and a packed step
computes the loss and gradient of the same documents unpacked."""

from __future__ import annotations

import pytest
import torch
from conftest import read_jsonl, run_cli, tiny_overrides, write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainer.data.examples import load_examples
from trainer.data.packing import collate_packed, document_lengths, pack_rows
from trainer.data.tokenize import TokenizedRow
from trainer.losses.objective import IGNORE_INDEX
from trainer.models import heads
from trainer.models.heads import model_inputs
from trainer.models.loading import ModelError
from trainer.models.probes import check_documents_stay_apart


def documents(lengths: list[int]) -> list[TokenizedRow]:
    rows, token = [], 0
    for index, length in enumerate(lengths):
        ids = list(range(token, token + length))
        rows.append(TokenizedRow(input_ids=ids, labels=ids, index=index))
        token += length
    return rows


def test_every_document_lands_whole_in_one_row_that_fits_it():
    lengths = [9, 3, 7, 7, 1, 5, 10, 2, 4, 6]
    packed = pack_rows(documents(lengths), seq_len=10)
    assert all(len(row.input_ids) <= 10 for row in packed)
    assert sorted(length for row in packed for length in row.doc_lengths) == sorted(lengths)
    assert sorted(token for row in packed for token in row.input_ids) == list(range(sum(lengths)))
    assert len(packed) == 6  # 54 tokens: best fit needs the least possible here
    assert [r.input_ids for r in pack_rows(documents(lengths), 10)] == [r.input_ids for r in packed]


def test_a_documents_first_token_is_no_target_and_positions_restart_at_each_document():
    packed = pack_rows(documents([3, 2]), seq_len=8)
    assert len(packed) == 1 and packed[0].doc_lengths == [3, 2]
    assert packed[0].labels == [IGNORE_INDEX, 1, 2, IGNORE_INDEX, 4]
    batch = collate_packed(packed + pack_rows(documents([4]), 8), pad_id=0)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert document_lengths(batch) == [3, 2, 4]
    assert model_inputs(batch).keys() == {"input_ids", "position_ids", "use_cache"}


def test_packed_documents_give_the_logits_each_gives_alone_and_a_leak_is_refused(tiny, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(tiny["teacher"]).train()
    check_documents_stay_apart("teacher", model, torch.device("cpu"))
    assert model.training  # the probe runs in eval mode and puts the model back as it was
    # The same call with a padding mask is not the packed format: the second document sees the first.
    monkeypatch.setattr(heads, "model_inputs", lambda batch: {"input_ids": batch["input_ids"], "use_cache": False})
    with pytest.raises(ModelError, match="data.pack=false"):
        check_documents_stay_apart("teacher", model, torch.device("cpu"))


@pytest.mark.slow
def test_a_packed_step_has_the_loss_and_gradient_of_the_same_documents_unpacked(tiny, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny["student"])
    data = write_jsonl(tmp_path / "six.jsonl", read_jsonl(tiny["train"])[:6])
    rows = load_examples(data, tokenizer, 64, cache_dir=None).rows
    packed_rows = len(pack_rows(rows, 64))
    assert packed_rows < len(rows)
    first_steps = {}
    for name, rows_per_step, extra in (("unpacked", len(rows), []), ("packed", packed_rows, ["data.pack=true"])):
        run_dir = tmp_path / name
        proc = run_cli(tiny_overrides(tiny, run_dir, tmp_path / "cache", f"data.train={data}", "train.seq_len=64",
                                      "train.max_steps=1", f"train.micro_batch_size={rows_per_step}", *extra))
        assert proc.returncode == 0, proc.stderr[-4000:]
        first_steps[name] = read_jsonl(run_dir / "metrics.jsonl")[0]
    unpacked, packed = first_steps["unpacked"], first_steps["packed"]
    for key in ("loss", "kd_loss", "grad_norm"):
        assert packed[key] == pytest.approx(unpacked[key], rel=1e-5), key
    assert packed["tokens_seen"] == unpacked["tokens_seen"] == sum(len(row.input_ids) for row in rows)
    # The same documents cost the same model FLOPs: attention is counted per document, not per packed row.
    assert packed["tflops_per_s"] / packed["tokens_per_s"] == pytest.approx(
        unpacked["tflops_per_s"] / unpacked["tokens_per_s"], rel=1e-9)
