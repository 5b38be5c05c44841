"""HFRolloutEngine on tiny GPT-2- and Llama-shaped models built here: greedy equals `generate`, each
row's sampling is its own, EOS and truncation are reported, the global RNG is untouched."""

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig
from transformers.generation.logits_process import TopPLogitsWarper

from trainer.rollout.engine import RolloutSettings
from trainer.rollout.hf import HFRolloutEngine, inverse_cdf_draws, top_p_filtered

VOCAB, PAD = 64, 0
PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]


def build(shape: str, vocab: int = VOCAB):
    # A wide initialisation makes a random model's greedy path vary instead of repeating one token.
    if shape == "llama":
        config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                             initializer_range=0.2, bos_token_id=None, eos_token_id=None, pad_token_id=PAD)
    else:
        config = GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                            initializer_range=0.2, bos_token_id=None, eos_token_id=None, pad_token_id=PAD)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()  # `generate` decodes in whatever mode it finds


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request):
    return build(request.param)


def engine(model, eos_ids=(VOCAB - 1,)):
    return HFRolloutEngine(model, list(eos_ids), PAD)


def never_stopping(model):
    return engine(model, [VOCAB + 1])  # an id outside the vocabulary: no row ever stops


def padded(prompts):
    longest = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def generate_greedy(model, prompts, max_new_tokens, eos):
    ids, mask = padded(prompts)
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                         pad_token_id=PAD, eos_token_id=eos)[:, ids.shape[1]:].tolist()
    return [row[: row.index(eos) + 1] if eos in row else row for row in out]


GREEDY = RolloutSettings(max_new_tokens=12, temperature=0)
SAMPLED = RolloutSettings(max_new_tokens=12, temperature=1.0, top_p=0.95)


def test_greedy_equals_generate_token_for_token(model):
    rollouts = engine(model).generate(PROMPTS, [1, 2, 3], GREEDY)
    assert rollouts.tokens == generate_greedy(model, PROMPTS, 12, VOCAB - 1)
    assert len(set(map(tuple, rollouts.tokens))) == len(PROMPTS)  # the rows really differ


def test_greedy_equals_generate_when_a_row_stops_early(model):
    free = never_stopping(model).generate(PROMPTS, [1, 2, 3], GREEDY)
    eos = free.tokens[1][3]  # the second row's 4th token: now it ends there
    rollouts = engine(model, [eos]).generate(PROMPTS, [1, 2, 3], GREEDY)
    assert rollouts.tokens == generate_greedy(model, PROMPTS, 12, eos)
    assert rollouts.tokens[1] == free.tokens[1][: free.tokens[1].index(eos) + 1]
    assert rollouts.stopped_at_eos[1]


def test_eos_stops_a_row_and_is_kept(model):
    free = never_stopping(model).generate(PROMPTS, [1, 2, 3], SAMPLED)
    eos = free.tokens[0][4]
    rollouts = engine(model, [eos]).generate(PROMPTS, [1, 2, 3], SAMPLED)
    first = free.tokens[0].index(eos)
    assert rollouts.tokens[0] == free.tokens[0][: first + 1]
    assert rollouts.tokens[0][-1] == eos and rollouts.stopped_at_eos[0]
    for row, tokens in enumerate(rollouts.tokens):  # every row stops at its first EOS, or runs to the end
        expected = free.tokens[row][: free.tokens[row].index(eos) + 1] if eos in free.tokens[row] else free.tokens[row]
        assert tokens == expected and rollouts.stopped_at_eos[row] == (eos in tokens)


def test_truncation_at_max_new_tokens_is_reported(model):
    settings = RolloutSettings(max_new_tokens=5, temperature=1.0)
    rollouts = engine(model).generate(PROMPTS, [1, 2, 3], settings)
    assert all(len(tokens) == 5 or tokens[-1] == VOCAB - 1 for tokens in rollouts.tokens)
    cut = [len(tokens) == 5 and tokens[-1] != VOCAB - 1 for tokens in rollouts.tokens]
    assert [not stopped for stopped in rollouts.stopped_at_eos] == cut
    assert rollouts.truncated == sum(cut) > 0
    assert rollouts.generated_tokens == sum(map(len, rollouts.tokens))
    assert rollouts.seconds > 0


@pytest.mark.parametrize("settings", [SAMPLED, GREEDY], ids=["sampled", "greedy"])
def test_a_row_writes_the_same_alone_and_in_a_batch(model, settings):
    # Padding changes attention's float sums in the last bits; on these seeds and lengths no draw
    # falls that close to a boundary (see trainer/rollout/hf.py on what is exact).
    batch = engine(model).generate(PROMPTS, [10, 20, 30], settings)
    for row, (prompt, seed) in enumerate(zip(PROMPTS, [10, 20, 30])):
        assert engine(model).generate([prompt], [seed], settings).tokens[0] == batch.tokens[row]
    reordered = engine(model).generate(PROMPTS[::-1], [30, 20, 10], settings)
    assert reordered.tokens == batch.tokens[::-1]


def test_same_seed_same_tokens_other_seed_other_tokens(model):
    first = engine(model).generate(PROMPTS, [1, 2, 3], SAMPLED)
    assert engine(model).generate(PROMPTS, [1, 2, 3], SAMPLED).tokens == first.tokens
    other = engine(model).generate(PROMPTS, [4, 5, 6], SAMPLED)
    assert all(a != b for a, b in zip(first.tokens, other.tokens))


