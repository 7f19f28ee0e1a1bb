"""VideoCrafter2's denoiser eps_theta(z_t, t, c, fps), the `lvdm` 3-D UNet of AILab-CVC/VideoCrafter
(lvdm/modules/networks/openaimodel3d.py), rebuilt from diffusers' video UNet blocks, and the names of
its released weights converted to ours (convert_unet).

Its layout is ModelScope's text-to-video UNet, which diffusers has as UNet3DConditionModel: a 2-D
convolution in, a temporal transformer on it (VideoCrafter's `init_attn`), then per level ResNet
blocks each followed by a temporal convolution, a spatial transformer (self- then cross-attention
to the text) and a temporal transformer (two self-attentions over the frames of each pixel), and the
mirror image up. VideoCrafter2 adds one input: the frame rate, embedded like the timestep by its
own MLP and added to the timestep's embedding (`fps_cond`). So the class below is diffusers' blocks
in that order with that one extra embedding; the spatial transformers project with Linear layers
(`use_linear: true`), and the first temporal transformer's 1x1 Conv1d projections become Linear.

NOTE (deviation): the original's ResBlocks normalise in float32 whatever the model's dtype
(GroupNormSpecific); diffusers' ResnetBlock2D normalises in the model's dtype. The same in float32,
the original's precision; in bfloat16 the GroupNorm statistics of the ResBlocks round otherwise."""
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.transformers.transformer_temporal import TransformerTemporalModel
from diffusers.models.unets.unet_3d_blocks import (CrossAttnDownBlock3D, CrossAttnUpBlock3D, DownBlock3D,
                                                   UNetMidBlock3DCrossAttn, UpBlock3D)
from torch import nn


