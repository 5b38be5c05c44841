"""The adapter's (or model's) README.md: a Hugging Face model card that names the student it adapts,
the teacher it was distilled from, the licences, the obligations the teacher's licence attaches to
the student, and the held-out metrics. peft writes a generic card on save; this one replaces it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from trainer.preflight.licence_check import CardLicence
from trainer.preflight.licences import Decision, describe

# The held-out metrics the card shows, before and after training (each only where the run has it).
CARD_METRICS = ("eval/kl_to_teacher", "eval/student_ce", "eval/student_ce_per_byte", "eval/top1_agreement", "eval/exact_match", "eval/teacher_ce",
                "eval/onpolicy_kl", "eval/teacher_nll_of_student")


def card_datasets(sources: dict) -> list[str]:
    """Datasets as a card names them: hub names as given, local files by file name only (a card
    is published; the full paths stay in provenance.json)."""
    names = []
    for source in sources.values():
        for spec in [source] if isinstance(source, (str, Path)) else list(source):
            path = Path(str(spec)).expanduser()
            names.append(path.name if path.exists() else str(spec))
    return names


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name, as the hub spells repositories
_HUB_SNAPSHOT = re.compile(r"models--(?P<owner>[^/]+?)--(?P<name>[^/]+)/snapshots/[^/]+/?$")


def card_base_model(student_path: str) -> str:
    """The student as a published card names it: a hub id as given; for a local folder, the hub id it
    came from where that is known (a hub cache snapshot's folder, or a hub id left as `_name_or_path`
    in its config.json), else the folder's name (the full path stays in provenance.json)."""
    folder = Path(os.path.expanduser(student_path))
    if not folder.exists():
        return student_path
    snapshot = _HUB_SNAPSHOT.search(str(folder.resolve()))
    if snapshot:
        return f"{snapshot['owner']}/{snapshot['name']}"
    try:
        recorded = json.loads((folder / "config.json").read_text()).get("_name_or_path", "")
    except (OSError, ValueError):
        recorded = ""
    if isinstance(recorded, str) and _HUB_ID.match(recorded) and not Path(recorded).exists():
        return recorded
    return folder.resolve().name


def write_card(out_dir: Path, *, name: str, student_id: str, student_licence: CardLicence, teacher_id: str,
               decision: Decision, name_ok: bool | None, datasets: list[str], metrics: dict, lora: bool,
               loss_kind: str, steps: int, on_policy: dict, cross_tokenizer: dict | None = None) -> Path:
    """`on_policy`, `cross_tokenizer`: the provenance record's entries (`trainer.outputs.record`)."""
    cross_tokenizer = cross_tokenizer or {"enabled": False}
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(
        base_model=student_id, base_model_relation="adapter" if lora else "finetune",
        library_name="peft" if lora else "transformers", pipeline_tag="text-generation", model_name=name,
        datasets=datasets, tags=["distillation", "knowledge-distillation", *(["lora", "peft"] if lora else []),
                                 *(["on-policy-distillation"] if on_policy["enabled"] else []),
                                 *(["cross-tokenizer-distillation"] if cross_tokenizer["enabled"] else [])],
        **{k: v for k, v in student_licence.card_fields().items() if v is not None},
        # Not standard hub fields: the card data keeps them, so tools can read who taught the student.
        teacher=teacher_id, teacher_license=decision.licence,
    )
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + _body(
        name, student_id, teacher_id, decision, name_ok, metrics, lora, loss_kind, steps, student_licence, on_policy,
        cross_tokenizer))
    path = Path(out_dir) / "README.md"
    card.save(path)
    return path


