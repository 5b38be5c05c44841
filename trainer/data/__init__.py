"""Training data: rows read from a source, tokenised with a loss mask, cached, split and batched.

- `sources.py`: reading rows (`.jsonl`, `.parquet`, `datasets` folders and hub names).
- `tokenize.py`: one row to token ids and labels, per format (prompt/response, messages, text, and
  prompt-only rows for on-policy distillation).
- `examples.py`: a split's tokenised rows, cached on disk by fingerprint; the held-out split.
- `batching.py`: which rows each rank takes at each step, and collating them.
- `packing.py`: several documents in one row, with position ids that restart at each.
- `alignment.py`: two tokenizers' tokens of one text aligned into spans by character offsets, and
  the share of the student's vocabulary the teacher's holds (distillation across tokenizers).
- `pairing.py`: one row tokenised by both models, their tokens aligned into spans (end markers
  included), the ids whose roles match (eos, end of turn), and collating pairs into a `SpanBatch`.
"""
