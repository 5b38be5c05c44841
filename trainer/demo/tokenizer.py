"""A character-level tokenizer for the demo task, built in memory (no download)."""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, IM_START, IM_END)

# Digits and operators for the arithmetic, plus the letters and newline that the chat template
# writes ("system", "user", "assistant"), so chat rows tokenize without <unk>.
TASK_CHARS = "0123456789+=; "
CHAT_CHARS = "\naeimnrstuy"

# ChatML, as Qwen uses it; `add_generation_prompt` opens the assistant turn for sampling.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """One id per character; `add_special_tokens=True` prepends <s> only, as Llama does.

    The caller appends </s> after a response, so the student learns where an answer stops.
    """
    alphabet = sorted(set(TASK_CHARS + CHAT_CHARS))
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *alphabet])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # "[\\s\\S]" matches any character, newline included, so each one becomes its own word.
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()  # join characters back without the spaces WordLevel would add
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END],
        padding_side="right",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
