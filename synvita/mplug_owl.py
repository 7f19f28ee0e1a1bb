"""mPLUG-Owl 7B (video), the paper's second model f(V, t) (Ye et al. 2023; VideoCon's Owl-Con starts
from it), rebuilt from transformers' parts: CLIP's vision embeddings and encoder layers with a
temporal adapter before each, a visual abstractor of learnt queries, and a LlamaModel. It reads the
released checkpoint (MAGAer13/mplug-owl-llama-7b-video: one pytorch_model.bin in mPLUG-Owl's own
layout, converted here key by key) and offers the interface of transformers' LLaVA families, so that
the stages, the shared-prefix forward (synvita/shared_prefix.py) and common.plain_answer_logits serve
it unchanged: a video placeholder id in the prompt, model.get_video_features, language_model, lm_head.
Checked against VideoCon's own modeling code on a tiny random model (tests/test_mplug_owl.py).
"""
import json
import math
import os
import re
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, CLIPVisionConfig, LlamaModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling, CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.auto import CONFIG_MAPPING
from transformers.models.clip.modeling_clip import CLIPEncoderLayer, CLIPVisionEmbeddings

VIDEO_TOKEN_ID = -2  # VideoCon's id of <|video|> in a prompt (its <image> is -1): no vocabulary id
# the abstractor's settings when the checkpoint names none (the released video model's)
ABSTRACTOR = dict(hidden_size=1024, num_hidden_layers=6, num_attention_heads=16, intermediate_size=2816,
                  encoder_hidden_size=1024, layer_norm_eps=1e-6)


class MplugOwlConfig(PretrainedConfig):
    """The released config.json as it is: vision_config (ViT-L/14 at 224, QuickGELU, LayerNorm eps
    1e-6), visual_abstractor_config, text_config (LLaMA-7B), num_query_tokens (64)."""
    model_type = "mplug-owl"
    sub_configs = {"text_config": AutoConfig, "vision_config": CLIPVisionConfig}  # each gets the attention backend

    def __init__(self, vision_config=None, visual_abstractor_config=None, text_config=None, num_query_tokens=64,
                 **kwargs):
        vision = {k: v for k, v in (vision_config or {}).items() if k != "model_type"}
        self.vision_config = CLIPVisionConfig(**{"hidden_act": "quick_gelu", "layer_norm_eps": 1e-6, **vision})
        self.visual_abstractor_config = {**ABSTRACTOR, **{k: v for k, v in (visual_abstractor_config or {}).items()
                                                          if k in ABSTRACTOR}}
        text = dict(text_config or {})
        self.text_config = CONFIG_MAPPING[text.pop("model_type", "llama")](**text)
        self.num_query_tokens = num_query_tokens
        self.video_token_id = VIDEO_TOKEN_ID  # where the video's num_query_tokens + 1 embeddings go
        super().__init__(**{k: v for k, v in kwargs.items() if k != "video_token_id"})  # ours is VIDEO_TOKEN_ID

    def get_text_config(self, *args, **kwargs):
        return self.text_config


# ---- the vision tower: CLIP's layers, each after a temporal adapter ----------------------------------
class TemporalAdapter(nn.Module):
    """Before each vision layer of a video (T > 1): LayerNorm, a 1x1x1 Conv3d down to half the width, a
    depthwise (3, 1, 1) Conv3d over time, QuickGELU, a 1x1x1 Conv3d back. It acts on the patch tokens
    and returns the class token unchanged, so the layer's residual doubles the class token, as released."""

    def __init__(self, width):
        super().__init__()
        half = width // 2
        self.ln = nn.LayerNorm(width)  # eps 1e-5, as released (the layers' own use 1e-6)
        self.down_proj = nn.Conv3d(width, half, kernel_size=1)
        self.conv = nn.Conv3d(half, half, kernel_size=(3, 1, 1), padding=(1, 0, 0), groups=half)
        self.up_proj = nn.Conv3d(half, width, kernel_size=1)

    def forward(self, x):  # (B, T, 1 + H*W, D)
        cls, patches = x[:, :, :1], x[:, :, 1:]
        side = math.isqrt(patches.shape[2])
        # in float32 whatever the model's dtype: the released code moved this conv to the CPU, as bf16's
        # depthwise Conv3d failed on GPUs; float32 is what it meant to compute
        h = self.ln(patches.float()).permute(0, 3, 1, 2).reshape(x.shape[0], -1, x.shape[1], side, side)  # (B, D, T, H, W)
        h = self.up_proj(F.gelu(self.conv(self.down_proj(h)), approximate="none") if False else
                         quick_gelu(self.conv(self.down_proj(h))))
        h = h.flatten(3).permute(0, 2, 3, 1)  # (B, T, H*W, D)
        return torch.cat([cls, h.to(x.dtype)], dim=2)


