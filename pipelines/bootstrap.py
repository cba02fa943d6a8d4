"""Stage `bootstrap`: the embedded default base model, built here because nothing can be
downloaded on an offline CPU box.

- a byte-level BPE tokenizer trained with `tokenizers` on the training split,
- a small, randomly initialised Llama from `transformers` (so it knows nothing: base exact
  match is ~0, which is what makes the SFT gain measurable),
- a chat template, saved as an ordinary Hugging Face checkpoint in models/base/.

With a real `model.base_model` (a Hugging Face id or a local directory) nothing is built: the
stage records which model was chosen in models/base/SOURCE.json and later stages load it.
"""

from __future__ import annotations

import pandas as pd
import torch

from pipelines.common import BASE_DIR, PREPARED, log, stage_main, write_json
from pipelines.config import ModelParams, Params
from pipelines.tokenizer import ROLES, SPECIAL, train_bpe
from pipelines.training import OPTIONAL_UNUSED, skip_unused_imports
# Prefix-consistent, so TRL can split prompt and completion by rendering the prompt alone.
CHAT_TEMPLATE = (
    "{%- for m in messages -%}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)


def corpus(frame: pd.DataFrame):
    for messages in frame["messages"]:
        for m in messages:
            yield m["content"]


def train_tokenizer(texts, vocab_size: int):
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=train_bpe(texts, vocab_size),
        pad_token=SPECIAL["pad"],
        bos_token=SPECIAL["bos"],
        eos_token=SPECIAL["eos"],
        additional_special_tokens=list(ROLES),
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"  # decoder-only generation pads on the left
    return fast


def build_model(cfg: ModelParams, tokenizer):
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False, max_new_tokens=32
    )
    return model


def run(params: Params) -> None:
    BASE_DIR.mkdir(parents=True, exist_ok=True)
    if not params.bootstrapped:
        write_json(BASE_DIR / "SOURCE.json", {"base_model": params.model.base_model})
        log.info("base_model=%s: nothing to bootstrap", params.model.base_model)
        return
    skip_unused_imports(*OPTIONAL_UNUSED)  # saving would import DeepSpeed, building the model scikit-learn
    train = pd.read_parquet(PREPARED / "sft_train.parquet")
    tokenizer = train_tokenizer(corpus(train), params.model.vocab_size)
    model = build_model(params.model, tokenizer)
    tokenizer.save_pretrained(BASE_DIR)
    model.save_pretrained(BASE_DIR)
    n = sum(p.numel() for p in model.parameters())
    write_json(BASE_DIR / "SOURCE.json", {"base_model": "bootstrap", "parameters": n, "vocab_size": len(tokenizer)})
    log.info("bootstrapped a %.2f M-parameter Llama with a %d-token BPE tokenizer", n / 1e6, len(tokenizer))


def main() -> None:
    stage_main("bootstrap", run)


if __name__ == "__main__":
    main()
