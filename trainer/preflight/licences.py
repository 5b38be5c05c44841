"""Which teacher licences allow distillation, and the decision for one teacher.

Distilling trains the student on the teacher's outputs. Several model licences speak to exactly
that: some forbid it (outside the licensor's own family), some allow it with duties that bind the
student, most open-source licences say nothing about outputs. The table below encodes our reading
of each text (each entry names its source); it is a guard against an accident, not legal advice.
A licence the table does not know counts as restricted: the user must read it and say so.

Licence ids are the Hugging Face hub's (`license:` of a model card); a card with `license: other`
is known by its `license_name`.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from trainer.errors import UserError

RESTRICTED = "restricted"
"""Distillation is forbidden or limited (e.g. non-commercial); the job stops unless acknowledged."""
OBLIGATIONS = "obligations"
"""Allowed, with duties that bind the student (naming, attribution, passing use restrictions on)."""
PERMISSIVE = "permissive"
"""The licence puts no condition on using the teacher's outputs."""

UNKNOWN = "unknown"
"""The id of a teacher whose licence could not be read (no card, no `license:`, nothing in config)."""


class LicenceError(UserError, ValueError):
    """The teacher's licence does not allow this job as configured; the message says what to do."""


@dataclass(frozen=True)
class Licence:
    id: str
    name: str
    """How messages name it: 'the Llama 3 licence'."""
    kind: str
    source: str
    """URL of the licence text this entry was read from."""
    why: str = ""
    """Restricted: what it forbids, completing '<name> ...'."""
    obligations: tuple[str, ...] = ()
    """Sentences, each a duty the student's publisher takes on."""
    notice: str | None = None
    """A line the student's documentation must show ('Built with Llama')."""
    name_prefix: str | None = None
    """The student's name must begin with this when it is distributed."""
    own_family: tuple[str, ...] = ()
    """Restricted except for a student under one of these licences (the licensor's own models)."""
    example: str = ""
    """When acknowledging is legitimate, for the refusal's hint."""


def _llama_31_plus(version: str, source: str) -> Licence:
    """Llama 3.1 dropped 3.0's ban on improving other models; a model trained on its outputs must
    carry the Llama name and the attribution instead (§1.b.i of each of these texts)."""
    return Licence(
        f"llama{version}", f"the Llama {version} licence", OBLIGATIONS, source,
        obligations=(
            'The student\'s name must begin with "Llama" when it is distributed or made available.',
            'Show "Built with Llama" prominently in the student\'s documentation (its model card does).',
            f"Give recipients a copy of the Llama {version} licence and keep to its Acceptable Use Policy.",
        ),
        notice="Built with Llama", name_prefix="Llama")


