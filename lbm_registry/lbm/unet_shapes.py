"""The model's state-dict keys and shapes, computed from the config without diffusers.

Why: checking a checkpoint against its config otherwise means building the UNet on the meta
device, and importing diffusers for that takes 6-8 s on a 2-core machine: the largest part of
``lbm-reg extract``'s start-up. This mirrors ``UNet2DConditionModel.__init__`` for the block
types LBM uses (``DownBlock2D``/``CrossAttnDownBlock2D``, ``UNetMidBlock2DCrossAttn``,
``CrossAttnUpBlock2D``/``UpBlock2D``, positional time embedding, GEGLU feed-forward) and returns
None for anything else, so callers fall back to diffusers. tests/test_lora_arch.py checks it
key for key against diffusers for the full-size and tiny configs. :func:`vae_shapes` does the
same for ``AutoencoderKL`` (``DownEncoderBlock2D``/``UpDecoderBlock2D``), and :func:`lbm_shapes`
gives the whole checkpoint's table, so ``verify_checkpoint`` needs no model at all.
"""

from __future__ import annotations

from lbm_registry.lbm.config import DenoiserConfig, LBMConfig, VAEConfig

Shapes = dict[str, tuple[int, ...]]

_DOWN = {"DownBlock2D", "CrossAttnDownBlock2D"}
_UP = {"UpBlock2D", "CrossAttnUpBlock2D"}


def _resnet(out: Shapes, p: str, cin: int, cout: int, temb: int | None) -> None:
    out[f"{p}.norm1.weight"] = out[f"{p}.norm1.bias"] = (cin,)
    out[f"{p}.conv1.weight"], out[f"{p}.conv1.bias"] = (cout, cin, 3, 3), (cout,)
    if temb is not None:
        out[f"{p}.time_emb_proj.weight"], out[f"{p}.time_emb_proj.bias"] = (cout, temb), (cout,)
    out[f"{p}.norm2.weight"] = out[f"{p}.norm2.bias"] = (cout,)
    out[f"{p}.conv2.weight"], out[f"{p}.conv2.bias"] = (cout, cout, 3, 3), (cout,)
    if cin != cout:
        out[f"{p}.conv_shortcut.weight"], out[f"{p}.conv_shortcut.bias"] = (cout, cin, 1, 1), (cout,)


