"""The GPU kit: installable beside a cluster's own torch, and scripts/gpu/check.sh working at tiny
shapes on the CPU (`--cpu`), so that the check a GPU machine runs once cannot rot unnoticed."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import pytest
from conftest import REPO
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

SECTIONS = ("correctness", "liger_shape", "end_to_end", "onpolicy")


def project_requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = [r for group in project["optional-dependencies"].values() for r in group]
    return [Requirement(r) for r in project["dependencies"] + extras]


def constraints() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    return pins


def test_pyproject_states_ranges_so_pip_keeps_a_cluster_s_own_torch():
    requirements = {canonicalize_name(r.name): r for r in project_requirements()}
    assert not [str(r) for r in requirements.values() if any(s.operator == "==" for s in r.specifier)], \
        "exact pins belong in constraints.txt"
    # The GPU image the check runs on: torch 2.11+cu130, transformers 5.17.
    assert requirements["torch"].specifier.contains("2.11.0+cu130") and requirements["torch"].specifier.contains("2.13.0")
    assert requirements["transformers"].specifier.contains("5.17.0")
    assert not requirements["transformers"].specifier.contains("6.0.0")


def test_constraints_pin_every_requirement_inside_its_range():
    pins = constraints()
    for requirement in project_requirements():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement.name} is not pinned in constraints.txt"
        assert requirement.specifier.contains(pins[name]), f"{name}=={pins[name]} is outside {requirement}"
    assert pins["torch"] == "2.13.0", "CI's CPU build of torch"


def test_setup_installs_the_pinned_versions():
    setup = (REPO / "scripts" / "setup.sh").read_text()
    assert re.search(r"pip install .*-c constraints\.txt .*-e \"\.\[dev\]\"", setup)
    assert "constraints.txt" in setup.split("exit 0")[0], "a changed constraints.txt reinstalls"


def test_every_wheel_the_gpu_machine_gets_is_pinned():
    script = (REPO / "scripts" / "gpu" / "wheels.sh").read_text()
    names = [n for array in ("BINARY", "SOURCE_ONLY")
             for n in re.search(rf"^{array}=\(([^)]*)\)", script, re.M).group(1).split()]
    assert {"deepspeed", "hydra-core", "omegaconf", "antlr4-python3-runtime", "trl"} <= set(names)
    pins = constraints()
    assert [n for n in names if canonicalize_name(n) not in pins] == []


def test_other_contenders_get_model_rates_from_ours():
    sys.path.insert(0, str(REPO / "scripts"))
    from bench_e2e import add_model_rates

    summary = {"ours": {"tokens_per_s": 2000.0, "tflops_per_s": 400.0, "mfu": 0.4},
               "trl": {"tokens_per_s": 1000.0}, "minimal": {"tokens_per_s": 2500.0}}
    add_model_rates(summary)
    assert summary["trl"]["tflops_per_s"] == pytest.approx(200.0) and summary["trl"]["mfu"] == pytest.approx(0.2)
    assert summary["minimal"]["mfu"] == pytest.approx(0.5)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_the_benchmark_tokenizer_reloads_as_built_whatever_the_model_type(tmp_path, arch):
    """transformers builds a qwen2 folder's tokenizer as its own Qwen2Tokenizer (its pre-tokenizer,
    the folder's vocabulary and merges): a word-level tokenizer came back empty there."""
    sys.path.insert(0, str(REPO / "scripts"))
    from bench_e2e import ARCHS, ALPHABET, SPECIALS, build_tokenizer, text_of, word_count
    from transformers import AutoTokenizer

    vocab = 512
    ARCHS[arch](vocab, 32, 1, 16).save_pretrained(tmp_path)
    build_tokenizer(vocab).save_pretrained(tmp_path)
    word_ids = [0, 25, 26, 400, word_count(vocab) - 1]
    first_word = len(SPECIALS) + len(ALPHABET)
    assert AutoTokenizer.from_pretrained(tmp_path)(text_of(word_ids, vocab))["input_ids"] == \
        [1, *(first_word + i for i in word_ids)]


@pytest.fixture
def check(monkeypatch):
    """scripts/gpu/check.py, imported into this process."""
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")  # else importing it (and bench_loss) restarts the process
    monkeypatch.syspath_prepend(str(REPO / "scripts" / "gpu"))
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    import check

    return check


def test_the_loss_check_fails_a_fused_loss_further_from_float64_than_plain_pytorch(monkeypatch, check):
    """bf16 rounding alone moves TVD's gradient about 5% off float64, so each dtype is judged against plain
    PyTorch's path in that dtype on the same inputs; a fused gradient 5% off must still fail, in both."""
    import bench_loss
    import torch

    rows = check.fused_loss_against_float64(check.CPU_SHAPES, torch.device("cpu"))
    assert all(row["ok"] for row in rows), rows
    assert max(row["grad_hidden_rel_err"] for row in rows if row["kind"] == "tvd" and row["dtype"] == "bfloat16") > 3e-2

    fused_step = bench_loss.fused_step

    def five_percent_off(sh, *rest):
        loss = fused_step(sh, *rest)
        sh.grad.mul_(1.05)
        return loss

    monkeypatch.setattr(bench_loss, "fused_step", five_percent_off)
    rows = check.fused_loss_against_float64(check.CPU_SHAPES, torch.device("cpu"))
    assert not any(row["ok"] for row in rows if row["kind"] != "tvd")
    assert not any(row["ok"] for row in rows if row["dtype"] == "float32")


def test_a_resumed_run_that_parts_before_the_kill_is_blamed_on_the_kernels_not_the_resume(check):
    assert check.cause_of_difference(None) is None
    assert "not deterministic run to run" in check.cause_of_difference(check.KILLED_AFTER_STEP)
    assert "did not restore" in check.cause_of_difference(check.KILLED_AFTER_STEP + 1)


