"""TokFusion: frozen-tokenizer tokens -> STE -> token-to-map -> CDDFuse-style base/detail backbone.

    model = TokFusion(cfg_model)                    # cfg_model: models.config.model_config()
    params = model.init(rng, stage=1 | 2, image_size=(H, W))
    params2 = model.extend_to_stage2(params, rng)   # keeps the trained parts, adds the fuse layers
    Z = model.tokens(tokenizer, image)              # (B, H, W, 1) -> (B, N, C), stop_gradient
    rec, feats = model.reconstruct(params, Z, image, modality="vis" | "ir")
    fused, feats = model.fuse(params, Z_vis, Z_ir, vis, ir)
    fused = model.fuse_images(params, tokenizer, vis, ir)    # any H, W

The trainable tree is a plain dict of the top-level modules' linen params:
    "ste"         {"delta": (N, C)} (shared) or {"vis": {"delta"}, "ir": {"delta"}}
    "interface"   TokenToMap params
    "encoder"     Encoder params (shared) or {"vis": ..., "ir": ...}
    "decoder"     Decoder params
    "base_fuse", "detail_fuse"  (stage 2 only)
"ste" is absent without tokens or STE, "interface" without tokens. The tokenizer's parameters are
never part of it. The model holds no state: the same instance serves every stage and dtype.

Encoder input [choice, `model.encoder_input`]: "replace" (default): the token-induced map F_hat
(B, H, W, dim) replaces CDDFuse's patch_embed output, so the image reaches the encoder through the
interface's detail injection; "add": patch_embed(image) + F_hat. `use_tokens=False` gives the
plain 2D path (patch_embed on the image, no STE, no interface). It is exactly CDDFuse's network
and test path only with, in addition, `residual="vis"` (its test_IVF.py and train.py; the
default "sum" is the paper's Eq. 12 and changes the fused output), `share_encoder=True` and the
default sizes (dim 64, 8 heads, 4 + 4 blocks, 3 + 1 INN nodes, expansion 2): 1,188,272
parameters. `models.config.cddfuse_model_config()` is that setting; `cddfuse_differences` names
what keeps a config from it.

Compute dtype: `model.dtype` (params stay float32). `model.remat=True` recomputes the backbone
blocks' activations in the backward pass (same params and results, less training memory).
`init` draws the parameters on the host with NumPy from the rng's key data (the distributions the
modules declare: PyTorch's defaults); under a trace it falls back to flax's own `init_traced`.

Run `python -m tokfusion_jax.models.fusion [--config=configs/x.py]` for a parameter summary.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tokfusion_jax.errors import ConfigError
from tokfusion_jax.models import backbone, interface
from tokfusion_jax.models.config import (
    DTYPES,
    RESIDUAL_MODES,
    TOKEN_SOURCES,
    model_config,
    token_shape_or_default,
)

Array = jax.Array
Params = dict[str, Any]
MODALITIES = ("vis", "ir")
ENCODER_INPUTS = ("replace", "add")
MODULE_ORDER = ("ste", "interface", "encoder", "decoder", "base_fuse", "detail_fuse")
_INIT_SIZE = 16  # params do not depend on the image size; init runs on 16 x 16 dummies


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The validated, hashable form of the model ConfigDict (see models/config.py)."""

    dim: int
    heads: int
    ffn_expansion: float
    enc_blocks: int
    dec_blocks: int
    detail_layers: int
    fuse_detail_layers: int
    use_tokens: bool
    use_ste: bool
    use_detail_injection: bool
    share_encoder: bool
    residual: str
    encoder_input: str
    ste_positions: tuple[int, ...]
    ste_channels: tuple[int, ...]
    ste_shared: bool
    token_source: str
    num_tokens: int
    token_dim: int
    token_input_size: int
    coarse_size: int
    refine_scale_init: float
    dtype: str
    remat: bool = False

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)