def _transformer(out: Shapes, p: str, channels: int, heads: int, layers: int, cross_dim: int, linear: bool) -> None:
    inner = heads * (channels // heads)
    out[f"{p}.norm.weight"] = out[f"{p}.norm.bias"] = (channels,)
    out[f"{p}.proj_in.weight"] = (inner, channels) if linear else (inner, channels, 1, 1)
    out[f"{p}.proj_in.bias"] = (inner,)
    for t in range(layers):
        b = f"{p}.transformer_blocks.{t}"
        for norm in ("norm1", "norm2", "norm3"):
            out[f"{b}.{norm}.weight"] = out[f"{b}.{norm}.bias"] = (inner,)
        for attn, kv in (("attn1", inner), ("attn2", cross_dim)):
            out[f"{b}.{attn}.to_q.weight"] = (inner, inner)
            out[f"{b}.{attn}.to_k.weight"] = (inner, kv)
            out[f"{b}.{attn}.to_v.weight"] = (inner, kv)
            out[f"{b}.{attn}.to_out.0.weight"], out[f"{b}.{attn}.to_out.0.bias"] = (inner, inner), (inner,)
        out[f"{b}.ff.net.0.proj.weight"], out[f"{b}.ff.net.0.proj.bias"] = (8 * inner, inner), (8 * inner,)
        out[f"{b}.ff.net.2.weight"], out[f"{b}.ff.net.2.bias"] = (inner, 4 * inner), (inner,)
    out[f"{p}.proj_out.weight"] = (channels, inner) if linear else (channels, inner, 1, 1)
    out[f"{p}.proj_out.bias"] = (channels,)


def denoiser_shapes(cfg: DenoiserConfig) -> Shapes | None:
    """Key (without ``denoiser.``) -> shape, or None when the config is outside what this mirrors."""
    if (set(cfg.down_block_types) - _DOWN or set(cfg.up_block_types) - _UP
            or cfg.mid_block_type != "UNetMidBlock2DCrossAttn"):
        return None
    blocks = list(cfg.block_out_channels)
    n = len(blocks)
    heads = list(cfg.attention_head_dim)   # diffusers: num_attention_heads defaults to attention_head_dim
    cross = list(cfg.cross_attention_dim)
    tlayers = list(cfg.transformer_layers_per_block)
    lin = cfg.use_linear_projection
    temb = blocks[0] * 4
    out: Shapes = {}
    out["conv_in.weight"], out["conv_in.bias"] = (blocks[0], cfg.in_channels, 3, 3), (blocks[0],)
    out["time_embedding.linear_1.weight"], out["time_embedding.linear_1.bias"] = (temb, blocks[0]), (temb,)
    out["time_embedding.linear_2.weight"], out["time_embedding.linear_2.bias"] = (temb, temb), (temb,)

    cout = blocks[0]
    for i, kind in enumerate(cfg.down_block_types):
        cin, cout = cout, blocks[i]
        for j in range(cfg.layers_per_block):
            _resnet(out, f"down_blocks.{i}.resnets.{j}", cin if j == 0 else cout, cout, temb)
            if kind == "CrossAttnDownBlock2D":
                _transformer(out, f"down_blocks.{i}.attentions.{j}", cout, heads[i], tlayers[i], cross[i], lin)
        if i < n - 1:
            out[f"down_blocks.{i}.downsamplers.0.conv.weight"] = (cout, cout, 3, 3)
            out[f"down_blocks.{i}.downsamplers.0.conv.bias"] = (cout,)

    c = blocks[-1]
    _resnet(out, "mid_block.resnets.0", c, c, temb)
    _transformer(out, "mid_block.attentions.0", c, heads[-1], tlayers[-1], cross[-1], lin)
    _resnet(out, "mid_block.resnets.1", c, c, temb)

    rblocks, rheads, rcross, rtl = blocks[::-1], heads[::-1], cross[::-1], tlayers[::-1]
    cout = rblocks[0]
    for i, kind in enumerate(cfg.up_block_types):
        prev, cout = cout, rblocks[i]
        skip_in = rblocks[min(i + 1, n - 1)]
        layers = cfg.layers_per_block + 1
        for j in range(layers):
            skip = skip_in if j == layers - 1 else cout
            res_in = prev if j == 0 else cout
            _resnet(out, f"up_blocks.{i}.resnets.{j}", res_in + skip, cout, temb)
            if kind == "CrossAttnUpBlock2D":
                _transformer(out, f"up_blocks.{i}.attentions.{j}", cout, rheads[i], rtl[i], rcross[i], lin)
        if i < n - 1:
            out[f"up_blocks.{i}.upsamplers.0.conv.weight"] = (cout, cout, 3, 3)
            out[f"up_blocks.{i}.upsamplers.0.conv.bias"] = (cout,)

    out["conv_norm_out.weight"] = out["conv_norm_out.bias"] = (blocks[0],)
    out["conv_out.weight"], out["conv_out.bias"] = (cfg.out_channels, blocks[0], 3, 3), (cfg.out_channels,)
    return out


def _vae_mid(out: Shapes, p: str, c: int) -> None:
    """``UNetMidBlock2D`` of the VAE: resnet, one single-head self-attention (with biases), resnet."""
    _resnet(out, f"{p}.resnets.0", c, c, None)
    a = f"{p}.attentions.0"
    out[f"{a}.group_norm.weight"] = out[f"{a}.group_norm.bias"] = (c,)
    for proj in ("to_q", "to_k", "to_v", "to_out.0"):
        out[f"{a}.{proj}.weight"], out[f"{a}.{proj}.bias"] = (c, c), (c,)
    _resnet(out, f"{p}.resnets.1", c, c, None)


def vae_shapes(cfg: VAEConfig) -> Shapes | None:
    """``AutoencoderKL`` key (without ``vae.vae_model.``) -> shape, or None outside what this mirrors."""
    if set(cfg.down_block_types) != {"DownEncoderBlock2D"} or set(cfg.up_block_types) != {"UpDecoderBlock2D"}:
        return None
    blocks = list(cfg.block_out_channels)
    n, lat = len(blocks), cfg.latent_channels
    out: Shapes = {}
    out["encoder.conv_in.weight"], out["encoder.conv_in.bias"] = (blocks[0], cfg.in_channels, 3, 3), (blocks[0],)
    cout = blocks[0]
    for i in range(n):
        cin, cout = cout, blocks[i]
        for j in range(cfg.layers_per_block):
            _resnet(out, f"encoder.down_blocks.{i}.resnets.{j}", cin if j == 0 else cout, cout, None)
        if i < n - 1:
            out[f"encoder.down_blocks.{i}.downsamplers.0.conv.weight"] = (cout, cout, 3, 3)
            out[f"encoder.down_blocks.{i}.downsamplers.0.conv.bias"] = (cout,)
    _vae_mid(out, "encoder.mid_block", blocks[-1])
    out["encoder.conv_norm_out.weight"] = out["encoder.conv_norm_out.bias"] = (blocks[-1],)
    out["encoder.conv_out.weight"], out["encoder.conv_out.bias"] = (2 * lat, blocks[-1], 3, 3), (2 * lat,)

    out["decoder.conv_in.weight"], out["decoder.conv_in.bias"] = (blocks[-1], lat, 3, 3), (blocks[-1],)
    _vae_mid(out, "decoder.mid_block", blocks[-1])
    rblocks = blocks[::-1]
    cout = rblocks[0]
    for i in range(n):
        prev, cout = cout, rblocks[i]
        for j in range(cfg.layers_per_block + 1):
            _resnet(out, f"decoder.up_blocks.{i}.resnets.{j}", prev if j == 0 else cout, cout, None)
        if i < n - 1:
            out[f"decoder.up_blocks.{i}.upsamplers.0.conv.weight"] = (cout, cout, 3, 3)
            out[f"decoder.up_blocks.{i}.upsamplers.0.conv.bias"] = (cout,)
    out["decoder.conv_norm_out.weight"] = out["decoder.conv_norm_out.bias"] = (blocks[0],)
    out["decoder.conv_out.weight"], out["decoder.conv_out.bias"] = (cfg.out_channels, blocks[0], 3, 3), (cfg.out_channels,)
    out["quant_conv.weight"], out["quant_conv.bias"] = (2 * lat, 2 * lat, 1, 1), (2 * lat,)
    out["post_quant_conv.weight"], out["post_quant_conv.bias"] = (lat, lat, 1, 1), (lat,)
    return out


def lbm_shapes(cfg: LBMConfig) -> Shapes | None:
    """Every key of a full LBM checkpoint (``denoiser.*``, ``vae.vae_model.*``, ``num_iterations``)
    -> shape, or None when either part is outside what these tables mirror."""
    den, vae = denoiser_shapes(cfg.denoiser), vae_shapes(cfg.vae)
    if den is None or vae is None:
        return None
    out: Shapes = {f"denoiser.{k}": v for k, v in den.items()}
    out.update({f"vae.vae_model.{k}": v for k, v in vae.items()})
    out["num_iterations"] = ()
    return out
