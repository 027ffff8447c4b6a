"""GPTQ: second-order, calibration-aware quantization into the packed format.

GPTQ (Frantar et al., 2023) quantizes a linear layer's weight ``W [N, K]`` one input column
at a time and, after each column, moves its rounding error onto the columns not yet
quantized so as to minimise the layer's output error on calibration inputs ``X``:

    E(Ŵ) = tr((W − Ŵ) H (W − Ŵ)ᵀ),    H = 2·XᵀX / n   (the layer's Hessian, [K, K])

Each row of ``W`` is independent given ``H``; the error of column ``j`` is compensated with
row ``j`` of the upper Cholesky factor ``U`` of ``H⁻¹`` (the "Cholesky reformulation"), in
blocks of ``block_size`` columns whose updates to the rest of the matrix are applied lazily,
as one matrix product per block.

What this implementation adds or chooses, and why (measurements in docs/QUANTIZERS.md):

* **Our format has no ``g_idx``** — codes are stored in the original column order and every
  group of ``group_size`` consecutive input columns has one (scale, zero). Each group's
  parameters are therefore fixed before any of its columns is quantized. ``act_order``:
  ``False`` visits columns in order and chooses a group's parameters at its first column,
  from the weights as GPTQ has updated them so far (the whole group lies in the current
  block, so it is up to date); ``"group"`` (default; GPTQModel's group-aware reordering)
  visits whole groups by decreasing max ``H_jj`` and the columns inside each by decreasing
  ``H_jj``, so a group is still one contiguous run and its parameters are still chosen from
  the updated weights; ``True`` (``desc_act``) visits all columns by decreasing ``H_jj``, so
  a group's columns are scattered over the sweep and all parameters are chosen up front from
  the original weights (GPTQ's ``static_groups``).
* **The zero is a float** (fp16/bf16) in our format, not an integer, so a group's grid can
  sit exactly on its range. ``group_params`` picks how each group's (scale, zero) is chosen:
  ``"minmax"`` (the exact range), ``"mse"`` (a grid of centred clipped ranges, each error
  weighted per column by the inverse of ``U_jj²``, the cost GPTQ charges a column for its
  rounding error), or ``"rtn"`` (exactly :func:`quantize_weight`'s RTN parameters, so with
  ``H = I`` GPTQ reproduces RTN bit for bit).
* **Refit** (``refit=True``): with the codes fixed, each row's scales and zeros are the
  least-squares solution of ``E`` (a ``2·groups``-variable problem per row, solved in
  closed form), kept only where it lowers ``E`` after rounding to the storage dtype.
* **Compensation** can be switched off (``compensate=False``: only ``diag H`` is used), which
  leaves an AWQ-style activation-aware clipping search and refit with no error feedback —
  measured against full GPTQ in docs/QUANTIZERS.md.
* **Damping**: ``damp`` × mean(diag H) is added to the diagonal; if the Cholesky factorisation
  still fails, the damping is doubled until it succeeds. Columns whose input is always zero
  ("dead", ``H_jj = 0``) get ``H_jj = 1``: their error then costs nothing and propagates
  nowhere.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .format import SCALE_DTYPES

GROUP_PARAMS = ("mse", "minmax", "rtn")

# Fractions of a group's range tried by group_params="mse" (centred clipping), 1.0 first.
_MSE_GRID = tuple(1.0 - 0.025 * i for i in range(21))  # 1.0 … 0.5

# Damping is doubled at most this many times before giving up on the Cholesky factorisation.
_DAMP_RETRIES = 20

# Elements per chunk of rows (bounds the sweep's and the refit's temporaries).
_CHUNK_ELEMENTS = 1 << 22


def hessian_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr((W − Ŵ) H (W − Ŵ)ᵀ)``: the layer's output error on the calibration inputs that
    ``H`` was accumulated from (times 2/n), the objective GPTQ minimises."""
    e = (weight.to(torch.float64) - approx.to(torch.float64))
    return float(((e @ hessian.to(torch.float64)) * e).sum())


