"""The bootstrapped model's tokenizer, as a plain `tokenizers` BPE: one function, so the
bootstrap stage (which trains it for the model) and the prepare stage (which measures row
lengths in the same tokens before the model exists) train it the same way. It imports no
torch and no transformers: prepare stays light."""

from __future__ import annotations

from collections.abc import Iterable

SPECIAL = {"pad": "<|pad|>", "bos": "<|bos|>", "eos": "<|end|>"}
ROLES = ("<|system|>", "<|user|>", "<|assistant|>")


def train_bpe(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE (every byte is a token, so nothing is ever unknown) trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[*SPECIAL.values(), *ROLES],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok
