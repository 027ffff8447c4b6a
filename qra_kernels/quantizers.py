"""Float weight → packed format (:mod:`qra_kernels.format`).

Two methods:

* ``rtn`` — min-max asymmetric round-to-nearest per group, with an integer zero point
  (exactly representable in fp16 and bf16, so storing it loses nothing).
* ``hqq`` — calibration-free refinement of each group's scale and zero, in the spirit of
  Half-Quadratic Quantization (Badri & Shaji, 2023): a small grid of clipped ranges, HQQ's
  half-quadratic l_p (p < 1) updates of the zero, and closed-form least-squares refits of
  (scale, zero) given the codes. The result is measured *after* scales and zeros are
  rounded to their storage dtype and compared group by group with RTN; each group keeps
  whichever has the smaller squared error. ``hqq`` is therefore never worse than ``rtn`` in
  weight error, by construction — the ``hqq`` package itself is worse than RTN at 3 bits
  on small real models, which is why the guard exists.

  Measured on SmolLM2-135M (held-out perplexity, group 64; float 19.96): 4-bit ``hqq``
  24.4 vs ``rtn`` 26.4, 8-bit both within 0.3%. At 3 bits the weight error still drops but
  perplexity does not follow (``rtn`` 60, ``hqq`` ~170): without calibration data no
  weight-space objective we tried (clipping grids, a max-error bound, gain debiasing)
  protects the few input channels of v_proj/down_proj that carry massive activations.
  At 2 bits both are unusable uniformly (ppl ~1.9e5 hqq, ~3.8e5 rtn) and ``hqq`` is the
  less bad. So the method is a per-bit-width choice: :data:`RECOMMENDED_METHOD` records the
  measured better one for each bit-width, and callers that quantize whole models use it.

Quantization works through the rows in chunks, so its temporaries stay within a few
times the chunk's float size, and it runs on the weight's device (GPU when given one).
"""
from __future__ import annotations

from typing import Optional

import torch

from .format import (SCALE_DTYPES, QuantizedWeight, check_bits, check_group_size, pack,
                     padded_in_features)

METHODS = ("rtn", "hqq", "gptq")
# Which method gave the lower held-out perplexity on SmolLM2-135M, per bit-width (above).
RECOMMENDED_METHOD = {2: "hqq", 3: "rtn", 4: "hqq", 8: "rtn"}

# Elements per chunk of rows: bounds peak temporary memory (~10 fp32 copies of a chunk).
_CHUNK_ELEMENTS = 1 << 22

# Smallest positive (subnormal) value of each scale dtype: a scale that rounds to zero
# in storage is lifted to this, so dequantization never divides by or multiplies with 0.
_SMALLEST_SCALE = {torch.float16: 2.0 ** -24, torch.bfloat16: 2.0 ** -133}

# HQQ hyper-parameters (the paper's defaults for the zero-point update).
_HQQ_P = 0.7
_HQQ_BETA = 10.0
_HQQ_KAPPA = 1.01
_HQQ_ITERS = 20
# Fractions of the min-max range tried as initial (clipped) ranges.
_CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


