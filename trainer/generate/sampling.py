"""The teacher's own sampling settings: what `generate.temperature`, `top_p` and `top_k` left null
stand for.

Model authors write the settings that suit their model into its `generation_config.json` (a
reasoning model asks for a temperature near 0.6; a model without `do_sample` is decoded greedily by
transformers' `generate`). A teacher that samples writes its mistakes too (the demo's teacher,
trained to be soft, gets 14% of its sums right at temperature 1 and all of them greedily), so the
default is what its authors chose, not a fixed temperature.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from trainer.models.loading import ModelError

log = logging.getLogger(__name__)

SAMPLING_KEYS = ("temperature", "top_p", "top_k")
GENERATION_CONFIG = "generation_config.json"


def teacher_sampling(folder: Path) -> dict:
    """`temperature` (0: greedy), `top_p` and `top_k` (0: off) as the teacher's generation_config.json
    asks for them; a key it does not write means greedy decoding, no nucleus and no top-k cut."""
    path = folder / GENERATION_CONFIG
    try:
        written = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot read {path} ({error}); fix or delete it, or set generate.temperature, "
                         "generate.top_p and generate.top_k.") from None
    samples = bool(written.get("do_sample"))
    return {
        "temperature": float(written.get("temperature") or 1.0) if samples else 0.0,
        "top_p": float(written.get("top_p") or 1.0),
        "top_k": int(written.get("top_k") or 0),
    }


def fill_sampling(generate, folder: Path, log_it: bool) -> None:
    """Set each of `generate.temperature/top_p/top_k` left null to the teacher's own, and say so."""
    unset = [key for key in SAMPLING_KEYS if generate[key] is None]
    if not unset:
        return
    own = teacher_sampling(folder)
    for key in unset:
        generate[key] = own[key]
    if log_it:
        chosen = ", ".join(f"{key}={own[key]}" for key in unset)
        how = "greedy decoding" if generate.temperature == 0 else "sampling"
        log.info("generate: %s (%s from the teacher's %s; set generate.<key> to choose)", how, chosen,
                 GENERATION_CONFIG)
