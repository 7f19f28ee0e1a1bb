"""LaVie's base text-to-video UNet (Vchitect/LaVie, Apache-2.0: base/models/unet.py, unet_blocks.py,
attention.py, resnet.py), rebuilt on diffusers' parts, and the conversion of its released checkpoint.

It is Stable Diffusion 1.4's UNet applied to every frame, with three changes that make it a video model:
  - each transformer block gains a temporal self-attention after its text cross-attention: every pixel
    attends over the frames, with rotary position embeddings on the first 32 channels of each head
    (one RotaryEmbedding(32) shared by all blocks, positions = frame indices) and a learned relative
    position bias per head (T5's buckets: 32, of which 8 exact, up to a distance of 32 frames);
  - the ResNet blocks' GroupNorms (and the last one) normalise over the whole clip, frames included,
    while the convolutions run frame by frame;
  - text conditioning is the same 77 CLIP tokens for every frame.
Here the parts are diffusers' ResnetBlock2D, Transformer2DModel, BasicTransformerBlock, Attention,
Downsample2D, Upsample2D, Timesteps and TimestepEmbedding, named as the original names its modules, so
the released state dict loads key for key (convert_released) and gives the original's numbers
(tests/test_lavie.py, against tests/fixtures/lavie_unet.json).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models import Transformer2DModel
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from diffusers.utils import BaseOutput

ROTARY_DIM, ROTARY_THETA = 32, 10000.0  # unet.py: RotaryEmbedding(32), rotary_embedding_torch's 'lang' freqs
NUM_BUCKETS, MAX_DISTANCE = 32, 32  # attention.py: RelativePositionBias(heads, max_distance=32)
ROTARY_KEY = "rotary_emb.freqs"  # the shared rotary module's frequencies, stored once per temporal attention


# ---- the two temporal position terms ----
def rotary_frequencies(device):
    """theta_i = 10000^(-2i/32), i = 0..15: rotary_embedding_torch's RotaryEmbedding(32) frequencies."""
    return 1.0 / ROTARY_THETA ** (torch.arange(0, ROTARY_DIM, 2, device=device).float() / ROTARY_DIM)


def rotate(x):
    """Rotary position embedding over the frame axis of x (batch, heads, frames, head_dim): channels
    (2i, 2i+1) of the first 32 turn by angle frame * theta_i (pairs interleaved, as rotary_embedding_torch
    pairs them); the other channels pass unchanged."""
    frames = x.shape[-2]
    angles = torch.arange(frames, device=x.device).float()[:, None] * rotary_frequencies(x.device)  # (f, 16)
    angles = angles.repeat_interleave(2, dim=-1)  # (f, 32): each angle for both channels of its pair
    # float32 angles, their cos and sin in float32 (float64 for a float64 x), as the original's cached
    # float32 angles give them; NOTE (deviation): in float16 the original computes the angles and their
    # cos and sin in float16 (its RotaryEmbedding is cast with the model); here they stay float32
    angles = angles.to(torch.promote_types(x.dtype, torch.float32))
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    head, rest = x[..., :ROTARY_DIM], x[..., ROTARY_DIM:]
    pairs = head.unflatten(-1, (-1, 2))  # (..., 16, 2): (x_2i, x_2i+1)
    turned = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)  # (-x_2i+1, x_2i)
    return torch.cat((head * cos + turned * sin, rest), dim=-1)


def relative_buckets(frames, device):
    """T5's relative position buckets for query frame i and key frame j: n = i - j; 16 buckets for
    n > 0 and 16 for n < 0; |n| < 8 exactly, larger |n| on a log scale up to 32 (bucket 15 beyond).
    The float arithmetic is the original's, so each boundary falls where it does there."""
    n = torch.arange(frames, device=device)[:, None] - torch.arange(frames, device=device)[None, :]  # i - j
    half = NUM_BUCKETS // 2  # 16 buckets for each sign of i - j
    exact = half // 2  # distances 0..7 get a bucket each
    bucket = (n < 0).long() * half  # the original's n = -(k - q) = q - k: the sign picks the half
    n = n.abs()
    # log(|n| / 8) / log(32 / 8) * 8, in float32 then truncated, as the original does; |n| = 0 is
    # clamped to 1 only to keep log finite (where() discards those entries)
    log_ratio = torch.log(n.clamp(min=1).float() / exact) / math.log(MAX_DISTANCE / exact)
    far = exact + (log_ratio * (half - exact)).long()
    far = torch.minimum(far, torch.full_like(far, half - 1))  # 32 frames apart and beyond: the last bucket
    return bucket + torch.where(n < exact, n, far)


