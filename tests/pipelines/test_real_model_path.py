"""The real-model code path (base_model = a Hugging Face id or local folder), reached on a CPU
with a tiny model of a real architecture (Qwen2) and a tokenizer that ships without a pad token,
as many released checkpoints do."""

import json
from pathlib import Path

from pipelines import bootstrap, sft
from pipelines.common import base_model_ref
from pipelines.config import ModelParams, PeftParams, SftParams
from tests.conftest import tiny_params


def tiny_qwen2(path: Path) -> Path:
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained("models/base")
    tok.pad_token = None  # like many real checkpoints
    config = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, eos_token_id=tok.eos_token_id)
    Qwen2ForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_sft_on_a_local_real_architecture_model(workspace):
    qwen = tiny_qwen2(workspace / "qwen2-local")
    params = tiny_params(
        model=ModelParams(base_model=str(qwen)),
        sft=SftParams(peft=PeftParams(method="lora", r=4, alpha=8), max_steps=4, batch_size=4, save_steps=2),
    )
    bootstrap.run(params)  # nothing to build: records the choice
    assert json.loads(Path("models/base/SOURCE.json").read_text()) == {"base_model": str(qwen)}
    assert base_model_ref(params) == str(qwen)
    sft.run(params)
    saved = json.loads(Path("models/sft/config.json").read_text())
    assert saved["model_type"] == "qwen2"
    assert json.loads(Path("metrics/sft.json").read_text())["steps"] == 4
