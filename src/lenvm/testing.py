"""Tiny random models for tests and quick trials: a 2-layer Llama and a BPE tokenizer.

Everything is built in-process (no downloads) in well under a second.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "List three colors: red, green and blue.",
    "Explain why the sky is blue in one sentence.",
    "What is 12 plus 30? The answer is 42.",
    "Therefore the result follows. Wait, let me check again.",
    "Once upon a time there was a small model that counted tokens.",
    "One two three four five six seven eight nine ten.",
    "Write a short poem about the sea and the wind.",
]


def tiny_tokenizer(vocab_size: int = 256):
    """A byte-level BPE tokenizer with ChatML special tokens, trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def tiny_model(
    path: str | os.PathLike, seed: int = 0, hidden_size: int = 64, layers: int = 2, eos_logit: float = 0.0
) -> Path:
    """Write a tiny random Llama causal LM with a ChatML BPE tokenizer to ``path``.

    ``eos_logit`` > 0 makes EOS about that much more likely than a random token (in logits), so
    that answers end: every embedding gets the same large first coordinate, which the final norm
    turns into a near-constant feature of every hidden state, and EOS's output embedding
    (tied to its input one) weighs that feature more."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    path = Path(path)
    tokenizer = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if eos_logit:
        with torch.no_grad():
            embeddings = model.get_input_embeddings().weight
            embeddings[:, 0] = 1.0  # dominates the residual stream: about sqrt(hidden) after the norm
            embeddings[tokenizer.eos_token_id, 0] += eos_logit / hidden_size**0.5
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