class VideoCrafterUNet3D(ModelMixin, ConfigMixin):
    """eps_theta(z_t, t, c, fps): (B, C, T, h, w) latents -> the predicted noise, same shape.

    attention_levels[i]: whether level i has the spatial and temporal transformers (VideoCrafter2:
    its attention_resolutions 4, 2, 1 = levels 0-2 of 4). attention_head_dim: channels per head
    (VideoCrafter's num_head_channels, 64): level i has block_out_channels[i] // 64 heads."""

    @register_to_config
    def __init__(self, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                 attention_levels=(True, True, True, False), attention_head_dim=64, cross_attention_dim=1024,
                 first_temporal_heads=8, fps_cond=True, norm_num_groups=32, norm_eps=1e-5):
        # the defaults are VideoCrafter2's (configs/inference_t2v_512_v2.0.yaml); GroupNorm32 everywhere,
        # eps 1e-5 in the ResBlocks and the output, 1e-6 in the transformers (diffusers' own choice too)
        super().__init__()
        c0, temb = block_out_channels[0], 4 * block_out_channels[0]  # the timestep embedding is 4x the first width
        # t (and fps) -> sinusoid [cos, sin] (VideoCrafter's timestep_embedding) -> Linear, SiLU, Linear
        self.time_proj = Timesteps(c0, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(c0, temb)  # VideoCrafter's time_embed
        self.fps_embedding = TimestepEmbedding(c0, temb) if fps_cond else None  # VideoCrafter2's addition
        self.conv_in = nn.Conv2d(in_channels, c0, 3, padding=1)  # input_blocks.0, frame by frame
        # init_attn: 8 heads of attention_head_dim channels over the frames, whatever the width (320 -> 512)
        self.transformer_in = TransformerTemporalModel(num_attention_heads=first_temporal_heads,
                                                       attention_head_dim=attention_head_dim, in_channels=c0,
                                                       norm_num_groups=norm_num_groups)
        # diffusers' 3-D blocks name the channels per head `num_attention_heads` (its documented legacy
        # naming): passing attention_head_dim there gives out_channels // 64 heads of 64, as VideoCrafter's
        common = dict(temb_channels=temb, resnet_eps=norm_eps, resnet_act_fn="silu", resnet_groups=norm_num_groups)
        attention = dict(num_attention_heads=attention_head_dim, cross_attention_dim=cross_attention_dim,
                         use_linear_projection=True)
        levels = len(block_out_channels)  # VideoCrafter2: 4 (channel_mult 1, 2, 4, 4)
        self.down_blocks, self.up_blocks = nn.ModuleList(), nn.ModuleList()
        # down level i: layers_per_block x [ResBlock, temporal conv, (spatial, temporal transformer)], then
        # a stride-2 convolution but on the last level (VideoCrafter's input_blocks)
        for i, ch in enumerate(block_out_channels):
            block = dict(num_layers=layers_per_block, in_channels=block_out_channels[max(i - 1, 0)], out_channels=ch,
                         add_downsample=i < levels - 1, downsample_padding=1, **common)
            self.down_blocks.append(CrossAttnDownBlock3D(**block, **attention) if attention_levels[i]
                                    else DownBlock3D(**block))
        # middle_block: ResBlock, spatial and temporal transformer, ResBlock (each ResBlock with its temporal conv)
        self.mid_block = UNetMidBlock3DCrossAttn(in_channels=block_out_channels[-1], **common, **attention)
        widths = list(reversed(block_out_channels))  # the up path runs the levels deepest first
        # up block i mirrors down level levels - 1 - i with one layer more (it also reads the level's
        # downsampled skip), then a nearest-neighbour 2x upsample and a convolution but on the last
        for i, ch in enumerate(widths):
            block = dict(num_layers=layers_per_block + 1, in_channels=widths[min(i + 1, levels - 1)], out_channels=ch,
                         prev_output_channel=widths[max(i - 1, 0)], add_upsample=i < levels - 1, resolution_idx=i,
                         **common)
            self.up_blocks.append(CrossAttnUpBlock3D(**block, **attention) if attention_levels[levels - 1 - i]
                                  else UpBlock3D(**block))
        # VideoCrafter's `out`: GroupNorm, SiLU, convolution back to the latent channels
        self.conv_norm_out = nn.GroupNorm(norm_num_groups, c0, eps=norm_eps)
        self.conv_act = nn.SiLU()  # out.1
        self.conv_out = nn.Conv2d(c0, out_channels, 3, padding=1)  # out.2

    def embed(self, timestep, fps, batch):
        """The (batch, 4 * width) embedding of t, plus that of fps (VideoCrafter2's `emb += fps_embedding`)."""
        t = torch.as_tensor(timestep, device=self.device).reshape(-1).expand(batch)  # one t for the batch, or one each
        emb = self.time_embedding(self.time_proj(t).to(self.dtype))  # the sinusoid is float32: cast for the MLP
        if self.fps_embedding is not None:
            # the UNet's own default is 16 when no fps is given (openaimodel3d.py's forward(fps=16))
            fps = torch.as_tensor(16 if fps is None else fps, device=self.device).reshape(-1).expand(batch)
            emb = emb + self.fps_embedding(self.time_proj(fps).to(self.dtype))
        return emb

    def forward(self, sample, timestep, encoder_hidden_states, fps=None):
        """sample (B, C, T, h, w), timestep and fps (a number or one per row), encoder_hidden_states
        (B, 77, width) -> eps (B, C_out, T, h, w)."""
        b, _, f, h, w = sample.shape  # f: frames, attended by the temporal layers only
        # every frame is an image for the 2-D layers: the embeddings and the text repeat per frame
        emb = self.embed(timestep, fps, b).repeat_interleave(f, dim=0)
        context = encoder_hidden_states.to(self.dtype).repeat_interleave(f, dim=0)
        x = sample.permute(0, 2, 1, 3, 4).reshape(b * f, -1, h, w).to(self.dtype)  # (B*T, C, h, w)
        x = self.transformer_in(self.conv_in(x), num_frames=f).sample  # conv, then init_attn over the frames
        skips = (x,)  # the skip connections, in VideoCrafter's `hs` order
        for block in self.down_blocks:  # only the blocks with attention read the text
            if isinstance(block, CrossAttnDownBlock3D):
                x, out = block(x, emb, encoder_hidden_states=context, num_frames=f)
            else:
                x, out = block(x, emb, num_frames=f)
            skips += out  # one per layer, and the downsampled one
        x = self.mid_block(x, emb, encoder_hidden_states=context, num_frames=f)  # at 1/8 of the latent
        for block in self.up_blocks:
            n = len(block.resnets)  # each of its ResBlocks takes the last skip, concatenated on channels
            x_skips, skips = skips[-n:], skips[:-n]
            # upsample to the size of the next skip: an odd latent size (not VideoCrafter2's) still fits
            size = skips[-1].shape[2:] if skips else None
            if isinstance(block, CrossAttnUpBlock3D):
                x = block(x, x_skips, emb, encoder_hidden_states=context, upsample_size=size, num_frames=f)
            else:
                x = block(x, x_skips, emb, upsample_size=size, num_frames=f)
        x = self.conv_out(self.conv_act(self.conv_norm_out(x)))
        return x.reshape(b, f, *x.shape[1:]).permute(0, 2, 1, 3, 4)  # back to (B, C, T, h, w)


# ---- the released checkpoint's UNet names (model.diffusion_model.*) -> ours ----
def resblock_names(theirs, ours, j):
    """One VideoCrafter ResBlock (with its temporal convolution) -> resnets[j] and temp_convs[j]."""
    resnet = f"{ours}resnets.{j}."
    return [(f"{theirs}in_layers.0.", f"{resnet}norm1."), (f"{theirs}in_layers.2.", f"{resnet}conv1."),
            (f"{theirs}emb_layers.1.", f"{resnet}time_emb_proj."), (f"{theirs}out_layers.0.", f"{resnet}norm2."),
            (f"{theirs}out_layers.3.", f"{resnet}conv2."), (f"{theirs}skip_connection.", f"{resnet}conv_shortcut."),
            # the original's attribute name, misspelt; inside it conv1..conv4 are laid out as diffusers' are
            (f"{theirs}temopral_conv.", f"{ours}temp_convs.{j}.")]


def layer_names(theirs, ours, j, attention):
    """VideoCrafter's TimestepEmbedSequential [ResBlock, SpatialTransformer, TemporalTransformer] ->
    layer j of a diffusers block; inside the transformers the names are the same."""
    names = resblock_names(f"{theirs}0.", ours, j)
    if attention:
        names += [(f"{theirs}1.", f"{ours}attentions.{j}."), (f"{theirs}2.", f"{ours}temp_attentions.{j}.")]
    return names


def unet_names(config):
    """(VideoCrafter prefix, our prefix) pairs, walking the blocks in the order openaimodel3d.py
    numbers them: input_blocks k = 1, 2, ... (levels' ResBlocks, then a Downsample), middle_block,
    output_blocks k = 0, 1, ... (the deepest level first, its Upsample last in the block)."""
    levels, n, attn = len(config["block_out_channels"]), config["layers_per_block"], config["attention_levels"]
    names = [("time_embed.0.", "time_embedding.linear_1."), ("time_embed.2.", "time_embedding.linear_2."),
             ("fps_embedding.0.", "fps_embedding.linear_1."), ("fps_embedding.2.", "fps_embedding.linear_2."),
             ("input_blocks.0.0.", "conv_in."), ("init_attn.0.", "transformer_in."),
             ("out.0.", "conv_norm_out."), ("out.2.", "conv_out.")]
    k = 1
    for level in range(levels):
        for j in range(n):
            names += layer_names(f"input_blocks.{k}.", f"down_blocks.{level}.", j, attn[level])
            k += 1
        if level < levels - 1:  # the level's Downsample is a block of its own
            names.append((f"input_blocks.{k}.0.op.", f"down_blocks.{level}.downsamplers.0.conv."))
            k += 1
    # middle_block: ResBlock, SpatialTransformer, TemporalTransformer, ResBlock
    names += resblock_names("middle_block.0.", "mid_block.", 0) + resblock_names("middle_block.3.", "mid_block.", 1)
    names += [("middle_block.1.", "mid_block.attentions.0."), ("middle_block.2.", "mid_block.temp_attentions.0.")]
    k = 0
    for i, level in enumerate(reversed(range(levels))):
        for j in range(n + 1):
            names += layer_names(f"output_blocks.{k}.", f"up_blocks.{i}.", j, attn[level])
            if level and j == n:  # the Upsample closes the level's last block
                upsample = f"output_blocks.{k}.{3 if attn[level] else 1}.conv."
                names.append((upsample, f"up_blocks.{i}.upsamplers.0.conv."))
            k += 1
    return names


def convert_unet(state, config):
    """VideoCrafter's UNet state dict (the `model.diffusion_model.` prefix removed) -> ours (config:
    VideoCrafterUNet3D's keyword arguments, or its .config). Every
    name must be placed: a checkpoint of another layout stops here, naming what is left over."""
    names = unet_names(config)
    out, unplaced = {}, []
    for key, value in state.items():
        # the prefixes end in "." and name a layer inside a block: at most one fits a name
        match = [(theirs, ours) for theirs, ours in names if key.startswith(theirs)]
        if len(match) != 1:
            unplaced.append(key)
            continue
        theirs, ours = match[0]
        if key.startswith("init_attn.0.proj_") and key.endswith("weight") and value.dim() == 3:
            value = value[:, :, 0]  # init_attn's 1x1 Conv1d (out, in, 1) is a Linear (out, in)
        out[ours + key[len(theirs):]] = value
    if unplaced:
        raise ValueError(f"{len(unplaced)} UNet weight(s) of the checkpoint fit no layer of VideoCrafter2's "
                         f"UNet, e.g. {unplaced[:3]}")
    return out
