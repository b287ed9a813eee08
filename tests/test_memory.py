"""The per-device memory table of the README's pod section (its layout is checked against real
shards on 8 host devices in test_sharding.py)."""

import pytest

from pvjax.parallel.memory import (
    KNOWN,
    kv_cache_elements_per_device,
    n_params,
    param_elements_per_device,
    per_device,
    table,
)


@pytest.mark.parametrize(
    "name, published",
    [
        # total_size / 2 of each checkpoint's model.safetensors.index.json (bf16 weights).
        ("qwen2.5-7b", 15_231_233_024 // 2),
        ("llama-3.1-8b", 16_060_522_496 // 2),
        ("llama-3.1-70b", 141_107_412_992 // 2),
    ],
)
def test_parameter_counts_match_the_published_checkpoints(name, published):
    assert n_params(KNOWN[name]) == published


def test_split_follows_the_rule_table():
    cfg = KNOWN["llama-3.1-8b"]
    total = n_params(cfg)
    assert (
        param_elements_per_device(cfg, data=8, model=1) == total
    )  # data parallel replicates weights
    norms = cfg.num_layers * 2 * cfg.hidden_size + cfg.hidden_size  # replicated under every mesh
    assert param_elements_per_device(cfg, data=1, model=8) == (total - norms) // 8 + norms
    # On 7 devices only what divides by 7 splits (Qwen2.5-7B: the query and output projections);
    # the vocabulary (152064), the MLP width (18944) and the 512 kv columns stay whole.
    q = KNOWN["qwen2.5-7b"]
    N, D, F, V, Q, KV = q.num_layers, q.hidden_size, q.intermediate_size, q.vocab_size, 3584, 512
    split = N * D * Q + N * Q + N * Q * D
    whole = 2 * V * D + 2 * N * D * KV + 2 * N * KV + 3 * N * D * F + 2 * N * D + D
    assert split + whole == n_params(q)
    assert param_elements_per_device(q, model=7) == split // 7 + whole
    assert kv_cache_elements_per_device(q, 1, 8, 4, 10) == 2 * 28 * 4 * 10 * 4 * 128
    assert kv_cache_elements_per_device(q, 2, 4, 4, 10) == 2 * 28 * 2 * 10 * 1 * 128


def test_gib_and_table():
    cfg = KNOWN["llama-3.1-70b"]
    r = per_device(cfg, data=1, model=8, batch=8, context=1024)
    assert r["weights_gib"] == pytest.approx(param_elements_per_device(cfg, 1, 8) * 2 / 2**30)
    assert r["kv_cache_gib"] == pytest.approx(2 * 80 * 8 * 1024 * 1 * 128 * 2 / 2**30)
    ft = per_device(cfg, data=1, model=8, use="full_finetune")
    assert ft["kv_cache_gib"] == 0 and ft["total_gib"] == pytest.approx(8 * r["weights_gib"])
    t = table()
    assert t.count("\n") == 2 + 6 - 1 and "Llama-3.1-70B-Instruct" in t
    with pytest.raises(ValueError, match="use must be"):
        per_device(cfg, use="training")