def check_hessian(hessian, in_features: int, name: str = "hessian") -> torch.Tensor:
    """Validate a layer Hessian ``[in_features, in_features]`` and return it as fp32,
    symmetrised (accumulation in floating point leaves it symmetric only up to rounding)."""
    if not isinstance(hessian, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [in_features, in_features], got "
                        f"{type(hessian).__name__}")
    if not hessian.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {hessian.dtype}")
    if tuple(hessian.shape) != (in_features, in_features):
        raise ValueError(f"{name} must have shape ({in_features}, {in_features}) (the weight's "
                         f"in_features), got {tuple(hessian.shape)}")
    h = hessian.to(torch.float32)
    if not bool(torch.isfinite(h).all()):
        raise ValueError(f"{name} contains NaN or Inf")
    if bool((torch.diagonal(h) < 0).any()):
        raise ValueError(f"{name} has a negative diagonal entry: it must be X^T X of the "
                         f"layer's inputs (positive semi-definite)")
    scale = float(h.abs().max())
    if scale > 0 and float((h - h.t()).abs().max()) > 1e-3 * scale:
        raise ValueError(f"{name} is not symmetric: it must be X^T X of the layer's inputs")
    return (h + h.t()) * 0.5


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int,
                  scale_dtype: torch.dtype, in_features: Optional[int] = None, *,
                  damp: float = 0.01, block_size: int = 128, act_order="group",
                  group_params: str = "mse", refit: bool = True, compensate: bool = True
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ of ``weight [N, Kp]`` (already padded to a multiple of ``group_size``) with the
    checked ``hessian [K, K]`` of its first ``in_features = K`` columns.

    Returns (codes uint8 ``[N, Kp]``, scales ``[N, Kp/g]``, zeros ``[N, Kp/g]``) in
    ``scale_dtype``; padding columns get code 0. Called by
    :func:`qra_kernels.quantizers.quantize_weight` (``method="gptq"``), which validates and
    pads; the options are documented there and in the module docstring.
    """
    if act_order not in (False, True, "group"):
        raise ValueError(f"act_order must be False, True or 'group', got {act_order!r}")
    if group_params not in GROUP_PARAMS:
        raise ValueError(f"group_params must be one of {GROUP_PARAMS}, got {group_params!r}")
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not 0 < damp <= 1:
        raise ValueError(f"damp must be a float in (0, 1], got {damp!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if scale_dtype not in SCALE_DTYPES:
        raise TypeError(f"scale_dtype must be torch.float16 or torch.bfloat16, got {scale_dtype}")
    if not isinstance(compensate, bool):
        raise TypeError(f"compensate must be a bool, got {type(compensate).__name__}")
    if not compensate:
        # Only the diagonal: no error moves between columns, and what is left is an
        # activation-aware choice of each group's grid (AWQ-style clipping search weighted
        # by each input channel's energy) followed by the same weighted refit.
        hessian = torch.diag(torch.diagonal(hessian))
    n, kp = weight.shape
    k = kp if in_features is None else in_features
    g = group_size
    qmax = float((1 << bits) - 1)
    dev = weight.device
    w_orig = weight.to(torch.float32)

    h = torch.zeros(kp, kp, dtype=torch.float32, device=dev)
    h[:k, :k] = hessian.to(dev, torch.float32)
    dead = torch.diagonal(h) == 0  # includes the padding columns
    h[dead, dead] = 1.0
    if act_order is True:
        # Visit columns by decreasing H_jj (the inputs with the most energy first), so the
        # columns that matter most are quantized while the most freedom is left to
        # compensate them.
        perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
    elif act_order == "group":
        # Group-aware order (GPTQModel's "GAR"): whole groups by decreasing max H_jj, and
        # the columns of each group by decreasing H_jj, so each group is still visited in
        # one contiguous run and its parameters can be chosen at its first column.
        local = torch.argsort(torch.diagonal(h).view(-1, g), dim=1, descending=True, stable=True)
        local = local + torch.arange(0, kp, g, device=dev).unsqueeze(1)
        order = torch.argsort(torch.diagonal(h).view(-1, g).amax(1), descending=True, stable=True)
        perm = local[order].reshape(-1)
    else:
        perm = torch.arange(kp, device=dev)
    u = _inverse_cholesky(h[perm][:, perm] if act_order else h, damp)
    # Cost of a unit rounding error in column j (GPTQ's (err / U_jj)², original order);
    # dead and padding columns cost nothing.
    d = torch.diagonal(u)
    col_cost = torch.empty_like(d)
    col_cost[perm] = 1.0 / (d * d)
    col_cost = torch.where(dead, torch.zeros_like(col_cost), col_cost)

    groups = kp // g
    scales = torch.empty(n, groups, dtype=scale_dtype, device=dev)
    zeros = torch.empty(n, groups, dtype=scale_dtype, device=dev)
    codes = torch.empty(n, kp, dtype=torch.uint8, device=dev)
    h_raw = hessian.to(dev, torch.float32)
    # Rows are independent given H: sweep them in chunks to bound the temporaries.
    rows = max(1, _CHUNK_ELEMENTS // kp)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        _sweep(w_orig[r0:r1], u, perm, col_cost, codes[r0:r1], scales[r0:r1], zeros[r0:r1],
               g, qmax, block_size, act_order, group_params)
    if refit:
        # The refit's temporaries are [rows, groups, Kp]: smaller chunks.
        rows = max(1, _CHUNK_ELEMENTS // (kp * groups))
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            _refit_params(w_orig[r0:r1, :k], codes[r0:r1], scales[r0:r1], zeros[r0:r1],
                          h_raw, g, qmax, k)
    if k != kp:
        codes[:, k:] = 0
    return codes, scales, zeros


def _sweep(w_orig, u, perm, col_cost, codes, scales, zeros, g, qmax, block_size, act_order,
           group_params) -> None:
    """The GPTQ column sweep over rows ``w_orig [n, Kp]``, writing codes/scales/zeros in place."""
    n, kp = w_orig.shape
    groups = kp // g
    scale_dtype = scales.dtype
    static = act_order is True
    if static:
        # Static groups: a group's columns are scattered over the sweep, so every group's
        # parameters are chosen up front, from the original weights.
        s_all, z_all = _group_params(w_orig.view(n, groups, g), col_cost.view(groups, g), qmax,
                                     scale_dtype, group_params)
        scales.copy_(s_all)
        zeros.copy_(z_all)
    w = w_orig[:, perm] if act_order else w_orig.clone()

    # Blocks must hold whole groups, so a group's parameters (chosen at its first column)
    # see its columns with every update from earlier columns applied.
    bs = max(g, (block_size // g) * g)
    cols_list = perm.tolist()
    for i1 in range(0, kp, bs):
        i2 = min(i1 + bs, kp)
        w1 = w[:, i1:i2].clone()
        err1 = torch.empty_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            c = cols_list[i1 + i]
            grp = c // g
            if not static and (i1 + i) % g == 0:
                # Not act-order, or group-aware order: this group's columns are the next g
                # of the sweep, all with every earlier update applied.
                s_g, z_g = _group_params(w1[:, i:i + g].unsqueeze(1),
                                         col_cost[perm[i1 + i:i1 + i + g]].unsqueeze(0), qmax,
                                         scale_dtype, group_params)
                scales[:, grp] = s_g[:, 0]
                zeros[:, grp] = z_g[:, 0]
            s = scales[:, grp].float()
            z = zeros[:, grp].float()
            col = w1[:, i]
            q = torch.round(col / s + z).clamp_(0, qmax)
            codes[:, c] = q.to(torch.uint8)
            e = (col - (q - z) * s) / u1[i, i]
            w1[:, i:].sub_(e.unsqueeze(1) * u1[i, i:].unsqueeze(0))
            err1[:, i] = e
        w[:, i2:].sub_(err1 @ u[i1:i2, i2:])


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + λ·mean(diag H)·I)⁻¹``, doubling λ until it factors."""
    mean_diag = float(torch.diagonal(h).mean())
    eye = torch.eye(h.shape[0], dtype=torch.float64, device=h.device)
    h64 = h.to(torch.float64)
    lam = damp
    for _ in range(_DAMP_RETRIES):
        # float64: the factorisation is O(K³) once per layer, cheap next to the sweep, and
        # it keeps the inverse usable for the ill-conditioned Hessians of wide inputs.
        lower, info = torch.linalg.cholesky_ex(h64 + lam * mean_diag * eye)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0:
                return upper.to(torch.float32)
        lam *= 2.0
    raise ValueError(f"hessian: the Cholesky factorisation failed even with damping "
                     f"{lam / 2:.3g} x mean diagonal; the matrix is not X^T X of real inputs")


