"""A PyTorch CDDFuse with the official module paths: the reference for conversion and parity.

``strict`` ``load_state_dict`` accepts the released checkpoints (``CDDFuse_IVF.pth``,
``CDDFuse_MIF.pth``) unchanged: each of the four entries of such a file is the ``state_dict`` of
an ``nn.DataParallel`` around one official module, so its keys start with ``module.``::

    model = build_cddfuse()                      # the four modules, in DataParallel wrappers
    model.load_release(torch.load(path, weights_only=True))   # strict, all four entries
    fused = model.fuse(vis, ir, residual="vis")  # (B, 1, H, W) in (0, 1), before any stretch
    rec = model.reconstruct(image)               # phase-I reconstruction with its own residual
    ckpt = random_release_checkpoint(seed=0)     # a random checkpoint in the release format

Layout is NCHW as in the original. ``fuse`` is the official test path (encoder on both images,
the two fuse layers on the sums of their features, the decoder with the given residual);
``minmax_stretch`` is the test scripts' post-processing. Written from the facts in the
reference notes (architecture, names, shapes), not from the original code.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

RELEASE_ENTRIES = ("DIDF_Encoder", "DIDF_Decoder", "BaseFuseLayer", "DetailFuseLayer")
RESIDUALS = ("vis", "sum", "none")
LN_EPS = 1e-5


# --------------------------------------------------------------------------------------------
# Restormer blocks
# --------------------------------------------------------------------------------------------


class WithBias_LayerNorm(nn.Module):  # official name
    """LayerNorm over the last axis: (x - mean) / sqrt(biased var + 1e-5) * weight + bias."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., C)
        mean = x.mean(-1, keepdim=True)
        var = x.var(-1, keepdim=True, unbiased=False)
        return (x - mean) / torch.sqrt(var + LN_EPS) * self.weight + self.bias


