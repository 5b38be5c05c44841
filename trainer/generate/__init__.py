"""Sequence-level distillation: the teacher writes responses that the student then learns as text.

`python -m trainer.generate generate.prompts=<rows> generate.out=<folder>` (see `responses.py`); the
sampling settings left unset are the teacher's own (`sampling.py`); `prompts.py` reads the prompt
rows and turns each answer into a data row.
"""