def _stored(s: torch.Tensor, z: torch.Tensor, dtype: torch.dtype):
    from .quantizers import _stored as stored
    return stored(s, z, dtype)


def _group_params(x: torch.Tensor, cost: torch.Tensor, qmax: float, dtype: torch.dtype,
                  how: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) in the storage dtype for ``x [rows, groups, g]``; ``cost [groups, g]``
    weights each column's squared error (``"mse"``)."""
    from .quantizers import _rtn_params
    if how == "rtn":
        return _rtn_params(x, qmax, dtype)
    mn, mx = x.amin(dim=-1), x.amax(dim=-1)
    rng = mx - mn
    if how == "minmax":
        return _minmax(mn, rng, qmax, dtype)
    best_s, best_z = _minmax(mn, rng, qmax, dtype)
    best_err = _weighted_error(x, best_s, best_z, qmax, cost)
    for frac in _MSE_GRID[1:]:
        s, z = _minmax(mn + rng * (1 - frac) / 2, rng * frac, qmax, dtype)
        err = _weighted_error(x, s, z, qmax, cost)
        better = err < best_err
        best_s = torch.where(better, s, best_s)
        best_z = torch.where(better, z, best_z)
        best_err = torch.where(better, err, best_err)
    return best_s, best_z


def _minmax(lo: torch.Tensor, rng: torch.Tensor, qmax: float, dtype: torch.dtype):
    """The grid spanning ``[lo, lo + rng]`` exactly: float zero ``-lo / s`` computed from the
    *stored* scale so the lower end maps onto code 0 as closely as the dtype allows."""
    s = rng / qmax
    s = torch.where(s > 0, s, torch.where(lo != 0, lo.abs(), torch.ones_like(lo)))
    s, _ = _stored(s, lo, dtype)
    z = -lo / s.float()
    return s, z.to(dtype)


