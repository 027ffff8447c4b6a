"""Quality of an allocation, at two fidelities, without ever running a kernel.

Every (layer, bits) is quantized once with the packed format's own quantizer
(:func:`qra_kernels.quantizers.quantize_weight`) and cached, in memory and on disk. An
allocation is then evaluated by swapping each linear layer's dense weight for
``dequantize(Wq) + B·A`` — mathematically what ``QRALinear`` computes — so a candidate costs
one ordinary dense forward pass instead of a dequantization per call.

The adapter of rank ``r`` starts from the top-``r`` singular triplets of the quantization
error ``W - dequantize(Wq)`` (the LoftQ initialisation, one iteration). A rank therefore
buys quality the moment it is allocated, which the cheap fidelity can see; a zero-initialised
adapter would make rank invisible until after training.

* cheap fidelity — :meth:`Evaluator.kl`: mean per-token KL(float ‖ quantized) of the
  next-token distributions on calibration tokens;
* costly fidelity — :meth:`Evaluator.proxy_finetune`: a short LoRA fine-tune (base frozen,
  adapters trainable, Adam) on calibration tokens, then the mean next-token loss on
  validation tokens the fine-tune never saw.
"""
from __future__ import annotations

import hashlib
import math
import os
import re
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from qra_kernels.format import SUPPORTED_BITS
from qra_kernels.quantizers import RECOMMENDED_METHOD, quantize_weight

Config = Mapping[str, Tuple[int, int]]  # {layer name: (bits, rank)}

_BLOCK_RE = re.compile(r"^(.*\.layers\.\d+)\.")


def linear_modules(model: nn.Module, names: Optional[Iterable[str]] = None) -> Dict[str, nn.Linear]:
    """``{name: nn.Linear}`` of the layers the search allocates (all but the output head)."""
    from .allocation import linear_shapes
    mods = dict(model.named_modules())
    names = list(names) if names is not None else list(linear_shapes(model))
    out = {}
    for n in names:
        m = mods.get(n)
        if not isinstance(m, nn.Linear):
            raise ValueError(f"layer {n!r} is not an nn.Linear of the model")
        out[n] = m
    return out


def layer_groups(names: Sequence[str], granularity: str = "block") -> Dict[str, List[str]]:
    """Search genes: one per decoder block (``block``) or one per linear layer (``module``)."""
    if granularity not in ("block", "module"):
        raise ValueError(f"granularity must be 'block' or 'module', got {granularity!r}")
    groups: Dict[str, List[str]] = {}
    for n in names:
        m = _BLOCK_RE.match(n) if granularity == "block" else None
        groups.setdefault(m.group(1) if m else n, []).append(n)
    return groups


def method_for(bits: int, method: str) -> str:
    if method == "recommended":
        return RECOMMENDED_METHOD[bits]
    if method not in ("rtn", "hqq"):
        raise ValueError(f"method must be 'recommended', 'rtn' or 'hqq', got {method!r}")
    return method