def _get(cfg: Any, key: str) -> Any:
    node = cfg
    for part in key.split("."):
        try:
            node = node[part]
        except (KeyError, AttributeError, TypeError) as e:
            raise ConfigError(f"model config: missing key model.{key}") from e
    return node


def _has(cfg: Any, key: str) -> bool:
    try:
        _get(cfg, key)
    except ConfigError:
        return False
    return True


def _int(cfg: Any, key: str, minimum: int = 1) -> int:
    v = _get(cfg, key)
    if v is None and key.startswith("tokens."):
        raise ConfigError(
            f"model.{key} is unset: training takes it from the tokenizer "
            "(models.config.resolve_token_shape); set it to build the model without one"
        )
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ConfigError(f"model.{key}: expected an integer >= {minimum}, got {v!r}")
    return v


def _bool(cfg: Any, key: str) -> bool:
    v = _get(cfg, key)
    if not isinstance(v, bool):
        raise ConfigError(f"model.{key}: expected true/false, got {v!r}")
    return v


def _choice(cfg: Any, key: str, choices: tuple[str, ...]) -> str:
    v = _get(cfg, key)
    if v not in choices:
        raise ConfigError(f"model.{key}: expected one of {', '.join(choices)}, got {v!r}")
    return v


def _int_tuple(cfg: Any, key: str) -> tuple[int, ...]:
    v = _get(cfg, key)
    if isinstance(v, int) and not isinstance(v, bool):
        v = (v,)
    try:
        out = tuple(v)
    except TypeError as e:
        raise ConfigError(f"model.{key}: expected a list of integers, got {v!r}") from e
    if not out or any(isinstance(i, bool) or not isinstance(i, int) for i in out):
        raise ConfigError(f"model.{key}: expected a non-empty list of integers, got {v!r}")
    return out


def spec_from_config(cfg: Mapping[str, Any] | ml_collections.ConfigDict) -> ModelSpec:
    """Validates the model section; raises `ConfigError` naming the bad key and value."""
    spec = ModelSpec(
        dim=_int(cfg, "dim", 2),
        heads=_int(cfg, "heads"),
        ffn_expansion=float(_get(cfg, "ffn_expansion")),
        enc_blocks=_int(cfg, "enc_blocks", 0),
        dec_blocks=_int(cfg, "dec_blocks", 0),
        detail_layers=_int(cfg, "detail_layers", 0),
        fuse_detail_layers=_int(cfg, "fuse_detail_layers", 0),
        use_tokens=_bool(cfg, "use_tokens"),
        use_ste=_bool(cfg, "use_ste"),
        use_detail_injection=_bool(cfg, "use_detail_injection"),
        share_encoder=_bool(cfg, "share_encoder"),
        residual=_choice(cfg, "residual", RESIDUAL_MODES),
        encoder_input=_choice(cfg, "encoder_input", ENCODER_INPUTS),
        ste_positions=_int_tuple(cfg, "ste.positions"),
        ste_channels=_int_tuple(cfg, "ste.channels"),
        ste_shared=_bool(cfg, "ste.shared"),
        token_source=_choice(cfg, "tokens.source", TOKEN_SOURCES),
        num_tokens=_int(cfg, "tokens.num_tokens"),
        token_dim=_int(cfg, "tokens.token_dim"),
        token_input_size=_int(cfg, "tokens.input_size"),
        coarse_size=_int(cfg, "coarse_size"),
        refine_scale_init=float(_get(cfg, "refine_scale_init")),
        dtype=_choice(cfg, "dtype", DTYPES),
        remat=_bool(cfg, "remat") if _has(cfg, "remat") else False,
    )
    if spec.dim % 2 or spec.dim % spec.heads:
        raise ConfigError(
            f"model.dim: {spec.dim} must be even and divisible by model.heads={spec.heads}"
        )
    if spec.ffn_expansion <= 0:
        raise ConfigError(f"model.ffn_expansion: expected > 0, got {spec.ffn_expansion}")
    if spec.use_tokens and spec.use_ste:  # range check of positions/channels
        interface.hard_mask(spec.num_tokens, spec.token_dim, spec.ste_positions, spec.ste_channels)
    return spec