def test_the_global_rng_and_the_train_mode_are_untouched(model):
    model.train()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    engine(model).generate(PROMPTS, [1, 2, 3], SAMPLED)
    assert torch.equal(torch.get_rng_state(), before)
    assert all(module.training for module in model.modules())
    model.eval()


def test_the_rollout_runs_in_eval_mode_without_gradients(model, monkeypatch):
    seen = []
    original = type(model).forward

    def watched(self, *args, **kwargs):
        seen.append((self.training, torch.is_grad_enabled()))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", watched)
    model.train()
    rollouts = engine(model).generate(PROMPTS, [1, 2, 3], RolloutSettings(max_new_tokens=4, temperature=0))
    model.eval()
    assert seen and all(state == (False, False) for state in seen)
    # One forward per new token: the prompt once, then one token per step from the KV cache.
    assert len(seen) == max(map(len, rollouts.tokens))


def test_full_distribution_is_sampled_at_top_p_one():
    model = build("llama", vocab=8)
    prompt, draws = [1, 2, 3], 4000
    with torch.no_grad():
        probs = model(torch.tensor([prompt])).logits[0, -1].float().div(0.7).softmax(-1)
    settings = RolloutSettings(max_new_tokens=1, temperature=0.7, top_p=1.0)
    rollouts = never_stopping(model).generate([prompt] * draws, list(range(draws)), settings)
    counts = torch.bincount(torch.tensor([tokens[0] for tokens in rollouts.tokens]), minlength=8).double()
    expected = probs.double() * draws
    chi_square = ((counts - expected) ** 2 / expected).sum().item()
    assert chi_square < 30  # 7 degrees of freedom: p < 1e-4 for a sampler that is right


def test_top_p_filter_is_transformers_nucleus():
    torch.manual_seed(0)
    logits = torch.randn(16, 50) * 3
    for top_p in (0.1, 0.5, 0.9, 0.99):
        expected = TopPLogitsWarper(top_p)(None, logits.clone())
        assert torch.equal(top_p_filtered(logits, top_p), expected)


def test_a_draw_never_lands_on_an_id_without_mass():
    """Zero-mass ids at both ends and between: the fixed-point sums and the search draw only the ids of
    mass, in proportion (an off-by-one in the search would draw a neighbour)."""
    probs = torch.tensor([[0.0, 0.25, 0.0, 0.75, 0.0, 0.0]] * 2000)
    generators = [torch.Generator().manual_seed(seed) for seed in range(len(probs))]
    drawn = inverse_cdf_draws(probs, generators)
    assert set(drawn.tolist()) == {1, 3}
    assert abs((drawn == 3).double().mean().item() - 0.75) < 0.05


def test_nucleus_sampling_draws_only_inside_the_nucleus():
    model = build("llama", vocab=16)
    prompt = [1, 2, 3]
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1:].float()
    inside = set(torch.isfinite(top_p_filtered(logits, 0.5))[0].nonzero().flatten().tolist())
    settings = RolloutSettings(max_new_tokens=1, temperature=1.0, top_p=0.5)
    rollouts = never_stopping(model).generate([prompt] * 300, list(range(300)), settings)
    assert {tokens[0] for tokens in rollouts.tokens} == inside and len(inside) < 16


def test_an_engine_needs_an_eos_and_a_seed_per_prompt(model):
    with pytest.raises(ValueError, match="no EOS token"):
        HFRolloutEngine(model, [], PAD)
    with pytest.raises(ValueError, match="one seed per prompt"):
        engine(model).generate(PROMPTS, [1], GREEDY)
    assert engine(model).generate([], [], GREEDY).tokens == []


@pytest.mark.parametrize("field, value", [("max_new_tokens", 0), ("temperature", -1.0), ("top_p", 0.0)])
def test_bad_settings_are_refused_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        RolloutSettings(**{"max_new_tokens": 4, field: value})


def test_for_tokenizer_stops_at_the_tokenizers_eos_and_the_models_end_of_turn_ids(tmp_path):
    from conftest import build_tokenizer

    tokenizer = build_tokenizer(tmp_path)
    model = build("llama", vocab=len(tokenizer))
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, end_of_turn]
    built = HFRolloutEngine.for_tokenizer(model, tokenizer)
    assert built.eos_ids == sorted({tokenizer.eos_token_id, end_of_turn})
    assert built.pad_id == tokenizer.pad_token_id


def test_a_wrapper_with_a_module_is_decoded_through_its_module(model):
    # As a DeepSpeed engine: the model is its `.module`, and its own forward is never called.
    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.module = inner

        def forward(self, *args, **kwargs):
            raise AssertionError("the rollout must call the wrapped module, not the wrapper")

    wrapped = engine(Wrapper(model)).generate(PROMPTS, [1, 2, 3], SAMPLED)
    assert wrapped.tokens == engine(model).generate(PROMPTS, [1, 2, 3], SAMPLED).tokens


def test_a_lora_student_rolls_out_as_its_generate_does():
    from peft import LoraConfig, get_peft_model

    student = get_peft_model(build("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                        init_lora_weights=False)).eval()
    rollouts = engine(student).generate(PROMPTS, [1, 2, 3], GREEDY)
    assert rollouts.tokens == generate_greedy(student, PROMPTS, 12, VOCAB - 1)
    with student.disable_adapter():  # the adapter is what wrote them
        assert engine(student).generate(PROMPTS, [1, 2, 3], GREEDY).tokens != rollouts.tokens
