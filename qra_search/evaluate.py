"""Quality of an allocation, at two fidelities, without ever running a kernel.

Every (layer, bits) is quantized once with the packed format's own quantizer and kept on
disk (:mod:`qra_search.store`). An allocation is then evaluated by overwriting each linear
layer's dense weight, in place, with ``dequantize(Wq) + B·A`` — mathematically what
``QRALinear`` computes — so a candidate costs one ordinary dense forward pass instead of a
dequantization per call, and memory holds one copy of the model's weights whatever is
evaluated (the float originals are read back from the store when a layer returns to float).

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
import torch.utils.checkpoint
from torch import nn

from qra_kernels.modules import is_conv1d, quantizable_layers
from qra_kernels.quantizers import method_for_bits

from .store import QuantStore

Config = Mapping[str, Tuple[int, int]]  # {layer name: (bits, rank)}
# Largest logits tensor one KL batch may make (fp32): a 262k vocabulary (Gemma 3) at 127
# positions is 133 MB per block, so such models go one block at a time.
_LOGITS_BUDGET_BYTES = 160 << 20
# Where the model's body and head are known, the head (and the softmax, KL or cross-entropy
# after it) runs over this many bytes of fp32 logits at a time: the whole [tokens, vocab]
# logits tensor and its log-softmax copies are never made. On SmolLM2-135M they were the
# search's largest transient (3 × 75 MB per KL pass); on Gemma 3 (262k vocabulary) 0.5 GB.
_HEAD_CHUNK_BYTES = 16 << 20

_BLOCK_RE = re.compile(r"^(.*\.layers\.\d+)\.")


def linear_modules(model: nn.Module, names: Optional[Iterable[str]] = None) -> Dict[str, nn.Module]:
    """``{name: module}`` of the layers the search allocates (``nn.Linear`` and ``Conv1D``,
    all but the output head)."""
    mods = dict(model.named_modules())
    names = list(names) if names is not None else list(quantizable_layers(model))
    out = {}
    for n in names:
        m = mods.get(n)
        if not (isinstance(m, nn.Linear) or is_conv1d(m)):
            raise ValueError(f"layer {n!r} is not an nn.Linear or Conv1D of the model")
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


method_for = method_for_bits  # the quantizer a bit-width gets (qra_kernels.quantizers)


class Evaluator:
    """Scores allocations of ``model``'s linear layers on fixed token blocks.

    ``calib`` ``[n, L]``: calibration tokens (KL and the proxy fine-tune's training data);
    ``valid`` ``[m, L]``: validation tokens for the proxy fine-tune's loss.
    """

    def __init__(self, model: nn.Module, store: QuantStore, calib: torch.Tensor,
                 valid: Optional[torch.Tensor] = None, batch_size: Optional[int] = None):
        if not isinstance(calib, torch.Tensor) or calib.dim() != 2 or calib.dtype != torch.long:
            raise ValueError("calibration tokens must be a LongTensor [n_blocks, seq_len]")
        if calib.shape[1] < 2:
            raise ValueError(f"calibration blocks need >= 2 tokens, got {calib.shape[1]}")
        self.model, self.store = model, store
        from .weights import weight_slots
        self.slots = weight_slots(model, store.shapes)  # linear layers and expert groups
        self.linears = {n: s.module for n, s in self.slots.items() if s.adaptable}
        self.calib = calib
        self.valid = valid if valid is not None else calib
        vocab = _vocab_size(model)
        per_block = calib.shape[1] * vocab * 4
        self.batch_size = batch_size or max(1, min(4, _LOGITS_BUDGET_BYTES // max(per_block, 1)))
        self.floats = store.floats
        self._current: Dict[str, Tuple[int, int]] = {}
        self.n_forward = 0
        self._blocks = _decoder_blocks(model)
        self._block_of = {}
        if self._blocks is not None:
            ids = {id(b): i for i, b in enumerate(self._blocks[0])}
            mods = dict(model.named_modules())
            for n in self.slots:
                parts = n.split(".")
                for j in range(len(parts), 0, -1):
                    mod = mods.get(".".join(parts[:j]))  # an expert group names a parameter
                    if mod is not None and id(mod) in ids:
                        self._block_of[n] = ids[id(mod)]
                        break
        # The float model's next-token log-probabilities on the calibration blocks. Stored
        # when small; for a large vocabulary only the last hidden states are kept and the
        # reference is recomputed batch by batch (exact, at the cost of one more head pass).
        self._store_ref = per_block * calib.shape[0] <= 2 * _LOGITS_BUDGET_BYTES
        if self._blocks is not None and not self._head_matches_model(calib[:1, :17]):
            self._blocks = None  # e.g. a logit scale after the head: use the whole forward
        with torch.no_grad():
            self._ref, self._block_inputs = [], []
            for b in self._batches(calib):
                inputs, last = self._capture(b)
                if last is None:  # body unknown: whole logits
                    self._ref.append(self._logits(b).log_softmax(-1))
                elif self._store_ref:
                    self._ref.append(torch.cat([c.log_softmax(-1) for c in self._head_chunks(last)])
                                     .view(b.shape[0], b.shape[1] - 1, -1))
                else:
                    self._ref.append(last)
                self._block_inputs.append(inputs)

    # --- weights -------------------------------------------------------------------------
    def apply(self, config: Config) -> None:
        """Set every searched layer's weight to the allocation's effective weight (float
        elsewhere)."""
        unknown = set(config) - set(self.slots)
        if unknown:
            raise ValueError(f"layer {sorted(unknown)[0]!r} is not a searched layer")
        with torch.no_grad():
            for n, slot in self.slots.items():
                want = tuple(config[n]) if n in config else None
                if self._current.get(n) == want:
                    continue
                w = self.floats.get(n) if want is None else self.store.effective_weight(n, *want)
                slot.set(w)
                del w
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
        """Each decoder block's input (hidden states, keyword arguments) on the float model,
        so that a pass where blocks ``< i`` are unchanged can start at block ``i``, and the
        input of the output head (``None, None`` where the body is not known)."""
        if self._blocks is None:
            return None, None
        inputs, hooks = [], []

        def pre(module, args, kwargs):
            inputs.append((args[0].detach() if args else kwargs["hidden_states"].detach(),
                           {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        for blk in self._blocks[0]:
            hooks.append(blk.register_forward_pre_hook(pre, with_kwargs=True))
        try:
            last = self._head_input(ids)
        finally:
            for h in hooks:
                h.remove()
        return inputs, last.detach()

    def _head_input(self, ids: torch.Tensor) -> torch.Tensor:
        """The output head's input ``[b, T, d]``: the model's own body (its final norm
        included), as its ``forward`` computes it before the head."""
        self.n_forward += 1
        out = self.model.model(input_ids=ids, use_cache=False)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def _head_logits(self, h: torch.Tensor) -> torch.Tensor:
        """The output head on rows of the head's input, as the model's own forward applies
        it (fp32)."""
        logits = self._blocks[2](h).float()
        cfg = getattr(self.model, "config", None)
        cap = getattr(cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg,
                      "final_logit_softcapping", None)
        if cap:  # Gemma 2's soft-capping sits after the head
            logits = torch.tanh(logits / cap) * cap
        return logits

    @torch.no_grad()
    def _head_matches_model(self, ids: torch.Tensor) -> bool:
        """Whether body → head (→ soft-capping) reproduces the model's own logits, so the
        chunked head may stand in for its forward (checked once, on a few positions)."""
        want = self.model(ids, use_cache=False).logits[:, :-1].float()
        got = self._head_logits(self._head_input(ids)[:, :-1])
        self.n_forward = 0
        return got.shape == want.shape and bool(
            (got - want).abs().max() <= 1e-4 * max(1.0, float(want.abs().max())))

    def _head_rows(self) -> int:
        return max(1, _HEAD_CHUNK_BYTES // (4 * _vocab_size(self.model)))

    def _head_chunks(self, h: torch.Tensor):
        """The head's logits of every predicting position of ``h [b, T, d]`` (all but the
        last), ``_head_rows()`` positions at a time, in row-major order."""
        rows = h[:, :-1].reshape(-1, h.shape[-1])
        step = self._head_rows()
        for s in range(0, rows.shape[0], step):
            yield self._head_logits(rows[s:s + step])

    def _reference_chunks(self, i: int):
        """Float log-probabilities of calibration batch ``i``, in ``_head_chunks`` order."""
        if not self._store_ref:
            for c in self._head_chunks(self._ref[i]):
                yield c.log_softmax(-1)
            return
        ref = self._ref[i].view(-1, self._ref[i].shape[-1])
        step = self._head_rows()
        for s in range(0, ref.shape[0], step):
            yield ref[s:s + step]

    def _hidden_from(self, start: int, inputs) -> torch.Tensor:
        self.n_forward += 1
        layers, norm, head = self._blocks
        h, kwargs = inputs[start]
        for blk in layers[start:]:
            out = blk(h, **kwargs)
            h = out[0] if isinstance(out, tuple) else out
        return norm(h)

    def _nll_sum(self, ids: torch.Tensor, h: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Summed next-token negative log-likelihood of ``ids``; with the body known the head
        runs in chunks, each under activation checkpointing when gradients flow (so only one
        chunk's logits exist at a time in the backward too)."""
        if self._blocks is None:
            logits = self._logits(ids)
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                   reduction="sum")
        h = self._head_input(ids) if h is None else h
        rows = h[:, :-1].reshape(-1, h.shape[-1])
        target = ids[:, 1:].reshape(-1)
        step = self._head_rows()

        def chunk(hh, tt):
            return F.cross_entropy(self._head_logits(hh), tt, reduction="sum")
        total = None
        for s in range(0, rows.shape[0], step):
            hh, tt = rows[s:s + step], target[s:s + step]
            part = (torch.utils.checkpoint.checkpoint(chunk, hh, tt, use_reentrant=False)
                    if torch.is_grad_enabled() and hh.requires_grad else chunk(hh, tt))
            total = part if total is None else total + part
        return total

    def _mean_nll(self, tokens: torch.Tensor) -> float:
        total, count = 0.0, 0
        with torch.no_grad():
            for ids in self._batches(tokens):
                total += float(self._nll_sum(ids))
                count += ids[:, 1:].numel()
        return total / count

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
        for i, (ids, inputs) in enumerate(zip(self._batches(self.calib), self._block_inputs)):
            count += ids.shape[0] * (ids.shape[1] - 1)
            if self._blocks is None:
                logq = self._logits(ids).log_softmax(-1)
                total += float(F.kl_div(logq, self._ref[i], log_target=True, reduction="sum"))
                continue
            h = (self._hidden_from(start, inputs) if 0 < start < len(inputs)
                 else self._head_input(ids))
            for logits, ref in zip(self._head_chunks(h), self._reference_chunks(i)):
                total += float(F.kl_div(logits.log_softmax(-1), ref, log_target=True,
                                        reduction="sum"))
        return total / count

    @torch.no_grad()
    def loss(self, config: Config, tokens: torch.Tensor) -> float:
        """Mean next-token negative log-likelihood on ``tokens`` under the allocation."""
        self.apply(config)
        return self._mean_nll(tokens)

    # --- costly fidelity -----------------------------------------------------------------
    def proxy_finetune(self, config: Config, steps: int = 10, lr: float = 5e-4,
                       seed: int = 0, eval_tokens: Optional[torch.Tensor] = None,
                       progress: bool = False) -> float:
        """Train the allocation's adapters for ``steps`` on calibration blocks (one block a
        step, in a seeded order), then return the mean loss on ``eval_tokens`` (default:
        the validation tokens). The model's weights are left as they were."""
        return self.finetune(config, steps, lr, seed, eval_tokens=eval_tokens,
                             progress=progress)

    def finetune(self, config: Config, steps: int, lr: float = 5e-4, seed: int = 0, *,
                 train_tokens: Optional[torch.Tensor] = None, batch_size: int = 1,
                 eval_tokens: Optional[torch.Tensor] = None, schedule: str = "constant",
                 warmup: int = 0, progress: bool = False, desc: str = "proxy fine-tune",
                 log: Optional[list] = None, checkpoint_blocks: bool = True) -> float:
        """LoRA fine-tune of the allocation's adapters (svd-initialised, base frozen, Adam):
        ``steps`` steps of ``batch_size`` blocks of ``train_tokens`` (default: the
        calibration blocks) in a seeded order, learning rate ``lr`` (``schedule``
        ``"constant"`` or ``"cosine"`` to 0, after ``warmup`` linear steps); returns the mean
        next-token loss on ``eval_tokens`` (default: the validation tokens; a mapping of
        name → blocks gives a mapping of losses). ``log`` gets
        each step's training loss. The model's weights are left as they were.

        ``checkpoint_blocks``: recompute each decoder block's activations in the backward
        (transformers' gradient checkpointing, where the model has it) instead of keeping
        all of them — the fine-tune then holds one block's activations rather than every
        block's (SmolLM2-135M, 128 tokens, rank 16 everywhere: +230 MiB instead of +540), for
        about one more forward a step.
        The result is the same either way."""
        if schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule must be 'constant' or 'cosine', got {schedule!r}")
        train = self.calib if train_tokens is None else train_tokens
        self.apply(config)
        adapters = {}
        hooks = []
        for n, (bits, rank) in config.items():
            if rank <= 0:
                continue
            if n not in self.linears:
                raise ValueError(f"{n!r} is an expert group: it takes no LoRA yet (rank 0), got "
                                 f"rank {rank}")
            e = self.store.get(n, bits)
            r = min(rank, e["B"].shape[1])
            B = nn.Parameter(e["B"][:, :r].clone())
            A = nn.Parameter(e["A"][:r].clone())
            adapters[n] = (A, B)
            m = self.linears[n]
            with torch.no_grad():  # base = dequantized only; the adapter is added by the hook
                dense = e["qw"].dequantize(torch.float32)
                self.slots[n].set(dense)
                del dense
            self._current[n] = ("base", bits)
            hooks.append(m.register_forward_hook(_lora_hook(A, B)))
        params = [p for ab in adapters.values() for p in ab]
        frozen = [p for p in self.model.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        was_training = self.model.training
        ckpt = (_Checkpointing(self.model)
                if checkpoint_blocks and params and steps > 0 else None)
        try:
            if ckpt is not None:
                ckpt.enable()
            if params and steps > 0:
                opt = torch.optim.Adam(params, lr=lr)

                def factor(step):
                    if step < warmup:
                        return (step + 1) / warmup
                    if schedule == "cosine":
                        t = (step - warmup) / max(1, steps - warmup)
                        return 0.5 * (1.0 + math.cos(math.pi * t))
                    return 1.0
                sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
                gen = torch.Generator().manual_seed(seed)
                order = torch.randperm(train.shape[0], generator=gen)
                self.model.train()
                it = range(steps)
                if progress:
                    from tqdm.auto import tqdm
                    it = tqdm(it, desc=desc, unit="step", leave=False)
                n = train.shape[0]
                for step in it:
                    idx = [order[(step * batch_size + j) % n] for j in range(batch_size)]
                    ids = train[torch.stack(idx)]
                    loss = self._nll_sum(ids) / ids[:, 1:].numel()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    if log is not None:
                        log.append(float(loss.detach()))
                self.model.eval()
            with torch.no_grad():
                if isinstance(eval_tokens, Mapping):
                    return {k: self._mean_nll(t) for k, t in eval_tokens.items()}
                return self._mean_nll(self.valid if eval_tokens is None else eval_tokens)
        finally:
            if ckpt is not None:
                ckpt.disable()
            for h in hooks:
                h.remove()
            for p in frozen:
                p.requires_grad_(True)
            self.model.train(was_training)


class _Checkpointing:
    """transformers' per-decoder-layer activation checkpointing, switched on for one
    fine-tune and off again (``activation_checkpointing_*`` from transformers 5.x,
    ``gradient_checkpointing_*`` before). Non-reentrant, so the frozen embeddings' output
    needs no gradient. Nothing is changed for a model without it, or one that already has it
    on."""

    def __init__(self, model: nn.Module):
        self.model = model
        new = hasattr(model, "activation_checkpointing_enable")
        self._on = (getattr(model, "is_activation_checkpointing" if new
                            else "is_gradient_checkpointing", False)
                    or not getattr(model, "supports_gradient_checkpointing", False))
        self._new = new
        self.active = False

    def enable(self) -> None:
        if self._on:
            return
        kwargs = {"use_reentrant": False}
        if self._new:
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        self.active = True

    def disable(self) -> None:
        if not self.active:
            return
        if self._new:
            self.model.activation_checkpointing_disable()
        else:
            self.model.gradient_checkpointing_disable()
        self.active = False


def _vocab_size(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return int(getattr(text, "vocab_size", None) or 32000)


def _decoder_blocks(model: nn.Module):
    """(blocks, final norm, output head) of a decoder-only transformers model, else None.
    A pass started at block i goes blocks → norm → head (→ soft-capping where the config
    has it), as the decoder-only models of transformers do."""
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