class QuantCache:
    """Per (layer, bits): the dense dequantized weight and the error's top singular factors.

    ``max_rank`` factors are kept (``B = U·√S``, ``A = √S·Vᵀ``) with the full singular values
    (for the rank signal) and ``‖W - Wq‖²``. On disk, entries are keyed by a hash of the
    weight's bytes and every quantization setting, so a changed model never reuses them.
    """

    def __init__(self, linears: Mapping[str, nn.Linear], group_size: int = 64,
                 max_rank: int = 64, method: str = "recommended",
                 cache_dir: Optional[str] = None, seed: int = 0):
        self.linears = dict(linears)
        # Snapshot the float weights: the Evaluator overwrites the live ones, and an entry
        # computed lazily later must still quantize the original.
        self.float_w = {n: m.weight.detach().to("cpu", torch.float32, copy=True)
                        for n, m in self.linears.items()}
        self.group_size, self.max_rank, self.method = group_size, max_rank, method
        self.cache_dir = os.path.join(cache_dir, "quant") if cache_dir else None
        self.seed = seed
        self._mem: Dict[Tuple[str, int], dict] = {}
        self._hash: Dict[str, str] = {}
        for b in SUPPORTED_BITS:
            method_for(b, method)  # validate early

    def weight_hash(self, name: str) -> str:
        if name not in self._hash:
            w = self.float_w[name].contiguous()
            h = hashlib.sha1(w.numpy().tobytes())
            h.update(str(tuple(w.shape)).encode())
            self._hash[name] = h.hexdigest()[:20]
        return self._hash[name]

    def _path(self, name: str, bits: int) -> Optional[str]:
        if not self.cache_dir:
            return None
        m = method_for(bits, self.method)
        return os.path.join(self.cache_dir, f"{self.weight_hash(name)}-b{bits}-g{self.group_size}"
                                            f"-{m}-r{self.max_rank}.pt")

    def get(self, name: str, bits: int) -> dict:
        """``{"dense", "B", "A", "sv", "err2"}`` for layer ``name`` at ``bits``."""
        key = (name, bits)
        if key in self._mem:
            return self._mem[key]
        path = self._path(name, bits)
        entry = None
        if path and os.path.exists(path):
            try:
                entry = torch.load(path, weights_only=True)
            except Exception:  # a torn file from a killed run: recompute it
                entry = None
        if entry is None:
            entry = self._compute(name, bits)
            if path:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                tmp = f"{path}.{os.getpid()}.tmp"
                torch.save(entry, tmp)
                os.replace(tmp, path)
        from qra_kernels.format import QuantizedWeight
        qw = QuantizedWeight(entry["qweight"], entry["scales"], entry["zeros"], bits,
                             self.group_size, tuple(self.linears[name].weight.shape))
        out = {"dense": qw.dequantize(torch.float32), "B": entry["B"], "A": entry["A"],
               "sv": entry["sv"], "err2": float(entry["err2"]), "qweight": qw}
        self._mem[key] = out
        return out

    def _compute(self, name: str, bits: int) -> dict:
        w = self.float_w[name]
        pad = w.shape[1] % self.group_size != 0
        qw = quantize_weight(w, bits, self.group_size, method_for(bits, self.method), pad=pad)
        err = w - qw.dequantize(torch.float32)
        q = min(self.max_rank + 8, min(err.shape))
        # Randomised SVD is plenty for the top factors; a fixed generator keeps it reproducible.
        g = torch.random.fork_rng(devices=[])
        with g:
            torch.manual_seed(self.seed)
            u, s, v = torch.svd_lowrank(err, q=q, niter=3)
        r = min(self.max_rank, s.numel())
        root = s[:r].sqrt()
        return {"qweight": qw.qweight, "scales": qw.scales, "zeros": qw.zeros,
                "B": (u[:, :r] * root).contiguous(), "A": (root[:, None] * v[:, :r].t()).contiguous(),
                "sv": s.contiguous(), "err2": torch.tensor(float((err * err).sum()))}

    def effective_weight(self, name: str, bits: int, rank: int) -> torch.Tensor:
        e = self.get(name, bits)
        if rank <= 0:
            return e["dense"]
        r = min(rank, e["B"].shape[1])
        return torch.addmm(e["dense"], e["B"][:, :r], e["A"][:r])

    def recovered_fraction(self, name: str, bits: int, rank: int) -> float:
        """Share of ``‖W - Wq‖²`` that the rank-``rank`` initial adapter removes."""
        e = self.get(name, bits)
        if rank <= 0 or e["err2"] <= 0:
            return 0.0
        return float((e["sv"][:rank] ** 2).sum()) / e["err2"]


