"""Loads GPTQ exports with real loaders, in a process of its own.

Loading a model with GPTQModel changes process-wide state (it disables dynamo here to skip
minutes of inductor compiling, sets allocator environment variables, patches transformers'
GPTQ quantizer), which the rest of the test suite must not inherit: ``test_gptq.py`` writes
``jobs.pt`` and runs ``python _loader_worker.py DIR``; this writes ``results.pt``. (Note that
*importing* gptqmodel cannot be kept out of the suite once it is installed: PEFT imports it
whenever it puts LoRA on an ``nn.Linear``.) Each job is ``{"kind", "path", "ids", ...}``; each result holds
what the loader built (bits, group size and its own fp16 dequantization per module, logits)
or the exception it raised.
"""
import os
import sys

import torch


def _gptqmodel(job):
    from gptqmodel import BACKEND, GPTQModel
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear
    g = GPTQModel.load(job["path"], device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)
    model = g.model
    out = {"modules": {n: (m.bits, m.group_size, m.dequantize_weight().t().contiguous())
                       for n, m in model.named_modules() if isinstance(m, BaseQuantLinear)},
           "float_linears": sorted(n for n, m in model.named_modules()
                                   if type(m) is torch.nn.Linear)}
    with torch.no_grad():
        out["logits"] = model(job["ids"]).logits.float()
    if job.get("adapter"):
        from peft import PeftModel
        served = PeftModel.from_pretrained(model, job["adapter"]).eval()
        with torch.no_grad():
            out["adapter_logits"] = served(job["ids"]).logits.float()
    return out


def _transformers(job):
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear  # noqa: F401 - the HF path's kernels
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(job["path"], dtype=torch.float16,
                                                 device_map="cpu")
    with torch.no_grad():
        return {"logits": model(job["ids"]).logits.float()}


def _plain(value):
    """Only builtins go back to the test, whose process has no gptqmodel to unpickle its
    types with (enums become their values)."""
    import enum
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, (str, int, float, bool, type(None), torch.Tensor)):
        return value
    return str(value)


def _quantize_config(job):
    from gptqmodel.quantization.config import QuantizeConfig
    return {"config": _plain(QuantizeConfig(**job["kwargs"]).to_dict())}


def main(root):
    import torch._dynamo
    # GPTQModel compiles its torch kernel's dequantization with inductor: minutes on 2
    # cores for a few tiny forwards. The same code runs eagerly.
    torch._dynamo.config.disable = True
    torch.set_num_threads(1)
    jobs = torch.load(os.path.join(root, "jobs.pt"), weights_only=False)
    results = {}
    run = {"gptqmodel": _gptqmodel, "transformers": _transformers,
           "quantize_config": _quantize_config}
    for name, job in jobs.items():
        try:
            results[name] = _plain(run[job["kind"]](job))
        except Exception as e:  # noqa: BLE001 - reported to the test, which decides
            results[name] = {"error": f"{type(e).__name__}: {e}"}
    torch.save(results, os.path.join(root, "results.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