_TABLE = (
    Licence("llama2", "the Llama 2 licence", RESTRICTED,
            "https://github.com/meta-llama/llama/blob/main/LICENSE",
            why="forbids using its outputs to improve any other large language model, except Llama 2 and its derivatives",
            obligations=("Give recipients a copy of the Llama 2 licence and keep its Notice file ('Llama 2 is licensed "
                         "under the LLAMA 2 Community License, Copyright (c) Meta Platforms, Inc. All Rights Reserved.').",),
            own_family=("llama2",), example="the student is itself a Llama 2 derivative, or Meta granted you other terms"),
    Licence("llama3", "the Llama 3 licence", RESTRICTED,
            "https://github.com/meta-llama/llama3/blob/main/LICENSE",
            why="forbids using its outputs to improve any other large language model, except Meta Llama 3 and its "
                "derivatives",
            obligations=('The student\'s name must begin with "Llama 3" when it is distributed or made available.',
                         'Show "Built with Meta Llama 3" prominently in the student\'s documentation (its model card '
                         "does), and give recipients a copy of the Llama 3 licence."),
            notice="Built with Meta Llama 3", name_prefix="Llama 3", own_family=("llama3",),
            example="the student is itself a Meta Llama 3 derivative, or Meta granted you other terms"),
    _llama_31_plus("3.1", "https://github.com/meta-llama/llama-models/blob/main/models/llama3_1/LICENSE"),
    _llama_31_plus("3.2", "https://github.com/meta-llama/llama-models/blob/main/models/llama3_2/LICENSE"),
    _llama_31_plus("3.3", "https://github.com/meta-llama/llama-models/blob/main/models/llama3_3/LICENSE"),
    _llama_31_plus("4", "https://github.com/meta-llama/llama-models/blob/main/models/llama4/LICENSE"),
    Licence("tongyi-qianwen", "the Tongyi Qianwen licence", RESTRICTED,
            "https://github.com/QwenLM/Qwen/blob/main/Tongyi%20Qianwen%20LICENSE%20AGREEMENT",
            why="forbids using the model or its outputs to improve any other large language model, except Tongyi "
                "Qianwen and its derivatives",
            obligations=("Give recipients a copy of the Tongyi Qianwen licence; above 100 million monthly active users "
                         "a licence from Alibaba Cloud is needed.",),
            own_family=("tongyi-qianwen",),
            example="the student is itself a Tongyi Qianwen derivative, or Alibaba Cloud granted you other terms"),
    Licence("tongyi-qianwen-research", "the Tongyi Qianwen research licence", RESTRICTED,
            "https://github.com/QwenLM/Qwen/blob/main/Tongyi%20Qianwen%20RESEARCH%20LICENSE%20AGREEMENT",
            why="allows non-commercial research use only",
            example="your work is non-commercial research"),
    Licence("qwen-research", "the Qwen research licence", RESTRICTED,
            "https://huggingface.co/Qwen/Qwen2.5-3B-Instruct/blob/main/LICENSE",
            why="allows use for non-commercial purposes only",
            obligations=('Use the student for non-commercial purposes only, and show "Built with Qwen" or "Improved '
                         'using Qwen" in its documentation.',),
            notice="Built with Qwen", example="your work is non-commercial research"),
    Licence("qwen", "the Qwen licence", OBLIGATIONS,
            "https://huggingface.co/Qwen/Qwen2.5-72B-Instruct/blob/main/LICENSE",
            obligations=('Show "Built with Qwen" or "Improved using Qwen" prominently in the student\'s documentation '
                         "(its model card does).",
                         "Above 100 million monthly active users a licence from Alibaba Cloud is needed."),
            notice="Built with Qwen"),
    Licence("gemma", "the Gemma Terms of Use", OBLIGATIONS, "https://ai.google.dev/gemma/terms",
            obligations=("The student is a Model Derivative of Gemma (a model trained by distillation from Gemma's "
                         "outputs), bound by the Gemma Terms of Use: pass their use restrictions and the Gemma "
                         "Prohibited Use Policy on to everyone you give it to, with a copy of the terms.",
                         "Ship a NOTICE file saying: Gemma is provided under and subject to the Gemma Terms of Use "
                         "found at ai.google.dev/gemma/terms."),
            notice="Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms"),
    Licence("deepseek", "the DeepSeek model licence", OBLIGATIONS,
            "https://github.com/deepseek-ai/DeepSeek-V3/blob/main/LICENSE-MODEL",
            obligations=("The student is a derivative under the DeepSeek model licence: pass its use-based restrictions "
                         "(Attachment A) on in the student's terms and give recipients a copy of the licence.",)),
    Licence("cc-by-nc-4.0", "CC BY-NC 4.0", RESTRICTED, "https://creativecommons.org/licenses/by-nc/4.0/legalcode",
            why="allows non-commercial use only", example="your work and the student's use are non-commercial",
            obligations=("Use the student for non-commercial purposes only and credit the teacher's creators.",)),
    Licence("cc-by-4.0", "CC BY 4.0", PERMISSIVE, "https://creativecommons.org/licenses/by/4.0/legalcode",
            obligations=("Credit the teacher's creators, name its licence (CC BY 4.0) and say that the student was "
                         "trained on its outputs.",)),
    Licence("apache-2.0", "Apache-2.0", PERMISSIVE, "https://www.apache.org/licenses/LICENSE-2.0"),
    Licence("mit", "MIT", PERMISSIVE, "https://opensource.org/license/mit"),
    Licence("bsd-2-clause", "BSD-2-Clause", PERMISSIVE, "https://opensource.org/license/bsd-2-clause"),
    Licence("bsd-3-clause", "BSD-3-Clause", PERMISSIVE, "https://opensource.org/license/bsd-3-clause"),
    Licence("cc0-1.0", "CC0 1.0", PERMISSIVE, "https://creativecommons.org/publicdomain/zero/1.0/legalcode"),
)
LICENCES: dict[str, Licence] = {entry.id: entry for entry in _TABLE}

# Other spellings of the same texts seen on hub cards (Qwen-7B-Chat's license_name; Gemma 1's,
# before the hub had a `gemma` id).
ALIASES = {
    "tongyi-qianwen-license-agreement": "tongyi-qianwen",
    "gemma-terms-of-use": "gemma",
}


def normalise(licence_id: str | None) -> str:
    """The table's id for a hub id as written in a card or config; UNKNOWN for nothing."""
    if licence_id is None or not str(licence_id).strip():
        return UNKNOWN
    cleaned = str(licence_id).strip().lower()
    return ALIASES.get(cleaned, cleaned)


