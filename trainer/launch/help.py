"""The key table of `--help`: every config key with its meaning, read from the field docs of
`trainer/config.py` (the string under each field), so the page cannot drift from the schema.

`conf/hydra/help/distill.yaml` places it with `${distill_keys:}`, a resolver that Hydra calls when
it renders the help template; it sees the composed config, so each key shows the value the
command line gives it.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import textwrap
from functools import lru_cache
from typing import Iterator

from omegaconf import OmegaConf

RESOLVER = "distill_keys"
_WIDTH = 100


@lru_cache(maxsize=None)
def _docs_by_class() -> dict[str, dict[str, str]]:
    """{class name: {field: its doc}} for every class of trainer/config.py. Python keeps no
    attribute docstrings at run time, so they are read from the source."""
    from trainer import config

    docs: dict[str, dict[str, str]] = {}
    for node in ast.parse(inspect.getsource(config)).body:
        if isinstance(node, ast.ClassDef):
            docs[node.name] = dict(_field_docs(node.body))
    return docs


def _field_docs(body: list[ast.stmt]) -> Iterator[tuple[str, str]]:
    """(field, doc) for each annotated field directly followed by a string."""
    for statement, following in zip(body, body[1:]):
        if (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            yield statement.target.id, " ".join(following.value.value.split())


def field_doc(cls: type, name: str) -> str:
    """The doc of `cls.name`, from the nearest class of its MRO that documents it ('' if none)."""
    docs = _docs_by_class()
    return next((docs[k.__name__][name] for k in cls.__mro__ if name in docs.get(k.__name__, {})), "")


def config_keys(cls: type | None = None, prefix: str = "") -> Iterator[tuple[str, str]]:
    """(dotted key, meaning) of every leaf key of the schema, in its order."""
    from trainer.config import DistillConfig

    cls = cls or DistillConfig
    for field in dataclasses.fields(cls):
        key = f"{prefix}{field.name}"
        factory = field.default_factory
        if factory is not dataclasses.MISSING and dataclasses.is_dataclass(factory):
            yield from config_keys(factory, f"{key}.")
        else:
            yield key, field_doc(cls, field.name)


def key_table(*, _root_=None) -> str:
    """The help's key table: each key with its value under this command line, then its meaning."""
    blocks, group = [], None
    for key, meaning in config_keys():
        if key.split(".")[0] != group and blocks:
            blocks.append("")
        group = key.split(".")[0]
        blocks.append(f"{key}={_value(_root_, key)}")
        blocks.append(textwrap.fill(meaning, _WIDTH, initial_indent="    ", subsequent_indent="    "))
    # Hydra fills the template with string.Template, for which "$" starts a placeholder.
    return "\n".join(blocks).replace("$", "$$")


def _value(root, key: str) -> str:
    if root is None:
        return ""
    try:
        value = OmegaConf.select(root, key, throw_on_missing=True)
    except Exception:  # a missing (???) or unresolvable value: the help still prints
        return "???"
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    return "null" if value is None else json.dumps(value) if isinstance(value, (bool, list, dict)) else str(value)


def register_help_resolver() -> None:
    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, key_table)
