#!/usr/bin/env python3
"""PyTorch eager reference for icefm's MAE training-step benchmark.

What it measures: one full MAE pre-training step -- forward (encoder on the kept tokens,
decoder on all tokens, norm-pix loss on the masked patches), backward, global grad-norm clip
and AdamW -- of the same model icefm trains (model/src/vit.rs, model/src/mae.rs,
model/src/optim.rs), on a fixed random batch (uniform in [-1, 1], every pixel valid, as
icefm's benches/train_step.rs). After --warmup untimed steps it times --steps steps with CUDA
events and reports images/s, ms/step, peak memory (torch.cuda.max_memory_allocated, reset
after the warm-up), model FLOPs per image (the formula of icefm's bench, see model_flops) and
the achieved TFLOP/s, with the torch version and the device name. It prints one
human-readable line, then the results as JSON (also written to --json PATH).

--copy-bandwidth instead measures the two ceilings the report compares against: the
device-to-device copy bandwidth of a ~4 GiB buffer (bytes read + written / time) and a bf16
8192^3 matmul's TFLOP/s.

How scripts/gpu-check.sh uses it: on the GPU machine it runs this script beside icefm's own
benchmark of the same step (same preset, image size, batch, mask ratio and dtype), plus once
with --copy-bandwidth, and puts the figures side by side: icefm's images/s against PyTorch
eager's (the reference), and both steps' TFLOP/s against the matmul and copy ceilings.
Typical calls:

    python3 scripts/torch_mae_bench.py --preset base --size 384 --batch 64 --dtype bf16 --json torch_bf16.json
    python3 scripts/torch_mae_bench.py --copy-bandwidth --json torch_ceilings.json

CPU smoke test (no GPU): --device cpu --preset tiny --size 64 --batch 2 --steps 2 --warmup 1 --dtype f32.
Standard library + torch + numpy only; a single file.
"""

import argparse
import json
import math
import platform
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------
# The model: icefm's MAE, layer for layer.
# ---------------------------------------------------------------------------------------------

# VitConfig::preset: (dim, depth, heads); patch 16, 2 input channels, MLP ratio 4, LN eps 1e-6.
PRESETS = {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
}
PATCH = 16
IN_CHANNELS = 2
MLP_RATIO = 4
LN_EPS = 1e-6
DECODER_DIM, DECODER_DEPTH, DECODER_HEADS = 512, 8, 16


def linear(inp, out):
    """vit.rs Linear: Xavier-uniform weight [out, in], zero bias."""
    lin = nn.Linear(inp, out, bias=True)
    nn.init.xavier_uniform_(lin.weight)
    nn.init.zeros_(lin.bias)
    return lin


def norm(dim):
    """vit.rs Norm: layer norm, biased variance, eps 1e-6, scale 1, shift 0."""
    return nn.LayerNorm(dim, eps=LN_EPS)


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.qkv = linear(dim, 3 * dim)
        self.proj = linear(dim, dim)
        self.heads = heads

    def forward(self, x):
        b, n, d = x.shape
        h = self.heads
        # [B, N, 3, H, hd] -> [3, B, H, N, hd], as vit.rs.
        qkv = self.qkv(x).reshape(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        # softmax(q k^T / sqrt(hd)) v: SDPA's default scale is hd^-0.5.
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = linear(dim, hidden)
        self.fc2 = linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="none"))  # exact (erf) GELU


class Block(nn.Module):
    """Pre-norm block: x + attn(ln1(x)), then + mlp(ln2(.)); no drop-path (rate 0 in icefm)."""

    def __init__(self, dim, heads):
        super().__init__()
        self.ln1 = norm(dim)
        self.attn = Attention(dim, heads)
        self.ln2 = norm(dim)
        self.mlp = Mlp(dim, dim * MLP_RATIO)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


