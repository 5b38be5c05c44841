"""Distillation losses: pure functions, tested on small random tensors.

- :mod:`.divergence`: the six divergences on full ``[..., V]`` logits (``distill_loss``), the
  reference every other path is tested against.
- :mod:`.sparse`: the same against a sparse teacher (top-k log-probabilities and ids, from a
  cache or an API), with the teacher's missing tail mass as one extra outcome.
- :mod:`.fused`: the loss fused with both LM heads, chunk by chunk, never holding ``[N, V]``
  logits; what the trainer runs by default.
- :mod:`.dense_chunk`, :mod:`.sparse_chunk`: one chunk's sums and logit gradient written out in
  closed form, against a dense or a sparse teacher; :mod:`.workspace`: the buffers chunks share.
- :mod:`.settings`: :class:`LossSettings`, the divergence's settings in one object, and ``IGNORE_INDEX``.
- :mod:`.head`: an LM head's weights and its model's quirks (soft-capping, logit scaling, bias,
  padded vocabulary rows).
- :mod:`.objective`: one micro-batch's training objective (KD + CE) as sums over its supervised
  tokens, divided once per step.
- :mod:`.spans`: :class:`SpanBatch`, a micro-batch's aligned spans as flat index tensors (data -> loss).
- :mod:`.cross_tokenizer`: ULD and GOLD between a student and a teacher with different tokenizers,
  on positions already aligned (spans merged by the chain rule), chunked, on logits or fused with
  both heads; the student's mass on ids the teacher lacks (``unshared_mass``).
- :mod:`.span_sums`: a micro-batch's cross-tokenizer objective (ULD/GOLD over its spans, with the
  spans' continuations, plus the student's CE) as sums, and the evaluation's span terms.
- :mod:`.topk_teacher`: :class:`TopKTeacher`, a cross-tokenizer cache's teacher (top-k per position),
  whose full rows ULD and GOLD read are rebuilt a chunk at a time.
- :mod:`.sorting`: rows sorted in descending order (ULD's and GOLD's sorted distributions), by
  NumPy's vectorised sorts on CPU, five times faster there than ``torch.sort``.
"""

from trainer.losses.cross_tokenizer import SharedVocab, fused_cross_tokenizer_loss, gold_loss, match_vocabularies, shared_vocab, uld_loss, unshared_mass
from trainer.losses.divergence import KINDS, distill_loss, masked_sum, per_token_divergence, validate_loss_params
from trainer.losses.fused import FusedSums, default_chunk_size, fused_distill_loss, fused_sparse_distill_loss, fused_token_sums
from trainer.losses.head import LMHead, head_quirks
from trainer.losses.settings import IGNORE_INDEX, LossSettings
from trainer.losses.sparse import PADDING_ID, SparseTeacher, sparse_distill_loss, sparse_per_token_divergence

__all__ = [
    "SharedVocab", "fused_cross_tokenizer_loss", "gold_loss", "match_vocabularies", "shared_vocab", "uld_loss", "unshared_mass",
    "KINDS", "distill_loss", "masked_sum", "per_token_divergence", "validate_loss_params",
    "FusedSums", "default_chunk_size", "fused_distill_loss", "fused_sparse_distill_loss", "fused_token_sums",
    "LMHead", "head_quirks", "IGNORE_INDEX", "LossSettings", "PADDING_ID", "SparseTeacher", "sparse_distill_loss", "sparse_per_token_divergence",
]
