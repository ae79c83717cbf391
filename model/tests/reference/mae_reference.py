"""Independent NumPy reference for a tiny masked autoencoder (MAE) forward pass.

Computes, in float64 from float32 weights, the forward pass of a tiny MAE
(He et al. 2022, mmselfsup layout): patchify -> patch embedding + 2-D sin-cos
position embedding -> random masking from given noise -> ViT encoder
(pre-norm blocks, exact GELU) -> final norm ("latent") -> decoder embedding,
mask tokens, unshuffle, decoder block, norm, prediction head ("pred") ->
norm-pix reconstruction loss over masked patches, ignoring invalid pixels.

Weights, inputs and expected outputs are written to
model/tests/data/mae_tiny_reference.npz (uncompressed np.savez).

Run from the repository root to (re)write the fixture:

    python3 model/tests/reference/mae_reference.py

The script is deterministic (np.random.default_rng(0)).
"""
import math
import os

import numpy as np

# ---- sizes ---------------------------------------------------------------
B, C, H, W = 2, 2, 16, 16
P_SZ = 4                          # patch size p
GH, GW = H // P_SZ, W // P_SZ     # token grid 4 x 4
N = GH * GW                       # 16 tokens
P = C * P_SZ * P_SZ               # 32 values per token
D, DEPTH, HEADS, HID = 16, 2, 2, 32
DD, DDEPTH, DHEADS, DHID = 8, 1, 2, 16
EPS = 1e-6
MASK_RATIO = 0.75
K = int(N * (1 - MASK_RATIO))     # 4 kept tokens

rng = np.random.default_rng(0)
params = {}


def normal(shape, std=0.3):
    return (rng.standard_normal(shape) * std).astype(np.float32)


def add_linear(name, out_dim, in_dim):
    params[name + ".weight"] = normal((out_dim, in_dim))
    params[name + ".bias"] = normal((out_dim,), 0.1)


def add_norm(name, dim):
    params[name + ".weight"] = (1.0 + normal((dim,), 0.1)).astype(np.float32)
    params[name + ".bias"] = normal((dim,), 0.1)


def add_block(prefix, dim, hid):
    add_norm(prefix + ".ln1", dim)
    add_linear(prefix + ".attn.qkv", 3 * dim, dim)
    add_linear(prefix + ".attn.proj", dim, dim)
    add_norm(prefix + ".ln2", dim)
    add_linear(prefix + ".mlp.fc1", hid, dim)
    add_linear(prefix + ".mlp.fc2", dim, hid)


# ---- parameters (float32) ------------------------------------------------
add_linear("encoder.patch_embed", D, P)
params["encoder.cls_token"] = normal((1, 1, D))
for i in range(DEPTH):
    add_block(f"encoder.blocks.{i}", D, HID)
add_norm("encoder.norm", D)
add_linear("decoder.embed", DD, D)
params["decoder.mask_token"] = normal((1, 1, DD))
for i in range(DDEPTH):
    add_block(f"decoder.blocks.{i}", DD, DHID)
add_norm("decoder.norm", DD)
add_linear("decoder.pred", P, DD)

# ---- inputs --------------------------------------------------------------
images = rng.standard_normal((B, C, H, W)).astype(np.float32)
valid = np.ones((B, H, W), dtype=np.float32)
valid[0, 0:6, 0:5] = 0.0                      # 6x5 no-data corner in sample 0
images = images * valid[:, None, :, :]        # zero invalid pixels, both channels
noise = rng.random((B, N)).astype(np.float32)

# float64 views used for all computation
p64 = {k: v.astype(np.float64) for k, v in params.items()}


# ---- building blocks -----------------------------------------------------
def patchify(x):
    """[B, C, H, W] -> [B, N, C*p*p], tokens row-major, values (c, i, j)."""
    b = x.shape[0]
    x = x.reshape(b, C, GH, P_SZ, GW, P_SZ).transpose(0, 2, 4, 1, 3, 5)
    return x.reshape(b, N, P)


