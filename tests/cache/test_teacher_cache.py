"""The teacher cache end to end: built once, read by training on 1 and 2 ranks, resumed, refused when it
belongs to another job; teacher-written datasets; API dumps as datasets and caches."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import read_jsonl, run_cli, tiny_overrides, write_jsonl

from trainer.cache.store import CacheReader, read_manifest, write_manifest

pytestmark = pytest.mark.slow

TOP_K = 8  # below the tiny vocabulary (31 ids), so the cache really truncates


def assert_ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-6000:]}"


def assert_user_error(proc, *needles: str) -> str:
    assert proc.returncode == 2, f"exit {proc.returncode}\nSTDERR:\n{proc.stderr[-4000:]}"
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("distill: error:")][-1]
    for needle in needles:
        assert needle in line, line
    return line


def build(tiny, tmp_path, folder: Path, *extra: str, nproc: int = 1):
    args = tiny_overrides(tiny, tmp_path / "build_run", tmp_path / "cache_dir", f"teacher.top_k={TOP_K}",
                          f"teacher.cache={folder}", "teacher.cache_shard_rows=8", *extra)
    return run_cli(args, nproc=nproc, module="trainer.cache")


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.safetensors"))}


@pytest.fixture(scope="module")
def built(tiny, tmp_path_factory) -> Path:
    tmp_path = tmp_path_factory.mktemp("built")
    folder = tmp_path / "teacher_cache"
    assert_ok(build(tiny, tmp_path, folder))
    return folder


def test_cached_values_are_the_teachers_top_k_recomputed(tiny, built):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.data.batching import collate
    from trainer.data.examples import load_examples

    tokenizer = AutoTokenizer.from_pretrained(tiny["student"])
    teacher = AutoModelForCausalLM.from_pretrained(tiny["teacher"]).eval()
    rows = load_examples(tiny["train"], tokenizer, 32, cache_dir=None).rows
    reader = CacheReader(built)
    assert reader.manifest.complete and reader.manifest.splits["train"].rows == len(rows) == 64
    assert reader.manifest.splits["train"].num_shards == 8
    vocab = len(tokenizer)
    for row in rows[:12]:
        batch = collate([row], tokenizer.pad_token_id)
        with torch.no_grad():
            logprobs = torch.log_softmax(teacher(input_ids=batch["input_ids"]).logits[0, :, :vocab].float(), -1)
        positions = [t for t in range(len(row.labels) - 1) if row.labels[t + 1] != -100]
        expected = logprobs[positions].topk(TOP_K, dim=-1)
        cached = reader.row("train", row.index)
        assert cached.ids.dtype == torch.int32 and cached.logprobs.dtype == torch.float16
        assert torch.equal(cached.ids.long(), expected.indices)
        torch.testing.assert_close(cached.logprobs.float(), expected.values, atol=2e-3, rtol=1e-3)
        targets = torch.tensor([row.labels[t + 1] for t in positions])
        torch.testing.assert_close(cached.target_logprobs, logprobs[positions].gather(1, targets[:, None])[:, 0])


def test_an_interrupted_build_resumes_on_two_ranks_and_writes_the_same_files(tiny, built, tmp_path):
    interrupted = tmp_path / "interrupted"
    shutil.copytree(built, interrupted)
    # What a build stopped mid-way leaves: some whole shards, a half-written temporary, an incomplete manifest.
    for shard in ("train/00003.safetensors", "train/00004.safetensors", "train/00007.safetensors", "eval/00000.safetensors"):
        (interrupted / shard).unlink()
    (interrupted / "train" / ".00003.safetensors.x.tmp").write_bytes(b"half a shard")
    manifest = read_manifest(interrupted)
    manifest.complete = False
    write_manifest(interrupted, manifest)
    with pytest.raises(ValueError, match="incomplete"):
        CacheReader(interrupted)

    proc = build(tiny, tmp_path, interrupted, nproc=2)
    assert_ok(proc)
    assert "4 of 10 shards to compute" in proc.stderr + proc.stdout
    assert shard_bytes(interrupted) == shard_bytes(built)
    assert read_manifest(interrupted).complete


def test_a_build_into_a_cache_of_another_key_is_refused_and_nothing_is_overwritten(tiny, built, tmp_path):
    before = shard_bytes(built)
    proc = build(tiny, tmp_path, built, "teacher.top_k=4")
    assert_user_error(proc, "teacher.top_k", "nothing was overwritten")
    proc = build(tiny, tmp_path, built, f"teacher.path={tiny['student']}")
    assert_user_error(proc, "teacher weights")
    assert shard_bytes(built) == before


def test_training_refuses_a_cache_built_for_another_teacher_or_data(tiny, built, tmp_path):
    other_data = write_jsonl(tmp_path / "other.jsonl", read_jsonl(tiny["train"])[:40])
    cases = {
        "teacher weights": [f"teacher.path={tiny['student']}"],
        "data.train": [f"data.train={other_data}"],
        "data.train (or train.seq_len)": ["train.seq_len=24"],
    }
    for needle, extra in cases.items():
        args = tiny_overrides(tiny, tmp_path / needle.split()[0], tmp_path / "c", f"teacher.cache={built}", *extra)
        line = assert_user_error(run_cli(args), needle)
        assert "python -m trainer.cache" in line
    missing = tiny_overrides(tiny, tmp_path / "auto", tmp_path / "empty_cache_dir", "teacher.cache=auto")
    assert_user_error(run_cli(missing), "there is no teacher cache for this teacher, data and teacher.top_k")


def test_training_from_the_cache_on_two_ranks_matches_one_rank_and_loads_no_teacher(tiny, built, tmp_path):
    runs = {}
    for nproc in (1, 2):
        run_dir = tmp_path / f"ranks{nproc}"
        args = tiny_overrides(tiny, run_dir, tmp_path / "c", f"teacher.cache={built}", "deepspeed=zero3",
                              f"train.micro_batch_size={4 // nproc}")
        proc = run_cli(args, nproc=nproc)
        assert_ok(proc)
        logged = proc.stdout + proc.stderr
        assert "teacher parameters held" not in logged and "read from the cache" in logged
        runs[nproc] = run_dir
    summary = json.loads((runs[2] / "summary.json").read_text())
    assert summary["teacher/source"] == "cache" and summary["teacher/cache_top_k"] == TOP_K
    assert summary["teacher/cached_from"]["path"] == str(tiny["teacher"])
    losses = {n: [m["loss"] for m in read_jsonl(d / "metrics.jsonl")] for n, d in runs.items()}
    assert losses[1] == pytest.approx(losses[2], rel=1e-4)
    assert losses[2][-1] < losses[2][0]


def test_a_cache_with_drawn_tails_is_the_same_from_any_ranks_and_refuses_reverse_kl(tiny, tmp_path):
    folders = {}
    for nproc in (1, 2):
        folders[nproc] = tmp_path / f"drawn_on_{nproc}"
        assert_ok(build(tiny, tmp_path, folders[nproc], "teacher.tail_samples=3", nproc=nproc))
    assert shard_bytes(folders[1]) == shard_bytes(folders[2])
    reader = CacheReader(folders[1])
    assert reader.manifest.key["tail_samples"] == 3 and reader.top_k == TOP_K
    for index in range(4):
        row = reader.row("train", index)
        listed_mass = torch.where(row.ids >= 0, row.logprobs.float().exp(), 0.0).sum(dim=-1)
        torch.testing.assert_close(listed_mass, torch.ones_like(listed_mass), atol=1e-2, rtol=0)
    rkl = tiny_overrides(tiny, tmp_path / "rkl", tmp_path / "c", f"teacher.cache={folders[1]}", "loss.kind=rkl")
    assert_user_error(run_cli(rkl), "teacher.tail_samples=3", "loss.kind=srkl")
    fkl = tiny_overrides(tiny, tmp_path / "fkl", tmp_path / "c", f"teacher.cache={folders[1]}")
    assert_ok(run_cli(fkl))
    assert json.loads((tmp_path / "fkl" / "summary.json").read_text())["teacher/source"] == "cache"


def test_a_cache_holding_the_whole_vocabulary_trains_exactly_like_the_online_teacher(tiny, tmp_path):
    """With k >= the vocabulary the cached teacher has no tail, so the sparse loss is the dense one;
    what is left is the float16 rounding of the stored log-probabilities."""
    full = tmp_path / "full"
    assert_ok(build(tiny, tmp_path, full, "teacher.top_k=64"))
    metrics = {}
    variants = {"online": [], "cached": [f"teacher.cache={full}"],
                "cached_full_logits": [f"teacher.cache={full}", "loss.fused=false"]}
    for name, extra in variants.items():
        run_dir = tmp_path / name
        assert_ok(run_cli(tiny_overrides(tiny, run_dir, tmp_path / "c", "loss.kind=jsd", "loss.temperature=2",
                                         "loss.ce_weight=0.3", *extra)))
        metrics[name] = read_jsonl(run_dir / "metrics.jsonl")
        metrics[name + "_summary"] = json.loads((run_dir / "summary.json").read_text())
    for cached in ("cached", "cached_full_logits"):
        for key in ("loss", "kd_loss", "ce_loss", "grad_norm"):
            assert [m[key] for m in metrics[cached]] == pytest.approx([m[key] for m in metrics["online"]], rel=2e-3)
        for key in ("eval/kl_to_teacher", "eval/teacher_ce", "eval/top1_agreement", "eval/student_ce"):
            assert metrics[cached + "_summary"][key] == pytest.approx(metrics["online_summary"][key], rel=5e-3, abs=1e-5)
        # A cache cannot score the student's own responses: the on-policy pair is the online job's only.
        assert "eval/onpolicy_kl" not in metrics[cached + "_summary"]
    assert "eval/onpolicy_kl" in metrics["online_summary"]


def test_a_sweep_over_teacher_cache_finds_the_cache_built_with_the_same_overrides(tiny, tmp_path):
    shared = [f"teacher.path={tiny['teacher']}", f"student.path={tiny['student']}", f"data.train={tiny['train']}",
              f"data.eval={tiny['eval']}", f"cache_dir={tmp_path / 'cache_dir'}", "train.seq_len=32",
              "train.micro_batch_size=4", "logger=none", f"teacher.top_k={TOP_K}"]
    built = run_cli([*shared, f"hydra.run.dir={tmp_path / 'b'}"], module="trainer.cache")
    assert_ok(built)
    folder = Path(built.stdout.strip().splitlines()[-1].split(" ", 1)[1])
    assert folder.parent == tmp_path / "cache_dir" / "teacher_cache"
    sweep = run_cli(["-m", "teacher=cache", *shared, "train.max_steps=2", "loss.temperature=1,2",
                     f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    assert_ok(sweep)
    for point in ("0", "1"):
        summary = json.loads((tmp_path / "sweep" / point / "summary.json").read_text())
        assert summary["teacher/source"] == "cache" and summary["teacher/cache"] == str(folder)


def test_generated_responses_are_the_same_on_one_or_two_ranks_resume_and_train_a_student(tiny, tmp_path):
    def generate(out: Path, nproc: int):
        args = tiny_overrides(tiny, tmp_path / f"g{nproc}", tmp_path / "c", f"generate.prompts={tiny['eval']}",
                              f"generate.out={out}", "generate.max_new_tokens=6", "generate.shard_rows=5",
                              "generate.batch_size=2", "generate.samples_per_prompt=2", "generate.temperature=1.5")
        return run_cli(args, nproc=nproc, module="trainer.generate")

    one, two = tmp_path / "one", tmp_path / "two"
    assert_ok(generate(one, 1))
    assert_ok(generate(two, 2))
    rows = read_jsonl(one / "train.jsonl")
    prompts = [r["prompt"] for r in read_jsonl(tiny["eval"])]
    assert [r["prompt"] for r in rows] == [p for p in prompts for _ in range(2)]
    assert len({r["response"] for r in rows}) > len(rows) // 2, "sampled responses should differ"
    assert (two / "train.jsonl").read_text() == (one / "train.jsonl").read_text()

    # Resume: a lost shard and an unfinished record are completed, to the same bytes.
    (one / "shards" / "00001.jsonl").unlink()
    (one / "train.jsonl").unlink()
    record = json.loads((one / "generation.json").read_text())
    (one / "generation.json").write_text(json.dumps({**record, "complete": False}))
    proc = generate(one, 1)
    assert_ok(proc)
    assert "1 of 4 shards to write" in proc.stdout + proc.stderr
    assert (one / "train.jsonl").read_text() == (two / "train.jsonl").read_text()

    train = tiny_overrides(tiny, tmp_path / "sft", tmp_path / "c", f"data.train={one / 'train.jsonl'}",
                           "data.eval=null", "loss.kind=sft")
    assert_ok(run_cli(train))
    assert json.loads((tmp_path / "sft" / "summary.json").read_text())["eval/tokens"] > 0


def test_generation_into_a_folder_of_other_settings_is_refused(tiny, tmp_path):
    out = tmp_path / "gen"
    base = tiny_overrides(tiny, tmp_path / "g", tmp_path / "c", f"generate.prompts={tiny['eval']}",
                          f"generate.out={out}", "generate.max_new_tokens=4")
    assert_ok(run_cli(base, module="trainer.generate"))
    before = (out / "train.jsonl").read_text()
    proc = run_cli([*base, "generate.temperature=0.5"], module="trainer.generate")
    assert_user_error(proc, "temperature", "nothing was overwritten")
    assert (out / "train.jsonl").read_text() == before


def _api_rows(count: int, with_logprobs: bool) -> list[dict]:
    rows = []
    for index in range(count):
        a, b = 10 + 7 * index, 20 + 3 * index
        row = {"prompt": f"{a}+{b}=", "response": str(a + b)}
        if with_logprobs:
            entries = []
            for digit in row["response"]:
                alternatives = [{"token": d, "logprob": -0.05 if d == digit else -4.0 - int(d) / 10}
                                for d in "0123456789" if d == digit or int(d) % 3 == 0]
                entries.append({"token": digit, "logprob": -0.05, "top_logprobs": alternatives})
            row["logprobs"] = {"content": entries}
        rows.append(row)
    return rows


def test_an_api_dump_without_logprobs_becomes_a_dataset_only(tiny, tmp_path):
    from trainer.cache.from_api import import_dump

    dump = write_jsonl(tmp_path / "dump.jsonl", _api_rows(6, with_logprobs=False))
    report = import_dump(dump, str(tiny["student"]), tmp_path / "out", "some-api-model", seq_len=32)
    assert report["rows_with_logprobs"] == 0 and not (tmp_path / "out" / "cache").exists()
    assert read_jsonl(tmp_path / "out" / "train.jsonl") == read_jsonl(dump)


def test_an_api_dump_with_logprobs_becomes_a_cache_the_trainer_reads(tiny, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny["student"])
    rows = _api_rows(24, with_logprobs=True)
    rows[5]["logprobs"]["content"][0]["token"] = "xx"  # tokens that are not the tokenizer's: text only
    dump = write_jsonl(tmp_path / "dump.jsonl", rows)
    out = tmp_path / "out"
    proc = run_cli([str(dump), "--tokenizer", str(tiny["student"]), "--out", str(out), "--teacher", "api-model",
                    "--seq-len", "32"], module="trainer.cache.from_api")
    assert_ok(proc)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["aligned_rows"] == 23 and report["unaligned_rows"] == 1
    assert "logprobs" not in read_jsonl(out / "train.jsonl")[0]

    reader = CacheReader(out / "cache")
    # k: the most tokens any position lists (the altered row lists "xx" besides its five digits).
    assert reader.manifest.key["teacher"] == "api:api-model" and reader.top_k == 6
    first = reader.row("train", 0)
    response = rows[0]["response"]
    assert first.ids.shape[0] == len(response) + 1  # the digits and the end-of-sequence token
    for position, digit in enumerate(response):
        assert int(first.ids[position, 0]) == tokenizer.convert_tokens_to_ids(digit)
        assert float(first.logprobs[position, 0]) == pytest.approx(-0.05)
        assert float(first.target_logprobs[position]) == pytest.approx(-0.05)
    assert (first.ids[-1] == -1).all(), "the API did not score the end-of-sequence token"
    assert (reader.row("train", 5).ids == -1).all()

    # The API model's licence is stated by no card: the user states it.
    train = tiny_overrides(tiny, tmp_path / "run", tmp_path / "c", "teacher.license=apache-2.0",
                           f"data.train={out / 'train.jsonl'}", "data.eval=null", f"teacher.cache={out / 'cache'}",
                           "teacher.path=null", "loss.ce_weight=0.5")
    proc = run_cli(train)
    assert_ok(proc)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["teacher/cached_from"] == {"api": "api-model", "dump": str(dump)}
    refused = run_cli([*train[:-3], f"teacher.cache={out / 'cache'}", "loss.ce_weight=0.5",
                       f"hydra.run.dir={tmp_path / 'refused'}"])
    assert_user_error(refused, "teacher weights")
