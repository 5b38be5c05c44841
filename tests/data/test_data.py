"""Tests for trainer.data on a character-level tokenizer built here (no downloads)."""

import json

import pyarrow
import pyarrow.parquet
import pytest
import torch

from conftest import CHATML, build_tokenizer, text_of
from trainer.data import examples as examples_module
from trainer.data.batching import collate
from trainer.data.examples import load_examples, split_holdout
from trainer.data.sources import DataError, read_rows
from trainer.data.tokenize import IGNORE_INDEX, TokenizedRow, tokenize_row


def supervised_text(tokenizer, row):
    return text_of(tokenizer, [label for label in row.labels if label != IGNORE_INDEX])


def supervised_runs(tokenizer, row):
    """The supervised stretches of a row, each decoded on its own."""
    runs, current = [], []
    for label in row.labels + [IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            current.append(label)
        elif current:
            runs.append(text_of(tokenizer, current))
            current = []
    return runs


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_parquet(path, rows):
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    return path


# --- tokenize_row ----------------------------------------------------------------------------


def test_prompt_response_supervises_response_and_eos(tokenizer):
    row = tokenize_row({"prompt": "Say hi: ", "response": "hi there"}, tokenizer, 64, "t.jsonl:1")
    assert text_of(tokenizer, row.input_ids) == "<s>Say hi: hi there</s>"
    assert supervised_text(tokenizer, row) == "hi there</s>"
    assert not row.truncated


def test_text_supervises_every_predicted_token(tokenizer):
    row = tokenize_row({"text": "abc"}, tokenizer, 64, "t.jsonl:1")
    assert text_of(tokenizer, row.input_ids) == "<s>abc</s>"
    # The first token is never a target once the trainer shifts labels.
    assert row.labels == [IGNORE_INDEX] + row.input_ids[1:]


def test_a_tokenizer_that_drops_the_text_is_refused():
    """A BPE tokenizer with no unknown token drops what its vocabulary lacks, as transformers'
    Qwen2Tokenizer does with a word-level tokenizer.json's words."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(vocab={"<pad>": 0, "</s>": 1}, merges=[]))
    dropping = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>")
    with pytest.raises(DataError, match=r"turns 'w1 w2' into no tokens at all: it does not fit its model folder"):
        tokenize_row({"text": "w1 w2"}, dropping, 64, "t.jsonl:1")
    assert tokenize_row({"text": "  "}, dropping, 64, "t.jsonl:1").input_ids == [1], "blank text is a row's own matter"


def test_no_bos_when_the_tokenizer_adds_none_by_default(tmp_path):
    tokenizer = build_tokenizer(tmp_path)
    tokenizer.backend_tokenizer.post_processor = None
    row = tokenize_row({"prompt": "p", "response": "r"}, tokenizer, 64, "t.jsonl:1")
    assert text_of(tokenizer, row.input_ids) == "pr</s>"


def test_messages_supervise_only_assistant_turns(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello?"},
        {"role": "assistant", "content": "Hi there."},
        {"role": "user", "content": "Bye?"},
        {"role": "assistant", "content": "Bye."},
    ]
    row = tokenize_row({"messages": messages}, tokenizer, 256, "t.jsonl:1")
    assert text_of(tokenizer, row.input_ids) == tokenizer.apply_chat_template(messages, tokenize=False)
    assert supervised_runs(tokenizer, row) == ["Hi there.<|im_end|>\n", "Bye.<|im_end|>\n"]


def test_messages_without_assistant_turn_have_no_supervised_tokens(tokenizer):
    row = tokenize_row({"messages": [{"role": "user", "content": "Hi"}]}, tokenizer, 64, "t.jsonl:1")
    assert row.num_supervised == 0


def test_messages_need_a_chat_template(tmp_path):
    tokenizer = build_tokenizer(tmp_path, chat_template=None)
    with pytest.raises(DataError, match="no chat template; use prompt/response rows"):
        tokenize_row({"messages": [{"role": "user", "content": "Hi"}]}, tokenizer, 64, "t.jsonl:3")


def test_template_that_is_not_prefix_consistent_is_refused(tmp_path):
    # Writing the number of messages first changes the start of the text with every turn.
    tokenizer = build_tokenizer(tmp_path, chat_template="{{ messages | length }}" + CHATML)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    with pytest.raises(DataError, match="not prefix-consistent for data row t.jsonl:2"):
        tokenize_row({"messages": messages}, tokenizer, 64, "t.jsonl:2")


def test_long_row_is_truncated_and_flagged(tokenizer):
    row = tokenize_row({"text": "x" * 50}, tokenizer, 16, "t.jsonl:1")
    assert len(row.input_ids) == len(row.labels) == 16
    assert row.truncated


def test_row_without_supervised_tokens_after_truncation_is_kept(tokenizer):
    row = tokenize_row({"prompt": "p" * 40, "response": "r"}, tokenizer, 16, "t.jsonl:1")
    assert row.truncated and row.num_supervised == 0


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"foo": 1}, r"data row my.jsonl:7 fits no known format \(expected .*\); got keys \['foo'\]"),
        ({"response": "only a response"}, r"my.jsonl:7 fits no known format .* got keys \['response'\]"),
        ({"prompt": 3}, r"my.jsonl:7 has a 'prompt' of type int; make it a string"),
        ({"prompt": " "}, r"my.jsonl:7 has neither a response nor a prompt to write one to"),
        (["not", "an", "object"], r"my.jsonl:7 fits no known format .* got a list"),
        ({"prompt": 3, "response": "r"}, r"my.jsonl:7 has a 'prompt' of type int; make it a string"),
        ({"text": ["a"]}, r"my.jsonl:7 has a 'text' of type list"),
        ({"messages": []}, r"my.jsonl:7 has 'messages' that is not a non-empty list"),
        ({"messages": [{"role": "user"}]}, r"my.jsonl:7 has messages\[0\] without string 'role' and 'content'"),
        ({"text": "t", "prompt": "p", "response": "r"}, r"my.jsonl:7 fits more than one format"),
    ],
)
def test_malformed_rows_are_named(tokenizer, row, message):
    with pytest.raises(DataError, match=message):
        tokenize_row(row, tokenizer, 64, "my.jsonl:7")


def test_extra_and_null_fields_are_ignored(tokenizer):
    row = tokenize_row({"id": 5, "text": "ab", "prompt": None}, tokenizer, 64, "t.jsonl:1")
    assert text_of(tokenizer, row.input_ids) == "<s>ab</s>"


# --- read_rows -------------------------------------------------------------------------------


def test_jsonl_rows_carry_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n')
    assert read_rows(str(path)) == [(f"{path}:1", {"text": "a"}), (f"{path}:3", {"text": "b"})]


def test_parquet_and_a_list_of_files(tmp_path):
    jsonl = write_jsonl(tmp_path / "a.jsonl", [{"text": "a"}])
    pairs = [{"prompt": "p", "response": "r"}, {"prompt": "q", "response": "s"}]
    parquet = write_parquet(tmp_path / "b.parquet", pairs)
    rows = read_rows([str(jsonl), str(parquet)])
    assert rows == [(f"{jsonl}:1", {"text": "a"}), (f"{parquet}[0]", pairs[0]), (f"{parquet}[1]", pairs[1])]


def test_a_hydra_list_of_files(tmp_path):
    from omegaconf import OmegaConf

    first = write_jsonl(tmp_path / "a.jsonl", [{"text": "a"}])
    second = write_jsonl(tmp_path / "b.jsonl", [{"text": "b"}])
    rows = read_rows(OmegaConf.create({"train": [str(first), str(second)]}).train)
    assert [origin for origin, _ in rows] == [f"{first}:1", f"{second}:1"]


def test_parquet_messages_tokenize(tokenizer, tmp_path):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    parquet = write_parquet(tmp_path / "chat.parquet", [{"messages": messages}])
    [(origin, row)] = read_rows(str(parquet))
    assert supervised_runs(tokenizer, tokenize_row(row, tokenizer, 64, origin)) == ["Yo<|im_end|>\n"]


def test_malformed_json_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(DataError, match=rf"{path}:2 is not valid JSON .*; fix or remove that line"):
        read_rows(str(path))


def test_unknown_row_format_names_file_and_line(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "my.jsonl", [{"text": "a"}, {"foo": "b"}])
    with pytest.raises(DataError, match=rf"data row {path}:2 fits no known format"):
        load_examples(str(path), tokenizer, 64, tmp_path / "cache")


def test_missing_file_says_to_check_the_path(tmp_path):
    with pytest.raises(DataError, match=r"data.train file '.*x.jsonl' does not exist; check the path"):
        read_rows(str(tmp_path / "x.jsonl"), key="data.train")


def test_empty_file_is_an_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(DataError, match="has no rows; add rows"):
        read_rows(str(path))


def test_unsupported_extension_is_an_error(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("text\na\n")
    with pytest.raises(DataError, match="is not a .jsonl or .parquet file; convert it"):
        read_rows(str(path))


def test_plain_folder_and_malformed_name_are_errors(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "a"}])
    with pytest.raises(DataError, match="is not a dataset saved with save_to_disk; point at .jsonl/.parquet files"):
        read_rows(str(tmp_path))
    with pytest.raises(DataError, match="is not a datasets name; write it as name, name:split or name:config:split"):
        read_rows("org/ds:a:b:c")


def test_datasets_name_goes_to_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(*names, split):
        calls.append((names, split))
        return datasets.Dataset.from_list([{"text": "a"}, {"text": "b"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert read_rows("org/ds:validation") == [("org/ds[0]", {"text": "a"}), ("org/ds[1]", {"text": "b"})]
    read_rows("org/ds")
    read_rows("org/ds:main:test")
    assert calls == [(("org/ds",), "validation"), (("org/ds",), "train"), (("org/ds", "main"), "test")]


def test_datasets_load_failure_is_one_line(monkeypatch):
    import datasets

    def failing_load_dataset(*names, split):
        raise ConnectionError("offline\nwith a traceback-like tail")

    monkeypatch.setattr(datasets, "load_dataset", failing_load_dataset)
    with pytest.raises(DataError, match=r"could not load 'org/ds' split 'train' \(offline\); check the name") as caught:
        read_rows("org/ds")
    assert "\n" not in str(caught.value)


def test_saved_dataset_folder_and_split(tmp_path):
    import datasets

    rows = [{"prompt": "p", "response": "r"}]
    datasets.Dataset.from_list(rows).save_to_disk(tmp_path / "single")
    splits = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list([{"text": "t"}])}
    )
    splits.save_to_disk(tmp_path / "splits")
    assert read_rows(str(tmp_path / "single")) == [(f"{tmp_path / 'single'}[0]", rows[0])]
    assert read_rows(str(tmp_path / "splits")) == [(f"{tmp_path / 'splits'}[0]", rows[0])]
    assert read_rows(f"{tmp_path / 'splits'}:test") == [(f"{tmp_path / 'splits'}[0]", {"text": "t"})]
    with pytest.raises(DataError, match=r"has no split 'dev'; pick one of \['test', 'train'\]"):
        read_rows(f"{tmp_path / 'splits'}:dev")


# --- load_examples ---------------------------------------------------------------------------


def test_examples_count_truncation_and_supervision(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "abcdefghijkl"}, {"prompt": "p", "response": "rr"}])
    examples = load_examples(str(path), tokenizer, 8, None)
    assert len(examples) == 2 and examples.origin == str(path)
    assert examples.num_truncated == 1
    assert examples.num_supervised_tokens == 7 + 3  # text after <s>; "rr</s>"
    assert examples.num_unsupervised_rows == 0


def test_second_load_comes_from_cache(tokenizer, tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "ab"}, {"prompt": "p", "response": "r"}])
    first = load_examples(str(path), tokenizer, 64, tmp_path / "cache")

    def must_not_tokenize(*args, **kwargs):
        raise AssertionError("tokenize_row ran although the cache should have answered")

    monkeypatch.setattr(examples_module, "tokenize_row", must_not_tokenize)
    second = load_examples(str(path), tokenizer, 64, tmp_path / "cache")
    assert second.from_cache and not first.from_cache
    assert second.rows == first.rows
    assert [p.suffix for p in (tmp_path / "cache").iterdir()] == [".pt"]  # no temporary file left behind


def test_cache_is_rebuilt_when_the_file_changes(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "ab"}])
    load_examples(str(path), tokenizer, 64, tmp_path / "cache")
    write_jsonl(path, [{"text": "cd"}])
    again = load_examples(str(path), tokenizer, 64, tmp_path / "cache")
    assert not again.from_cache
    assert text_of(tokenizer, again.rows[0].input_ids) == "<s>cd</s>"


def test_cache_is_rebuilt_for_another_seq_len_or_template(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "abcdef"}])
    load_examples(str(path), tokenizer, 64, tmp_path / "cache")
    assert not load_examples(str(path), tokenizer, 4, tmp_path / "cache").from_cache
    other = build_tokenizer(tmp_path / "other", chat_template=CHATML + " ")
    assert not load_examples(str(path), other, 64, tmp_path / "cache").from_cache
    assert load_examples(str(path), tokenizer, 64, tmp_path / "cache").from_cache


def test_damaged_cache_is_rebuilt(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "ab"}])
    first = load_examples(str(path), tokenizer, 64, tmp_path / "cache")
    [cache_file] = (tmp_path / "cache").iterdir()
    cache_file.write_bytes(b"not a torch file")
    again = load_examples(str(path), tokenizer, 64, tmp_path / "cache")
    assert not again.from_cache and again.rows == first.rows


def test_missing_file_is_reported_before_the_cache_is_consulted(tokenizer, tmp_path):
    with pytest.raises(DataError, match="data.eval file .* does not exist"):
        load_examples(str(tmp_path / "gone.jsonl"), tokenizer, 64, tmp_path / "cache", key="data.eval")


# --- split_holdout and collate ---------------------------------------------------------------


def numbered_rows(count):
    return [TokenizedRow([index], [index]) for index in range(count)]


def test_split_is_deterministic_disjoint_and_complete():
    rows = numbered_rows(100)
    train, evaluation = split_holdout(rows, 0.1, seed=3)
    assert (train, evaluation) == split_holdout(rows, 0.1, seed=3)
    assert len(evaluation) == 10
    assert sorted(row.input_ids[0] for row in train + evaluation) == list(range(100))
    assert evaluation != split_holdout(rows, 0.1, seed=4)[1]


def test_split_holds_out_at_least_one_and_keeps_one_for_training():
    assert [len(part) for part in split_holdout(numbered_rows(3), 0.01, seed=0)] == [2, 1]
    assert [len(part) for part in split_holdout(numbered_rows(2), 0.99, seed=0)] == [1, 1]


def test_split_needs_two_rows():
    with pytest.raises(DataError, match="too few to hold one out"):
        split_holdout(numbered_rows(1), 0.1, seed=0)


def test_collate_right_pads():
    rows = [TokenizedRow([5, 6, 7], [IGNORE_INDEX, 6, 7]), TokenizedRow([8], [IGNORE_INDEX])]
    batch = collate(rows, pad_id=0)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "row_index"}
    assert all(batch[key].shape == (2, 3) and batch[key].dtype == torch.long
               for key in ("input_ids", "attention_mask", "labels"))
    assert batch["row_index"].tolist() == [-1, -1], "rows built by hand come from no source"
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [IGNORE_INDEX] * 3]