def _param_count(tree: Any) -> int:
    return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def _init_leaf(
    path: tuple[str, ...],
    leaf: Any,
    siblings: Mapping[str, Any],
    rng: np.random.Generator,
    refine_scale_init: float,
) -> np.ndarray:
    """Draws one parameter exactly as the module's declared flax initializer distributes it."""
    name = path[-1]
    shape = tuple(leaf.shape)
    if name == "kernel" or (name == "bias" and "kernel" in siblings):
        fan_in = math.prod(siblings["kernel"].shape[:-1])  # (k, k, C_in / g, out) or (in, out)
        bound = 1.0 / math.sqrt(fan_in)
        return rng.uniform(-bound, bound, shape).astype(np.float32)
    if name in ("weight", "temperature", "scale"):  # LayerNorm weight, attention temperatures
        return np.ones(shape, np.float32)
    if name in ("bias", "delta"):  # LayerNorm bias, STE offset
        return np.zeros(shape, np.float32)
    if name == "refine_scale":
        return np.full(shape, refine_scale_init, np.float32)
    raise KeyError(f"no initialisation rule for parameter {'/'.join(path)}")


def materialize(abstract: Params, rng: np.random.Generator, refine_scale_init: float) -> Params:
    """Fills an abstract (eval_shape) parameter tree on the host with the modules' init rules.

    Drawing with NumPy avoids compiling jax's RNG for every parameter shape (seconds per block on
    CPU); the distributions are the ones the flax modules declare (PyTorch's defaults).
    """

    def walk(node: Mapping[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in sorted(node):
            child = node[key]
            if isinstance(child, Mapping):
                out[key] = walk(child, (*path, key))
            else:
                out[key] = jnp.asarray(
                    _init_leaf((*path, key), child, node, rng, refine_scale_init)
                )
        return out

    return walk(abstract, ())


def pad_to_multiple(x: Array, multiple: int) -> Array:
    """Pads (B, H, W, C) at the bottom/right by symmetric reflection to multiples of `multiple`."""
    h, w = x.shape[1:3]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x
    return jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="symmetric")


def _host_seed(rng: Array) -> np.ndarray:
    """A concrete key's bits as a NumPy seed, also when it is closed over by eval_shape/jit."""
    with jax.ensure_compile_time_eval():
        return np.asarray(jax.random.key_data(rng)).astype(np.uint32).ravel()


class TokFusion:
    """The trainable fusion model. Stateless: parameters live in the dict `init` returns."""

    def __init__(self, cfg: Mapping[str, Any] | ml_collections.ConfigDict | ModelSpec) -> None:
        self.spec = cfg if isinstance(cfg, ModelSpec) else spec_from_config(cfg)
        s = self.spec
        dt = s.compute_dtype
        self.ste_module = (
            interface.SelectiveTokenEdit(s.num_tokens, s.token_dim, s.ste_positions, s.ste_channels)
            if s.use_tokens and s.use_ste
            else None
        )
        self.interface_module = (
            interface.TokenToMap(
                s.dim, s.coarse_size, s.use_detail_injection, s.refine_scale_init, dt
            )
            if s.use_tokens
            else None
        )
        self.encoder_module = backbone.Encoder(
            dim=s.dim,
            heads=s.heads,
            expansion=s.ffn_expansion,
            blocks=s.enc_blocks,
            detail_layers=s.detail_layers,
            patch_embed=not s.use_tokens or s.encoder_input == "add",
            dtype=dt,
            remat=s.remat,
        )
        self.decoder_module = backbone.Decoder(
            s.dim, s.heads, s.ffn_expansion, s.dec_blocks, dtype=dt, remat=s.remat
        )
        self.base_fuse_module = backbone.maybe_remat(backbone.BaseFeatureExtraction, s.remat)(
            s.dim, s.heads, dt
        )
        self.detail_fuse_module = backbone.maybe_remat(backbone.DetailFeatureExtraction, s.remat)(
            s.dim, s.fuse_detail_layers, dt
        )

    def __hash__(self) -> int:
        return hash(self.spec)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TokFusion) and other.spec == self.spec

    def __repr__(self) -> str:
        return f"TokFusion({self.spec})"

    # ------------------------------------------------------------------ parameters

    def _size_multiple(self) -> int:
        return interface.SIZE_MULTIPLE if self.spec.use_tokens else 1

    def init(self, rng: Array, stage: int = 1, image_size: tuple[int, int] = (256, 256)) -> Params:
        """Returns the float32 trainable tree for `stage` (1: no fuse layers; 2: with them).

        Parameter shapes do not depend on the image size; `image_size` is checked to be usable
        (divisible by 8 with tokens; other sizes go through `fuse_images`).
        """
        if stage not in (1, 2):
            raise ConfigError(f"stage: expected 1 or 2, got {stage!r}")
        h, w = image_size
        m = self._size_multiple()
        if h % m or w % m:
            raise ConfigError(
                f"image_size: {h}x{w} is not divisible by {m}; use fuse_images for any size"
            )
        if isinstance(rng, jax.core.Tracer):  # under jit / eval_shape: plain flax init
            return self.init_traced(rng, stage)
        abstract = jax.eval_shape(lambda k: self.init_traced(k, stage), rng)
        seed = _host_seed(rng)
        return materialize(abstract, np.random.default_rng(seed), self.spec.refine_scale_init)

    def init_traced(self, rng: Array, stage: int = 1) -> Params:
        """The same tree as `init`, drawn with flax's initializers (jax RNG, traceable, slower)."""
        s = self.spec
        keys = jax.random.split(rng, 5)
        img = jnp.zeros((1, _INIT_SIZE, _INIT_SIZE, 1), jnp.float32)
        feat = jnp.zeros((1, _INIT_SIZE, _INIT_SIZE, s.dim), jnp.float32)
        z = jnp.zeros((1, s.num_tokens, s.token_dim), jnp.float32)
        params: Params = {}
        if self.ste_module is not None:
            delta = self.ste_module.init(keys[0], z)["params"]
            params["ste"] = delta if s.ste_shared else {m: delta for m in MODALITIES}
        if self.interface_module is not None:
            params["interface"] = self.interface_module.init(keys[1], z, img)["params"]
        enc_feat = feat if s.use_tokens else None

        def enc(key: Array) -> Params:
            return self.encoder_module.init(key, img, enc_feat)["params"]

        if s.share_encoder:
            params["encoder"] = enc(keys[2])
        else:
            params["encoder"] = {"vis": enc(keys[2]), "ir": enc(keys[3])}
        params["decoder"] = self.decoder_module.init(keys[4], feat, feat, img)["params"]
        if stage == 2:
            params = self._add_fuse_layers(params, jax.random.fold_in(rng, 2))
        return params

    def extend_to_stage2(self, params: Params, rng: Array) -> Params:
        """A new tree: `params` (kept as they are) plus fresh base_fuse / detail_fuse layers."""
        if isinstance(rng, jax.core.Tracer):
            return self._add_fuse_layers(params, rng)
        abstract = jax.eval_shape(lambda k: self._add_fuse_layers({}, k), rng)
        seed = _host_seed(rng)
        fresh = materialize(abstract, np.random.default_rng(seed), self.spec.refine_scale_init)
        out = dict(params)
        for name, tree in fresh.items():
            out.setdefault(name, tree)
        return out

    def _add_fuse_layers(self, params: Params, rng: Array) -> Params:
        out = dict(params)
        feat = jnp.zeros((1, _INIT_SIZE, _INIT_SIZE, self.spec.dim), jnp.float32)
        k_base, k_detail = jax.random.split(rng)
        if "base_fuse" not in out:
            out["base_fuse"] = self.base_fuse_module.init(k_base, feat)["params"]
        if "detail_fuse" not in out:
            out["detail_fuse"] = self.detail_fuse_module.init(k_detail, feat)["params"]
        return out

    @staticmethod
    def param_counts(params: Params) -> dict[str, int]:
        """Number of scalars per top-level module, plus "total"."""
        counts = {k: _param_count(v) for k, v in params.items()}
        counts["total"] = sum(counts.values())
        return counts

    # ------------------------------------------------------------------ tokens

    def tokens(self, tokenizer: Any, image: Array) -> Array | None:
        """Frozen tokens Z (B, N, C) float32 of gray images (B, H, W, 1) in [0, 1].

        The image is resized to the tokenizer's image size (bicubic, antialiased; skipped when it
        already has that size), clipped to [0, 1], replicated to RGB and encoded; `tokens.source`
        picks the quantized vectors, the raw latent or its l2-normalised form. The result is
        wrapped in stop_gradient. Returns None for the no-token ablation. Works under jit with the
        tokenizer traced.
        """
        s = self.spec
        if not s.use_tokens:
            return None
        from tokfusion_jax.models import titok  # the tokenizer is only needed with tokens

        size = tokenizer.config.image_size
        if size != s.token_input_size:
            raise ConfigError(
                f"model.tokens.input_size={s.token_input_size} but the tokenizer's image_size is "
                f"{size}"
            )
        if image.ndim != 4 or image.shape[-1] != 1:
            raise ValueError(f"tokens: expected gray images (B, H, W, 1), got {image.shape}")
        x = image.astype(jnp.float32)
        if x.shape[1:3] != (size, size):
            x = jax.image.resize(x, (x.shape[0], size, size, 1), "bicubic", antialias=True)
            x = jnp.clip(x, 0.0, 1.0)
        rgb = jnp.repeat(x, 3, axis=-1)  # (B, S, S, 3)
        out = titok.encode(tokenizer, rgb, s.compute_dtype)
        if s.token_source == "quantized":
            z = out.quantized
        elif s.token_source == "continuous":
            z = out.continuous
        else:
            z = titok.l2_normalize(out.continuous.astype(jnp.float32))
        if z.shape[1:] != (s.num_tokens, s.token_dim):
            raise ConfigError(
                f"model.tokens: (num_tokens, token_dim) = ({s.num_tokens}, {s.token_dim}) but the "
                f"tokenizer gives {tuple(z.shape[1:])}"
            )
        return jax.lax.stop_gradient(z.astype(jnp.float32))

    # ------------------------------------------------------------------ forward passes

    def _branch(self, params: Params, name: str, modality: str, shared: bool) -> Params:
        tree = params[name]
        return tree if shared else tree[modality]

    def edit_tokens(self, params: Params, z: Array, modality: str = "vis") -> Array:
        """STE: Z_tilde (B, N, C) float32 (identity when STE is off)."""
        if self.ste_module is None:
            return jnp.asarray(z, jnp.float32)
        ste = self._branch(params, "ste", modality, self.spec.ste_shared)
        return self.ste_module.apply({"params": ste}, z)

    def token_map(self, params: Params, z: Array, image: Array, modality: str = "vis") -> Array:
        """pi(STE(Z), image) -> F_hat (B, H, W, dim); H, W divisible by 8."""
        zt = self.edit_tokens(params, z, modality)
        return self.interface_module.apply({"params": params["interface"]}, zt, image)

    def encode(
        self, params: Params, z: Array | None, image: Array, modality: str = "vis"
    ) -> tuple[Array, Array]:
        """(base, detail), each (B, H, W, dim), of one modality."""
        if modality not in MODALITIES:
            raise ValueError(f"modality: expected 'vis' or 'ir', got {modality!r}")
        feat = None
        if self.spec.use_tokens:
            if z is None:
                raise ValueError("this model uses tokens: pass Z = model.tokens(tokenizer, image)")
            feat = self.token_map(params, z, image, modality)
        enc = self._branch(params, "encoder", modality, self.spec.share_encoder)
        return self.encoder_module.apply({"params": enc}, image, feat)

    def decode(self, params: Params, base: Array, detail: Array, residual: Array | None) -> Array:
        """sigmoid(Dec(base, detail) + residual) -> (B, H, W, 1) float32."""
        return self.decoder_module.apply({"params": params["decoder"]}, base, detail, residual)

    def reconstruct(
        self, params: Params, z: Array | None, image: Array, modality: str = "vis"
    ) -> tuple[Array, dict[str, Array]]:
        """Stage I: rec (B, H, W, 1) in (0, 1) and {"base", "detail"} (B, H, W, dim).

        The residual is the image itself (residual "sum" or "vis", as CDDFuse's phase I) or none.
        """
        base, detail = self.encode(params, z, image, modality)
        residual = None if self.spec.residual == "none" else image
        return self.decode(params, base, detail, residual), {"base": base, "detail": detail}

    def fuse(
        self, params: Params, z_vis: Array | None, z_ir: Array | None, vis: Array, ir: Array
    ) -> tuple[Array, dict[str, Array]]:
        """Stage II: fused (B, H, W, 1) in (0, 1) and the encoder features of both modalities.

        B_f = BaseFuse(B_vis + B_ir), D_f = DetailFuse(D_vis + D_ir), I_f = Dec(B_f, D_f; I_ref)
        with I_ref = vis + ir ("sum"), vis ("vis") or none.
        """
        if "base_fuse" not in params or "detail_fuse" not in params:
            raise ValueError(
                "fuse needs stage-2 params (model.init(..., stage=2) or extend_to_stage2)"
            )
        base_v, detail_v = self.encode(params, z_vis, vis, "vis")
        base_i, detail_i = self.encode(params, z_ir, ir, "ir")
        base_f = self.base_fuse_module.apply({"params": params["base_fuse"]}, base_v + base_i)
        detail_f = self.detail_fuse_module.apply(
            {"params": params["detail_fuse"]}, detail_v + detail_i
        )
        residual = {"sum": lambda: vis + ir, "vis": lambda: vis, "none": lambda: None}[
            self.spec.residual
        ]()
        fused = self.decode(params, base_f, detail_f, residual)
        feats = {
            "base_vis": base_v,
            "detail_vis": detail_v,
            "base_ir": base_i,
            "detail_ir": detail_i,
        }
        return fused, feats

    def fuse_images(self, params: Params, tokenizer: Any, vis: Array, ir: Array) -> Array:
        """Fuses pairs of any size: (B, H, W, 1) each -> (B, H, W, 1) float32 in (0, 1).

        Tokens come from the whole images (resized for the tokenizer); the 2D path runs at the
        native size, padded by reflection to a multiple of 8 and cropped back. Jit-friendly.
        """
        if vis.shape != ir.shape:
            raise ValueError(f"fuse_images: vis {vis.shape} and ir {ir.shape} differ in shape")
        h, w = vis.shape[1:3]
        z_vis = self.tokens(tokenizer, vis)
        z_ir = self.tokens(tokenizer, ir)
        m = self._size_multiple()
        vis_p = pad_to_multiple(vis.astype(jnp.float32), m)
        ir_p = pad_to_multiple(ir.astype(jnp.float32), m)
        fused, _ = self.fuse(params, z_vis, z_ir, vis_p, ir_p)
        return fused[:, :h, :w, :]