def quick_gelu(x):
    """x * sigmoid(1.702 x), CLIP's activation, the released adapter's."""
    return x * torch.sigmoid(1.702 * x)


class VisionLayer(nn.Module):
    """One released vision layer: x + temporal(x) for a video, then CLIP's pre-norm encoder layer
    (fused query_key_value split into q/k/v_proj by convert_released) on each frame."""

    def __init__(self, config):
        super().__init__()
        self.temporal = TemporalAdapter(config.hidden_size)
        self.layer = CLIPEncoderLayer(config)

    def forward(self, x):  # (B, T, N, D)
        if x.shape[1] > 1:
            x = x + self.temporal(x)  # the class token: x + x
        return self.layer(x.flatten(0, 1), None).view(x.shape)


class VisionTower(nn.Module):
    """ViT-L/14: CLIP's embeddings (class token, patches, positions), a pre-LayerNorm, the layers, and a
    post-LayerNorm on every token (the released model applies it to all of them, not only the class token)."""

    def __init__(self, config):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList(VisionLayer(config) for _ in range(config.num_hidden_layers))
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixels):  # (B, T, 3, H, W) -> (B, T, N, D)
        x = self.pre_layernorm(self.embeddings(pixels.flatten(0, 1)))
        x = x.view(*pixels.shape[:2], *x.shape[1:])
        for layer in self.layers:
            x = layer(x)
        return self.post_layernorm(x)


# ---- the visual abstractor: learnt queries read the video's tokens ------------------------------------
def abstractor_mlp_width(intermediate_size):
    """The released SwiGLU width: intermediate_size if it is the video model's 2816, else 2/3 of it
    rounded up to a multiple of 256 (the rule of mPLUG-Owl's code)."""
    if intermediate_size == 2816:
        return intermediate_size
    return 256 * math.ceil(int(2 * intermediate_size / 3) / 256)


