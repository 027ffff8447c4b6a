"""DDP and FSDP2 LoRA fine-tuning of a qra model: 2 gloo processes spawned by the test,
results equal to single-process training on the same global batch."""
import os
import sys

import pytest
import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))

pytest.importorskip("peft")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("needs torch.distributed with gloo", allow_module_level=True)


@pytest.fixture(scope="module")
def worker():
    # Spawned children import the worker by plain module name; multiprocessing hands them
    # the parent's sys.path, so putting this folder on it is enough.
    sys.path.insert(0, HERE)
    try:
        import _dist_worker
        yield _dist_worker
    finally:
        sys.path.remove(HERE)


@pytest.fixture(scope="module")
def reference(worker):
    return worker.single_process()


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_process_training_matches_single_process(mode, worker, reference, tmp_path):
    import torch.multiprocessing as mp
    out = tmp_path / "result.pt"
    mp.spawn(worker.main, args=(mode, str(tmp_path / "rendezvous"), str(out)),
             nprocs=worker.WORLD, join=True)
    got = torch.load(out)
    losses, state = reference
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(losses),
                               atol=1e-5, rtol=1e-5)
    assert losses[-1] < losses[0]
    assert got["state"].keys() == state.keys()
    lora = [n for n in state if "lora_" in n and not n.endswith((".qweight",))]
    assert len(lora) >= 28
    for n, t in state.items():
        if n.endswith((".qweight", ".scales", ".zeros")):
            assert torch.equal(got["state"][n], t), n  # the packed base is untouched
        else:
            torch.testing.assert_close(got["state"][n], t, atol=1e-5, rtol=1e-4)


def test_shard_model_rejects_bad_input():
    from torch import nn

    import qra_kernels as qk
    from qra_kernels.integrations.distributed import (check_packed_frozen, decoder_blocks,
                                                      shard_model)
    model = nn.Sequential(nn.ModuleList([nn.Linear(64, 64), nn.Linear(64, 64)]),
                          qk.QRALinear.from_linear(nn.Linear(64, 32), bits=4, group_size=32,
                                                   method="rtn"))
    assert len(decoder_blocks(model)) == 2
    with pytest.raises(ValueError, match="mp_policy"):
        shard_model(model, mp_policy=object())
    with pytest.raises(TypeError, match="model"):
        shard_model("model")
    model[1].scales.requires_grad_(True)
    with pytest.raises(ValueError, match="1.scales"):
        check_packed_frozen(model)
