"""Who runs the routed-experts op (``qra::grouped_linear``, :mod:`qra_kernels.ops`).

The selected backend's name decides, with the same rule as ``qra::linear``
(:mod:`qra_kernels.backends`):

* ``"reference"`` runs the spec (``ReferenceBackend.grouped_forward``: plain torch).
* Any other choice runs the experts one after another, each expert's run of rows through
  the ``qra::linear`` backend that the registry selects for those rows (``cpu``, ``triton``,
  ``cuda``, or ``reference`` where "auto" finds nothing faster). A backend asked for by name
  that cannot run an expert's rows raises there, as it does for one linear layer. Experts
  that receive no rows cost nothing.

Per-expert dispatch launches one kernel per expert that receives tokens and reads
``tokens_per_expert`` on the host (one device sync per call on a GPU). A grouped kernel —
one launch over all (expert, tile) pairs, as MegaBlocks and vLLM's fused MoE do — would
remove both; it is not written yet.
"""
from __future__ import annotations

from typing import List

import torch

from ..format import expert_code_rows
from . import _REGISTRY, _ensure_loaded, get_backend, select_backend


def _counts(tokens_per_expert: torch.Tensor, n_experts: int, rows: int) -> List[int]:
    counts = [int(c) for c in tokens_per_expert.tolist()]
    if len(counts) != n_experts:
        raise ValueError(f"tokens_per_expert has {len(counts)} entries for {n_experts} experts")
    if any(c < 0 for c in counts) or sum(counts) != rows:
        raise ValueError(f"tokens_per_expert must be >= 0 and sum to the {rows} rows of x, got "
                         f"{counts}")
    return counts


def _reference():
    _ensure_loaded()
    return _REGISTRY["reference"]


def grouped_forward(x, tokens_per_expert, qweight, scales, zeros, bits, group_size,
                    out_features):
    counts = _counts(tokens_per_expert, len(bits), x.shape[0])
    if get_backend() == "reference":
        return _reference().grouped_forward(x, tokens_per_expert, qweight, scales, zeros, bits,
                                            group_size, out_features)
    kp = scales.shape[1] * group_size
    y = x.new_empty(x.shape[0], out_features)
    row = 0
    for e, ((r0, r1), count) in enumerate(zip(expert_code_rows(bits, kp), counts)):
        if count:
            xe = x[row:row + count]
            y[row:row + count] = select_backend(xe).forward(
                xe, qweight[r0:r1], scales[e], zeros[e], bits[e], group_size, out_features,
                None, None, 0.0, None)
        row += count
    return y


def grouped_backward(grad_out, x, tokens_per_expert, qweight, scales, zeros, bits, group_size,
                     out_features):
    counts = _counts(tokens_per_expert, len(bits), x.shape[0])
    if get_backend() == "reference":
        return _reference().grouped_backward(grad_out, x, tokens_per_expert, qweight, scales,
                                             zeros, bits, group_size, out_features)
    kp = scales.shape[1] * group_size
    gx = torch.zeros_like(x)
    row = 0
    for e, ((r0, r1), count) in enumerate(zip(expert_code_rows(bits, kp), counts)):
        if count:
            xe = x[row:row + count]
            ge, _, _ = select_backend(xe).backward(
                grad_out[row:row + count].contiguous(), xe, qweight[r0:r1], scales[e],
                zeros[e], bits[e], group_size, out_features, None, None, 0.0, True, False)
            gx[row:row + count] = ge
        row += count
    return gx