class LayerNorm(nn.Module):
    """Per-pixel LayerNorm of an NCHW map over its channels ('WithBias' Restormer form)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.body = WithBias_LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        return self.body(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def channel_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, temperature: torch.Tensor, heads: int
) -> torch.Tensor:
    """Transposed attention: per head, softmax(l2n(q) l2n(k)^T * temperature) v over channels.

    q, k, v (B, C, H, W); temperature (heads, 1, 1); q and k are l2-normalised over H*W.
    """
    b, c, h, w = q.shape
    q, k, v = (t.reshape(b, heads, c // heads, h * w) for t in (q, k, v))
    q = F.normalize(q, dim=-1)
    k = F.normalize(k, dim=-1)
    attn = ((q @ k.transpose(-2, -1)) * temperature).softmax(dim=-1)  # (B, heads, c, c)
    return (attn @ v).reshape(b, c, h, w)


def gated_gelu(x: torch.Tensor) -> torch.Tensor:
    """GELU(first half of the channels) * second half (exact erf GELU)."""
    x1, x2 = x.chunk(2, dim=1)
    return F.gelu(x1) * x2


class Attention(nn.Module):
    """MDTA: 1x1 qkv, depthwise 3x3, channel attention, 1x1 projection; no biases."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv = nn.Conv2d(dim, 3 * dim, 1, bias=False)
        self.qkv_dwconv = nn.Conv2d(3 * dim, 3 * dim, 3, padding=1, groups=3 * dim, bias=False)
        self.project_out = nn.Conv2d(dim, dim, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_dwconv(self.qkv(x)).chunk(3, dim=1)
        return self.project_out(channel_attention(q, k, v, self.temperature, self.num_heads))


class FeedForward(nn.Module):
    """GDFN: 1x1 (dim -> 2 hidden), depthwise 3x3, GELU gate, 1x1 (hidden -> dim)."""

    def __init__(self, dim: int, expansion: float) -> None:
        super().__init__()
        hidden = int(dim * expansion)
        self.project_in = nn.Conv2d(dim, 2 * hidden, 1, bias=False)
        self.dwconv = nn.Conv2d(2 * hidden, 2 * hidden, 3, padding=1, groups=2 * hidden, bias=False)
        self.project_out = nn.Conv2d(hidden, dim, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project_out(gated_gelu(self.dwconv(self.project_in(x))))


class TransformerBlock(nn.Module):
    """Pre-norm Restormer block: x + attn(norm1(x)), then x + ffn(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, expansion: float) -> None:
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = LayerNorm(dim)
        self.ffn = FeedForward(dim, expansion)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class OverlapPatchEmbed(nn.Module):
    """3x3 conv embedding, no bias, no downsampling."""

    def __init__(self, in_channels: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


# --------------------------------------------------------------------------------------------
# Base (lite transformer) and detail (INN) branches
# --------------------------------------------------------------------------------------------


class AttentionBase(nn.Module):
    """Base-branch attention: 1x1 qkv1, dense 3x3 qkv2, channel attention, 1x1 proj."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv1 = nn.Conv2d(dim, 3 * dim, 1, bias=False)
        self.qkv2 = nn.Conv2d(3 * dim, 3 * dim, 3, padding=1, bias=False)
        self.proj = nn.Conv2d(dim, dim, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv2(self.qkv1(x)).chunk(3, dim=1)
        return self.proj(channel_attention(q, k, v, self.scale, self.num_heads))


class Mlp(nn.Module):
    """Base-branch Mlp (expansion 1): 1x1 (dim -> 2 dim), 3x3 with groups=dim, gate, 1x1."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.project_in = nn.Conv2d(dim, 2 * dim, 1, bias=False)
        self.dwconv = nn.Conv2d(2 * dim, 2 * dim, 3, padding=1, groups=dim, bias=False)
        self.project_out = nn.Conv2d(dim, dim, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project_out(gated_gelu(self.dwconv(self.project_in(x))))


class BaseFeatureExtraction(nn.Module):
    """x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int = 64, num_heads: int = 8) -> None:
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn = AttentionBase(dim, num_heads)
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class InvertedResidualBlock(nn.Module):
    """bottleneckBlock: 1x1 (c -> 2c), ReLU6, reflection pad, depthwise 3x3, ReLU6, 1x1."""

    def __init__(self, channels: int = 32, expand_ratio: int = 2) -> None:
        super().__init__()
        hidden = channels * expand_ratio
        self.bottleneckBlock = nn.Sequential(  # official name
            nn.Conv2d(channels, hidden, 1, bias=False),
            nn.ReLU6(),
            nn.ReflectionPad2d(1),
            nn.Conv2d(hidden, hidden, 3, groups=hidden, bias=False),
            nn.ReLU6(),
            nn.Conv2d(hidden, channels, 1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bottleneckBlock(x)


class DetailNode(nn.Module):
    """Affine coupling: shuffle (1x1 with bias), z2 += phi(z1), z1 = z1 exp(rho(z2)) + eta(z2)."""

    def __init__(self, dim: int = 64) -> None:
        super().__init__()
        self.theta_phi = InvertedResidualBlock(dim // 2)
        self.theta_rho = InvertedResidualBlock(dim // 2)
        self.theta_eta = InvertedResidualBlock(dim // 2)
        self.shffleconv = nn.Conv2d(dim, dim, 1, bias=True)

    def forward(
        self, z1: torch.Tensor, z2: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:  # (B, dim / 2, H, W) each
        z1, z2 = self.shffleconv(torch.cat((z1, z2), dim=1)).chunk(2, dim=1)
        z2 = z2 + self.theta_phi(z1)
        z1 = z1 * torch.exp(self.theta_rho(z2)) + self.theta_eta(z2)
        return z1, z2


class DetailFeatureExtraction(nn.Module):
    """Channel halves through ``num_layers`` DetailNodes, concatenated back."""

    def __init__(self, num_layers: int = 3, dim: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(*[DetailNode(dim) for _ in range(num_layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, dim, H, W)
        z1, z2 = x.chunk(2, dim=1)
        for node in self.net:
            z1, z2 = node(z1, z2)
        return torch.cat((z1, z2), dim=1)


# --------------------------------------------------------------------------------------------
# Encoder and decoder
# --------------------------------------------------------------------------------------------


class Restormer_Encoder(nn.Module):  # official name
    """patch_embed -> 4 TransformerBlocks -> (base, detail, shallow feature), each (B, 64, H, W)."""

    def __init__(
        self, dim: int = 64, num_blocks: int = 4, heads: int = 8, expansion: float = 2.0
    ) -> None:
        super().__init__()
        self.patch_embed = OverlapPatchEmbed(1, dim)
        self.encoder_level1 = nn.Sequential(
            *[TransformerBlock(dim, heads, expansion) for _ in range(num_blocks)]
        )
        self.baseFeature = BaseFeatureExtraction(dim, heads)  # official name
        self.detailFeature = DetailFeatureExtraction(3, dim)  # official name

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        shallow = self.encoder_level1(self.patch_embed(image))
        return self.baseFeature(shallow), self.detailFeature(shallow), shallow


class Restormer_Decoder(nn.Module):  # official name
    """sigmoid(head(4 blocks(reduce([base, detail]))) + residual) and the reduced feature."""

    def __init__(
        self, dim: int = 64, num_blocks: int = 4, heads: int = 8, expansion: float = 2.0
    ) -> None:
        super().__init__()
        self.reduce_channel = nn.Conv2d(2 * dim, dim, 1, bias=False)
        self.encoder_level2 = nn.Sequential(
            *[TransformerBlock(dim, heads, expansion) for _ in range(num_blocks)]
        )
        self.output = nn.Sequential(
            nn.Conv2d(dim, dim // 2, 3, padding=1, bias=False),
            nn.LeakyReLU(),  # slope 0.01
            nn.Conv2d(dim // 2, 1, 3, padding=1, bias=False),
        )
        self.sigmoid = nn.Sigmoid()

    def forward(
        self, residual: torch.Tensor | None, base: torch.Tensor, detail: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual (B, 1, H, W) or None, base, detail) -> (image (B, 1, H, W), reduced)."""
        reduced = self.reduce_channel(torch.cat((base, detail), dim=1))
        x = self.output(self.encoder_level2(reduced))
        if residual is not None:
            x = x + residual
        return self.sigmoid(x), reduced


# --------------------------------------------------------------------------------------------
# The four modules of a release checkpoint
# --------------------------------------------------------------------------------------------


class CDDFuse(nn.Module):
    """The four official modules, each in an ``nn.DataParallel`` (state-dict keys ``module.*``).

    ``state_dict()`` gives the flat form ``DIDF_Encoder.module.patch_embed.proj.weight``...
    (the ``.safetensors`` layout); `release_checkpoint` the nested ``torch.save`` form.
    """

    def __init__(self) -> None:
        super().__init__()
        self.DIDF_Encoder = nn.DataParallel(Restormer_Encoder())
        self.DIDF_Decoder = nn.DataParallel(Restormer_Decoder())
        self.BaseFuseLayer = nn.DataParallel(BaseFeatureExtraction(dim=64, num_heads=8))
        self.DetailFuseLayer = nn.DataParallel(DetailFeatureExtraction(num_layers=1))

    def release_checkpoint(self) -> dict[str, dict[str, torch.Tensor]]:
        """{'DIDF_Encoder': state_dict, ...}: what the official train.py saves."""
        return {name: getattr(self, name).state_dict() for name in RELEASE_ENTRIES}

    def load_release(self, checkpoint: dict[str, dict[str, torch.Tensor]]) -> CDDFuse:
        """Loads a release checkpoint with strict ``load_state_dict`` on every module."""
        for name in RELEASE_ENTRIES:
            getattr(self, name).load_state_dict(checkpoint[name], strict=True)
        return self

    def encode(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """image (B, 1, H, W) -> (base, detail), each (B, 64, H, W)."""
        base, detail, _ = self.DIDF_Encoder(image)
        return base, detail

    def reconstruct(self, image: torch.Tensor) -> torch.Tensor:
        """Phase I: Decoder(image, *Encoder(image)) -> (B, 1, H, W) in (0, 1)."""
        base, detail = self.encode(image)
        return self.DIDF_Decoder(image, base, detail)[0]

    def fuse(self, vis: torch.Tensor, ir: torch.Tensor, residual: str = "vis") -> torch.Tensor:
        """The test path: (B, 1, H, W) pairs -> fused (B, 1, H, W) in (0, 1), before stretching.

        ``residual``: "vis" (test_IVF.py, train.py), "sum" (test_MIF.py with the IVF weights) or
        "none" (test_MIF.py with the MIF weights).
        """
        if residual not in RESIDUALS:
            raise ValueError(f"residual: expected one of {RESIDUALS}, got {residual!r}")
        base_v, detail_v = self.encode(vis)
        base_i, detail_i = self.encode(ir)
        base = self.BaseFuseLayer(base_v + base_i)
        detail = self.DetailFuseLayer(detail_v + detail_i)
        res = {"vis": vis, "sum": ir + vis, "none": None}[residual]
        return self.DIDF_Decoder(res, base, detail)[0]


def minmax_stretch(x: torch.Tensor) -> torch.Tensor:
    """(x - min) / (max - min) over the whole tensor: the test scripts' post-processing."""
    return (x - x.min()) / (x.max() - x.min())


def build_cddfuse(seed: int | None = None) -> CDDFuse:
    """The four modules in eval mode; PyTorch's default init, or `init_random_` with ``seed``."""
    model = CDDFuse().eval()
    return model if seed is None else init_random_(model, seed)


@torch.no_grad()
def init_random_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fills every parameter in place with well-scaled random values (deterministic).

    Conv kernels ~ U(+-1/sqrt(fan_in)) (PyTorch's default range); conv biases the same; norm
    weights, attention temperatures and scales ~ U(0.6, 1.4); norm biases ~ U(-0.2, 0.2). Unlike
    the default init every leaf differs from its neighbours, so a swapped or mis-mapped tensor
    shows in the outputs.
    """
    gen = torch.Generator().manual_seed(seed)

    def uniform(shape: torch.Size, lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(shape, generator=gen)

    for name, p in model.named_parameters():
        if p.ndim == 4:
            bound = 1.0 / math.sqrt(math.prod(p.shape[1:]))
            p.copy_(uniform(p.shape, -bound, bound))
        elif name.endswith("shffleconv.bias"):
            bound = 1.0 / math.sqrt(p.shape[0])  # fan_in of the 1x1 conv (dim x 1 x 1)
            p.copy_(uniform(p.shape, -bound, bound))
        elif name.endswith("body.bias"):
            p.copy_(uniform(p.shape, -0.2, 0.2))
        else:  # norm weights, temperature, scale
            p.copy_(uniform(p.shape, 0.6, 1.4))
    return model


def random_release_checkpoint(seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """A random-weight checkpoint in the release format (what ``torch.save`` wrote)."""
    return build_cddfuse(seed).release_checkpoint()
