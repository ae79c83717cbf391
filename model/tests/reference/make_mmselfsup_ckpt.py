"""Write a tiny SAR-IceFM / mmselfsup MAE checkpoint and its PyTorch reference outputs.

The model is built by hand in plain PyTorch (no mmselfsup, mmcls or mmengine import) with the
module names of mmselfsup 1.x's ``MAEViT`` backbone (an mmcls ``VisionTransformer``) and its
``MAEPretrainDecoder`` neck, so its ``state_dict()`` has the keys a real checkpoint has:

    backbone.patch_embed.projection.{weight,bias}   conv [D, C, p, p]
    backbone.cls_token, backbone.pos_embed          [1, 1, D], [1, 1 + N, D] (fixed sin-cos)
    backbone.layers.{i}.ln1 / attn.qkv / attn.proj / ln2 / ffn.layers.0.0 / ffn.layers.1
    backbone.ln1                                    final norm
    neck.mask_token, neck.decoder_pos_embed, neck.decoder_embed,
    neck.decoder_blocks.{i}.* (same block layout), neck.ln1, neck.decoder_pred

Sizes: width 16, 2 blocks, 2 heads, MLP ratio 2, patch 4, 2 channels, 8 x 8 px (4 tokens);
decoder 8 wide, 1 block, 2 heads. Pre-norm blocks, qkv with bias, exact GELU, LayerNorm eps
1e-6, position embeddings from mmselfsup's ``build_2d_sincos_position_embedding`` (re-typed
here) with a zero class-token row. Random weights from a fixed seed.

Files written (run from the repository root: ``python model/tests/reference/make_mmselfsup_ckpt.py``):

- ``model/tests/data/mmselfsup_tiny.pth``: ``torch.save({"meta", "state_dict", "optimizer"})``,
  the mmengine layout.
- ``model/tests/data/mmselfsup_tiny_backbone.pth``: a bare state dict of the backbone only,
  each key prefixed ``module.`` (as a DistributedDataParallel wrapper saves it).
- ``model/tests/data/mmselfsup_tiny_reference.npz`` (uncompressed): ``images`` [2, 2, 8, 8];
  ``encoder_out`` [2, 5, 16], the encoder on all tokens (no masking) after the final norm;
  ``noise`` [2, 4], the masking noise; ``latent`` [2, 3, 16], the encoder on the tokens that
  noise keeps at mask ratio 0.5; ``pred`` [2, 4, 32], the decoder's predictions re-ordered from
  mmselfsup's (i, j, c) patch-value order to icefm's (c, i, j).
"""
import os

import numpy as np
import torch
from torch import nn

D, DEPTH, HEADS, MLP_RATIO = 16, 2, 2, 2
PATCH, CHANNELS, IMG = 4, 2, 8
DD, DDEPTH, DHEADS = 8, 1, 2
EPS = 1e-6
MASK_RATIO = 0.5
GRID = IMG // PATCH
N = GRID * GRID
SEED = 0

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "data")


def sincos_2d(grid, dim, cls_token=True):
    """mmselfsup's ``build_2d_sincos_position_embedding`` (square grid), re-typed."""
    grid_w = torch.arange(grid, dtype=torch.float32)
    grid_h = torch.arange(grid, dtype=torch.float32)
    grid_w, grid_h = torch.meshgrid(grid_w, grid_h, indexing="ij")
    pos_dim = dim // 4
    omega = torch.arange(pos_dim, dtype=torch.float32) / pos_dim
    omega = 1.0 / (10000.0**omega)
    out_w = torch.einsum("m,d->md", grid_w.flatten(), omega)
    out_h = torch.einsum("m,d->md", grid_h.flatten(), omega)
    pos = torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)[None]
    if cls_token:
        pos = torch.cat([torch.zeros(1, 1, dim), pos], dim=1)
    return pos


class MultiheadAttention(nn.Module):
    """mmcls ``MultiheadAttention``: one ``qkv`` linear, heads split as (3, heads, head_dim)."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        hd = d // self.heads
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        att = (q @ k.transpose(-2, -1)) * hd**-0.5
        att = att.softmax(dim=-1)
        out = (att @ v).transpose(1, 2).reshape(b, n, d)
        return self.proj(out)


class FFN(nn.Module):
    """mmcv ``FFN``: ``layers = Sequential(Sequential(fc1, GELU, Dropout), fc2, Dropout)``."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.0)),
            nn.Linear(hidden, dim),
            nn.Dropout(0.0),
        )

    def forward(self, x, identity):
        return identity + self.layers(x)


