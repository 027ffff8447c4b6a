"""Training a PEFT model on qra layers: the prepare helper, gradient checkpointing, the
transformers Trainer, loss against float LoRA, and torch.compile(fullgraph=True)."""
import copy

import pytest
import torch
from torch import nn

import qra_kernels as qk
from qra_kernels import QRALinear
from qra_kernels.integrations import peft as qp
from qra_kernels.integrations.training import prepare_for_training, trainable_parameters

from .conftest import tiny_model

pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training  # noqa: E402

IDS = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(4))


def quantize(model, bits=4, method="rtn"):
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    qk.quantize_model(model, {"layers": {n: {"bits": bits} for n in names}, "group_size": 32},
                      method=method)
    return model


def train(model, steps, lr=1e-2, ids=IDS):
    opt = torch.optim.AdamW(list(trainable_parameters(model).values()), lr=lr)
    losses = []
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def param_bytes(model):
    return sum(p.numel() * p.element_size() for p in model.parameters())


def test_prepare_for_training_does_not_upcast():
    model = quantize(tiny_model()).to(torch.bfloat16)
    layer = model.model.layers[0].self_attn.q_proj
    scales = layer.scales.clone()
    size = param_bytes(model)
    prepare_for_training(model)
    assert not any(p.requires_grad for p in model.parameters())
    assert param_bytes(model) == size
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert layer.scales.dtype == torch.float16 and torch.equal(layer.scales, scales)
    assert model.is_gradient_checkpointing and model.config.use_cache is False

    # What the helper avoids: PEFT's kbit helper upcasts every bf16/fp16 parameter,
    # including the packed layers' scales (writing .data bypasses QRALinear._apply).
    other = quantize(tiny_model()).to(torch.bfloat16)
    prepare_model_for_kbit_training(other)
    assert param_bytes(other) > size
    assert other.model.layers[0].self_attn.q_proj.scales.dtype == torch.float32

    small = quantize(tiny_model()).to(torch.bfloat16)
    prepare_for_training(small, gradient_checkpointing=False, upcast_norms=True)
    assert small.model.norm.weight.dtype == torch.float32
    assert small.model.embed_tokens.weight.dtype == torch.bfloat16
    with pytest.raises(TypeError, match="model"):
        prepare_for_training("model")
    with pytest.raises(TypeError, match="gradient_checkpointing"):
        prepare_for_training(small, gradient_checkpointing="yes")


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(reentrant):
    def grads(checkpointing):
        model = quantize(tiny_model())
        prepare_for_training(model, gradient_checkpointing=checkpointing,
                             gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        pm = get_peft_model(model, qp.lora_config(model, r=4))
        torch.manual_seed(5)
        for p in trainable_parameters(pm).values():
            nn.init.normal_(p, std=0.05)
        pm.train()
        pm(input_ids=IDS, labels=IDS).loss.backward()
        return {n: p.grad.clone() for n, p in trainable_parameters(pm).items()}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys() and len(plain) == 28
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], atol=1e-6, rtol=1e-4)
        assert plain[n].abs().sum() > 0, n


def test_lora_on_qra_learns_like_float_lora():
    base = tiny_model()
    floats = copy.deepcopy(base)
    qra = quantize(copy.deepcopy(base), bits=4, method="hqq")
    targets = sorted(n for n, m in floats.named_modules()
                     if isinstance(m, nn.Linear) and n != "lm_head")
    torch.manual_seed(6)
    pf = get_peft_model(floats, LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    torch.manual_seed(6)
    pq = get_peft_model(qra, qp.lora_config(qra, r=8, lora_alpha=16))
    lf, lq = train(pf, 25), train(pq, 25)
    drop_f, drop_q = lf[0] - lf[-1], lq[0] - lq[-1]
    print("float LoRA", [round(v, 3) for v in lf[::6]], "qra LoRA", [round(v, 3) for v in lq[::6]])
    assert drop_f > 1.0, lf  # the task is learnable by float LoRA
    assert abs(lq[0] - lf[0]) < 0.1  # 4-bit base: nearly the float starting loss
    assert abs(drop_q - drop_f) < 0.25 * drop_f, (lf, lq)


def test_trainer_runs_with_peft_on_qra(tmp_path):
    from transformers import Trainer, TrainingArguments

    class Blocks(torch.utils.data.Dataset):
        def __len__(self):
            return len(IDS)

        def __getitem__(self, i):
            return {"input_ids": IDS[i], "labels": IDS[i]}

    model = prepare_for_training(quantize(tiny_model()))
    pm = get_peft_model(model, qp.lora_config(model, r=8, lora_alpha=16))
    before = {n: p.detach().clone() for n, p in trainable_parameters(pm).items()}
    packed = {n: p.detach().clone() for n, p in pm.named_parameters()
              if n.endswith((".qweight", ".scales", ".zeros"))}
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2,
                             max_steps=6, learning_rate=1e-2, logging_steps=1, report_to=[],
                             save_strategy="no", use_cpu=True, gradient_checkpointing=True,
                             gradient_checkpointing_kwargs={"use_reentrant": False},
                             dataloader_num_workers=0)
    trainer = Trainer(model=pm, args=args, train_dataset=Blocks())
    result = trainer.train()
    assert result.global_step == 6
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0], losses
    changed = [n for n, p in trainable_parameters(pm).items() if not torch.equal(p, before[n])]
    assert len(changed) == len(before)
    for n, p in pm.named_parameters():
        if n in packed:
            assert torch.equal(p, packed[n]), n


def test_compile_fullgraph_forward_backward():
    model = quantize(tiny_model(num_hidden_layers=1))
    pm = get_peft_model(model, qp.lora_config(model, r=4))
    for p in trainable_parameters(pm).values():
        nn.init.normal_(p, std=0.05)
    pm.train()
    ref = pm(input_ids=IDS, labels=IDS, use_cache=False).loss
    ref.backward()
    expected = {n: p.grad.clone() for n, p in trainable_parameters(pm).items()}
    pm.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    compiled = torch.compile(pm, fullgraph=True)  # any graph break raises
    loss = compiled(input_ids=IDS, labels=IDS, use_cache=False).loss
    loss.backward()
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    for n, p in trainable_parameters(pm).items():
        torch.testing.assert_close(p.grad, expected[n], atol=1e-5, rtol=1e-4)
    torch._dynamo.reset()
