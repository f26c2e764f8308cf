"""Key and value quantization for HCAttention: batched k-means product codebooks, code assignment,
lookup-table scores, int8 rows with per-row scales. Pure tensor functions: no files, no model.

Shapes: a product quantizer splits a head's key [D] into g = D / d sub-vectors of width d; each
(layer, KV head, group) has its own codebook of c centroids, so codebooks are [..., g, c, d] and
codes [..., tokens, g] (uint8 when c <= 256, int16 otherwise).
"""
from __future__ import annotations

BLOCK_ELEMENTS = 1 << 24  # distance-matrix elements materialised at once on the CPU (64 MiB of float32)
CUDA_BLOCK_ELEMENTS = 1 << 27  # and on a GPU (512 MiB): fewer, larger kernels


def code_dtype(centroids: int):
    import torch

    return torch.uint8 if centroids <= 256 else torch.int16


def _block(B: int, n: int, c: int, cuda: bool = False) -> int:
    return max(1, min(B, (CUDA_BLOCK_ELEMENTS if cuda else BLOCK_ELEMENTS) // max(1, n * c)))


def nearest(x, cent):
    """x [B, n, d], cent [B, c, d] (float32) → (index [B, n] int64, squared distance [B, n])."""
    import torch

    out_i = torch.empty(x.shape[:2], dtype=torch.long, device=x.device)
    out_d = torch.empty(x.shape[:2], dtype=torch.float32, device=x.device)
    step = _block(x.shape[0], x.shape[1], cent.shape[1], x.is_cuda)
    for a in range(0, x.shape[0], step):
        xb, cb = x[a:a + step], cent[a:a + step]
        # ||x - c||² = ||x||² - 2 x·c + ||c||²; the ||x||² term does not change the argmin
        d = torch.baddbmm((cb * cb).sum(-1)[:, None, :], xb, cb.transpose(1, 2), alpha=-2.0)  # [b, n, c]
        val, idx = d.min(-1)
        out_i[a:a + step] = idx
        out_d[a:a + step] = (val + (xb * xb).sum(-1)).clamp_(min=0)
    return out_i, out_d


def kmeans(x, c: int, iters: int = 8, seed: int = 0):
    """Lloyd's k-means on B independent problems at once. x [B, n, d] float32 → centroids [B, c, d].

    Deterministic for a seed on a given device: random distinct initial points (drawn on the CPU), sums
    by one-hot matmul (no atomics), empty clusters reseeded with the worst-fitted points."""
    import torch

    B, n, d = x.shape
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if n >= c:
        init = torch.argsort(torch.rand(B, n, generator=gen), dim=1)[:, :c]  # c distinct points per problem
    else:  # fewer points than centroids: duplicates are harmless (they share the points)
        init = torch.randint(n, (B, c), generator=gen)
    cent = x.gather(1, init.to(x.device)[..., None].expand(B, c, d)).clone()
    step = _block(B, n, c, x.is_cuda)
    for _ in range(iters):
        idx, dist = nearest(x, cent)
        for a in range(0, B, step):
            xb, ib = x[a:a + step], idx[a:a + step]
            if x.is_cuda:  # one-hot matmul: no atomics, so the same seed gives the same codebooks
                onehot = torch.nn.functional.one_hot(ib, c).to(x.dtype)  # [b, n, c]
                sums, counts = onehot.transpose(1, 2) @ xb, onehot.sum(1)  # [b, c, d], [b, c]
            else:  # CPU scatter_add is sequential per row, hence deterministic, and 30x cheaper
                sums = torch.zeros(xb.shape[0], c, d, dtype=x.dtype).scatter_add_(1, ib[..., None].expand(-1, -1, d), xb)
                counts = torch.zeros(xb.shape[0], c, dtype=x.dtype).scatter_add_(1, ib, torch.ones_like(ib, dtype=x.dtype))
            new = sums / counts.clamp(min=1)[..., None]
            empty = counts == 0
            if bool(empty.any()):
                far = dist[a:a + step].argsort(dim=1, descending=True)  # worst-fitted points first
                rank = (empty.cumsum(1) - 1).clamp(min=0) % n  # k-th empty cluster takes the k-th worst point
                repl = xb.gather(1, far.gather(1, rank)[..., None].expand(-1, -1, d))
                new = torch.where(empty[..., None], repl, new)
            cent[a:a + step] = new
    return cent


def split(keys, sub_dim: int):
    """keys [L, H, T, D] → sub-vector problems [L*H*g, T, sub_dim] (float32)."""
    L, H, T, D = keys.shape
    g = D // sub_dim
    return keys.float().reshape(L, H, T, g, sub_dim).permute(0, 1, 3, 2, 4).reshape(L * H * g, T, sub_dim)


def calibrate(keys, sub_dim: int, centroids: int, iters: int, seed: int):
    """Codebooks [L, H, g, c, sub_dim] float32 from calibration keys [L, H, T, D] (post-RoPE)."""
    L, H, T, D = keys.shape
    cent = kmeans(split(keys, sub_dim), centroids, iters, seed)
    return cent.reshape(L, H, D // sub_dim, centroids, sub_dim)


def encode_keys(keys, codebooks):
    """Codes [L, H, T, g] of keys [L, H, T, D] under codebooks [L, H, g, c, d]."""
    L, H, T, D = keys.shape
    g, c, d = codebooks.shape[2:]
    idx, _ = nearest(split(keys, d), codebooks.reshape(L * H * g, c, d).float())  # [L*H*g, T]
    return idx.reshape(L, H, g, T).permute(0, 1, 3, 2).to(code_dtype(c)).contiguous()


def decode_keys(codes, codebooks):
    """Reconstructed keys [..., T, D] from codes [..., T, g] and codebooks [..., g, c, d]."""
    import torch

    g, c, d = codebooks.shape[-3:]
    lead = codes.shape[:-2]
    cb = codebooks.float().reshape(-1, g * c, d)  # [P, g*c, d]
    T = codes.shape[-2]
    idx = codes.long().reshape(cb.shape[0], T, g) + torch.arange(g, device=codes.device) * c  # [P, T, g]
    out = cb.gather(1, idx.reshape(cb.shape[0], T * g, 1).expand(-1, -1, d))  # [P, T*g, d]
    return out.reshape(*lead, codes.shape[-2], g * d)


def approx_logits(q, codebooks, codes, block_tokens: int = 1 << 16):
    """Lookup-table scores (mission.md §4.1(2)): T[i, :] = C_i · q̄_i, z̃_t = Σ_i T[i, P[t, i]].

    q [H, R, D] float32 (R query rows per KV head), codebooks [H, g, c, d], codes [H, n, g] → z̃ [H, R, n]
    float32, unscaled (multiply by the attention scale). One embedding_bag per block of tokens: it sums the
    g table entries of each token without materialising [H, R, n, g]."""
    import torch
    import torch.nn.functional as F

    H, R, D = q.shape
    g, c, d = codebooks.shape[1:]
    n = codes.shape[1]
    table = torch.einsum("hrgd,hgcd->hgcr", q.reshape(H, R, g, d), codebooks.float())  # [H, g, c, R]
    weight = table.reshape(H * g * c, R)
    # int32 indices (H·g·c is far below 2^31): half the index traffic of int64 at a million tokens
    offset = (torch.arange(H, device=q.device, dtype=torch.int32)[:, None] * (g * c)
              + torch.arange(g, device=q.device, dtype=torch.int32)[None] * c)
    out = torch.empty(H, n, R, dtype=torch.float32, device=q.device)
    for a in range(0, n, block_tokens):
        idx = codes[:, a:a + block_tokens].int() + offset[:, None, :]  # [H, nb, g]
        out[:, a:a + block_tokens] = F.embedding_bag(idx.reshape(-1, g), weight, mode="sum").reshape(H, -1, R)
    return out.transpose(1, 2)  # [H, R, n]


def quantize_rows(x):
    """int8 rows with a float32 scale per row: x [..., D] → (q [..., D] int8, scale [...])."""
    import torch

    scale = x.float().abs().amax(-1).clamp(min=1e-12) / 127.0
    q = torch.round(x.float() / scale[..., None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_rows(q, scale, dtype):
    """Inverse of quantize_rows (scale None: q is already a float tensor)."""
    if scale is None:
        return q.to(dtype)
    return (q.float() * scale[..., None]).to(dtype)