class TransformerEncoderLayer(nn.Module):
    """mmcls ``TransformerEncoderLayer`` (pre-norm)."""

    def __init__(self, dim, heads, hidden):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim, eps=EPS)
        self.attn = MultiheadAttention(dim, heads)
        self.ln2 = nn.LayerNorm(dim, eps=EPS)
        self.ffn = FFN(dim, hidden)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return self.ffn(self.ln2(x), identity=x)


class PatchEmbed(nn.Module):
    def __init__(self):
        super().__init__()
        self.projection = nn.Conv2d(CHANNELS, D, kernel_size=PATCH, stride=PATCH)

    def forward(self, x):
        return self.projection(x).flatten(2).transpose(1, 2)


class MAEViT(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch_embed = PatchEmbed()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(sincos_2d(GRID, D), requires_grad=False)
        self.layers = nn.ModuleList(
            [TransformerEncoderLayer(D, HEADS, D * MLP_RATIO) for _ in range(DEPTH)]
        )
        self.ln1 = nn.LayerNorm(D, eps=EPS)

    def encode(self, tokens):
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
        x = torch.cat([cls, tokens], dim=1)
        for layer in self.layers:
            x = layer(x)
        return self.ln1(x)

    def embed(self, images):
        return self.patch_embed(images) + self.pos_embed[:, 1:]

    def forward_masked(self, images, noise):
        """MAEViT.forward with the masking noise given (``random_masking`` draws it)."""
        x = self.embed(images)
        b, n, d = x.shape
        keep = int(n * (1 - MASK_RATIO))
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :keep]
        x = torch.gather(x, 1, ids_keep.unsqueeze(-1).repeat(1, 1, d))
        return self.encode(x), ids_restore


class MAEPretrainDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.decoder_embed = nn.Linear(D, DD)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, DD))
        self.decoder_pos_embed = nn.Parameter(sincos_2d(GRID, DD), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            [TransformerEncoderLayer(DD, DHEADS, DD * MLP_RATIO) for _ in range(DDEPTH)]
        )
        self.ln1 = nn.LayerNorm(DD, eps=EPS)  # build_norm_layer(..., postfix=1) -> "ln1"
        self.decoder_pred = nn.Linear(DD, PATCH * PATCH * CHANNELS)

    def forward(self, x, ids_restore):
        x = self.decoder_embed(x)
        mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.ln1(x))[:, 1:]


class MAE(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = MAEViT()
        self.neck = MAEPretrainDecoder()


def randomise(model, gen):
    """Every learned tensor random (norm scales near 1), the fixed position embeddings kept."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "pos_embed" in name:
                continue
            if name.endswith("ln1.weight") or name.endswith("ln2.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("_token"):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)


def main():
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    model = MAE().eval()
    randomise(model, gen)

    images = torch.randn(2, CHANNELS, IMG, IMG, generator=gen)
    noise = torch.rand(2, N, generator=gen)
    with torch.no_grad():
        encoder_out = model.backbone.encode(model.backbone.embed(images))
        latent, ids_restore = model.backbone.forward_masked(images, noise)
        pred = model.neck(latent, ids_restore)
    # mmselfsup's patchify orders a patch's values (i, j, c) ('nchpwq->nhwpqc'); icefm's (c, i, j).
    pred_icefm = pred.reshape(2, N, PATCH, PATCH, CHANNELS).permute(0, 1, 4, 2, 3).reshape(2, N, -1)

    os.makedirs(DATA, exist_ok=True)
    sd = model.state_dict()  # an OrderedDict with _metadata, as mmengine saves it
    torch.save(
        {
            "meta": {
                "mmengine_version": "0.7.0",
                "epoch": 1,
                "iter": 10,
                "seed": SEED,
                "experiment_name": "mae_vit-micro_ai4arctic",
                "dataset_meta": None,
            },
            "state_dict": sd,
            "optimizer": {"state": {}, "param_groups": [{"lr": 1.5e-4, "weight_decay": 0.05}]},
        },
        os.path.join(DATA, "mmselfsup_tiny.pth"),
    )
    backbone = {"module." + k: v.clone() for k, v in sd.items() if k.startswith("backbone.")}
    torch.save(backbone, os.path.join(DATA, "mmselfsup_tiny_backbone.pth"))
    np.savez(
        os.path.join(DATA, "mmselfsup_tiny_reference.npz"),
        images=images.numpy(),
        encoder_out=encoder_out.numpy(),
        noise=noise.numpy(),
        latent=latent.numpy(),
        pred=pred_icefm.numpy(),
    )
    for name in ("mmselfsup_tiny.pth", "mmselfsup_tiny_backbone.pth", "mmselfsup_tiny_reference.npz"):
        print(f"{name}: {os.path.getsize(os.path.join(DATA, name))} bytes")
    print(f"{len(sd)} tensors in the state dict")


if __name__ == "__main__":
    main()