def _weighted_error(x, s, z, qmax, cost):
    sf, zf = s.float().unsqueeze(-1), z.float().unsqueeze(-1)
    q = torch.round(x / sf + zf).clamp(0, qmax)
    return (((q - zf) * sf - x).square() * cost).sum(dim=-1)


def _refit_params(w: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                  zeros: torch.Tensor, h: torch.Tensor, g: int, qmax: float, k: int) -> None:
    """In place: per row, the (scale, zero) of every group that minimise
    ``(w − ŵ) H (w − ŵ)ᵀ`` with the codes fixed, where it lowers that error once stored.

    ``ŵ = Σ_g s_g·q_g + m_g·1_g`` (``q_g``: the row's codes on group g, zero elsewhere;
    ``m_g = −s_g·z_g``) is linear in ``θ = (s, m)``, so ``θ = (AᵀHA)⁻¹ AᵀH w`` per row. The
    blocks of ``AᵀHA`` are sums of ``H`` restricted to pairs of groups, so building it costs
    one ``[K, K] × [K, N]`` product in all.
    """
    n = w.shape[0]
    groups = scales.shape[1]
    kp = groups * g
    dev = w.device
    q = codes[:, :k].float()
    # Pad to whole groups with zero H rows/columns: padding contributes nothing.
    qp = torch.zeros(n, kp, device=dev)
    qp[:, :k] = q
    hp = torch.zeros(kp, kp, device=dev)
    hp[:k, :k] = h
    wp = torch.zeros(n, kp, device=dev)
    wp[:, :k] = w
    ind = torch.zeros(kp, groups, device=dev)  # group indicator
    ind[torch.arange(kp, device=dev), torch.arange(kp, device=dev) // g] = 1.0
    ind[k:] = 0.0
    qg = qp.view(n, groups, g)
    hq = torch.empty(n, groups, kp, device=dev)  # (H q_g)[i] for each row, group
    for gi in range(groups):
        hq[:, gi] = qg[:, gi] @ hp[gi * g:(gi + 1) * g]
    h1 = ind.t() @ hp  # [groups, kp]: (H 1_g)
    m = 2 * groups
    a = torch.empty(n, m, m, device=dev)
    # <q_h, H q_g> = Σ_{i∈h} q_i (H q_g)_i
    a[:, :groups, :groups] = (hq.view(n, groups, groups, g) * qg.unsqueeze(1)).sum(-1).transpose(1, 2)
    # <q_h, H 1_g>
    qh1 = (h1.view(groups, groups, g).unsqueeze(0) * qg.unsqueeze(1)).sum(-1)  # [n, g_of_1, h]
    a[:, :groups, groups:] = qh1.transpose(1, 2)
    a[:, groups:, :groups] = qh1
    a[:, groups:, groups:] = (h1.view(groups, groups, g)).sum(-1).unsqueeze(0)
    hw = wp @ hp  # [n, kp] (H w)
    rhs = torch.cat([(qg * hw.view(n, groups, g)).sum(-1), hw.view(n, groups, g).sum(-1)], 1)
    # A little ridge keeps rows whose codes are constant on a group (singular) solvable.
    ridge = 1e-6 * torch.diagonal(a, dim1=1, dim2=2).mean(-1).clamp_min(1e-30)
    a = a + ridge[:, None, None] * torch.eye(m, device=dev)
    theta = torch.linalg.solve(a.double(), rhs.double().unsqueeze(-1)).squeeze(-1).float()
    s_new, m_new = theta[:, :groups], theta[:, groups:]
    ok_s = torch.isfinite(s_new) & (s_new > 0) & torch.isfinite(m_new)
    s_new = torch.where(ok_s, s_new, scales.float())
    z_new = torch.where(ok_s, -m_new / s_new, zeros.float())
    try:
        s_st, z_st = _stored(s_new, z_new, scales.dtype)
    except ValueError:
        return  # a refit scale beyond the dtype's range: keep the sweep's parameters
    z_st = torch.where(torch.isfinite(z_st), z_st, zeros)

    def err(s, z):
        deq = (qg - z.float().unsqueeze(-1)) * s.float().unsqueeze(-1)
        e = deq.view(n, kp)[:, :k] - w
        return ((e @ h) * e).sum(-1)

    better = err(s_st, z_st) < err(scales, zeros)
    scales.copy_(torch.where(better.unsqueeze(1), s_st, scales))
    zeros.copy_(torch.where(better.unsqueeze(1), z_st, zeros))
