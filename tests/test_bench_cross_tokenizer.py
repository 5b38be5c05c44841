"""scripts/bench_cross_tokenizer.py runs every cell and its chunk breakdown (tiny shape: seconds, not a
measurement), runs the chosen cells only, and times a cell whose estimate exceeds the budget on fewer
rows, saying so."""

import json
import subprocess
import sys

from conftest import REPO

TINY = ["--student-vocab", "300", "--teacher-vocab", "256", "--hidden", "16", "--shared", "200", "--threads", "1"]


def run_bench(tmp_path, *extra):
    out = tmp_path / "bench.json"
    command = [sys.executable, str(REPO / "scripts" / "bench_cross_tokenizer.py"), *TINY, *extra, "--json", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout, json.loads(out.read_text())


def test_every_cell_is_measured_against_the_same_tokenizer_reference(tmp_path):
    stdout, record = run_bench(tmp_path, "--tokens", "64", "--warmup-tokens", "32", "--top-k", "0", "16")
    names = [cell["name"] for cell in record["cells"]]
    assert names == ["same V=300", "same V=256", "uld exact sort", "uld top_k=16", "gold exact sort", "gold top_k=16"]
    for cell in record["cells"]:
        assert not cell["oom"] and cell["tokens"] == 64 and cell["seconds"] > 0 and cell["peak_extra_bytes"] >= 0
    assert record["cells"][0]["time_ratio"] == 1.0 and all(cell["memory_ratio"] >= 0 for cell in record["cells"])
    assert set(record["breakdowns"]) == set(names[2:])
    assert "sorts" in record["breakdowns"]["uld exact sort"] and "topk" in record["breakdowns"]["gold top_k=16"]
    assert sum(line.startswith("| ") for line in stdout.splitlines()) == 1 + len(names)  # the header and one row a cell


def test_a_cell_over_its_budget_is_timed_on_fewer_rows(tmp_path):
    stdout, record = run_bench(tmp_path, "--tokens", "64", "--warmup-tokens", "16", "--cells", "uld exact sort",
                               "--cell-budget-s", "1e-9")
    assert [(cell["name"], cell["tokens"]) for cell in record["cells"]] == [("same V=300", 16), ("uld exact sort", 16)]
    assert "16 (est. " in stdout


def test_each_chunk_size_is_its_own_cell(tmp_path):
    _, record = run_bench(tmp_path, "--tokens", "32", "--warmup-tokens", "16", "--methods", "uld", "--top-k", "0",
                          "--chunk", "3", "32")
    cells = [(cell["name"], cell["chunk"]) for cell in record["cells"]]
    assert cells[2:] == [("uld exact sort chunk=3", 3), ("uld exact sort chunk=32", 32)]
    assert set(record["breakdowns"]) == {"uld exact sort chunk=3", "uld exact sort chunk=32"}