# ---------------------------------------------------------------------- summary CLI


def summary(cfg_model: Mapping[str, Any] | ml_collections.ConfigDict) -> str:
    """A table of trainable parameters per module at stage 2 (shapes only, nothing allocated)."""
    model = TokFusion(cfg_model)
    shapes = jax.eval_shape(lambda k: model.init(k, stage=2), jax.random.key(0))
    counts = model.param_counts(shapes)
    order = [k for k in MODULE_ORDER if k in counts]
    lines = [f"{'module':<14}{'trainable params':>18}"]
    lines += [f"{k:<14}{counts[k]:>18,}" for k in order]
    lines.append(f"{'total':<14}{counts['total']:>18,}")
    s = model.spec
    lines.append(_cddfuse_note(s))
    if model.ste_module is not None:
        per = len(s.ste_positions) * len(s.ste_channels) * (1 if s.ste_shared else 2)
        lines.append(f"(STE: {per} of the Delta entries are unmasked and can change)")
    return "\n".join(lines)


def cddfuse_differences(spec: ModelSpec) -> list[str]:
    """The settings of ``spec`` that differ from CDDFuse's network and IVF test path (empty: none).

    A medical residual ("sum" for its IVF weights on MRI pairs, "none" for its MIF weights) is
    also CDDFuse's, and is reported as such rather than as a difference.
    """
    from tokfusion_jax.models.config import cddfuse_model_config

    want = spec_from_config(cddfuse_model_config("vis"))
    keys = ("use_tokens", "share_encoder", "dim", "heads", "ffn_expansion", "enc_blocks")
    keys += ("dec_blocks", "detail_layers", "fuse_detail_layers", "residual")
    diffs = []
    for key in keys:
        got, ref = getattr(spec, key), getattr(want, key)
        medical = key == "residual" and got in ("sum", "none")
        if got != ref and not medical:
            diffs.append(f"model.{key}={got!r} (CDDFuse: {ref!r})")
    return diffs