class RelativePositionBias(torch.nn.Module):
    """b_h(i, j): one learned scalar per head and bucket of i - j, added to the temporal attention logits."""

    def __init__(self, heads):
        super().__init__()
        self.relative_attention_bias = torch.nn.Embedding(NUM_BUCKETS, heads)  # original name and shape

    def forward(self, frames):
        buckets = relative_buckets(frames, self.relative_attention_bias.weight.device)  # (frames, frames)
        return self.relative_attention_bias(buckets).permute(2, 0, 1)  # (heads, frames, frames)


class TemporalAttnProcessor:
    """diffusers attention processor of LaVie's temporal attention: softmax(rot(q/sqrt(d)) rot(k)^T + b) v
    over the frames of each pixel; attn.time_rel_pos_bias holds b."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        rows, frames, _ = hidden_states.shape  # (batch * pixels, frames, channels)
        q, k, v = (proj(hidden_states).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
                   for proj in (attn.to_q, attn.to_k, attn.to_v))  # (rows, heads, frames, head_dim)
        # the original scales q before the rotation (the same thing: the rotation is linear)
        q, k = rotate(q * attn.scale), rotate(k)
        bias = attn.time_rel_pos_bias(frames).to(q.dtype)  # (heads, frames, frames), broadcast over rows
        # a float attn_mask is added to the logits: softmax(q k^T + b) v; q is scaled already
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
        out = out.transpose(1, 2).reshape(rows, frames, -1)
        return attn.to_out[1](attn.to_out[0](out))  # linear, then dropout (0)


# ---- the blocks: diffusers' parts, applied to videos (batch, channels, frames, height, width) ----
def per_frame(layer, x, *args):
    """A 2-D layer (convolution, up- or downsampling) on every frame of x (b, c, f, h, w)."""
    b, _, f = x.shape[:3]
    y = layer(x.transpose(1, 2).flatten(0, 1), *args)  # ((b f), c, h, w)
    return y.unflatten(0, (b, f)).transpose(1, 2)


class VideoResnetBlock(ResnetBlock2D):
    """ResnetBlock2D whose GroupNorms see the whole clip (the original's ResnetBlock3D normalises its
    (b, c, f, h, w) input over channels x frames x pixels); its convolutions run per frame."""

    def forward(self, x, temb):
        h = per_frame(self.conv1, self.nonlinearity(self.norm1(x)))  # norm over the clip, conv per frame
        h = h + self.time_emb_proj(self.nonlinearity(temb))[:, :, None, None, None]  # the timestep, every frame
        h = per_frame(self.conv2, self.dropout(self.nonlinearity(self.norm2(h))))
        x = per_frame(self.conv_shortcut, x) if self.conv_shortcut is not None else x  # 1x1 when channels change
        return (x + h) / self.output_scale_factor


class TemporalTransformerBlock(BasicTransformerBlock):
    """BasicTransformerBlock (self-attention, text cross-attention, GEGLU feed-forward) with LaVie's
    temporal attention (norm_temp, attn_temp) between the cross-attention and the feed-forward."""

    def __init__(self, dim, heads, head_dim, cross_attention_dim, upcast_attention=False):
        # norm1/attn1, norm2/attn2, norm3/ff: SD's block, its attention without biases on q, k, v
        super().__init__(dim, heads, head_dim, cross_attention_dim=cross_attention_dim, activation_fn="geglu",
                         upcast_attention=upcast_attention)
        self.norm_temp = torch.nn.LayerNorm(dim)  # pre-norm of the temporal attention
        self.attn_temp = Attention(dim, heads=heads, dim_head=head_dim, upcast_attention=upcast_attention,
                                   processor=TemporalAttnProcessor())
        self.attn_temp.time_rel_pos_bias = RelativePositionBias(heads)  # one bias table per temporal attention

    def forward(self, hidden_states, encoder_hidden_states=None, cross_attention_kwargs=None, **kwargs):
        frames = cross_attention_kwargs["num_frames"]  # hidden_states: ((b f), pixels, channels)
        x = self.attn1(self.norm1(hidden_states)) + hidden_states  # spatial self-attention, per frame
        x = self.attn2(self.norm2(x), encoder_hidden_states=encoder_hidden_states) + x  # the text, per frame
        bf, pixels, c = x.shape
        # temporal attention: each pixel's sequence of frames, (b f) d c -> (b d) f c and back
        t = x.view(bf // frames, frames, pixels, c).transpose(1, 2).reshape(-1, frames, c)
        t = self.attn_temp(self.norm_temp(t)) + t
        x = t.view(bf // frames, pixels, frames, c).transpose(1, 2).reshape(bf, pixels, c)
        return self.ff(self.norm3(x)) + x  # feed-forward


def video_transformer(channels, heads, cross_attention_dim, groups, upcast_attention):
    """Transformer2DModel (GroupNorm, 1x1 proj_in, one block, 1x1 proj_out, residual) with LaVie's block."""
    # built with SD's block, which LaVie's replaces (on the meta device when loading: no cost)
    model = Transformer2DModel(heads, channels // heads, in_channels=channels, num_layers=1,
                               cross_attention_dim=cross_attention_dim, norm_num_groups=groups,
                               upcast_attention=upcast_attention)
    model.transformer_blocks = torch.nn.ModuleList([TemporalTransformerBlock(
        channels, heads, channels // heads, cross_attention_dim, upcast_attention)])
    return model


def run_transformer(model, x, text):
    """The transformer on a clip x (b, c, f, h, w): every frame reads the same text (b, tokens, dim)."""
    b, c, f, h, w = x.shape
    frames = x.transpose(1, 2).reshape(b * f, c, h, w)  # its GroupNorm is per frame, as the original's
    # the frame count reaches the temporal attention through the blocks' cross_attention_kwargs
    out = model(frames, encoder_hidden_states=text.repeat_interleave(f, dim=0),
                cross_attention_kwargs={"num_frames": f}, return_dict=False)[0]
    return out.view(b, f, c, h, w).transpose(1, 2)


class VideoBlock(torch.nn.Module):
    """One level of the UNet: a ResNet block per width of `ins` (its input channels), each followed
    by a transformer when `attention`, then a downsampler (down path) or an upsampler (up path)."""

    def __init__(self, ins, out_channels, cfg, attention, resample=None):
        super().__init__()
        heads, groups = cfg["heads"], cfg["norm_num_groups"]
        # cfg: the UNet's settings; "scale" only in the mid block (mid_block_scale_factor)
        self.resnets = torch.nn.ModuleList([VideoResnetBlock(
            in_channels=n, out_channels=out_channels, temb_channels=cfg["temb"], eps=cfg["norm_eps"], groups=groups,
            non_linearity=cfg["act_fn"], output_scale_factor=cfg.get("scale", 1.0)) for n in ins])
        self.attentions = torch.nn.ModuleList([video_transformer(
            out_channels, heads, cfg["cross_attention_dim"], groups, cfg["upcast_attention"])
            for _ in ins]) if attention else None
        if resample == "down":  # conv stride 2, named "op" as SD's (its weights sit under .conv)
            self.downsamplers = torch.nn.ModuleList([Downsample2D(
                out_channels, use_conv=True, out_channels=out_channels, padding=cfg["downsample_padding"], name="op")])
        if resample == "up":  # nearest x2, then conv
            self.upsamplers = torch.nn.ModuleList([Upsample2D(out_channels, use_conv=True, out_channels=out_channels)])

    def forward(self, x, temb, text, skips=None, size=None):
        """Down path (skips None): (x, the outputs the up path takes). Up path: x, after taking skips."""
        outputs = ()
        for i, resnet in enumerate(self.resnets):
            if skips is not None:  # the up path takes the down path's outputs, last first
                x = torch.cat([x, skips[-1 - i]], dim=1)
            x = resnet(x, temb)
            x = run_transformer(self.attentions[i], x, text) if self.attentions is not None else x
            outputs += (x,)  # down path: each block's output is a skip connection
        if hasattr(self, "downsamplers"):  # stride 2 per frame; its output is a skip too
            x = per_frame(self.downsamplers[0], x)
            outputs += (x,)
        if hasattr(self, "upsamplers"):  # size: the skip's (h, w) where the latents are not a multiple of 8
            x = per_frame(self.upsamplers[0], x, size)
        return x if skips is not None else (x, outputs)


class MidBlock(torch.nn.Module):
    """The bottom of the UNet: ResNet block, transformer, ResNet block."""

    def __init__(self, channels, cfg):
        super().__init__()
        block = VideoBlock([channels] * 2, channels, dict(cfg, scale=cfg["mid_block_scale_factor"]), attention=False)
        self.resnets = block.resnets
        self.attentions = torch.nn.ModuleList([video_transformer(
            channels, cfg["heads"], cfg["cross_attention_dim"], cfg["norm_num_groups"], cfg["upcast_attention"])])

    def forward(self, x, temb, text):
        x = self.resnets[0](x, temb)
        return self.resnets[1](run_transformer(self.attentions[0], x, text), temb)


# ---- the UNet ----
@dataclass
class UNetOutput(BaseOutput):
    sample: torch.Tensor  # the predicted noise epsilon, (batch, 4, frames, height / 8, width / 8)


class LaVieUNet(ModelMixin, ConfigMixin):
    """epsilon_theta(z_t, t, text) on a clip of latents (b, 4, f, h, w). Its config is SD-1.4's
    unet/config.json (from_sd_config): the original builds LaVie's UNet from that file, replacing its
    block types by three cross-attention levels and a plain one (down), the reverse (up)."""

    @register_to_config
    def __init__(self, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                 attention_head_dim=8, cross_attention_dim=768, norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
                 flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, mid_block_scale_factor=1.0,
                 upcast_attention=False, sample_size=64):
        super().__init__()
        widths = list(block_out_channels)
        # SD's attention_head_dim is the number of heads (diffusers' old naming), one or one per level
        heads = [attention_head_dim] * len(widths) if isinstance(attention_head_dim, int) else list(attention_head_dim)
        cfg = dict(temb=4 * widths[0], norm_num_groups=norm_num_groups, norm_eps=norm_eps, act_fn=act_fn,
                   cross_attention_dim=cross_attention_dim, upcast_attention=upcast_attention,
                   downsample_padding=downsample_padding, mid_block_scale_factor=mid_block_scale_factor)
        # the original's InflatedConv3d: a 2-D convolution on every frame
        self.conv_in = torch.nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.time_proj = Timesteps(widths[0], flip_sin_to_cos, freq_shift)  # sinusoidal features of t
        self.time_embedding = TimestepEmbedding(widths[0], cfg["temb"])
        # down: every level but the last has cross-attention and halves the frames' size
        self.down_blocks, prev = torch.nn.ModuleList(), widths[0]
        for i, width in enumerate(widths):
            last = i == len(widths) - 1
            ins = [prev] + [width] * (layers_per_block - 1)  # the first block changes the width
            self.down_blocks.append(VideoBlock(ins, width, dict(cfg, heads=heads[i]), attention=not last,
                                               resample=None if last else "down"))
            prev = width
        self.mid_block = MidBlock(widths[-1], dict(cfg, heads=heads[-1]))
        # up: the reverse, one more ResNet block a level; each takes a skip from the down path, whose
        # widths are the level's own but for its last, which comes from the level above
        self.up_blocks, rev, rev_heads = torch.nn.ModuleList(), widths[::-1], heads[::-1]
        for i, width in enumerate(rev):
            skips = [width] * layers_per_block + [rev[min(i + 1, len(rev) - 1)]]
            ins = [(prev if j == 0 else width) + s for j, s in enumerate(skips)]
            self.up_blocks.append(VideoBlock(ins, width, dict(cfg, heads=rev_heads[i]), attention=i > 0,
                                             resample="up" if i < len(rev) - 1 else None))
            prev = width
        self.conv_norm_out = torch.nn.GroupNorm(norm_num_groups, widths[0], eps=norm_eps)  # over the clip
        self.conv_out = torch.nn.Conv2d(widths[0], out_channels, 3, padding=1)

    @classmethod
    def from_sd_config(cls, config, **kwargs):
        """The UNet of SD-1.4's unet/config.json (a dict): its sizes; its block types are LaVie's own."""
        if config.get("use_linear_projection"):  # SD 1.x uses 1x1 convolutions; the original's linear path is broken
            raise ValueError("LaVie's UNet is SD 1.x's: use_linear_projection must be false")
        keys = set(cls.extract_init_dict(config)[0])  # the settings __init__ takes; block types etc. dropped
        return cls(**{k: v for k, v in config.items() if k in keys}, **kwargs)

    def forward(self, sample, timestep, encoder_hidden_states, return_dict=True):
        """epsilon for latents `sample` (b, c, f, h, w) at step `timestep` (a number, or one per clip)
        given the text's CLIP states (b, tokens, dim)."""
        # latents whose size is not a multiple of 2^(levels - 1): each upsampler takes its skip's size
        resize = any(s % 2 ** (len(self.up_blocks) - 1) for s in sample.shape[-2:])
        t = timestep if torch.is_tensor(timestep) else torch.tensor([timestep], device=sample.device)
        t = t.reshape(-1).to(sample.device).expand(sample.shape[0])  # one t per clip
        emb = self.time_embedding(self.time_proj(t).to(self.dtype))  # (b, 4 * widths[0])
        x = per_frame(self.conv_in, sample)
        skips = (x,)  # the up path's inputs, taken back last first
        for block in self.down_blocks:  # the down path keeps every block's output for the up path
            x, outputs = block(x, emb, encoder_hidden_states)
            skips += outputs
        x = self.mid_block(x, emb, encoder_hidden_states)
        for i, block in enumerate(self.up_blocks):
            mine, skips = skips[-len(block.resnets):], skips[:-len(block.resnets)]  # one skip per ResNet block
            size = skips[-1].shape[-2:] if resize and i < len(self.up_blocks) - 1 else None
            x = block(x, emb, encoder_hidden_states, mine, size)
        x = per_frame(self.conv_out, F.silu(self.conv_norm_out(x)))  # GroupNorm over the clip, conv per frame
        return UNetOutput(sample=x) if return_dict else (x,)


# ---- the released checkpoint: lavie_base.pt ----
def convert_released(checkpoint):
    """lavie_base.pt (loaded) -> this UNet's state dict. The file holds the original model's state dict,
    or {"ema": it} (the original's find_model takes either). The modules here carry the original's
    names, so every key keeps its name but one kind: `...attn_temp.rotary_emb.freqs`, the shared
    RotaryEmbedding(32)'s frequencies, stored once per temporal attention and never trained
    (requires_grad False). They are checked against the values computed here and dropped."""
    state = checkpoint["ema"] if "ema" in checkpoint else checkpoint
    expected = rotary_frequencies(torch.device("cpu"))
    converted = {}
    for name, tensor in state.items():
        if name.endswith(ROTARY_KEY):  # float16 in a half-precision checkpoint: 1e-3 relative
            if tensor.shape != expected.shape or not torch.allclose(tensor.float(), expected, rtol=1e-3, atol=0):
                raise ValueError(f"{name}: not RotaryEmbedding({ROTARY_DIM})'s frequencies {expected.tolist()}")
            continue
        converted[name] = tensor
    return converted