def quantize_weight(weight: torch.Tensor, bits: int, group_size: int = 64, method: str = "hqq",
                    hessian: Optional[torch.Tensor] = None, *,
                    scale_dtype: torch.dtype = torch.float16, pad: bool = False,
                    **gptq_options) -> QuantizedWeight:
    """Quantize ``weight [out_features, in_features]`` to ``bits`` with groups along the input.

    ``method="gptq"`` needs ``hessian``: the layer's ``X^T X`` (any positive multiple, e.g.
    ``2·XᵀX/n``) over calibration inputs ``X [n, in_features]``, as
    :func:`qra_kernels.calibration.layer_hessians` returns it. Its options (keyword-only,
    defaults measured best in docs/QUANTIZERS.md) are those of
    :func:`qra_kernels.gptq.gptq_quantize`: ``damp`` (fraction of the mean diagonal added),
    ``block_size``, ``act_order``, ``group_params`` (``"mse"``, ``"minmax"``, ``"rtn"``) and
    ``refit``. ``rtn`` and ``hqq`` take neither a hessian nor options.

    ``pad=True`` allows an ``in_features`` that ``group_size`` does not divide: the last
    group is padded (the parameters are chosen as if the padding were copies of the last
    column, so min/max are unchanged); the padding codes are stored as 0 and ignored by
    every kernel.
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got {weight.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-d [out_features, in_features], got shape "
                         f"{tuple(weight.shape)}")
    if weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(f"weight must not be empty, got shape {tuple(weight.shape)}")
    check_bits(bits)
    check_group_size(group_size)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if scale_dtype not in SCALE_DTYPES:
        raise TypeError(f"scale_dtype must be torch.float16 or torch.bfloat16, got {scale_dtype}")
    n, k = weight.shape
    if k % group_size and not pad:
        raise ValueError(
            f"group_size={group_size} does not divide in_features={k}; pass pad=True or a "
            f"group size that divides it")
    if method == "gptq":
        if hessian is None:
            raise ValueError("hessian is required for method='gptq': the layer's X^T X "
                             "[in_features, in_features] from calibration inputs "
                             "(qra_kernels.calibration.layer_hessians)")
        from .gptq import check_hessian
        hessian = check_hessian(hessian, k)
    else:
        if hessian is not None:
            raise ValueError(f"hessian is only used by method='gptq'; method={method!r} is "
                             f"calibration-free (pass hessian=None)")
        if gptq_options:
            raise TypeError(f"method={method!r} takes no option(s) "
                            f"{sorted(gptq_options)} (they are method='gptq' options)")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("weight contains NaN or Inf")

    kp = padded_in_features(k, group_size)
    if method == "gptq":
        from .gptq import gptq_quantize
        w = weight.to(torch.float32)
        if kp != k:
            w = torch.cat([w, w[:, -1:].expand(-1, kp - k)], dim=1)
        q, s, z = gptq_quantize(w, hessian, bits, group_size, scale_dtype, k, **gptq_options)
        return QuantizedWeight(pack(q, bits), s.t().contiguous(), z.t().contiguous(), bits,
                               group_size, (n, k))
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // kp)
    codes, scales, zeros = [], [], []
    for start in range(0, n, rows_per_chunk):
        w = weight[start:start + rows_per_chunk].to(torch.float32)
        if kp != k:
            w = torch.cat([w, w[:, -1:].expand(-1, kp - k)], dim=1)
        q, s, z = _quantize_groups(w.view(w.shape[0], kp // group_size, group_size), bits,
                                   method, scale_dtype)
        q = q.view(w.shape[0], kp)
        if kp != k:
            q[:, k:] = 0  # docs/FORMAT.md: padding codes are 0
        codes.append(pack(q, bits))
        scales.append(s.t())
        zeros.append(z.t())
    return QuantizedWeight(torch.cat(codes, dim=1).contiguous(),
                           torch.cat(scales, dim=1).contiguous(),
                           torch.cat(zeros, dim=1).contiguous(), bits, group_size, (n, k))


def _quantize_groups(w: torch.Tensor, bits: int, method: str, scale_dtype: torch.dtype):
    """``w [rows, groups, g]`` fp32 → (codes uint8, scales, zeros [rows, groups] stored dtype)."""
    qmax = float((1 << bits) - 1)
    s, z = _rtn_params(w, qmax, scale_dtype)
    if method == "rtn":
        return _codes(w, s, z, qmax).to(torch.uint8), s, z
    best_err = _group_error(w, s, z, qmax)
    s_h, z_h = _stored(*_hqq_params(w, qmax), scale_dtype)
    better = _group_error(w, s_h, z_h, qmax) < best_err
    best_s, best_z = s, z
    best_s = torch.where(better, s_h, best_s)
    best_z = torch.where(better, z_h, best_z)
    return _codes(w, best_s, best_z, qmax).to(torch.uint8), best_s, best_z


def _stored(s: torch.Tensor, z: torch.Tensor, dtype: torch.dtype):
    """Round (scale, zero) to the storage dtype, refusing scales the dtype cannot hold."""
    limit = torch.finfo(dtype).max
    if bool((s > limit).any()):
        raise ValueError(
            f"weight: a group's range needs a scale of {float(s.max()):.4g}, beyond "
            f"{dtype}'s maximum {limit:.4g}; pass scale_dtype=torch.bfloat16")
    s = s.clamp_min(_SMALLEST_SCALE[dtype]).to(dtype)
    # The smallest scale may still round to 0 in storage if it was below the subnormal.
    s = torch.where(s == 0, torch.full_like(s, _SMALLEST_SCALE[dtype]), s)
    return s, z.to(dtype)


def _rtn_params(w, qmax, dtype):
    mn, mx = w.amin(dim=-1), w.amax(dim=-1)
    s = (mx - mn) / qmax
    # A constant group: any positive scale works; |value| keeps the code grid near it.
    s = torch.where(s > 0, s, torch.where(mn != 0, mn.abs(), torch.ones_like(mn)))
    s, _ = _stored(s, mn, dtype)
    # Round the stored scale *up* where storage rounded it down, so the code grid still spans
    # [min, max]: otherwise tiny groups (fp16 subnormal scales, 2-3 significant bits) clamp
    # their extremes by several steps.
    short = s.float() < (mx - mn) / qmax
    s = torch.where(short, torch.nextafter(s, torch.full_like(s, float("inf"))), s)
    z = torch.round(-mn / s.float()).clamp(0, qmax)
    return s, z.to(dtype)


def _codes(w, s, z, qmax):
    sf, zf = s.float().unsqueeze(-1), z.float().unsqueeze(-1)
    return torch.round(w / sf + zf).clamp(0, qmax)


def _group_error(w, s, z, qmax):
    """Sum of squared errors of each group."""
    sf, zf = s.float().unsqueeze(-1), z.float().unsqueeze(-1)
    q = torch.round(w / sf + zf).clamp(0, qmax)
    return ((q - zf) * sf - w).square().sum(dim=-1)


def _lsq_refit(w, q, s, z):
    """Least-squares (scale, zero) for fixed codes: w ≈ s·q + m, m = -s·z. Keeps the old
    values where the fit is degenerate (constant codes) or gives a non-positive scale."""
    qm, wm = q.mean(dim=-1, keepdim=True), w.mean(dim=-1, keepdim=True)
    dq = q - qm
    var = dq.square().mean(dim=-1)
    cov = (dq * (w - wm)).mean(dim=-1)
    s_new = cov / var.clamp_min(1e-12)
    ok = (var > 0) & (s_new > 0) & torch.isfinite(s_new)
    s_new = torch.where(ok, s_new, s)
    m = wm.squeeze(-1) - s_new * qm.squeeze(-1)
    z_new = torch.where(ok, -m / s_new, z)
    return s_new, z_new


def _hqq_params(w, qmax):
    """fp32 (scale, zero) per group with the least squared error found (module docstring)."""
    mn, mx = w.amin(dim=-1), w.amax(dim=-1)
    rng = (mx - mn).clamp_min(1e-12)
    best_s = rng / qmax
    best_z = -mn / best_s
    best_err = torch.full_like(mn, float("inf"))

    def consider(s, z):
        nonlocal best_s, best_z, best_err
        sf, zf = s.unsqueeze(-1), z.unsqueeze(-1)
        err = ((torch.round(w / sf + zf).clamp(0, qmax) - zf) * sf - w).square().sum(dim=-1)
        better = err < best_err
        best_s = torch.where(better, s, best_s)
        best_z = torch.where(better, z, best_z)
        best_err = torch.where(better, err, best_err)

    # 1. Clipped ranges (centred), each followed by one least-squares refit.
    for frac in _CLIP_GRID:
        s = rng * frac / qmax
        z = -(mn + rng * (1 - frac) / 2) / s
        q = torch.round(w / s.unsqueeze(-1) + z.unsqueeze(-1)).clamp(0, qmax)
        consider(*_lsq_refit(w, q, s, z))

    # 2. HQQ's half-quadratic splitting on the zero: shrink the residual with the
    #    generalised soft-threshold of the l_p norm, then the zero in closed form.
    s, z = best_s, best_z.clone()
    sf = s.unsqueeze(-1)
    beta = _HQQ_BETA
    for _ in range(_HQQ_ITERS):
        q = torch.round(w / sf + z.unsqueeze(-1)).clamp(0, qmax)
        r = w - (q - z.unsqueeze(-1)) * sf
        e = torch.sign(r) * torch.relu(r.abs() - r.abs().clamp_min(1e-12).pow(_HQQ_P - 1) / beta)
        z = (q - (w - e) / sf).mean(dim=-1)
        beta *= _HQQ_KAPPA
        consider(s, z)

    # 3. Alternate re-rounding and least-squares refits from the best point so far.
    s, z = best_s, best_z
    for _ in range(3):
        q = torch.round(w / s.unsqueeze(-1) + z.unsqueeze(-1)).clamp(0, qmax)
        s, z = _lsq_refit(w, q, s, z)
        consider(s, z)
    return best_s, best_z


def method_for_bits(bits: int, method: str) -> str:
    """The quantizer a bit-width gets: ``method`` itself, or for ``"recommended"`` the
    measured best one (:data:`RECOMMENDED_METHOD`)."""
    if method == "recommended":
        return RECOMMENDED_METHOD[bits]
    if method not in METHODS:
        raise ValueError(f"method must be 'recommended' or one of {METHODS}, got {method!r}")
    return method
