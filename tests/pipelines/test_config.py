import pytest

from pipelines.config import ConfigError, Params, load_params


def write(tmp_path, text):
    p = tmp_path / "params.yaml"
    p.write_text(text)
    return p


def test_repo_params_file_is_valid_and_explicit():
    params = load_params("params.yaml")
    assert params.bootstrapped
    assert params.sft.peft.method == "lora" and params.recipe == ["sft", "dpo"]


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_params(write(tmp_path, "sft:\n  learning_rat: 0.1\n"))
    msg = str(err.value)
    assert "sft.learning_rat: unknown key" in msg
    assert "did you mean 'learning_rate'" in msg


def test_unknown_section_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="sftt: unknown key"):
        load_params(write(tmp_path, "sftt: {}\n"))


def test_bad_value_names_key_and_value(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_params(write(tmp_path, "sft:\n  max_steps: -3\n"))
    assert "sft.max_steps" in str(err.value) and "-3" in str(err.value)


def test_cross_field_checks(tmp_path):
    with pytest.raises(ConfigError, match="min_len"):
        load_params(write(tmp_path, "generate:\n  min_len: 6\n  max_len: 4\n"))
    with pytest.raises(ConfigError, match="divisible"):
        load_params(write(tmp_path, "model:\n  hidden_size: 30\n  num_heads: 4\n"))


def test_gate_threshold_on_undeclared_metric_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="unknown metric"):
        load_params(write(tmp_path, "gate:\n  thresholds:\n    bleu: {min: 0.3}\n"))


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="mapping"):
        load_params(write(tmp_path, "- a\n- b\n"))


def test_every_field_has_a_description():
    def walk(model):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            ann = field.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                walk(ann)

    for name, section in Params.model_fields.items():
        if hasattr(section.annotation, "model_fields"):
            walk(section.annotation)
        else:  # a top-level value such as the recipe
            assert section.description, f"Params.{name} has no description"


def test_real_model_config_is_valid():
    params = load_params("configs/real-model.yaml")
    assert not params.bootstrapped and params.serve.engine == "vllm"
    assert params.sft.deepspeed == "configs/deepspeed/zero2.json" and params.sft.peft.modules_to_save == []
    # Its canary asks for what its error-rate test needs, no less (a smaller value would be raised).
    assert params.canary.step_requests == params.canary.min_step_requests == 255


def test_canary_error_rate_test_is_checked_and_sets_the_step_floor(tmp_path):
    with pytest.raises(ConfigError, match="error_rate_effect .* must exceed error_rate_margin"):
        load_params(write(tmp_path, "canary:\n  error_rate_margin: 0.02\n  error_rate_effect: 0.01\n"))
    coarse = load_params(write(tmp_path, "canary:\n  step_requests: 2\n  error_rate_effect: 0.5\n")).canary
    assert coarse.step_requests == 4, "ceil(ln(1 / 0.1) / ln(0.999 / 0.5)): a floor, raised"


def test_recipe_errors_name_the_step(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown step\(s\) \['dpoo'\]; available: sft, dpo"):
        load_params(write(tmp_path, "recipe: [sft, dpoo]\n"))
    with pytest.raises(ConfigError, match="last step must train the policy"):
        load_params(write(tmp_path, "recipe: [sft, rm]\n"))
    with pytest.raises(ConfigError, match="no 'rm' step comes before 'grpo'"):
        load_params(write(tmp_path, "recipe: [sft, grpo]\ngrpo:\n  rewards: [reward_model]\n"))
    with pytest.raises(ConfigError, match="unknown reward"):
        load_params(write(tmp_path, "grpo:\n  rewards: [exactmatch]\n"))
    with pytest.raises(ConfigError, match="multiple of num_generations"):
        load_params(write(tmp_path, "grpo:\n  batch_size: 10\n  num_generations: 4\n"))
    with pytest.raises(ConfigError, match="sft.peft.method"):
        load_params(write(tmp_path, "sft:\n  peft:\n    method: lorax\n"))
    assert load_params(write(tmp_path, "recipe: [sft, rm, grpo]\ngrpo:\n  rewards: [reward_model, exact_match]\n")).recipe == ["sft", "rm", "grpo"]