class Evaluator:
    """Scores allocations of ``model``'s linear layers on fixed token blocks.

    ``calib`` ``[n, L]``: calibration tokens (KL and the proxy fine-tune's training data);
    ``valid`` ``[m, L]``: validation tokens for the proxy fine-tune's loss.
    """

    def __init__(self, model: nn.Module, cache: QuantCache, calib: torch.Tensor,
                 valid: Optional[torch.Tensor] = None, batch_size: int = 4):
        if not isinstance(calib, torch.Tensor) or calib.dim() != 2 or calib.dtype != torch.long:
            raise ValueError("calibration tokens must be a LongTensor [n_blocks, seq_len]")
        if calib.shape[1] < 2:
            raise ValueError(f"calibration blocks need >= 2 tokens, got {calib.shape[1]}")
        self.model, self.cache = model, cache
        self.linears = cache.linears
        self.calib = calib
        self.valid = valid if valid is not None else calib
        self.batch_size = batch_size
        self.float_w = cache.float_w
        self._current: Dict[str, Tuple[int, int]] = {}
        self.n_forward = 0
        self._blocks = _decoder_blocks(model)
        self._block_of = {}
        if self._blocks is not None:
            ids = {id(b): i for i, b in enumerate(self._blocks[0])}
            for n in self.linears:
                parts = n.split(".")
                for j in range(len(parts), 0, -1):
                    mod = model.get_submodule(".".join(parts[:j])) if j else model
                    if id(mod) in ids:
                        self._block_of[n] = ids[id(mod)]
                        break
        with torch.no_grad():
            self._ref_logp, self._block_inputs = [], []
            for b in self._batches(calib):
                logits, inputs = self._capture(b)
                self._ref_logp.append(logits.log_softmax(-1))
                self._block_inputs.append(inputs)

    # --- weights -------------------------------------------------------------------------
    def apply(self, config: Config) -> None:
        """Set every linear's weight to the allocation's effective weight (float elsewhere)."""
        unknown = set(config) - set(self.linears)
        if unknown:
            raise ValueError(f"layer {sorted(unknown)[0]!r} is not a searched linear layer")
        with torch.no_grad():
            for n, m in self.linears.items():
                want = tuple(config[n]) if n in config else None
                if self._current.get(n) == want:
                    continue
                w = self.float_w[n] if want is None else self.cache.effective_weight(n, *want)
                m.weight.copy_(w)
                if want is None:
                    self._current.pop(n, None)
                else:
                    self._current[n] = want

    def restore(self) -> None:
        self.apply({})

    # --- cheap fidelity ------------------------------------------------------------------
    def _batches(self, tokens: torch.Tensor):
        for i in range(0, tokens.shape[0], self.batch_size):
            yield tokens[i:i + self.batch_size]

    def _logits(self, ids: torch.Tensor) -> torch.Tensor:
        self.n_forward += 1
        return self.model(ids, use_cache=False).logits[:, :-1].float()

    def _capture(self, ids: torch.Tensor):
        """Float logits, and each decoder block's input (hidden states, keyword arguments)
        so that a pass where blocks ``< i`` are unchanged can start at block ``i``."""
        if self._blocks is None:
            return self._logits(ids), None
        inputs, hooks = [], []

        def pre(module, args, kwargs):
            inputs.append((args[0].detach() if args else kwargs["hidden_states"].detach(),
                           {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        for blk in self._blocks[0]:
            hooks.append(blk.register_forward_pre_hook(pre, with_kwargs=True))
        try:
            logits = self._logits(ids)
        finally:
            for h in hooks:
                h.remove()
        return logits, inputs

    def _logits_from(self, start: int, inputs) -> torch.Tensor:
        self.n_forward += 1
        layers, norm, head = self._blocks
        h, kwargs = inputs[start]
        for blk in layers[start:]:
            out = blk(h, **kwargs)
            h = out[0] if isinstance(out, tuple) else out
        return head(norm(h))[:, :-1].float()

    def first_changed_block(self, config: Config) -> int:
        """Index of the first decoder block holding a layer that differs from float."""
        if self._blocks is None:
            return 0
        return min((self._block_of.get(n, 0) for n in config), default=len(self._blocks[0]))

    @torch.no_grad()
    def kl(self, config: Config) -> float:
        """Mean per-token KL(float ‖ quantized) on the calibration tokens."""
        self.apply(config)
        start = self.first_changed_block(config)
        total, count = 0.0, 0
        for ref, ids, inputs in zip(self._ref_logp, self._batches(self.calib), self._block_inputs):
            if inputs is not None and 0 < start < len(inputs):
                logits = self._logits_from(start, inputs)
            else:
                logits = self._logits(ids)
            logq = logits.log_softmax(-1)
            total += float(F.kl_div(logq, ref, log_target=True, reduction="sum"))
            count += ref.shape[0] * ref.shape[1]
        return total / count

    @torch.no_grad()
    def loss(self, config: Config, tokens: torch.Tensor) -> float:
        """Mean next-token negative log-likelihood on ``tokens`` under the allocation."""
        self.apply(config)
        return _mean_nll(self.model, tokens, self.batch_size)

    # --- costly fidelity -----------------------------------------------------------------
    def proxy_finetune(self, config: Config, steps: int = 10, lr: float = 5e-4,
                       seed: int = 0, eval_tokens: Optional[torch.Tensor] = None,
                       progress: bool = False) -> float:
        """Train the allocation's adapters for ``steps`` on calibration blocks (one block a
        step, in a seeded order), then return the mean loss on ``eval_tokens`` (default:
        the validation tokens). The model's weights are left as they were."""
        self.apply(config)
        adapters = {}
        hooks = []
        for n, (bits, rank) in config.items():
            if rank <= 0:
                continue
            e = self.cache.get(n, bits)
            r = min(rank, e["B"].shape[1])
            B = nn.Parameter(e["B"][:, :r].clone())
            A = nn.Parameter(e["A"][:r].clone())
            adapters[n] = (A, B)
            m = self.linears[n]
            with torch.no_grad():  # base = dequantized only; the adapter is added by the hook
                m.weight.copy_(e["dense"])
            self._current[n] = ("base", bits)
            hooks.append(m.register_forward_hook(_lora_hook(A, B)))
        params = [p for ab in adapters.values() for p in ab]
        frozen = [p for p in self.model.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        was_training = self.model.training
        try:
            if params and steps > 0:
                opt = torch.optim.Adam(params, lr=lr)
                gen = torch.Generator().manual_seed(seed)
                order = torch.randperm(self.calib.shape[0], generator=gen)
                self.model.train()
                it = range(steps)
                if progress:
                    from tqdm.auto import tqdm
                    it = tqdm(it, desc="proxy fine-tune", unit="step", leave=False)
                for step in it:
                    ids = self.calib[order[step % len(order)]].unsqueeze(0)
                    logits = self.model(ids, use_cache=False).logits[:, :-1].float()
                    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                self.model.eval()
            with torch.no_grad():
                return _mean_nll(self.model, self.valid if eval_tokens is None else eval_tokens,
                                 self.batch_size)
        finally:
            for h in hooks:
                h.remove()
            for p in frozen:
                p.requires_grad_(True)
            self.model.train(was_training)


def _decoder_blocks(model: nn.Module):
    """(blocks, final norm, output head) of a decoder-only transformers model, else None."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    norm = getattr(inner, "norm", None)
    head = getattr(model, "lm_head", None)
    if isinstance(layers, nn.ModuleList) and len(layers) and norm is not None and head is not None:
        return layers, norm, head
    return None


def _lora_hook(A: torch.Tensor, B: torch.Tensor):
    def hook(module, inputs, output):
        return output + (inputs[0] @ A.t()) @ B.t()
    return hook


def _mean_nll(model: nn.Module, tokens: torch.Tensor, batch_size: int) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, tokens.shape[0], batch_size):
            ids = tokens[i:i + batch_size]
            logits = model(ids, use_cache=False).logits[:, :-1].float()
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                           ids[:, 1:].reshape(-1), reduction="sum"))
            count += ids[:, 1:].numel()
    return total / count


def perplexity_of(mean_nll: float) -> float:
    return math.exp(mean_nll)