class AbstractorLayer(nn.Module):
    """Cross-attention of the queries q to [norm1(q), normk(the T x N visual tokens)], a residual on
    norm1(q) (not on q), then a SwiGLU MLP with a LayerNorm before its output projection."""

    def __init__(self, c):
        super().__init__()
        d, self.heads = c["hidden_size"], c["num_attention_heads"]
        self.norm1, self.normk, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)  # eps 1e-5
        self.query, self.key, self.value = (nn.Linear(n, d) for n in (d, c["encoder_hidden_size"], c["encoder_hidden_size"]))
        self.out_proj = nn.Linear(d, d)
        width = abstractor_mlp_width(c["intermediate_size"])
        self.w1, self.w3, self.w2 = nn.Linear(d, width), nn.Linear(d, width), nn.Linear(width, d)
        self.ffn_ln = nn.LayerNorm(width, eps=c["layer_norm_eps"])

    def forward(self, q, visual):  # q (B, Q, d), visual (B, T*N, d)
        q = self.norm1(q)
        kv = torch.cat([q, self.normk(visual)], dim=1)  # the queries attend to themselves and the video

        def heads(x):  # (B, L, d) -> (B, heads, L, d / heads)
            return x.view(*x.shape[:2], self.heads, -1).transpose(1, 2)
        scores = heads(self.query(q)) @ heads(self.key(kv)).transpose(-1, -2) / math.sqrt(q.shape[-1] // self.heads)
        context = (scores.softmax(dim=-1) @ heads(self.value(kv))).transpose(1, 2).flatten(2)
        q = q + self.out_proj(context)  # the residual on norm1(q), as released
        return q + self.w2(self.ffn_ln(F.silu(self.w1(self.norm2(q))) * self.w3(self.norm2(q))))


class Abstractor(nn.Module):
    """num_query_tokens queries (+ as many temporal ones for a video) through the layers; out come the
    queries through visual_fc plus the temporal ones through temporal_visual_fc, and vit_eos: Q + 1
    embeddings of the LLM's width (65 for the released model)."""

    def __init__(self, c, text_width):
        super().__init__()
        self.layers = nn.ModuleList(AbstractorLayer(c) for _ in range(c["num_hidden_layers"]))
        self.visual_fc = nn.Linear(c["hidden_size"], text_width)
        self.temporal_visual_fc = nn.Linear(c["hidden_size"], text_width)
        self.vit_eos = nn.Parameter(torch.zeros(1, 1, text_width))

    def forward(self, queries, temporal, visual):  # visual (B, T, N, d)
        T = visual.shape[1]
        q = torch.cat([queries, temporal], dim=1) if T > 1 else queries
        for layer in self.layers:
            q = layer(q, visual.flatten(1, 2))
        n = queries.shape[1]
        out = self.visual_fc(q[:, :n])
        if T > 1:
            out = out + self.temporal_visual_fc(q[:, n:])
        return torch.cat([out, self.vit_eos.expand(len(out), -1, -1)], dim=1)


# ---- the whole model: the LLaVA families' interface ---------------------------------------------------
class MplugOwlModel(nn.Module):
    """The vision tower, the abstractor's queries and layers, and the LLM (language_model, a LlamaModel)."""

    def __init__(self, config):
        super().__init__()
        c, width = config.visual_abstractor_config, config.text_config.hidden_size
        self.vision_model = VisionTower(config.vision_config)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, c["hidden_size"]))
        self.temporal_query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, c["hidden_size"]))
        self.abstractor = Abstractor(c, width)
        self.language_model = LlamaModel(config.text_config)

    def get_video_features(self, pixel_values_videos, **kwargs):
        """(B, T, 3, 224, 224) frames -> pooler_output (B, Q + 1, LLM width): what replaces <|video|>."""
        visual = self.vision_model(pixel_values_videos)  # (B, T, N, D)
        queries = self.query_tokens.expand(len(visual), -1, -1)
        temporal = self.temporal_query_tokens.expand(len(visual), -1, -1)
        return BaseModelOutputWithPooling(pooler_output=self.abstractor(queries, temporal, visual))


class MplugOwlForConditionalGeneration(PreTrainedModel):
    """f(V, t)'s model: the prompt's <|video|> placeholder (VIDEO_TOKEN_ID, expanded to Q + 1 ids by the
    processor or by shared_prefix) gets the video's embeddings, the LLM runs, lm_head gives the logits."""
    config_class = MplugOwlConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_attention_backend = True
    _no_split_modules = ["LlamaDecoderLayer", "VisionLayer", "AbstractorLayer"]

    def __init__(self, config):
        super().__init__(config)
        self.model = MplugOwlModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.language_model.embed_tokens

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, CLIPVisionEmbeddings):  # a buffer in no checkpoint: the positions 0..N
            module.position_ids.copy_(torch.arange(module.num_positions).expand((1, -1)))

    def forward(self, input_ids=None, pixel_values_videos=None, attention_mask=None, position_ids=None,
                mm_encoder_outputs=None, logits_to_keep=0, **kwargs):
        """As a LLaVA family's forward: pixel_values_videos, or the precomputed mm_encoder_outputs["video"]
        (shared_prefix), fill the placeholder positions; returns the logits at logits_to_keep."""
        embeds = self.get_input_embeddings()(input_ids.clamp(min=0))  # a placeholder's row is replaced below
        video = (mm_encoder_outputs or {}).get("video")
        if video is None and pixel_values_videos is not None:
            video = self.model.get_video_features(pixel_values_videos.to(self.dtype))
        if video is not None:  # the video's Q + 1 embeddings at the placeholders, in order
            where = (input_ids == self.config.video_token_id)[..., None].expand_as(embeds)
            embeds = embeds.masked_scatter(where, video.pooler_output.to(embeds.dtype))
        out = self.model.language_model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                                        **kwargs)
        return CausalLMOutputWithPast(logits=self.lm_head(slice_logits_to_keep(out.last_hidden_state, logits_to_keep)))


