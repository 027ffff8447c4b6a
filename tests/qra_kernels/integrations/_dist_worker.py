"""Worker for test_distributed.py: imported by name in the spawned processes."""
import faulthandler
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

STEPS = 3
WORLD = 2


def build():
    """The same PEFT-on-qra tiny Llama in every process (seeded)."""
    import transformers
    from peft import get_peft_model
    import qra_kernels as qk
    from qra_kernels.integrations import peft as qp
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    qk.quantize_model(model, {"layers": {n: {"bits": 4} for n in names}, "group_size": 32},
                      method="rtn")
    for p in model.parameters():
        p.requires_grad_(False)
    pm = get_peft_model(model, qp.lora_config(model, r=4, lora_alpha=8))
    torch.manual_seed(1)
    for n, p in pm.named_parameters():
        if p.requires_grad:
            nn.init.normal_(p, std=0.05)
    return pm


def batch():
    return torch.randint(0, 128, (2 * WORLD, 12), generator=torch.Generator().manual_seed(7))


def train(model, ids):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(STEPS):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return losses


def trained_state(pm):
    out = {}
    for n, p in pm.named_parameters():
        if p.requires_grad or n.endswith((".qweight", ".scales", ".zeros")):
            t = p.full_tensor() if hasattr(p, "full_tensor") else p
            out[n] = t.detach().clone()
    return out


def single_process():
    torch.set_num_threads(1)
    pm = build()
    losses = train(pm, batch())
    return [l.item() for l in losses], trained_state(pm)


def main(rank, mode, init_file, out_path):
    # A C++ abort inside gloo kills the child with no Python traceback; this prints one.
    faulthandler.enable(file=sys.stderr, all_threads=True)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                           world_size=WORLD)
    try:
        pm = build()
        ids = batch().chunk(WORLD)[rank]  # equal shares, equal token counts
        if mode == "ddp":
            model = nn.parallel.DistributedDataParallel(pm)
        elif mode == "fsdp":
            from qra_kernels.integrations.distributed import shard_model
            model = shard_model(pm)
            packed = [p for n, p in pm.named_parameters() if n.endswith(".qweight")]
            assert packed and all(p.dtype == torch.int32 and not p.requires_grad
                                  and type(p).__name__ == "DTensor" for p in packed)
        else:
            raise ValueError(mode)
        losses = train(model, ids)
        for l in losses:  # the global-batch loss = mean of the equal shares
            dist.all_reduce(l)
            l /= WORLD
        state = trained_state(pm)
        if rank == 0:
            torch.save({"losses": [l.item() for l in losses], "state": state}, out_path)
        # Leave together. Without this barrier rank 1 could finish and tear gloo down while
        # rank 0 was still saving, and now and then it died of SIGABRT ("terminate called
        # without an active exception"): 2 of 12 runs here and once in CI. With it: none in 27.
        dist.barrier()
        del model, pm  # release DDP's reducer / FSDP's state before the group goes
    finally:
        dist.destroy_process_group()
