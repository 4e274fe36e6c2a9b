"""A PyTorch TiTok with the official module paths: the reference for conversion and parity.

``TiTokTorch(config).load_state_dict(sd, strict=True)`` accepts the released tokenizer files
(``model.safetensors`` / ``tokenizer_titok_*.bin``) unchanged. Layout is NCHW, as in the
original; ``encode`` returns tokens token-major ``(B, N, C)`` like the Flax model so the two can
be compared directly. Written from the facts in the reference notes, not from the original code.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tokfusion_jax.models.titok import GN_EPS, GN_GROUPS, LN_EPS, TiTokConfig


class ResidualAttentionBlock(nn.Module):
    """Pre-norm block: ``attn`` is an ``nn.MultiheadAttention``; ``mlp`` = c_fc, gelu, c_proj."""

    def __init__(self, width: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=LN_EPS)
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=LN_EPS)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, mlp_dim))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(mlp_dim, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (L, B, W), sequence first as nn.MultiheadAttention expects
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


def _param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.randn(*shape) * shape[-1] ** -0.5)


class TiTokEncoder(nn.Module):
    def __init__(self, cfg: TiTokConfig) -> None:
        super().__init__()
        w, g = cfg.enc_width, cfg.grid_size
        self.cfg = cfg
        self.patch_embed = nn.Conv2d(3, w, cfg.patch_size, stride=cfg.patch_size)
        self.class_embedding = _param(1, w)
        self.positional_embedding = _param(g * g + 1, w)
        self.latent_token_positional_embedding = _param(cfg.num_tokens, w)
        self.ln_pre = nn.LayerNorm(w, eps=LN_EPS)
        self.transformer = nn.ModuleList(
            ResidualAttentionBlock(w, cfg.enc_heads, cfg.mlp_ratio * w)
            for _ in range(cfg.enc_depth)
        )
        self.ln_post = nn.LayerNorm(w, eps=LN_EPS)
        self.conv_out = nn.Conv2d(w, cfg.encoder_out_channels, 1)

    def forward(self, x: torch.Tensor, latent_tokens: torch.Tensor) -> torch.Tensor:
        """x (B, 3, S, S) -> z (B, C_out, 1, N), as the original returns it."""
        cfg, b = self.cfg, x.shape[0]
        n, w = cfg.num_tokens, cfg.enc_width
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, g*g, W)
        x = torch.cat([self.class_embedding.expand(b, 1, w), x], dim=1)
        x = x + self.positional_embedding
        latents = (latent_tokens + self.latent_token_positional_embedding).expand(b, n, w)
        x = self.ln_pre(torch.cat([x, latents], dim=1))
        x = x.transpose(0, 1)
        for block in self.transformer:
            x = block(x)
        x = x.transpose(0, 1)
        h = self.ln_post(x[:, -n:])  # (B, N, W)
        if cfg.is_legacy:
            h = h.reshape(b, w, n, 1)  # the row-major reshape quirk
        else:
            h = h.transpose(1, 2).reshape(b, w, n, 1)
        return self.conv_out(h).reshape(b, -1, 1, n)


class _DepthToSpace(nn.Module):
    def __init__(self, p: int) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, g, _ = x.shape
        p = self.p
        x = x.reshape(b, p, p, 3, g, g).permute(0, 3, 4, 1, 5, 2)  # (B, c, row, p1, col, p2)
        return x.reshape(b, 3, g * p, g * p)


class TiTokDecoder(nn.Module):
    def __init__(self, cfg: TiTokConfig) -> None:
        super().__init__()
        w, g = cfg.dec_width, cfg.grid_size
        self.cfg = cfg
        self.class_embedding = _param(1, w)
        self.positional_embedding = _param(g * g + 1, w)
        self.mask_token = _param(1, 1, w)
        self.latent_token_positional_embedding = _param(cfg.num_tokens, w)
        self.decoder_embed = nn.Linear(cfg.token_size, w)
        self.ln_pre = nn.LayerNorm(w, eps=LN_EPS)
        self.transformer = nn.ModuleList(
            ResidualAttentionBlock(w, cfg.dec_heads, cfg.mlp_ratio * w)
            for _ in range(cfg.dec_depth)
        )
        self.ln_post = nn.LayerNorm(w, eps=LN_EPS)
        if cfg.is_legacy:
            self.ffn = nn.Sequential(
                nn.Conv2d(w, 2 * w, 1), nn.Tanh(), nn.Conv2d(2 * w, cfg.pixel_codebook_size, 1)
            )
            self.conv_out = nn.Identity()
        else:
            p = cfg.patch_size
            self.ffn = nn.Sequential(nn.Conv2d(w, p * p * 3, 1), _DepthToSpace(p))
            self.conv_out = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, C, 1, N) -> logits (B, K_pix, g, g) (legacy) or RGB (B, 3, S, S)."""
        cfg, b = self.cfg, z.shape[0]
        w, g = cfg.dec_width, cfg.grid_size
        x = self.decoder_embed(z.reshape(b, cfg.token_size, -1).transpose(1, 2))
        x = x + self.latent_token_positional_embedding
        masks = self.mask_token.expand(b, g * g, w)
        prefix = torch.cat([self.class_embedding.expand(b, 1, w), masks], dim=1)
        x = torch.cat([prefix + self.positional_embedding, x], dim=1)
        x = self.ln_pre(x).transpose(0, 1)
        for block in self.transformer:
            x = block(x)
        x = self.ln_post(x.transpose(0, 1)[:, 1 : 1 + g * g])
        x = x.transpose(1, 2).reshape(b, w, g, g)
        return self.conv_out(self.ffn(x))