def sincos_2d(h, w, dim):
    """vit.rs sincos_2d: [h*w, dim], row-major tokens, [sin(r w), cos(r w), sin(c w), cos(c w)]
    with w_k = 10000^(-k / (dim/4)); the first half encodes the row. Computed in f64, stored f32."""
    q = dim // 4
    omega = 1.0 / 10000.0 ** (np.arange(q, dtype=np.float64) / q)
    r, c = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    a = r.reshape(-1, 1) * omega[None, :]
    bb = c.reshape(-1, 1) * omega[None, :]
    out = np.zeros((h * w, dim), dtype=np.float32)
    out[:, 0:q] = np.sin(a)
    out[:, q : 2 * q] = np.cos(a)
    out[:, 2 * q : 3 * q] = np.sin(bb)
    out[:, 3 * q : 4 * q] = np.cos(bb)
    return torch.from_numpy(out)


def patchify(x, p):
    """vit.rs patchify: [B, C, H, W] -> [B, N, C*p*p], tokens row-major, values in (c, i, j)
    order (a flattened [D, C, p, p] conv kernel's order)."""
    b, c, h, w = x.shape
    gh, gw = h // p, w // p
    return x.reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c * p * p)


def make_masking(noise, ratio):
    """mae.rs Masking::from_noise: keep floor(N (1 - ratio)) tokens, the first of the ascending
    (stable, ties by index) argsort of the noise; ids_restore undoes the shuffle."""
    n = noise.shape[1]
    keep = int(n * (1.0 - ratio))
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1, stable=True)
    return ids_shuffle[:, :keep], ids_restore, keep


def norm_pix(target, valid):
    """mae.rs norm_pix: per patch, mean and unbiased variance over the valid values (eps 1e-6);
    weight = valid, zeroed for patches with fewer than 2 valid values."""
    cnt = valid.sum(-1, keepdim=True)
    enough = (cnt >= 2.0).to(target.dtype)
    safe = cnt.clamp(min=2.0)
    mean = (target * valid).sum(-1, keepdim=True) / safe
    centred = target - mean
    var = ((centred * valid) ** 2).sum(-1, keepdim=True) / (safe - 1.0)
    return centred / torch.sqrt(var + 1e-6), valid * enough


def patch_loss(pred, target, weight, masked):
    """mae.rs patch_loss: per patch the MSE over its weighted values, then the mean over the
    masked patches that have any weighted value (0 when there are none; no host sync here:
    the numerator is then 0 too, so clamping the count at 1 gives the same 0)."""
    se = ((pred - target) ** 2 * weight).sum(-1, keepdim=True)
    cnt = weight.sum(-1, keepdim=True)
    has = (cnt > 0).to(pred.dtype)
    per_patch = se / cnt.clamp(min=1.0)
    w = masked * has
    return (per_patch * w).sum() / w.sum().clamp(min=1.0)


