"""A slow, explicit reference of CAPI_SPEC.md, written independently of the package.

Everything runs per image in float64 with plain loops and formulas: per-channel RoPE, softmax attention
by hand, RMSNorm and erf-GELU by formula. Tests compare the fast model against it.
"""

import math

import torch


def rms_norm(x, weight=None, eps=1e-5):
    y = x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + eps)
    return y * weight if weight is not None else y


def gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def rope(x, coords, freqs):
    """x: (n, hd); coords: (n, 2); freqs: (2, hd). Channel c pairs with c +- hd/2 (rotate_half)."""
    n, hd = x.shape
    half = hd // 2
    out = torch.empty_like(x)
    for c in range(hd):
        angle = coords[:, 0] * freqs[0, c] + coords[:, 1] * freqs[1, c]
        rotated = -x[:, c + half] if c < half else x[:, c - half]  # rotate_half pairing
        out[:, c] = x[:, c] * torch.cos(angle) + rotated * torch.sin(angle)
    return out


def attention(sd, prefix, x, coords, context, context_coords, num_heads):
    d = x.shape[-1]
    hd = d // num_heads
    q = x @ sd[prefix + "q_proj.weight"].T
    k = context @ sd[prefix + "k_proj.weight"].T
    v = context @ sd[prefix + "v_proj.weight"].T
    freqs = sd[prefix + "rope.freqs"]
    heads = []
    for head in range(num_heads):
        sl = slice(head * hd, (head + 1) * hd)
        qh = rope(q[:, sl], coords, freqs)
        kh = rope(k[:, sl], context_coords, freqs)
        scores = (qh @ kh.T) / math.sqrt(hd)
        scores = scores - scores.max(dim=-1, keepdim=True).values
        weights = torch.exp(scores)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        heads.append(weights @ v[:, sl])
    return torch.cat(heads, dim=-1) @ sd[prefix + "proj.weight"].T


def block(sd, prefix, x, coords, num_heads, context=None, context_coords=None, eps=1e-5):
    normed = rms_norm(x, sd[prefix + "residual1.norm.weight"], eps)
    if context is None:
        context, context_coords = normed, coords
    x = x + attention(sd, prefix + "residual1.fn.", normed, coords, context, context_coords, num_heads)
    normed = rms_norm(x, sd[prefix + "residual2.norm.weight"], eps)
    hidden = gelu(normed @ sd[prefix + "residual2.fn.fc1.weight"].T)
    return x + hidden @ sd[prefix + "residual2.fn.fc2.weight"].T


def n_blocks(sd, which):
    return len({k.split(".")[2] for k in sd if k.startswith(which + ".blocks.")})


def patch_coords(h, w):
    coords = []
    for i in range(h):
        for j in range(w):
            coords.append((i / (h - 1) if h > 1 else 0.0, j / (w - 1) if w > 1 else 0.0))
    return torch.tensor(coords, dtype=torch.float64)


def register_coords(n_registers):
    side = n_registers // 4
    c = [k / side for k in range(side)]
    coords = [(ci, 0.0) for ci in c] + [(1.0, ci) for ci in c]  # top edge, right edge
    coords += [(1 - ci, 1.0) for ci in c] + [(0.0, 1 - ci) for ci in c]  # bottom edge, left edge
    return torch.tensor(coords, dtype=torch.float64)


def encode(sd, image, num_heads, visible=None, patch_size=14):
    """image: (3, H, W). Returns enc_norm-ed tokens [registers, visible patches] and their coordinates."""
    sd = {k: v.double() for k, v in sd.items()}
    image = image.double()
    _, height, width = image.shape
    h, w = height // patch_size, width // patch_size
    weight = sd["patch_embed.weight"].reshape(sd["patch_embed.weight"].shape[0], -1)
    patches = []
    for i in range(h):
        for j in range(w):
            pix = image[:, i * patch_size : (i + 1) * patch_size, j * patch_size : (j + 1) * patch_size]
            patches.append(weight @ pix.reshape(-1) + sd["patch_embed.bias"])
    tokens = torch.stack(patches)
    coords = patch_coords(h, w)
    if visible is not None:
        tokens, coords = tokens[visible], coords[visible]
    regs = register_coords(sd["registers"].shape[1])
    lo, hi = coords.min(dim=0).values, coords.max(dim=0).values
    regs = lo + regs * (hi - lo)
    x = torch.cat([sd["registers"][0], tokens])
    coords = torch.cat([regs, coords])
    for b in range(n_blocks(sd, "encoder")):
        x = block(sd, f"encoder.blocks.{b}.", x, coords, num_heads)
    return rms_norm(x), coords


def predict(sd, context, context_coords, query_coords, num_heads, depth=None):
    """Mask tokens at query_coords cross-attend to context through the first `depth` predictor blocks."""
    sd = {k: v.double() for k, v in sd.items()}
    x = sd["mask_token"].expand(query_coords.shape[0], -1)
    depth = n_blocks(sd, "decoder") if depth is None else depth
    for b in range(depth):
        x = block(sd, f"decoder.blocks.{b}.", x, query_coords, num_heads, context, context_coords)
    return rms_norm(x)


def official_forward(sd, image, num_heads, pred_num_heads, patch_size=14):
    """The official inference outputs for one image: (global_repr, registers, feature_map)."""
    n_reg = sd["registers"].shape[1]
    tokens, coords = encode(sd, image, num_heads, patch_size=patch_size)
    h, w = image.shape[1] // patch_size, image.shape[2] // patch_size
    pooled = predict(sd, tokens, coords, patch_coords(h, w), pred_num_heads, depth=1).mean(dim=0)
    return pooled, tokens[:n_reg], tokens[n_reg:].reshape(h, w, -1)