def lookup(licence_id: str) -> Licence | None:
    return LICENCES.get(normalise(licence_id))


def classify(licence_id: str | None) -> str:
    """RESTRICTED, OBLIGATIONS or PERMISSIVE; anything the table does not know is RESTRICTED."""
    entry = lookup(licence_id) if licence_id else None
    return entry.kind if entry else RESTRICTED


@dataclass(frozen=True)
class Decision:
    """Why a teacher may be distilled, and what that binds the student to. Recorded in provenance.json."""

    licence: str
    """The teacher's licence id (normalised), or 'unknown'."""
    kind: str
    read_from: str
    """Where the id came from, in words."""
    allowed_because: str
    """permissive, obligations, own family (the student is the licensor's own), or acknowledged."""
    obligations: tuple[str, ...] = ()
    notice: str | None = None
    name_prefix: str | None = None
    source: str | None = None
    accepted: str | None = None
    """teacher.accept_license as given, when the user acknowledged a restricted licence."""
    student_licence: str | None = None

    def as_record(self) -> dict:
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}


def decide(licence_id: str | None, read_from: str, accept: str | None = None,
           student_licence: str | None = None) -> Decision:
    """The decision for a teacher under `licence_id` (None: unknown). A restricted licence passes only
    when `accept` names it exactly, or when the student is under the licensor's own licence (the
    exception Llama 2, Llama 3 and Tongyi Qianwen make for their own derivatives); else LicenceError."""
    licence = normalise(licence_id)
    entry = LICENCES.get(licence)
    student = normalise(student_licence) if student_licence else None
    common = dict(licence=licence, read_from=read_from, source=entry.source if entry else None,
                  student_licence=student, obligations=entry.obligations if entry else (),
                  notice=entry.notice if entry else None, name_prefix=entry.name_prefix if entry else None)
    if entry is not None and entry.kind != RESTRICTED:
        return Decision(kind=entry.kind, allowed_because=entry.kind, **common)
    if entry is not None and student in entry.own_family:
        return Decision(kind=RESTRICTED, allowed_because="own family", **common)
    if accept is not None and normalise(accept) == licence:
        acknowledged = (f"You acknowledged {licence} with teacher.accept_license={accept}: you confirmed that its "
                        "terms allow this use.",)
        return Decision(kind=RESTRICTED, allowed_because="acknowledged", accepted=accept, **{
            **common, "obligations": common["obligations"] + acknowledged})
    raise LicenceError(refusal(licence, read_from, entry, accept))


def describe(decision: Decision) -> str:
    """Why the teacher was allowed, in a few words, for the model card."""
    return {
        PERMISSIVE: "permissive",
        OBLIGATIONS: "allowed with obligations",
        "own family": f"restricted, but allowed for its own family's models, as the student ({decision.student_licence}) is",
        "acknowledged": f"restricted; the user acknowledged it with teacher.accept_license={decision.accepted}",
    }[decision.allowed_because]


def refusal(licence: str, read_from: str, entry: Licence | None, accept: str | None) -> str:
    """One line: the licence, why it stops the job, and how to go on."""
    mismatch = f" (teacher.accept_license={accept} names another licence)" if accept is not None else ""
    if entry is not None:
        return (f"the teacher's licence is {licence} ({read_from}): {entry.name} {entry.why}; nothing was loaded{mismatch}. "
                f"Set teacher.accept_license={licence} if your use is permitted (e.g. {entry.example}), "
                "or pick a teacher whose licence allows distillation.")
    if licence == UNKNOWN:
        return (f"the teacher's licence is unknown ({read_from}), so distilling it counts as restricted; nothing was "
                f"loaded{mismatch}. Set teacher.license to its id (e.g. apache-2.0) if you know it, or "
                "teacher.accept_license=unknown once you have checked that its terms allow training another model "
                "on its outputs.")
    return (f"the teacher's licence {licence} ({read_from}) is not one distill can classify, so distilling it counts as "
            f"restricted; nothing was loaded{mismatch}. Read its terms, then set teacher.accept_license={licence} if "
            "they allow training another model on its outputs.")


def name_complies(name: str, prefix: str) -> bool:
    """Whether `name` begins with `prefix`, counting spaces, hyphens and underscores as one
    ('Llama-3-tiny' begins with 'Llama 3')."""
    def canonical(text: str) -> str:
        return re.sub(r"[\s_-]+", " ", text).strip().lower()

    return canonical(name).startswith(canonical(prefix))
