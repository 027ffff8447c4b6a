"""The launch configurations are data: a valid JSON table with a default entry."""
import json

import pytest
import torch

from qra_kernels.triton import config
from qra_kernels.triton.gemm import block_k_for


def test_table_is_valid_and_has_a_default():
    table = json.loads(config.CONFIG_PATH.read_text())
    assert "default" in table
    for name, entry in table.items():
        if name.startswith("_"):
            continue
        assert 1 <= entry["decode_max_m"] <= 16, name
        for regime in config.REGIMES:
            cfg = entry[regime]
            for key, value in cfg.items():
                assert isinstance(value, int) and value > 0, (name, regime, key)
                if key.startswith("BLOCK_"):
                    assert value & (value - 1) == 0, (name, regime, key, "power of two")


def test_cpu_uses_the_default_entry():
    cpu = torch.device("cpu")
    assert config.configs_for(cpu) == json.loads(config.CONFIG_PATH.read_text())["default"]
    assert config.decode_max_m(cpu) == config.configs_for(cpu)["decode_max_m"]
    with pytest.raises(ValueError, match="regime"):
        config.launch_config("prefill", cpu)


@pytest.mark.parametrize("group_size", (32, 64, 128))
@pytest.mark.parametrize("block_k", (32, 64, 128, 256))
def test_block_k_never_splits_a_word_and_tiles_groups(group_size, block_k):
    got = block_k_for(group_size, block_k)
    assert got % 32 == 0 and group_size % got == 0  # one group per tile
    spanning = block_k_for(group_size, block_k, span_groups=True)
    assert spanning == block_k and (group_size % spanning == 0 or spanning % group_size == 0)


@pytest.mark.parametrize("block_k", (16, 48, 0))
def test_bad_block_k_is_rejected(block_k):
    with pytest.raises(ValueError, match="BLOCK_K"):
        block_k_for(64, block_k)


def test_fp32_activations_take_their_own_tiles():
    # tf32x3 dots need smaller tiles to stay out of local memory (the static gate checks it).
    cpu = torch.device("cpu")
    entry = config.configs_for(cpu)
    for regime in ("gemm", "grad_input", "decode"):
        assert config.launch_config(regime, cpu, torch.float32) == entry[f"{regime}_fp32"]
        assert config.launch_config(regime, cpu, torch.bfloat16) == entry[regime]
    assert config.launch_config("lora_grad", cpu, torch.float32) == entry["lora_grad"]