def _body(name, student_id, teacher_id, decision: Decision, name_ok, metrics: dict, lora: bool, loss_kind: str,
          steps: int, student_licence: CardLicence, on_policy: dict, cross_tokenizer: dict) -> str:
    kind = "A LoRA adapter for" if lora else "A fine-tune of"
    lines = [f"# {name}", ""]
    if decision.notice:
        lines += [f"**{decision.notice}**", ""]
    lines += [f"{kind} `{student_id}`, distilled from the teacher `{teacher_id}` (loss `{loss_kind}`, {steps} "
              f"optimizer steps) with distill{_on_policy_clause(on_policy)}{_cross_tokenizer_clause(cross_tokenizer)}.",
              "", "## Licences", "",
              f"- Student (base model): {student_licence.card_fields()['license']} ({student_licence.read_from}).",
              f"- Teacher: {decision.licence} ({decision.read_from}): {describe(decision)}"
              + (f"; text: {decision.source}" if decision.source else "") + "."]
    if decision.obligations:
        lines += ["", "### Obligations from the teacher's licence", "", *[f"- {o}" for o in decision.obligations]]
    if name_ok is False:
        lines += ["", f"**This model's name, {name!r}, does not begin with {decision.name_prefix!r}, as the teacher's "
                  "licence requires of a distributed model: rename it before you publish it.**"]
    lines += ["", "## How to load", "", *_how_to_load(student_id, lora)]
    lines += ["", "## Held-out evaluation", "", "| metric | before | after |", "| --- | ---: | ---: |"]
    for key in CARD_METRICS:
        if key in metrics:
            before = metrics.get(f"initial/{key}")
            lines.append(f"| {key} | {_number(before)} | {_number(metrics[key])} |")
    lines += ["", "## Provenance", "",
              "`provenance.json` beside this card records the sha256 of every weight, tokenizer and data file, the "
              "resolved config, the code's git commit, package versions and devices; its `record_sha256` is the "
              "sha256 of its canonical JSON without that field (`trainer.outputs.record.verify_file`).", ""]
    return "\n".join(lines)


def _on_policy_clause(on_policy: dict) -> str:
    """How the student's training responses were written: nothing to add for an off-policy run (the
    dataset's responses, as in any distillation); for an on-policy one, λ and the sampling settings."""
    if not on_policy["enabled"]:
        return ""
    sampling = ("greedy" if on_policy["temperature"] == 0  # top-p does nothing then
                else f"temperature {on_policy['temperature']:g}, top-p {on_policy['top_p']:g}")
    return (f", by on-policy distillation (GKD, λ={on_policy['fraction']:g}): the student wrote the responses of "
            f"{on_policy['fraction']:.0%} of its training rows itself ({sampling}, at most "
            f"{on_policy['max_new_tokens']} new tokens) and the teacher scored every token of them")


_CROSS_TOKENIZER_METHODS = {
    "gold": "GOLD: exact divergence over the tokens both vocabularies share, ULD over the rest",
    "uld": "ULD: the two next-token distributions compared sorted by probability",
}


def _cross_tokenizer_clause(cross_tokenizer: dict) -> str:
    """Nothing for a student that shares the teacher's tokenizer; else that it does not, and how the
    two were compared."""
    if not cross_tokenizer["enabled"]:
        return ""
    return (f", across tokenizers ({_CROSS_TOKENIZER_METHODS[cross_tokenizer['method']]}; the two tokenisations "
            "aligned by character offsets)")


def _how_to_load(student_id: str, lora: bool) -> list[str]:
    """A snippet that loads what this card describes (`student_id` is the card's base_model)."""
    where = "" if _HUB_ID.match(student_id) else " (a local folder: provenance.json has its path)"
    if not lora:
        return ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                'model_dir = "path/to/model"  # this folder, or its hub id once uploaded',
                "model = AutoModelForCausalLM.from_pretrained(model_dir)",
                "tokenizer = AutoTokenizer.from_pretrained(model_dir)", "```"]
    return ["```python", "from peft import PeftModel", "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "", 'adapter_dir = "path/to/adapter"  # this folder, or its hub id once uploaded',
            f"base = AutoModelForCausalLM.from_pretrained({json.dumps(student_id)})  # the student it adapts{where}",
            "model = PeftModel.from_pretrained(base, adapter_dir)",
            "tokenizer = AutoTokenizer.from_pretrained(adapter_dir)", "```", "",
            "`model.merge_and_unload()` folds the adapter into the weights (`peft.merge=true` saves that as `merged/`)."]


def _number(value) -> str:
    return "" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)
