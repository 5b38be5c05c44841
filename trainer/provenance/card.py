"""The adapter's (or model's) README.md: a Hugging Face model card that names the student it adapts,
the teacher it was distilled from, the licences, the obligations the teacher's licence attaches to
the student, and the held-out metrics. peft writes a generic card on save; this one replaces it.
"""

from __future__ import annotations

from pathlib import Path

from trainer.provenance.gate import CardLicence
from trainer.provenance.licences import Decision, describe

# The held-out metrics the card shows, before and after training.
CARD_METRICS = ("eval/kl_to_teacher", "eval/student_ce", "eval/top1_agreement", "eval/exact_match", "eval/teacher_ce")


def card_datasets(sources: dict) -> list[str]:
    """Datasets as a card names them: hub names as given, local files by file name only (a card
    is published; the full paths stay in provenance.json)."""
    names = []
    for source in sources.values():
        for spec in [source] if isinstance(source, (str, Path)) else list(source):
            path = Path(str(spec)).expanduser()
            names.append(path.name if path.exists() else str(spec))
    return names


def write_card(out_dir: Path, *, name: str, student_id: str, student_licence: CardLicence, teacher_id: str,
               decision: Decision, name_ok: bool | None, datasets: list[str], metrics: dict, lora: bool,
               loss_kind: str, steps: int) -> Path:
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(
        base_model=student_id, base_model_relation="adapter" if lora else "finetune",
        library_name="peft" if lora else "transformers", pipeline_tag="text-generation", model_name=name,
        datasets=datasets, tags=["distillation", "knowledge-distillation", *(["lora", "peft"] if lora else [])],
        **{k: v for k, v in student_licence.card_fields().items() if v is not None},
        # Not standard hub fields: the card data keeps them, so tools can read who taught the student.
        teacher=teacher_id, teacher_license=decision.licence,
    )
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + _body(
        name, student_id, teacher_id, decision, name_ok, metrics, lora, loss_kind, steps, student_licence))
    path = Path(out_dir) / "README.md"
    card.save(path)
    return path


def _body(name, student_id, teacher_id, decision: Decision, name_ok, metrics: dict, lora: bool, loss_kind: str,
          steps: int, student_licence: CardLicence) -> str:
    kind = "A LoRA adapter for" if lora else "A fine-tune of"
    lines = [f"# {name}", ""]
    if decision.notice:
        lines += [f"**{decision.notice}**", ""]
    lines += [f"{kind} `{student_id}`, distilled from the teacher `{teacher_id}` (loss `{loss_kind}`, {steps} "
              "optimizer steps) with distill.", "", "## Licences", "",
              f"- Student (base model): {student_licence.card_fields()['license']} ({student_licence.read_from}).",
              f"- Teacher: {decision.licence} ({decision.read_from}): {describe(decision)}"
              + (f"; text: {decision.source}" if decision.source else "") + "."]
    if decision.obligations:
        lines += ["", "### Obligations from the teacher's licence", "", *[f"- {o}" for o in decision.obligations]]
    if name_ok is False:
        lines += ["", f"**This model's name, {name!r}, does not begin with {decision.name_prefix!r}, as the teacher's "
                  "licence requires of a distributed model: rename it before you publish it.**"]
    lines += ["", "## Held-out evaluation", "", "| metric | before | after |", "| --- | ---: | ---: |"]
    for key in CARD_METRICS:
        if key in metrics:
            before = metrics.get(f"initial/{key}")
            lines.append(f"| {key} | {_number(before)} | {_number(metrics[key])} |")
    lines += ["", "## Provenance", "",
              "`provenance.json` beside this card records the sha256 of every weight, tokenizer and data file, the "
              "resolved config, the code's git commit, package versions and devices; its `record_sha256` is the "
              "sha256 of its canonical JSON without that field (`trainer.provenance.record.verify_file`).", ""]
    return "\n".join(lines)


def _number(value) -> str:
    return "" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)
