"""Teacher and student: loading, checks before weights load, LoRA, DeepSpeed engines, heads.

- `loading.py`: tokenizers, configs and weights through `transformers`.
- `checks.py`: files, shapes, positions and vocabulary checked on the meta device.
- `files.py`: where a model setting's files are (the one resolver), safetensors headers and tokenizer
  files, read without loading weights.
- `lora.py`: the student's LoRA targets and adapter. `engines.py`: DeepSpeed engines and configs.
- `optimizer.py`: AdamW that skips a NaN/Inf step on every rank together.
- `heads.py`: hidden states up to the LM head, and the head, for the fused loss.
- `probes.py`: start-up proofs on each model (head parity, packed documents kept apart).
- `teacher.py`: the frozen teacher behind its engine, and `Teacher`, the one interface the step and
  the evaluation use (a model here, a cache in trainer/cache/teacher.py).
"""
