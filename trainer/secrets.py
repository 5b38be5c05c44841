"""Which environment variables hold secrets (the W&B key, the Hugging Face token), and their values.

W&B and huggingface_hub read them from the environment; nothing a run writes may hold one. This
module only says what a secret is, so the config's check (`trainer.config.validate` refuses a
value holding one) and the launcher's (overrides, log records: trainer/launch/secrets.py) agree.
"""

from __future__ import annotations

import os

SECRET_VARIABLES = ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
# Shorter values are placeholders ("x", "0"), not tokens; masking them would garble every log line.
_MIN_LENGTH = 8


def secret_values() -> dict[str, str]:
    """Variable name -> value of each secret set in the environment."""
    values = {name: os.environ.get(name, "").strip() for name in SECRET_VARIABLES}
    return {name: value for name, value in values.items() if len(value) >= _MIN_LENGTH}