# ---- the released checkpoint's layout -> ours ---------------------------------------------------------
RENAMES = [  # (released name, ours), regular expressions applied in order; the LLM keeps LLaMA's names
    (r"^language_model\.model\.", "model.language_model."),
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^vision_model\.embeddings\.patch_embed\.", "model.vision_model.embeddings.patch_embedding."),
    (r"^vision_model\.embeddings\.pre_layernorm\.", "model.vision_model.pre_layernorm."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.temporal\.", r"model.vision_model.layers.\1.temporal."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.dense\.", r"model.vision_model.layers.\1.layer.self_attn.out_proj."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.input_layernorm\.", r"model.vision_model.layers.\1.layer.layer_norm1."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.post_attention_layernorm\.", r"model.vision_model.layers.\1.layer.layer_norm2."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.mlp\.", r"model.vision_model.layers.\1.layer.mlp."),
    (r"^vision_model\.post_layernorm\.", "model.vision_model.post_layernorm."),
    (r"^(query_tokens|temporal_query_tokens)$", r"model.\1"),
    (r"^abstractor\.encoder\.layers\.(\d+)\.crossattention\.(attention|output\.mlp|output)\.", r"model.abstractor.layers.\1."),
    (r"^abstractor\.encoder\.layers\.(\d+)\.crossattention\.", r"model.abstractor.layers.\1."),
    (r"^abstractor\.", "model.abstractor."),
]


def split_fused_qkv(tensor, heads):
    """The released fused query_key_value (weight (3D, D) or bias (3D,)) is laid out per head as (heads,
    3, head_dim): split it into q, k, v of (D, ...) each, not into three consecutive thirds."""
    per_head = tensor.view(heads, 3, -1, *tensor.shape[1:])
    return [per_head[:, i].reshape(-1, *tensor.shape[1:]) for i in range(3)]


def convert_released(state, config):
    """A released mPLUG-Owl video state dict -> this module's names and shapes (the fused qkv split,
    the class token and position embedding reshaped for CLIP's embeddings)."""
    heads, out = config.vision_config.num_attention_heads, {}
    for name, tensor in state.items():
        if m := re.match(r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.query_key_value\.(weight|bias)$", name):
            for proj, part in zip(("q_proj", "k_proj", "v_proj"), split_fused_qkv(tensor, heads)):
                out[f"model.vision_model.layers.{m[1]}.layer.self_attn.{proj}.{m[2]}"] = part
        elif name == "vision_model.embeddings.cls_token":  # (1, 1, D) -> CLIP's class_embedding (D,)
            out["model.vision_model.embeddings.class_embedding"] = tensor.reshape(-1)
        elif name == "vision_model.embeddings.position_embedding":  # (1, N, D) -> an nn.Embedding's (N, D)
            out["model.vision_model.embeddings.position_embedding.weight"] = tensor[0]
        else:
            for pattern, ours in RENAMES:
                if re.match(pattern, name):
                    out[re.sub(pattern, ours, name)] = tensor
                    break
            else:
                raise ValueError(f"{name}: not a tensor of mPLUG-Owl's released video model")
    return out


def read_state_dict(path):
    """The tensors of a checkpoint folder: pytorch_model.bin (the released one), or *.safetensors."""
    from safetensors.torch import load_file
    names = sorted(os.listdir(path))
    if any(n.endswith(".safetensors") for n in names):
        return {k: v for n in names if n.endswith(".safetensors") for k, v in load_file(os.path.join(path, n)).items()}
    bins = [n for n in names if re.fullmatch(r"pytorch_model(-\d+-of-\d+)?\.bin", n)]
    if not bins:
        raise ValueError(f"{path}: no pytorch_model*.bin or *.safetensors")
    state = {}
    for n in bins:  # mmap: a 14 GB file is not read into memory at once
        state.update(torch.load(os.path.join(path, n), map_location="cpu", mmap=True, weights_only=True))
    return state


def load(path, dtype=torch.float32, attn_implementation="sdpa_shared_prefix"):
    """The model of a released checkpoint folder (config.json of model_type "mplug-owl"), converted,
    in `dtype` with its temporal adapters in float32; the LLM's attention is `attn_implementation`."""
    config = MplugOwlConfig(**json.load(open(os.path.join(path, "config.json"), encoding="utf-8")))
    state = convert_released(read_state_dict(path), config)
    model = MplugOwlForConditionalGeneration.from_pretrained(None, config=config, state_dict=state, dtype=dtype,
                                                            attn_implementation=attn_implementation)
    for layer in model.model.vision_model.layers:
        layer.temporal.float()  # float32 under bf16 (see TemporalAdapter)
    model.name_or_path = model.config._name_or_path = path  # where it came from (peft's adapter records it)
    return model


def load_owl_con(model, path):
    """VideoCon's Owl-Con (videocon/owl-con) or a released mPLUG-Owl SynViTA checkpoint on `model`: the
    whole PEFT-wrapped state dict (a pytorch_model.bin, or the folder that holds one), LoRA r = alpha =
    32 on the LLM's projections, in peft's naming of its day (base_model.model.<released name>, with or
    without the adapter name). Every tensor of the file is loaded, the base weights too: the result is
    the model the file holds. Returns the PeftModel."""
    from peft import LoraConfig, get_peft_model
    file = os.path.join(path, "pytorch_model.bin") if os.path.isdir(path) else path
    state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    prefix = "base_model.model."
    if not state or not all(k.startswith(prefix) for k in state) or not any(".lora_A" in k for k in state):
        raise ValueError(f"{file}: not a PEFT-wrapped mPLUG-Owl state dict with LoRA weights")
    state = {re.sub(r"\.default(?=\.weight$)", "", k[len(prefix):]): v for k, v in state.items()}  # peft >= 0.3 named it
    lora = {k: v for k, v in state.items() if ".lora_" in k}
    rank = next(v.shape[0] for k, v in lora.items() if ".lora_A" in k)
    targets = sorted({re.search(r"\.(\w+)\.lora_A", k)[1] for k in lora if ".lora_A" in k})
    with warnings.catch_warnings():  # peft 0.21 itself reads transformers' deprecated `is_gradient_checkpointing`
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=32, lora_dropout=0.0,
                                                 target_modules=rf".*language_model\..*\.({'|'.join(targets)})"))
    wrapped = rf"(\.language_model\..*\.(?:{'|'.join(targets)}))\.(weight|bias)$"  # today's peft: <layer>.base_layer.weight
    base = {re.sub(wrapped, r"\1.base_layer.\2", k): v for k, v in
            convert_released({k: v for k, v in state.items() if k not in lora}, model.get_base_model().config).items()}
    for name, tensor in lora.items():  # the LLM's names, as convert_released renames them; peft's adapter name
        for pattern, ours in RENAMES[:2]:
            name = re.sub(pattern, ours, name)
        base[re.sub(r"\.(lora_[AB])\.weight$", r".\1.default.weight", name)] = tensor
    model.load_state_dict({prefix + k: v for k, v in base.items()}, strict=True)
    return model.eval()
