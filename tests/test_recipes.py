"""The recipes for real hardware: each validates, and its student shape builds on the meta device.

The teachers' configs are written here from their published config.json values, so the
test runs offline.
"""

from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM

from slimlm.adapters import get_adapter
from slimlm.plan import PrunePlan, target_shape, validate_targets
from slimlm.recipe import load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"

TEACHERS = {
    "meta-llama/Llama-3.1-8B": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                    max_position_embeddings=131072, tie_word_embeddings=False),
    "mistralai/Mistral-Nemo-Base-2407": dict(model_type="mistral", vocab_size=131072, hidden_size=5120,
                                             intermediate_size=14336, num_hidden_layers=40, num_attention_heads=32,
                                             num_key_value_heads=8, head_dim=128, max_position_embeddings=128000,
                                             tie_word_embeddings=False),
    "Qwen/Qwen3-8B-Base": dict(model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                               num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                               max_position_embeddings=32768, tie_word_embeddings=False),
}
# (recipe, published parameter count of the student, in billions)
EXPECTED = {
    "llama-3.1-8b-width.yaml": 4.5,
    "llama-3.1-8b-depth.yaml": 4.5,
    "mistral-nemo-12b-to-8b.yaml": 8.4,
    "qwen3-8b-to-5b.yaml": 5.0,
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recipe_validates_and_builds_its_student(name):
    recipe, _ = load_recipe(RECIPES / name)
    kw = dict(TEACHERS[recipe.teacher])
    config = AutoConfig.for_model(kw.pop("model_type"), **kw)
    adapter = get_adapter(config)
    shape = adapter.shape()
    t = recipe.prune
    validate_targets(t, shape)
    new = target_shape(t, shape)
    adapter.validate_shape(new)
    plan = PrunePlan(
        shape, list(range(new.hidden)), list(range(new.layers)),
        {i: list(range(new.ffn)) for i in range(new.layers)},
        {i: list(range(new.heads)) for i in range(new.layers)},
        {i: list(range(new.kv_heads)) for i in range(new.layers)},
    )
    student_config = adapter.new_config(plan)
    with init_empty_weights():
        student = AutoModelForCausalLM.from_config(student_config, dtype=torch.bfloat16)
    n = sum(p.numel() for p in student.parameters())
    assert n == adapter.param_count(new)
    assert abs(n / 1e9 - EXPECTED[name]) < 0.25, n
    assert (RECIPES.parent / recipe.run.accelerate_config).exists()