class VectorQuantizer(nn.Module):
    def __init__(self, codebook_size: int, token_size: int, use_l2_norm: bool) -> None:
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, token_size)
        self.use_l2_norm = use_l2_norm

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z (B, C, 1, N) -> (quantized (B, C, 1, N), indices (B, 1, N))."""
        z = z.float().permute(0, 2, 3, 1)  # (B, 1, N, C)
        flat = z.reshape(-1, z.shape[-1])
        codebook = self.embedding.weight
        if self.use_l2_norm:
            flat = F.normalize(flat, dim=-1)
            codebook = F.normalize(codebook, dim=-1)
            z = F.normalize(z, dim=-1)
        dist = (
            flat.pow(2).sum(1, keepdim=True)
            + codebook.pow(2).sum(1)
            - 2 * torch.einsum("bd,dn->bn", flat, codebook.t())
        )
        indices = dist.argmin(dim=1)
        z_q = self.lookup(indices).view(z.shape)
        z_q = z + (z_q - z).detach()
        return z_q.permute(0, 3, 1, 2).contiguous(), indices.view(z.shape[0], 1, -1)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        z_q = self.embedding(indices)
        return F.normalize(z_q, dim=-1) if self.use_l2_norm else z_q


class PixelVectorQuantizer(nn.Module):
    """Only the codebook is used at inference."""

    def __init__(self, num_embeddings: int, dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_embeddings, dim)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(GN_GROUPS, cin, eps=GN_EPS)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(GN_GROUPS, cout, eps=GN_EPS)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cout, cout, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if hasattr(self, "nin_shortcut"):
            return h + self.nin_shortcut(h)  # the original's quirk: input not used
        return x + h


class UpLevel(nn.Module):
    def __init__(self, cin: int, cout: int, num_blocks: int, upsample: bool) -> None:
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(cin if i == 0 else cout, cout) for i in range(num_blocks)
        )
        if upsample:
            self.upsample_conv = nn.Conv2d(cout, cout, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        if hasattr(self, "upsample_conv"):
            x = self.upsample_conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return x


class PixelDecoder(nn.Module):
    def __init__(self, cfg: TiTokConfig) -> None:
        super().__init__()
        widths = cfg.pixel_widths
        self.conv_in = nn.Conv2d(cfg.pixel_z_channels, widths[-1], 3, padding=1)
        self.mid = nn.ModuleList([ResnetBlock(widths[-1], widths[-1]) for _ in range(2)])
        ins = [widths[min(i + 1, len(widths) - 1)] for i in range(len(widths))]
        self.up = nn.ModuleList(
            UpLevel(ins[i], widths[i], cfg.pixel_num_res_blocks, i != 0) for i in range(len(widths))
        )
        self.norm_out = nn.GroupNorm(GN_GROUPS, widths[0], eps=GN_EPS)
        self.conv_out = nn.Conv2d(widths[0], 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(z)
        for block in self.mid:
            x = block(x)
        for level in reversed(self.up):
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class TiTokTorch(nn.Module):
    """TiTok with the official state_dict layout; NCHW images in [0, 1]."""

    def __init__(self, cfg: TiTokConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.latent_tokens = _param(cfg.num_tokens, cfg.enc_width)
        self.encoder = TiTokEncoder(cfg)
        self.decoder = TiTokDecoder(cfg)
        if cfg.quantize_mode == "vq":
            self.quantize = VectorQuantizer(cfg.codebook_size, cfg.token_size, cfg.use_l2_norm)
        if cfg.has_pixel_decoder:
            self.pixel_quantize = PixelVectorQuantizer(
                cfg.pixel_codebook_size, cfg.pixel_z_channels
            )
            self.pixel_decoder = PixelDecoder(cfg)

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x (B, 3, S, S) -> continuous, quantized (B, N, C) and indices (B, N) (VAE: mode)."""
        z = self.encoder(x, self.latent_tokens)  # (B, C_out, 1, N)
        continuous = z[:, :, 0, :].transpose(1, 2)  # (B, N, C_out)
        if self.cfg.quantize_mode == "vae":
            mean = continuous[..., : self.cfg.token_size]
            return {
                "continuous": mean,
                "quantized": mean,
                "z_quantized": z[:, : self.cfg.token_size],
            }
        z_q, indices = self.quantize(z)
        return {
            "continuous": continuous,
            "quantized": z_q[:, :, 0, :].transpose(1, 2),
            "indices": indices[:, 0],
            "z_quantized": z_q,
        }

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """z_q (B, C, 1, N) -> image (B, 3, S, S) (legacy: through the soft pixel codebook)."""
        out = self.decoder(z_q)
        if not self.cfg.is_legacy:
            return out
        probs = out.softmax(dim=1)
        q = torch.einsum("nchw,cd->ndhw", probs, self.pixel_quantize.embedding.weight)
        return self.pixel_decoder(q)

    def decode_tokens(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (B, N) -> image (B, 3, S, S)."""
        z_q = self.quantize.lookup(indices)  # (B, N, C)
        return self.decode(z_q.transpose(1, 2)[:, :, None, :])


@torch.no_grad()
def init_random_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fills every parameter in place with well-scaled random values (fast, deterministic).

    Matrices and conv kernels get std 1/sqrt(fan_in); norm scales 1 + 0.1 N(0, 1); biases and
    norm offsets 0.1 N(0, 1); embeddings std 1/sqrt(width). Works on ``to_empty`` models.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        leaf = name.rsplit(".", 1)[-1]
        is_norm = any(k in name for k in ("ln_", "norm"))
        if is_norm and leaf == "weight":
            p.copy_(1.0 + 0.1 * noise)
        elif leaf.endswith("bias"):
            p.copy_(0.1 * noise)
        elif p.ndim >= 2 and leaf.endswith("weight") and "embedding" not in name:
            p.copy_(noise / math.sqrt(math.prod(p.shape[1:])))
        else:
            p.copy_(noise * p.shape[-1] ** -0.5)
    return model