def test_runs_that_skipped_their_updates_are_no_proof_of_a_resume(tmp_path, check):
    """Two runs that skipped every update end at the adapter they started from, equal bit for bit: the
    kill-and-resume row must say they did not train."""
    runs = [tmp_path / "straight", tmp_path / "resumed"]

    def summaries(*skipped):
        for run, count in zip(runs, skipped):
            run.mkdir(exist_ok=True)
            (run / "summary.json").write_text(json.dumps({"train/skipped_steps": count}))

    logged = [(step, 0.5, 0.5, 0.25) for step in range(1, 7)]
    summaries(0, 0)
    assert check.every_update_applied(logged, runs)
    assert not check.every_update_applied([*logged[:5], (6, 0.5, 0.5, math.nan)], runs)
    assert not check.every_update_applied([*logged[:5], (6, 0.5, 0.5, 0.0)], runs)
    summaries(0, 6)
    assert not check.every_update_applied(logged, runs)


def test_liger_failing_on_the_image_costs_its_own_row_not_ours(monkeypatch, check):
    """Liger's Triton kernels meet the GPU image's versions first on the GPU: if they break, the section
    still has ours' and plain PyTorch's figures, and says why Liger's row is empty."""
    import torch

    def broken_liger(*_):
        raise RuntimeError("Triton: no kernel image is available\nsecond line")

    monkeypatch.setattr(check, "liger_unavailable", lambda device: None)
    monkeypatch.setattr(check, "liger_step", broken_liger)
    section = check.liger_shape(None, check.CPU_SHAPES, torch.device("cpu"))
    rows = {row["path"]: row for row in section["paths"]}
    assert section["status"] == "ok"
    assert all(rows[path]["ms"] > 0 and "error" not in rows[path] for path in ("ours (fused)", "plain PyTorch"))
    assert rows[check.LIGER_PATH]["ms"] is None
    assert section["liger"] == "failed: RuntimeError: Triton: no kernel image is available"
    assert "| Liger chunked JSD |" in check.markdown({"device": "cpu", "mode": "m", "started": "s", "python": "3",
                                                      "versions": {}}, {"liger_shape": section})


@pytest.mark.slow
def test_the_check_at_tiny_shapes_on_the_cpu_writes_every_section_with_numbers(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu" / "check.sh"), str(out), "--cpu",
                           "--work", str(tmp_path / "work")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=1600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    sections = report["sections"]
    assert tuple(sections) == SECTIONS
    assert report["versions"]["torch"]

    correctness = sections["correctness"]
    assert correctness["status"] == "ok", correctness
    assert {row["kind"] for row in correctness["fused_loss_vs_float64"]} == {"fkl", "rkl", "jsd", "skl", "srkl", "tvd"}
    fused = correctness["fused_loss_vs_float64"]
    assert sorted({row["dtype"] for row in fused}) == ["bfloat16", "float32"], "the GPU's dtypes, bf16 included"
    assert all(row["loss_rel_err"] < (1e-4 if row["dtype"] == "float32" else 3e-2) for row in fused)
    assert {row["dtype"] for row in correctness["head_parity"]} == {"bfloat16"}
    assert {row["arch"] for row in correctness["head_parity"]} == {"qwen2", "llama"}
    assert correctness["nonfinite_skipping"]["skipped"] == 2
    assert [(r["stage"], r["precision"], r["deterministic"], r["trained"], r["losses_equal"], r["adapter_equal"],
             r["first_differing_step"]) for r in correctness["kill_and_resume"]] == [(3, "bf16", True, True, True, True,
                                                                                       None)]

    liger = sections["liger_shape"]
    assert liger["status"] == "ok" and liger["liger"].startswith("skipped: ")
    assert [row["path"] for row in liger["paths"]] == ["ours (fused)", "plain PyTorch"]
    assert all(row["ms"] > 0 and row["peak_extra_gib"] >= 0 for row in liger["paths"])

    e2e = sections["end_to_end"]
    assert e2e["status"] == "ok", e2e
    assert e2e["precision"] == "bf16", "the GPU's precision, on the CPU too"
    rows = {row["contender"]: row for row in e2e["contenders"]}
    assert {"ours", "minimal"} <= set(rows)
    assert all(row["tokens_per_s"] > 0 and row["tflops_per_s"] > 0 and row["peak_memory_gib"] > 0
               for row in rows.values())
    assert all(row["mfu"] is None for row in rows.values()), "a CPU has no known peak"
    assert "trl" in rows or any(note.startswith("trl skipped: ") for note in e2e["notes"])
    assert all(math.isfinite(g["value"]) for name, g in e2e["goals"].items() if name.startswith("tokens/s"))

    onpolicy = sections["onpolicy"]
    assert onpolicy["status"] == "ok", onpolicy
    assert onpolicy["precision"] == "bf16"
    ours = onpolicy["ours"]
    assert ours["tokens_per_s"] > 0 and 0 < ours["generation_share"] < 1 and ours["generation_tokens_per_s"] > 0
    assert 1 <= ours["mean_rollout_length"] <= 16, "rollouts of at most --max-new-tokens 16"
    assert [row["engine"] for row in onpolicy["rollout_phase"]] == ["ours (HFRolloutEngine)", "bare model.generate"]
    assert all(row["tokens_per_s"] > 0 for row in onpolicy["rollout_phase"])
    md = (out / "gpu_check.md").read_text()
    assert all(f"## {name}: " in md for name in SECTIONS)
    assert "| fkl | float32 |" in md and "| ours |" in md and "| ours (HFRolloutEngine) |" in md
