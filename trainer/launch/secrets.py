"""Keep the W&B key and the Hugging Face token out of everything a run writes.

Both live in the environment (trainer/secrets.py says which variables), where W&B and
huggingface_hub read them. Nothing of ours prints them, but a library's log line may (an HTTP
error quoting a header, a debug dump of settings): :func:`redact_secrets_in_logs` rewrites every
log record that holds one, whoever logs it. `trainer.config.validate` refuses a config value
holding one, and `trainer.launch.cli` an override, since both are saved with the run and sent to W&B.
"""

from __future__ import annotations

import logging

from trainer.secrets import secret_values

REDACTED = "[redacted]"


def redact(text: str, secrets: dict[str, str]) -> str:
    for name, value in secrets.items():
        text = text.replace(value, f"{REDACTED}:{name}")
    return text


def redact_secrets_in_logs() -> None:
    """Rewrite every log record created from now on, in this process, so it holds no secret.

    A record factory, not a filter: a filter on a logger misses its children's records and one on
    a handler misses handlers added later (Hydra's, W&B's); every record goes through the factory.
    Installing twice is harmless."""
    secrets = secret_values()
    make_record = logging.getLogRecordFactory()
    if not secrets or getattr(make_record, "redacts_secrets", False):
        return

    def redacting_factory(*args, **kwargs):
        record = make_record(*args, **kwargs)
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a malformed call; logging reports it when the record is emitted
            return record
        cleaned = redact(message, secrets)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and record.exc_info[1] is not None:
            # Formatters print the exception's text; keep it from quoting a secret too.
            error = record.exc_info[1]
            if any(value in str(error) for value in secrets.values()):
                record.exc_info, record.exc_text = None, None
                record.msg = f"{record.msg} ({type(error).__name__}: {redact(str(error), secrets)})"
        return record

    redacting_factory.redacts_secrets = True
    logging.setLogRecordFactory(redacting_factory)
