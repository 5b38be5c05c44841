"""The demo's cross-tokenizer student: the demo student re-headed for a tokenizer of its own.

Its tokenizer has the teacher's characters and specials plus every two-digit pair "00".."99" as one
token, with every id different from the teacher's, so distilling into it needs a cross-tokenizer
loss (`loss.cross_tokenizer`). It is built from the finished demo assets into a cache folder of its
own, on first use, so the base demo's fingerprint and build time stay as they were.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from trainer.demo.assets import COMPLETE_MARKER, DemoAssets, build_atomically, is_complete, write_model_card
from trainer.demo.tokenizer import BOS, CHAT_CHARS, CHAT_TEMPLATE, EOS, IM_END, IM_START, PAD, SPECIAL_TOKENS, \
    TASK_CHARS, UNK

# Bump when the code below changes what it builds, so an old cross student is not reused.
CROSS_VERSION = 1

DIGIT_PAIRS = tuple(f"{n:02d}" for n in range(100))


def build_pair_tokenizer() -> PreTrainedTokenizerFast:
    """The demo's characters plus each two-digit pair as one token; `add_special_tokens=True`
    prepends <s>, as the teacher's tokenizer does.

    Ids run characters, pairs, specials: no token shares its id with the teacher's tokenizer, which
    puts specials first, so code that mixes up the two vocabularies fails on the demo too.
    Characters come before pairs because a doubled digit's pair ("77") starts with exactly its
    digit's row (see `reheaded_rows`): the two tie, and greedy decoding (argmax) takes the lower id.
    """
    alphabet = sorted(set(TASK_CHARS + CHAT_CHARS))
    vocab = {token: i for i, token in enumerate([*alphabet, *DIGIT_PAIRS, *SPECIAL_TOKENS])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Two digits in a row are one word, from the left ("347" is "34", "7"); any other character,
    # newline included, is a word of its own.
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"\d\d|[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END], padding_side="right",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def row_sources(new_vocab: dict[str, int], old_vocab: dict[str, int]) -> dict[int, list[int]]:
    """{new id: the old ids its embedding row is made from}: a token both vocabularies hold, its
    own row; a token the old one lacks, the rows of its characters."""
    sources = {}
    for token, new_id in new_vocab.items():
        parts = [token] if token in old_vocab else list(token)
        missing = [part for part in parts if part not in old_vocab]
        if missing:
            raise ValueError(f"the new token {token!r} has characters {missing} the old vocabulary lacks; "
                             "give the old tokenizer those characters or drop the token.")
        sources[new_id] = [old_vocab[part] for part in parts]
    return sources


def reheaded_rows(old_rows: torch.Tensor, sources: dict[int, list[int]]) -> torch.Tensor:
    """[len(sources), hidden] rows: each the mean of its source rows of `old_rows` [old vocab, hidden].

    The mean keeps a pair's row at the scale of a character's. As an input it reads as a blend of
    its two digits. As an output (the demo ties the head to the embedding) its logit is the mean of
    its digits' logits, never above the larger, so greedy decoding never prefers a pair to every
    character (a doubled digit ties with its digit; the tokenizer's id order settles that): the
    untrained student writes a character at a time, and training teaches it the pairs.
    """
    rows = torch.empty(len(sources), old_rows.shape[1], dtype=old_rows.dtype)
    for new_id, old_ids in sources.items():
        rows[new_id] = old_rows[old_ids].mean(dim=0)
    return rows


def reheaded_student(student, old_tokenizer, new_tokenizer):
    """A copy of `student` whose embedding (and LM head) rows follow `new_tokenizer`'s vocabulary."""
    sources = row_sources(new_tokenizer.get_vocab(), old_tokenizer.get_vocab())
    model = copy.deepcopy(student)
    embedding = nn.Embedding.from_pretrained(
        reheaded_rows(student.get_input_embeddings().weight.detach(), sources),
        freeze=False, padding_idx=new_tokenizer.pad_token_id,
    )
    model.set_input_embeddings(embedding)
    head = nn.Linear(embedding.embedding_dim, len(sources), bias=False)
    if model.config.tie_word_embeddings:
        head.weight = embedding.weight
    else:
        head.weight.data.copy_(reheaded_rows(student.get_output_embeddings().weight.detach(), sources))
    model.set_output_embeddings(head)
    _point_config_at(model, new_tokenizer)
    return model.eval()


def _point_config_at(model, tokenizer) -> None:
    """The vocabulary size and special ids the config and generation config carry, as `tokenizer` has them."""
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    model.config.vocab_size = len(tokenizer)
    for config in (model.config, model.generation_config):
        for name, value in ids.items():
            setattr(config, name, value)


def cross_student_folder(assets: DemoAssets, cache_dir: str | Path) -> Path:
    """`cache_dir/demo-cross-tokenizer-<hash of CROSS_VERSION and the demo build it derives from>`."""
    demo_build = assets.student_path.parent.name  # names the demo recipe's fingerprint
    payload = json.dumps({"version": CROSS_VERSION, "demo": demo_build}, sort_keys=True)
    return Path(cache_dir) / f"demo-cross-tokenizer-{hashlib.sha256(payload.encode()).hexdigest()[:16]}"


def build_cross_tokenizer_student(assets: DemoAssets, cache_dir: str | Path, *, log=print) -> Path:
    """The cross-tokenizer student's model folder, derived from `assets`: built on the first call (a
    second or two), found in the cache after that."""
    final = cross_student_folder(assets, cache_dir)
    if not is_complete(final):
        log(f"Building the demo's cross-tokenizer student in {final} from {assets.student_path}.")
        build_atomically(final, lambda staging: _build_into(staging, assets))
    return final / "student"


def _build_into(folder: Path, assets: DemoAssets) -> None:
    """Write the re-headed student, its tokenizer and card into `folder`, the completion marker last."""
    student = AutoModelForCausalLM.from_pretrained(assets.student_path)
    tokenizer = build_pair_tokenizer()
    cross = reheaded_student(student, AutoTokenizer.from_pretrained(assets.student_path), tokenizer)
    path = folder / "student"
    cross.save_pretrained(path)
    tokenizer.save_pretrained(path)
    write_model_card(path, "cross-tokenizer student", (
        "The demo student (the demo teacher with half of its layers dropped) re-headed for a tokenizer "
        "that also writes every two-digit pair as one token: rows of shared tokens are the teacher's, a "
        "pair's is the mean of its two digits'."))
    (folder / "source.json").write_text(json.dumps({"version": CROSS_VERSION, "demo_student": str(assets.student_path)}))
    (folder / COMPLETE_MARKER).write_text(f"derived_from={assets.student_path.parent.name}\n")
