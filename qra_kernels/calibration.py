"""Calibration: the layer Hessians ``H = 2·XᵀX/n`` of a transformers causal LM, and GPTQ
of its decoder blocks' linear layers, one decoder block at a time.

The model is never run whole. The inputs of decoder block 0 (and the keyword arguments
every block receives: attention masks, rotary embeddings — they differ per block in models
with sliding-window layers such as Gemma-3) are captured once, by a forward pass in which
the blocks are replaced by recorders that do no work. Then, for each block in turn,
forward hooks on its ``nn.Linear`` layers accumulate ``XᵀX`` while the block runs over the
calibration batches, its layers are quantized, and the block's outputs become the next
block's inputs. Peak memory is one block's activations for the whole calibration set
(twice: inputs and outputs) plus that block's Hessians.

Two ways to feed the blocks (``inputs=``):

* ``"sequential"`` (GPTQModel's default): block ``i`` sees the outputs of the already
  quantized blocks ``< i``, and inside a block each set of layers that read the same input
  (q/k/v, then o, then gate/up, then down) is quantized before the next set's Hessians
  are collected, so every layer compensates the error of everything before it.
* ``"float"``: every block sees the float model's activations, so each layer's result
  depends only on its own bits — what a search needs, which quantizes each (layer, bits)
  once and combines them. :func:`layer_hessians` returns these Hessians themselves.

Only ``nn.Linear`` layers inside the decoder blocks are handled; the output head (and the
embeddings) stay float.
"""
from __future__ import annotations

from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from .format import QuantizedWeight, check_bits, check_group_size
from .quantizers import quantize_weight

INPUTS = ("sequential", "float")


def decoder_blocks(model: nn.Module) -> Tuple[str, nn.ModuleList]:
    """(qualified name, ModuleList) of a transformers decoder's blocks: the ``ModuleList``
    named ``layers``/``h``/``blocks`` holding the most modules with linear layers."""
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and name.split(".")[-1] in ("layers", "h", "blocks"):
            if len(mod) and all(any(isinstance(m, nn.Linear) for m in b.modules()) for b in mod):
                if best is None or len(mod) > len(best[1]):
                    best = (name, mod)
    if best is None:
        raise ValueError(f"model: no decoder blocks found in {type(model).__name__} (expected a "
                         f"transformers causal LM with a ModuleList of blocks named 'layers')")
    return best


def block_linears(model: nn.Module) -> List[Dict[str, nn.Linear]]:
    """For each decoder block, ``{qualified name: nn.Linear}`` of its linear layers."""
    prefix, blocks = decoder_blocks(model)
    out = []
    for i, blk in enumerate(blocks):
        out.append({f"{prefix}.{i}.{n}": m for n, m in blk.named_modules()
                    if isinstance(m, nn.Linear)})
    return out


def check_tokens(tokens, name: str = "calibration") -> torch.Tensor:
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"{name} must be a LongTensor of token ids [n_blocks, seq_len], got "
                        f"{type(tokens).__name__}")
    if tokens.dtype != torch.long or tokens.dim() != 2 or tokens.numel() == 0:
        raise ValueError(f"{name} must be a non-empty LongTensor of token ids [n_blocks, "
                         f"seq_len], got {tokens.dtype} of shape {tuple(tokens.shape)}")
    return tokens


class _Stop(Exception):
    pass


class _Recorder(nn.Module):
    """Stands in for a decoder block during the capture pass: records what the block would
    receive and passes the hidden states through untouched (the keyword arguments do not
    depend on them), stopping the forward after the last block."""

    def __init__(self, index: int, last: bool, sink: list):
        super().__init__()
        self.index, self.last, self.sink = index, last, sink

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        self.sink.append((self.index, hidden if self.index == 0 else None, args[1:], kwargs))
        if self.last:
            raise _Stop
        return hidden


@torch.no_grad()
def _capture(model: nn.Module, blocks: nn.ModuleList, tokens: torch.Tensor, batch_size: int):
    """Per batch: block 0's input hidden states, and per block its other (args, kwargs)."""
    device = next(model.parameters()).device
    originals = list(blocks)
    hidden: List[torch.Tensor] = []
    calls: List[List[Tuple[tuple, dict]]] = []
    try:
        for i in range(len(blocks)):
            blocks[i] = _Recorder(i, i == len(blocks) - 1, [])
        for b0 in range(0, tokens.shape[0], batch_size):
            for r in blocks:
                r.sink.clear()
            try:
                model(tokens[b0:b0 + batch_size].to(device), use_cache=False)
            except _Stop:
                pass
            records = [rec for r in blocks for rec in r.sink]
            if len(records) != len(blocks) or records[0][1] is None:
                raise ValueError(f"model: its forward called the decoder blocks "
                                 f"{len(records)} times for {len(blocks)} blocks; cannot "
                                 f"calibrate block by block")
            hidden.append(records[0][1])
            calls.append([(a, k) for _, _, a, k in records])
    finally:
        for i, m in enumerate(originals):
            blocks[i] = m
    return hidden, calls