def _cddfuse_note(spec: ModelSpec) -> str:
    diffs = cddfuse_differences(spec)
    if not diffs and spec.residual == "vis":
        return "(exactly CDDFuse's network and infrared-visible test path: test_IVF.py, train.py)"
    if not diffs:
        where = {"sum": "CDDFuse_IVF.pth", "none": "CDDFuse_MIF.pth"}[spec.residual]
        return (
            f"(CDDFuse's network; residual {spec.residual!r} is its medical test path, test_MIF.py "
            f"with {where}; its infrared-visible path adds the visible image only: "
            "model.residual='vis')"
        )
    if spec.use_tokens:
        return "(TokFusion; the plain 2D CDDFuse network is models.config.cddfuse_model_config())"
    return "(plain 2D, but not CDDFuse's network: " + ", ".join(diffs) + ")"


def _main(argv: list[str]) -> None:
    """``python -m tokfusion_jax.models.fusion [--config=FILE[:ARG]]``: the parameter table."""
    from absl import flags

    if len(argv) > 1:
        raise ConfigError(f"unexpected positional arguments: {' '.join(argv[1:])}")
    config = flags.FLAGS.config
    if config is None:
        cfg_model = model_config()
    elif "model" not in config:
        raise ConfigError("--config: get_config() has no 'model' section")
    else:
        cfg_model = ml_collections.ConfigDict(config.model.to_dict())
        shape = token_shape_or_default(cfg_model.tokens)
        if any(cfg_model.tokens.get(k) is None for k in shape):
            print(f"(unset token-shape keys come from the tokenizer; shown as TiTok-L-32: {shape})")
        cfg_model.tokens.update(shape)
    print(summary(cfg_model))


if __name__ == "__main__":
    from ml_collections import config_flags

    from tokfusion_jax.errors import run_absl

    config_flags.DEFINE_config_file("config", None, "Config file whose get_config().model is used.")
    run_absl(_main)