def pos_embed(gh, gw, d):
    """2-D sin-cos embedding [gh*gw, d]: [sin(r w), cos(r w), sin(c w), cos(c w)]."""
    q = d // 4
    omega = 1.0 / 10000.0 ** (np.arange(q, dtype=np.float64) / q)
    r, c = np.meshgrid(np.arange(gh, dtype=np.float64),
                       np.arange(gw, dtype=np.float64), indexing="ij")
    r, c = r.reshape(-1, 1) * omega, c.reshape(-1, 1) * omega
    return np.concatenate([np.sin(r), np.cos(r), np.sin(c), np.cos(c)], axis=1)


def linear(x, name):
    return x @ p64[name + ".weight"].T + p64[name + ".bias"]


def layer_norm(x, name):
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)   # biased variance
    return (x - mean) / np.sqrt(var + EPS) * p64[name + ".weight"] + p64[name + ".bias"]


_erf = np.vectorize(math.erf)


def gelu(x):
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def attention(x, name, heads):
    b, n, d = x.shape
    hd = d // heads
    qkv = linear(x, name + ".qkv").reshape(b, n, 3, heads, hd).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]                        # [b, heads, n, hd]
    a = softmax(q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd))
    out = (a @ v).transpose(0, 2, 1, 3).reshape(b, n, d)    # heads back in order
    return linear(out, name + ".proj")


def block(x, prefix, heads):
    x = x + attention(layer_norm(x, prefix + ".ln1"), prefix + ".attn", heads)
    h = linear(gelu(linear(layer_norm(x, prefix + ".ln2"), prefix + ".mlp.fc1")), prefix + ".mlp.fc2")
    return x + h


# ---- forward pass --------------------------------------------------------
x64 = images.astype(np.float64)
tokens = linear(patchify(x64), "encoder.patch_embed") + pos_embed(GH, GW, D)

ids_shuffle = np.argsort(noise, axis=1, kind="stable")
ids_keep = ids_shuffle[:, :K].astype(np.int64)
ids_restore = np.argsort(ids_shuffle, axis=1, kind="stable").astype(np.int64)
masked = ids_restore >= K                                   # [B, N]
kept = np.take_along_axis(tokens, ids_keep[:, :, None], axis=1)

cls = np.broadcast_to(p64["encoder.cls_token"], (B, 1, D))
x = np.concatenate([cls, kept], axis=1)                      # [B, 1+K, D]
for i in range(DEPTH):
    x = block(x, f"encoder.blocks.{i}", HEADS)
latent = layer_norm(x, "encoder.norm")                       # [B, 1+K, D]

y = linear(latent, "decoder.embed")                          # [B, 1+K, DD]
mask_tokens = np.broadcast_to(p64["decoder.mask_token"], (B, N - K, DD))
rest = np.concatenate([y[:, 1:], mask_tokens], axis=1)       # [B, N, DD]
rest = np.take_along_axis(rest, ids_restore[:, :, None], axis=1)
y = np.concatenate([y[:, :1], rest + pos_embed(GH, GW, DD)], axis=1)
for i in range(DDEPTH):
    y = block(y, f"decoder.blocks.{i}", DHEADS)
y = layer_norm(y, "decoder.norm")
pred = linear(y, "decoder.pred")[:, 1:]                      # [B, N, P]

# ---- norm-pix loss over masked patches, invalid pixels left out ----------
target = patchify(x64)
v = patchify(np.broadcast_to(valid.astype(np.float64)[:, None], (B, C, H, W)))
cnt = v.sum(axis=-1)                                         # [B, N]
safe = np.maximum(cnt, 2.0)                                  # avoid /0; excluded below
mean = (v * target).sum(axis=-1) / safe
var = (v * (target - mean[..., None]) ** 2).sum(axis=-1) / (safe - 1.0)
t = (target - mean[..., None]) / np.sqrt(var[..., None] + EPS)
patch_loss = (v * (pred - t) ** 2).sum(axis=-1) / safe       # [B, N]
use = masked & (cnt >= 2)
loss = np.array([patch_loss[use].mean()], dtype=np.float64)

print(f"loss = {loss[0]:.12f}")
print(f"masked patches used = {int(use.sum())} (of {int(masked.sum())} masked)")

# ---- write fixture -------------------------------------------------------
out = dict(params)
out.update(images=images, valid=valid, noise=noise,
           latent=latent, pred=pred, loss=loss,
           ids_keep=ids_keep, ids_restore=ids_restore)
path = os.path.join("model", "tests", "data", "mae_tiny_reference.npz")
np.savez(path, **out)
print(f"wrote {path}")