class _HessianHooks:
    """Forward hooks accumulating ``Σ xᵀx`` (fp32) for some linear layers. Layers fed the
    very same input tensor (q/k/v; gate/up) share one accumulator."""

    def __init__(self, linears: Mapping[str, nn.Linear], stop: bool = False):
        self.linears = dict(linears)
        # stop=True: abort the block's forward (raise _Stop) once every hooked layer has
        # run on the batch, when only their Hessians are wanted: the rest of the block's
        # work would be thrown away.
        self.stop = stop
        self._called: set = set()
        self.sums: Dict[str, torch.Tensor] = {}
        self.rows: Dict[str, int] = {}
        self.owner: Dict[str, str] = {}     # layer -> layer whose accumulator it shares
        self.order: List[str] = []          # layers in the order the block first calls them
        self._seen: List[Tuple[torch.Tensor, str]] = []
        self._handles = []

    def __enter__(self):
        for name, mod in self.linears.items():
            self._handles.append(mod.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._seen.clear()

    def new_batch(self):
        # The inputs seen are held until the next batch so that no other tensor can take
        # their address (and identity) within this one.
        self._seen.clear()
        self._called.clear()

    def _hook(self, name):
        def hook(module, inputs, output):
            x = inputs[0]
            if name not in self.owner:
                self.order.append(name)
                self.owner[name] = next((o for t, o in self._seen if t is x), name)
            self._seen.append((x, name))
            if self.owner[name] == name:
                x2 = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
                if name not in self.sums:
                    self.sums[name] = torch.zeros(x2.shape[1], x2.shape[1],
                                                  dtype=torch.float32, device=x2.device)
                    self.rows[name] = 0
                self.sums[name].addmm_(x2.t(), x2)
                self.rows[name] += x2.shape[0]
            self._called.add(name)
            if self.stop and len(self._called) == len(self.linears):
                raise _Stop
        return hook

    def hessians(self) -> Dict[str, torch.Tensor]:
        """``{layer: 2·XᵀX/n}``; layers that share an input share the tensor object."""
        out: Dict[str, torch.Tensor] = {}
        done: Dict[str, torch.Tensor] = {}
        for name in self.linears:
            if name not in self.owner:
                raise ValueError(f"layer {name!r} received no input during calibration (is it "
                                 f"used by the model's forward?)")
            o = self.owner[name]
            if o not in done:
                done[o] = self.sums[o] * (2.0 / self.rows[o])
            out[name] = done[o]
        return out


def _run_block(block: nn.Module, hidden: Sequence[torch.Tensor], calls, index: int,
               hooks: Optional[_HessianHooks] = None, keep: bool = True):
    outs = []
    for h, per_block in zip(hidden, calls):
        args, kwargs = per_block[index]
        if hooks is not None:
            hooks.new_batch()
        try:
            out = block(h, *args, **kwargs)
        except _Stop:
            continue
        if keep:
            outs.append(out[0] if isinstance(out, tuple) else out)
    if hooks is not None:
        hooks.new_batch()
    return outs


def _check_args(model, tokens, batch_size, inputs=None):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_tokens(tokens)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if inputs is not None and inputs not in INPUTS:
        raise ValueError(f"inputs must be one of {INPUTS}, got {inputs!r}")


def _progress(it, total, desc, progress):
    if not progress:
        return it
    from tqdm.auto import tqdm
    return tqdm(it, total=total, desc=desc, unit="block")


@torch.no_grad()
def iter_hessians(model: nn.Module, calibration: torch.Tensor, names: Optional[Sequence[str]] = None,
                  *, batch_size: int = 4, progress: bool = False
                  ) -> Iterator[Dict[str, torch.Tensor]]:
    """Float-input Hessians, one decoder block at a time: yields ``{layer: H}`` for each block
    (only the ``names`` asked for, default every linear layer of the blocks), so a caller
    can store or use each block's before the next is computed."""
    _check_args(model, calibration, batch_size)
    per_block = _select(model, names)
    _, blocks = decoder_blocks(model)
    hidden, calls = _capture(model, blocks, calibration, batch_size)
    last = max((i for i, lin in enumerate(per_block) if lin), default=-1)
    for i in _progress(range(last + 1), last + 1, "hessians", progress):
        if not per_block[i]:
            hidden = _run_block(blocks[i], hidden, calls, i)
            continue
        with _HessianHooks(per_block[i]) as hooks:
            hidden = _run_block(blocks[i], hidden, calls, i, hooks, keep=i < last)
        yield hooks.hessians()


def layer_hessians(model: nn.Module, calibration: torch.Tensor,
                   names: Optional[Sequence[str]] = None, *, batch_size: int = 4,
                   progress: bool = False) -> Dict[str, torch.Tensor]:
    """``{layer name: H = 2·XᵀX/n}`` ([in_features, in_features], fp32) of the decoder blocks'
    linear layers over ``calibration`` token ids ``[n_blocks, seq_len]``, every layer seeing
    the float model's inputs. Layers that read the same input (q/k/v, gate/up) share one
    tensor object: do not modify them in place. Feed them to
    ``quantize_weight(w, bits, g, method="gptq", hessian=H)``."""
    out: Dict[str, torch.Tensor] = {}
    for hs in iter_hessians(model, calibration, names, batch_size=batch_size, progress=progress):
        out.update(hs)
    return out


def _select(model: nn.Module, names: Optional[Sequence[str]]) -> List[Dict[str, nn.Linear]]:
    per_block = block_linears(model)
    if names is None:
        return per_block
    if isinstance(names, (str, bytes)):
        raise TypeError("names must be a sequence of layer names, not a single string")
    where = {n: i for i, lin in enumerate(per_block) for n in lin}
    chosen: List[Dict[str, nn.Linear]] = [{} for _ in per_block]
    for n in names:
        if n not in where:
            mods = dict(model.named_modules())
            what = ("not an nn.Linear inside a decoder block (the output head and embeddings "
                    "stay float)" if n in mods else "not a module of the model")
            raise ValueError(f"layer {n!r} is {what}")
        chosen[where[n]][n] = per_block[where[n]][n]
    return chosen


@torch.no_grad()
def quantize_layers(model: nn.Module, plan: Mapping[str, int], calibration: torch.Tensor, *,
                    group_size: int = 64, inputs: str = "sequential", apply: bool = False,
                    batch_size: int = 4, progress: bool = False,
                    scale_dtype: torch.dtype = torch.float16, **gptq_options
                    ) -> Dict[str, QuantizedWeight]:
    """GPTQ of the linear layers in ``plan`` (``{layer name: bits}``) over ``calibration`` token
    ids ``[n_blocks, seq_len]``, block by block; returns ``{layer name: QuantizedWeight}``.

    ``inputs``: ``"sequential"`` or ``"float"`` (module docstring). The model's weights are
    left as they were unless ``apply=True``, which leaves each planned layer's weight equal
    to its dequantized quantization (the model then computes what the packed model would).
    Layers whose ``in_features`` the group size does not divide are padded. ``gptq_options``
    go to :func:`qra_kernels.gptq.gptq_quantize` (``act_order``, ``damp``, ...).
    """
    _check_args(model, calibration, batch_size, inputs)
    if not isinstance(plan, Mapping) or not plan:
        raise ValueError("plan must be a non-empty mapping {layer name: bits}")
    for n, b in plan.items():
        check_bits(b, name=f"plan[{n!r}]")
    check_group_size(group_size)
    per_block = _select(model, list(plan))
    _, blocks = decoder_blocks(model)
    hidden, calls = _capture(model, blocks, calibration, batch_size)
    last = max(i for i, lin in enumerate(per_block) if lin)
    result: Dict[str, QuantizedWeight] = {}

    def quantize(name: str, lin: nn.Linear, h: torch.Tensor) -> torch.Tensor:
        w = lin.weight.detach()
        qw = quantize_weight(w, plan[name], group_size, "gptq", h, scale_dtype=scale_dtype,
                             pad=w.shape[1] % group_size != 0, **gptq_options)
        result[name] = qw
        return qw.dequantize(w.dtype)

    for i in _progress(range(last + 1), last + 1, f"gptq ({inputs} inputs)", progress):
        todo = per_block[i]
        if not todo:
            hidden = _run_block(blocks[i], hidden, calls, i)
            continue
        saved = {n: lin.weight.detach().clone() for n, lin in todo.items()}
        try:
            if inputs == "float":
                with _HessianHooks(todo) as hooks:
                    hidden = _run_block(blocks[i], hidden, calls, i, hooks, keep=i < last)
                for n, h in hooks.hessians().items():
                    todo[n].weight.copy_(quantize(n, todo[n], h))
            else:
                for subset in _subsets(blocks[i], todo, hidden, calls, i):
                    with _HessianHooks(subset, stop=True) as hooks:
                        _run_block(blocks[i], hidden, calls, i, hooks, keep=False)
                    for n, h in hooks.hessians().items():
                        todo[n].weight.copy_(quantize(n, todo[n], h))
                if i < last:
                    hidden = _run_block(blocks[i], hidden, calls, i)
        finally:
            if not apply:
                for n, w in saved.items():
                    todo[n].weight.copy_(w)
    return result


def _subsets(block, todo: Mapping[str, nn.Linear], hidden, calls, index: int):
    """The planned layers of one block in sets that read one input, in the order the block
    calls them (found on the first calibration batch)."""
    with _HessianHooks(todo) as probe:
        _run_block(block, hidden[:1], calls[:1], index, probe, keep=False)
    missing = [n for n in todo if n not in probe.owner]
    if missing:
        raise ValueError(f"layer {missing[0]!r} received no input during calibration (is it "
                         f"used by the model's forward?)")
    sets: Dict[str, Dict[str, nn.Linear]] = {}
    for n in probe.order:
        sets.setdefault(probe.owner[n], {})[n] = todo[n]
    return list(sets.values())