class Mae(nn.Module):
    def __init__(self, preset):
        super().__init__()
        dim, depth, heads = PRESETS[preset]
        self.dim, self.depth, self.heads = dim, depth, heads
        pv = IN_CHANNELS * PATCH * PATCH
        # Encoder (vit.rs Vit). The patch embedding is a [D, C*p*p] linear map of patchified
        # input, which is the stride-16 convolution.
        self.patch_embed = linear(pv, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = norm(dim)
        # Decoder (mae.rs Mae).
        self.decoder_embed = linear(dim, DECODER_DIM)
        self.mask_token = nn.Parameter(torch.randn(1, 1, DECODER_DIM) * 0.02)
        self.decoder_blocks = nn.ModuleList(
            Block(DECODER_DIM, DECODER_HEADS) for _ in range(DECODER_DEPTH)
        )
        self.decoder_norm = norm(DECODER_DIM)
        self.decoder_pred = linear(DECODER_DIM, pv)
        self._pos = {}

    def pos_embed(self, gh, gw, dim, device):
        key = (gh, gw, dim, str(device))
        if key not in self._pos:
            self._pos[key] = sincos_2d(gh, gw, dim).unsqueeze(0).to(device)
        return self._pos[key]

    def forward(self, images, valid, ids_keep, ids_restore):
        b, c, h, w = images.shape
        gh, gw = h // PATCH, w // PATCH
        n = gh * gw
        k = ids_keep.shape[1]
        d, dd = self.dim, DECODER_DIM

        # Encoder on the kept tokens; the class token gets no position embedding.
        tokens = self.patch_embed(patchify(images, PATCH)) + self.pos_embed(gh, gw, d, images.device)
        kept = torch.gather(tokens, 1, ids_keep.unsqueeze(-1).expand(b, k, d))
        x = torch.cat([self.cls_token.expand(b, 1, d), kept], dim=1)
        for blk in self.blocks:
            x = blk(x)
        latent = self.norm(x)

        # Decoder on all tokens: kept ones in their places, mask tokens elsewhere.
        x = self.decoder_embed(latent)
        shuffled = torch.cat([x[:, 1:, :], self.mask_token.expand(b, n - k, dd).to(x.dtype)], dim=1)
        restored = torch.gather(shuffled, 1, ids_restore.unsqueeze(-1).expand(b, n, dd))
        y = torch.cat([x[:, :1, :], restored + self.pos_embed(gh, gw, dd, images.device)], dim=1)
        for blk in self.decoder_blocks:
            y = blk(y)
        y = self.decoder_norm(y)
        pred = self.decoder_pred(y)[:, 1:, :]

        # Norm-pix targets over each patch's valid pixels; the loss on the masked patches, in f32.
        with torch.autocast(device_type=images.device.type, enabled=False):
            target = patchify(images.float(), PATCH)
            vmask = patchify(valid.float().unsqueeze(1).expand(b, c, h, w), PATCH)
            target, weight = norm_pix(target, vmask)
            masked = (ids_restore >= k).float().unsqueeze(-1)
            return patch_loss(pred.float(), target, weight, masked)


def param_groups(model, weight_decay):
    """optim.rs no_decay: 1-D tensors (norms, biases) and the cls/mask/pos tokens get none."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.ndim <= 1 or name.endswith(("cls_token", "mask_token", "pos_embed")):
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def model_flops_per_image(preset, size, mask_ratio):
    """Forward FLOPs of one image, the formula of icefm's benches/train_step.rs forward_flops:
    every matmul counted as 2*m*n*k, nothing else (norms, softmax, GELU, loss, optimiser left out).
      n = (size/16)^2 tokens, K = floor(n (1 - mask_ratio)) kept, p = 2*16*16 values a patch,
      block(T, d) = 2 T d^2 (4 + 2 r)   [qkv 3 d^2 + proj d^2 + MLP 2 r d^2, r = 4]
                  + 4 T^2 d             [q k^T and att v]
      fwd = 2 n p D                      [patch embedding]
          + depth * block(K + 1, D)      [encoder, class token included]
          + 2 (K + 1) D d_dec            [decoder embedding]
          + 8 * block(n + 1, 512)        [decoder]
          + 2 n d_dec p                  [prediction; icefm's formula counts n tokens, the layer
                                          runs on n + 1 and the class token's row is dropped]
    A training step is counted as 3 x fwd (backward = 2 x forward), per image."""
    d, depth, _ = PRESETS[preset]
    n = (size // PATCH) ** 2
    keep = math.floor(n * (1.0 - mask_ratio))
    p = IN_CHANNELS * PATCH * PATCH
    r = MLP_RATIO

    def block(t, dim):
        return 2.0 * t * dim * dim * (4.0 + 2.0 * r) + 4.0 * t * t * dim

    dd = DECODER_DIM
    fwd = (
        2.0 * n * p * d
        + depth * block(keep + 1, d)
        + 2.0 * (keep + 1) * d * dd
        + DECODER_DEPTH * block(n + 1, dd)
        + 2.0 * n * dd * p
    )
    return fwd


# ---------------------------------------------------------------------------------------------
# Timing helpers.
# ---------------------------------------------------------------------------------------------


class Timer:
    """CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.device = device

    def start(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def elapsed_ms(self, a, b):
        if self.cuda:
            return a.elapsed_time(b)
        return (b - a) * 1e3

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def base_info(args, device):
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": device_name(device),
        "device_type": device.type,
        "python": platform.python_version(),
    }


# ---------------------------------------------------------------------------------------------
# The training-step benchmark.
# ---------------------------------------------------------------------------------------------


def bench_step(args, device):
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    model = Mae(args.preset).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    opt_kw = {"foreach": True} if args.adamw == "foreach" else {"fused": True}
    opt = torch.optim.AdamW(
        param_groups(model, args.weight_decay),
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
        **opt_kw,
    )
    params = [p for p in model.parameters()]

    g = torch.Generator(device="cpu").manual_seed(args.seed + 1)
    images = (torch.rand(args.batch, IN_CHANNELS, args.size, args.size, generator=g) * 2 - 1).to(device)
    valid = torch.ones(args.batch, args.size, args.size, device=device)
    n_tok = (args.size // PATCH) ** 2
    fixed_noise = torch.rand(args.batch, n_tok, generator=g).to(device)

    # Build the position embeddings outside any compiled region (a cache on the module).
    gh = args.size // PATCH
    model.pos_embed(gh, gh, model.dim, device)
    model.pos_embed(gh, gh, DECODER_DIM, device)
    fwd = torch.compile(model) if args.compile else model
    use_amp = args.dtype == "bf16"

    def step():
        # Per-step masking drawn on the device (part of the step), unless --fixed-mask.
        noise = fixed_noise if args.fixed_mask else torch.rand(args.batch, n_tok, device=device)
        ids_keep, ids_restore, _ = make_masking(noise, args.mask)
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
            loss = fwd(images, valid, ids_keep, ids_restore)
        loss.backward()
        if args.clip_grad > 0:
            # optim.rs clip_scale: scale by max/(norm + 1e-6) when the global norm is over max.
            torch.nn.utils.clip_grad_norm_(params, args.clip_grad, foreach=True)
        opt.step()
        return loss.detach()

    timer = Timer(device)
    losses = []
    t_wall = time.perf_counter()
    for _ in range(args.warmup):
        losses.append(step())
    timer.sync()
    warmup_s = time.perf_counter() - t_wall
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    marks = [timer.start()]
    t0 = time.perf_counter()
    for _ in range(args.steps):
        losses.append(step())
        marks.append(timer.start())
    timer.sync()
    wall_s = time.perf_counter() - t0
    per_step = [timer.elapsed_ms(a, b) for a, b in zip(marks[:-1], marks[1:])]
    total_ms = timer.elapsed_ms(marks[0], marks[-1])
    ms = total_ms / max(args.steps, 1)
    losses = [float(x) for x in torch.stack(losses).float().cpu()] if losses else []

    fwd_img = model_flops_per_image(args.preset, args.size, args.mask)
    step_flops = 3.0 * fwd_img * args.batch
    res = base_info(args, device)
    res.update(
        {
            "mode": "train_step",
            "impl": "torch-compile" if args.compile else "torch-eager",
            "preset": args.preset,
            "size": args.size,
            "batch": args.batch,
            "mask_ratio": args.mask,
            "dtype": args.dtype,
            "tf32": bool(args.tf32 and device.type == "cuda"),
            "adamw": args.adamw,
            "compile": args.compile,
            "fixed_mask": args.fixed_mask,
            "params": n_params,
            "warmup_steps": args.warmup,
            "timed_steps": args.steps,
            "warmup_s": warmup_s,
            "ms_per_step": ms,
            "ms_per_step_median": statistics.median(per_step) if per_step else None,
            "ms_per_step_min": min(per_step) if per_step else None,
            "wall_s": wall_s,
            "images_per_s": args.batch * 1e3 / ms if ms > 0 else None,
            "model_flops_per_image_fwd": fwd_img,
            "model_flops_per_image_step": 3.0 * fwd_img,
            "achieved_tflops": step_flops / (ms * 1e-3) / 1e12 if ms > 0 else None,
            "peak_mem_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
            "losses": losses,
            "loss_init": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None,
        }
    )
    mem = res["peak_mem_bytes"]
    line = (
        f"torch {res['torch']} {res['impl']} on {res['device']}: MAE-{args.preset} {args.size}px "
        f"b{args.batch} {args.dtype}: {res['images_per_s']:.1f} img/s, {ms:.1f} ms/step "
        f"(median {res['ms_per_step_median']:.1f}), {res['achieved_tflops']:.2f} TFLOP/s "
        f"({3 * fwd_img / 1e9:.1f} GFLOP/img/step), "
        + (f"peak {mem / 2**30:.2f} GiB, " if mem is not None else "")
        + f"loss {res['loss_init']:.4f} -> {res['loss_last']:.4f}"
    )
    return line, res


# ---------------------------------------------------------------------------------------------
# Ceilings: copy bandwidth and bf16 matmul.
# ---------------------------------------------------------------------------------------------


def bench_ceilings(args, device):
    timer = Timer(device)
    res = base_info(args, device)
    res["mode"] = "ceilings"

    # Device-to-device copy of --copy-gib GiB: bytes read + written over the time.
    nbytes = int(args.copy_gib * 2**30) // 4 * 4
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    reps = args.copy_reps
    for _ in range(2):
        dst.copy_(src)
    timer.sync()
    times = []
    for _ in range(reps):
        a = timer.start()
        dst.copy_(src)
        b = timer.start()
        timer.sync()
        times.append(timer.elapsed_ms(a, b))
    best = min(times)
    res["copy_bytes"] = nbytes
    res["copy_gb_per_s"] = 2 * nbytes / (best * 1e-3) / 1e9
    res["copy_gb_per_s_median"] = 2 * nbytes / (statistics.median(times) * 1e-3) / 1e9
    del src, dst

    # bf16 matmul n^3 (2 n^3 FLOPs).
    n = args.matmul_n
    a_ = torch.randn(n, n, device=device).to(torch.bfloat16)
    b_ = torch.randn(n, n, device=device).to(torch.bfloat16)
    for _ in range(3):
        c_ = a_ @ b_
    timer.sync()
    reps = args.matmul_reps
    s = timer.start()
    for _ in range(reps):
        c_ = a_ @ b_
    e = timer.start()
    timer.sync()
    ms = timer.elapsed_ms(s, e) / reps
    del c_
    res["matmul_n"] = n
    res["matmul_dtype"] = "bf16"
    res["matmul_ms"] = ms
    res["matmul_tflops"] = 2.0 * n**3 / (ms * 1e-3) / 1e12
    line = (
        f"torch {res['torch']} on {res['device']}: copy {nbytes / 2**30:.2f} GiB "
        f"{res['copy_gb_per_s']:.0f} GB/s (read+write, best of {reps}); "
        f"bf16 matmul {n}^3 {res['matmul_tflops']:.1f} TFLOP/s"
    )
    return line, res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="base")
    ap.add_argument("--size", type=int, default=384, help="image edge in pixels (multiple of 16)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--mask", type=float, default=0.75, help="mask ratio")
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--dtype", choices=["bf16", "f32"], default="bf16",
                    help="bf16: autocast with f32 master weights; f32: plain f32")
    ap.add_argument("--device", default="cuda", help="cuda | cpu | cuda:N")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (off by default; compiling adds a minute or more to the warm-up)")
    ap.add_argument("--adamw", choices=["foreach", "fused"], default="foreach")
    ap.add_argument("--tf32", action="store_true", help="allow TF32 matmuls in f32 mode (off, as PyTorch's default)")
    ap.add_argument("--fixed-mask", action="store_true", help="reuse one masking every step (icefm's CPU bench does)")
    ap.add_argument("--lr", type=float, default=1e-4, help="constant learning rate (icefm's bench: 1e-4)")
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--clip-grad", type=float, default=3.0, help="global grad-norm clip (icefm default 3; 0: none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="PATH", help="also write the results here")
    ap.add_argument("--copy-bandwidth", action="store_true",
                    help="measure the ceilings instead: D2D copy bandwidth and bf16 matmul TFLOP/s")
    ap.add_argument("--copy-gib", type=float, default=4.0)
    ap.add_argument("--copy-reps", type=int, default=10)
    ap.add_argument("--matmul-n", type=int, default=8192)
    ap.add_argument("--matmul-reps", type=int, default=50)
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("CUDA is not available to this torch build; use --device cpu")
    if args.size % PATCH:
        sys.exit(f"--size must be a multiple of {PATCH}")
    if device.type == "cuda":
        torch.cuda.set_device(device)

    if args.copy_bandwidth:
        line, res = bench_ceilings(args, device)
    else:
        line, res = bench_step(args, device)
    res["argv"] = sys.argv[1:] if argv is None else list(argv)
    print(line)
    text = json.dumps(res, indent=None, sort_keys=True)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(json.dumps(res, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
