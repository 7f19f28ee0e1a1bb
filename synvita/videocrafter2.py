"""VideoCrafter2 (AILab-CVC/VideoCrafter, Apache-2.0 code and weights), the paper's third generator G
of §4, as a diffusers pipeline: its released `model.ckpt` converted, name by name, into diffusers'
and transformers' parts, sampled with VideoCrafter's own DDIM sampler.

    t^s -> CLIP's BPE, 77 tokens -> OpenCLIP ViT-H's text tower to its penultimate layer (a CLIPTextModel)
        -> c (77 x 1024); "" -> the unconditional c (uncond_type empty_seq)
    z_T ~ N(0, I) of (4, T, H/8, W/8) -> DDIM, eta 1, x0 rescaled (use_scale), guidance 12, the UNet told
        t, c and fps 28 (synvita/videocrafter2_unet.py) -> z_0
    z_0 -> the LDM VAE's decoder frame by frame (diffusers' AutoencoderKL) -> (T, H, W, 3) in [0, 1]

Defaults: the release's scripts/run_text2video.sh with configs/inference_t2v_512_v2.0.yaml (RUN_DEFAULTS).

A folder laid out as the original release (is_videocrafter2_folder recognises it):
    <folder>/model.ckpt      hub VideoCrafter/VideoCrafter2, file model.ckpt (7.4 GB, float32; the release's
                             checkpoints/base_512_v2/model.ckpt): UNet, VAE and text tower in one file
    <folder>/tokenizer/      vocab.json and merges.txt of CLIP's BPE (49408 tokens), e.g. from hub
                             openai/clip-vit-large-patch14 or laion/CLIP-ViT-H-14-laion2B-s32B-b79K: the
                             vocabulary that open_clip ships and VideoCrafter tokenizes with
    <folder>/inference_t2v_512_v2.0.yaml   optional, the release's configs/ file (without it: RELEASED)
filled with, e.g.:
    hf download VideoCrafter/VideoCrafter2 model.ckpt --local-dir <folder>
    hf download openai/clip-vit-large-patch14 vocab.json merges.txt --local-dir <folder>/tokenizer

What 01_generate.py's loading uses: .to(device), set_progress_bar_config and enable_model_cpu_offload
come from DiffusionPipeline; pipe.vae is diffusers' AutoencoderKL (enable_tiling, enable_slicing); the
denoiser is pipe.unet (no .transformer: diffusers' caches do not apply; torch.compile pipe.unet).

Checked against VideoCrafter's own code on a tiny random model: tests/test_videocrafter2.py."""
import os
import pickle
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, DiffusionPipeline
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from synvita.videocrafter2_unet import VideoCrafterUNet3D, convert_unet

# the three names of a release folder (the module docstring)
CHECKPOINT, CONFIG, TOKENIZER = "model.ckpt", "inference_t2v_512_v2.0.yaml", "tokenizer"
# scripts/run_text2video.sh's settings, in 01_generate.py's terms: 50 DDIM steps, guidance 12, 320x512,
# the UNet's temporal_length of 16 frames, and its mp4 at inference.py's --savefps default of 10
RUN_DEFAULTS = dict(num_inference_steps=50, guidance_scale=12.0, height=320, width=512, num_frames=16, fps=10)
FPS_CONDITION = 28  # the frame rate the UNet is told (run_text2video.sh's --fps 28), not the mp4's
# configs/inference_t2v_512_v2.0.yaml's model.params: what the layers and the sampler read of it
RELEASED = {
    "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000, "scale_factor": 0.18215,
    "use_scale": True, "scale_b": 0.7, "uncond_type": "empty_seq",
    "unet_config": {"params": {
        "in_channels": 4, "out_channels": 4, "model_channels": 320, "attention_resolutions": [4, 2, 1],
        "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4], "num_head_channels": 64, "transformer_depth": 1,
        "context_dim": 1024, "use_linear": True, "temporal_conv": True, "temporal_attention": True,
        "temporal_selfatt_only": True, "use_relative_position": False, "use_causal_attention": False,
        "temporal_length": 16, "addition_attention": True, "fps_cond": True}},
    "first_stage_config": {"params": {"embed_dim": 4, "ddconfig": {
        "double_z": True, "z_channels": 4, "resolution": 512, "in_channels": 3, "out_ch": 3, "ch": 128,
        "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": []}}},
    "cond_stage_config": {"params": {"layer": "penultimate"}},
}
# lvdm options this rebuild has only at one value (the class default where the yaml is silent): a
# config that sets another stops in read_config, named, instead of rendering other videos
UNET_FIXED = {"use_linear": True, "temporal_conv": True, "temporal_attention": True, "temporal_selfatt_only": True,
              "use_relative_position": False, "use_causal_attention": False, "addition_attention": True,
              "transformer_depth": 1, "temporal_transformer_depth": 1, "use_scale_shift_norm": False,
              "resblock_updown": False, "tempspatial_aware": False, "use_image_attention": False, "dims": 2}
MODEL_FIXED = {"parameterization": "eps", "beta_schedule": "linear", "uncond_type": "empty_seq"}
VAE_FIXED = {"attn_resolutions": [], "double_z": True}
# buffers of the checkpoint (ddpm3d.py's register_schedule) that the scheduler recomputes from the config
SCHEDULE_BUFFERS = {"betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "scale_arr",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2"}


def is_videocrafter2_folder(path):
    """Whether path is a folder in VideoCrafter's release layout: a model.ckpt, and no model_index.json
    (a diffusers folder, which 01_generate.py loads with DiffusionPipeline)."""
    return os.path.isfile(os.path.join(path, CHECKPOINT)) and not os.path.exists(os.path.join(path, "model_index.json"))


# ---- the config: the release's yaml, else VideoCrafter2's own values ----
def release_params(folder):
    """model.params of <folder>/inference_t2v_512_v2.0.yaml (RELEASED without the file), checked: every
    option this rebuild does not implement is named in one error."""
    path = os.path.join(folder, CONFIG)
    if os.path.exists(path):
        import yaml  # PyYAML: transformers' own dependency
        with open(path, encoding="utf-8") as fh:
            params = yaml.safe_load(fh)["model"]["params"]
    else:
        params = RELEASED
    unet, vae = params["unet_config"]["params"], params["first_stage_config"]["params"]  # the UNet and the VAE
    wrong = [f"unet_config.{k}: {unet[k]}" for k, v in UNET_FIXED.items() if unet.get(k, v) != v]
    wrong += [f"{k}: {params[k]}" for k, v in MODEL_FIXED.items() if params.get(k, v) != v]
    wrong += [f"ddconfig.{k}: {vae['ddconfig'][k]}" for k, v in VAE_FIXED.items() if vae["ddconfig"].get(k, v) != v]
    if unet.get("num_head_channels", -1) == -1:  # heads given by count: a width per level we do not map
        wrong.append("unet_config.num_head_channels: -1")
    if vae["ddconfig"]["z_channels"] != vae["embed_dim"]:  # diffusers' AutoencoderKL has one latent width
        wrong.append(f"z_channels {vae['ddconfig']['z_channels']} != embed_dim {vae['embed_dim']}")
    if wrong:
        raise ValueError(f"{path}: this VideoCrafter2 rebuild implements none of {wrong}")
    return params


def read_config(folder):
    """The release's config -> keyword arguments of our UNet, AutoencoderKL and scheduler, and the text
    tower's layer ("penultimate" for VideoCrafter2)."""
    params = release_params(folder)  # checked: what is read below is what we implement
    u, dd = params["unet_config"]["params"], params["first_stage_config"]["params"]["ddconfig"]
    levels = len(u["channel_mult"])  # the UNet halves the latent levels - 1 times
    unet = dict(in_channels=u["in_channels"], out_channels=u["out_channels"],
                block_out_channels=[u["model_channels"] * m for m in u["channel_mult"]],
                layers_per_block=u["num_res_blocks"], attention_head_dim=u["num_head_channels"],
                # level i runs at downsampling 2^i: it has attention when that is in attention_resolutions
                attention_levels=[2 ** i in u["attention_resolutions"] for i in range(levels)],
                cross_attention_dim=u["context_dim"], fps_cond=u.get("fps_cond", False))
    vae = dict(in_channels=dd["in_channels"], out_channels=dd["out_ch"], latent_channels=dd["z_channels"],
               down_block_types=["DownEncoderBlock2D"] * len(dd["ch_mult"]),
               up_block_types=["UpDecoderBlock2D"] * len(dd["ch_mult"]),
               block_out_channels=[dd["ch"] * m for m in dd["ch_mult"]], layers_per_block=dd["num_res_blocks"],
               sample_size=dd["resolution"], scaling_factor=params.get("scale_factor", 1.0))
    # LatentDiffusion's and DDPM's defaults where the yaml is silent; its fix_scale_bug changes only
    # entries of s past t = 999, which no step reads
    scheduler = dict(num_train_timesteps=params.get("timesteps", 1000), beta_start=params.get("linear_start", 1e-4),
                     beta_end=params.get("linear_end", 2e-2), use_scale=params.get("use_scale", False),
                     scale_a=params.get("scale_a", 1.0), scale_b=params.get("scale_b", 0.3),
                     mid_step=params.get("mid_step", 400))
    return unet, vae, scheduler, params["cond_stage_config"]["params"].get("layer", "last")


# ---- VideoCrafter's DDIM sampler (lvdm/models/samplers/ddim.py), the x0 rescale included ----
class VideoCrafter2DDIMScheduler(SchedulerMixin, ConfigMixin):
    """DDIM as VideoCrafter samples it, which no diffusers scheduler does. Its timesteps are
    range(0, 1000, 1000 // steps) + 1 (981, 961, ..., 1 for 50 steps), and with `use_scale` (true for
    VideoCrafter2) the predicted x0 is divided by s_t and the next latent is built from s_prev * x0,
    where s falls linearly from scale_a = 1 to scale_b = 0.7 over t = 0..mid_step = 400 and stays at
    0.7 above (ddpm3d.py's scale_arr: its q_sample, the training's noising, scales x0 by s_t too)."""

    @register_to_config
    def __init__(self, num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, use_scale=True,
                 scale_a=1.0, scale_b=0.7, mid_step=400, steps_offset=1):
        # lvdm's "linear" schedule is linear in sqrt(beta) (diffusers' scaled_linear), made in float64
        # and kept by the model as a float32 buffer, which the sampler reads
        betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=torch.float64) ** 2
        self.alphas_cumprod = torch.cumprod(1 - betas, 0).float()  # abar_t
        # s_t for t = 0..999 (the original's array runs on past 999, where no step reads)
        rest = torch.full((num_train_timesteps,), scale_b, dtype=torch.float64)
        self.scale_arr = torch.cat([torch.linspace(scale_a, scale_b, mid_step, dtype=torch.float64), rest]).float()
        self.timesteps = torch.tensor([], dtype=torch.long)

    def set_timesteps(self, num_inference_steps, eta=1.0, device=None):
        """The DDIM timesteps (descending) and, per step, abar_t, abar_prev, sigma_t, s_t and s_prev."""
        total = self.config.num_train_timesteps
        # make_ddim_timesteps('uniform'): 1000 // steps apart, then + 1 (diffusers' "leading" spacing with
        # steps_offset 1); a count that does not divide 1000 gets more steps (7 -> 8), or fails (3)
        ascending = torch.arange(0, total, total // num_inference_steps) + self.config.steps_offset
        if ascending[-1] >= total:  # the original stops there with an IndexError
            raise ValueError(f"num_inference_steps {num_inference_steps}: VideoCrafter's DDIM reaches t = "
                             f"{int(ascending[-1])} (range(0, {total}, {total // num_inference_steps}) + 1), past "
                             f"its last t = {total - 1}: choose another count, e.g. 50")
        a = self.alphas_cumprod[ascending]  # abar_t of each step
        a_prev = torch.cat([self.alphas_cumprod[:1], a[:-1]])  # the last step goes to abar_0, not to 1
        # sigma_t = eta sqrt((1 - abar_prev) / (1 - abar_t) (1 - abar_t / abar_prev)), in float64 as the
        # original's numpy arithmetic, then float32 as its torch.full
        ratio = (1 - a_prev.double()) / (1 - a.double()) * (1 - a.double() / a_prev.double())
        s_prev = torch.cat([self.scale_arr[:1], self.scale_arr[ascending[:-1]]])  # s of the step before, 1 at t = 0
        # per step, indexed as the original's `index` (0 = the last step, t = 1), float32 as its buffers
        self.table = dict(a=a, a_prev=a_prev, sigma=(eta * ratio.sqrt()).float(), s=self.scale_arr[ascending],
                          s_prev=s_prev)
        self.index = {int(t): i for i, t in enumerate(ascending)}  # t -> its row of the table
        self.timesteps = ascending.flip(0).to(device)  # run from t = 981 down to t = 1
        self.num_inference_steps = len(ascending)

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        """x_{t-1} from eps = model_output at x_t = sample (p_sample_ddim), the noise from generator (a list:
        row i from generator[i]; one generator: the whole batch at once, as the original's torch.randn)."""
        i = self.index[int(timestep)]  # the original passes this index with t
        a, a_prev, sigma, s, s_prev = (self.table[k][i].to(sample.device) for k in self.table)  # the table's order
        # x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)
        pred_x0 = (sample - (1 - a).sqrt() * model_output) / a.sqrt()
        direction = (1 - a_prev - sigma ** 2).sqrt() * model_output  # the part of x_{t-1} that points along eps
        # drawn at every step, even at eta 0 where sigma is 0: the generator's stream stays the original's
        noise = sigma * randn_rows(sample.shape, generator, sample.device)
        if self.config.use_scale:  # the x0 rescale: x0 / s_t, then sqrt(abar_prev) * s_prev * x0
            pred_x0 = pred_x0 / s
            prev = a_prev.sqrt() * s_prev * pred_x0 + direction + noise
        else:  # plain DDIM
            prev = a_prev.sqrt() * pred_x0 + direction + noise
        return DDIMSchedulerOutput(prev_sample=prev, pred_original_sample=pred_x0) if return_dict else (prev,)


def randn_rows(shape, generator, device):
    """N(0, I) of shape (B, ...) on device: row i from generator[i] when a list is given (a row's noise
    does not depend on the rows beside it), else the whole batch from one generator (None: torch's)."""
    if isinstance(generator, (list, tuple)):
        # each on its generator's device (01 passes CPU generators: the same numbers on any GPU)
        rows = [torch.randn((1, *shape[1:]), generator=g, device=g.device) for g in generator]
        return torch.cat([r.to(device) for r in rows])
    return torch.randn(shape, generator=generator, device=generator.device if generator else "cpu").to(device)


# ---- the released checkpoint -> diffusers' and transformers' names ----
def load_checkpoint(path, trust_checkpoint=False):
    """The state dict of a released model.ckpt: PyTorch Lightning's {"state_dict": ...}, DeepSpeed's
    {"module": ...} (names behind a 16-character prefix) or bare, as funcs.py's load_model_checkpoint
    reads them. Memory-mapped: the 7.4 GB are not read into memory twice."""
    try:
        # weights_only: a pickle can run code; tensors, dicts and numbers need no trust
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=not trust_checkpoint)
    except pickle.UnpicklingError:
        if trust_checkpoint:
            raise
        raise ValueError(f"{path} holds Python objects beside its tensors; if you trust the file (the hub's "
                         f"VideoCrafter/VideoCrafter2), load it with trust_checkpoint=True "
                         f"(01_generate.py: --pipeline_kwargs '{{\"trust_checkpoint\": true}}')") from None
    if "module" in ckpt:  # DeepSpeed's layout, which funcs.py tries first
        return {k[16:]: v for k, v in ckpt["module"].items()}
    return ckpt.get("state_dict", ckpt)


def convert_text_encoder(state, layer):
    """OpenCLIP's text tower (cond_stage_model.model.*) -> (CLIPTextConfig, CLIPTextModel state dict).

    FrozenOpenCLIPEmbedder runs the tower to its penultimate block, then ln_final: a CLIPTextModel one
    layer shorter (the last block's weights dropped) returns exactly that as last_hidden_state, as
    diffusers' Stable Diffusion 2 text encoders do. The sizes are read off the weights; the heads have
    64 channels, as in every OpenCLIP text tower (ViT-H-14: 1024 wide, 16 heads)."""
    import re
    from transformers import CLIPTextConfig
    vocab, width = state["token_embedding.weight"].shape  # 49408 x 1024 for ViT-H
    blocks = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("transformer.resblocks."))
    keep = blocks - 1 if layer == "penultimate" else blocks  # VideoCrafter2: 23 of 24
    config = CLIPTextConfig(vocab_size=vocab, hidden_size=width,
                            intermediate_size=state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                            # OpenCLIP ViT-H's text MLP uses the exact GELU (no QuickGELU), LayerNorm eps 1e-5
                            num_hidden_layers=keep, num_attention_heads=width // 64, hidden_act="gelu",
                            max_position_embeddings=state["positional_embedding"].shape[0], layer_norm_eps=1e-5,
                            # CLIP's BPE ends with <|startoftext|>, <|endoftext|>; open_clip pads with id 0
                            bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=0)
    names = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
             "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    out = {"embeddings.token_embedding.weight": state["token_embedding.weight"],
           "embeddings.position_embedding.weight": state["positional_embedding"],  # a parameter, not a table
           "final_layer_norm.weight": state["ln_final.weight"], "final_layer_norm.bias": state["ln_final.bias"]}
    # text_projection and logit_scale serve CLIP's pooled embedding only: they are left out
    for key, value in state.items():
        m = re.match(r"transformer\.resblocks\.(\d+)\.(.+?)[._](weight|bias)$", key)  # in_proj_weight: "_"
        if not m or int(m[1]) >= keep:  # not a block's, or the block the penultimate layer skips
            continue
        prefix = f"encoder.layers.{m[1]}."  # resblock i is CLIP layer i
        if m[2] == "attn.in_proj":  # nn.MultiheadAttention's rows are [q; k; v]
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3)):
                out[f"{prefix}self_attn.{name}.{m[3]}"] = part
        else:
            out[f"{prefix}{names[m[2]]}.{m[3]}"] = value
    return config, out


def convert_vae(state, levels):
    """The LDM AutoencoderKL (first_stage_model.*: lvdm/modules/networks/ae_modules.py's Encoder and
    Decoder, no attention but in the middle) -> diffusers' AutoencoderKL, whose blocks are the same."""
    import re
    attention = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
    rules = [(r"^(encoder|decoder)\.mid\.block_(\d)\.", lambda m: f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}."),
             (r"^(encoder|decoder)\.mid\.attn_1\.(\w+)\.",
              lambda m: f"{m[1]}.mid_block.attentions.0.{attention[m[2]]}."),
             (r"^encoder\.down\.(\d+)\.block\.", lambda m: f"encoder.down_blocks.{m[1]}.resnets."),
             (r"^encoder\.down\.(\d+)\.downsample\.", lambda m: f"encoder.down_blocks.{m[1]}.downsamplers.0."),
             # the decoder's `up` counts levels from the bottom (up.0 is the last run), up_blocks from the top
             (r"^decoder\.up\.(\d+)\.block\.", lambda m: f"decoder.up_blocks.{levels - 1 - int(m[1])}.resnets."),
             (r"^decoder\.up\.(\d+)\.upsample\.",
              lambda m: f"decoder.up_blocks.{levels - 1 - int(m[1])}.upsamplers.0."),
             (r"^(encoder|decoder)\.norm_out\.", lambda m: f"{m[1]}.conv_norm_out."),
             (r"\.nin_shortcut\.", lambda m: ".conv_shortcut.")]
    out = {}
    for key, value in state.items():
        for pattern, repl in rules:  # in order: the block rules, then the names inside them
            key = re.sub(pattern, repl, key)
        if ".mid_block.attentions.0.to_" in key and value.dim() == 4:
            value = value[:, :, 0, 0]  # the middle attention's 1x1 convolutions are Linear layers here
        out[key] = value
    return out


def split_released(state):
    """The checkpoint's names by part: model.diffusion_model.* (UNet), first_stage_model.* (VAE) and
    cond_stage_model.model.* (text tower), prefixes removed; a name of no part is an error."""
    parts, unknown = {"unet": {}, "vae": {}, "text": {}}, []
    prefixes = {"model.diffusion_model.": "unet", "first_stage_model.": "vae", "cond_stage_model.model.": "text"}
    for key, value in state.items():
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        if prefix:
            parts[prefixes[prefix]][key[len(prefix):]] = value
        elif key not in SCHEDULE_BUFFERS:  # e.g. an EMA copy (use_ema), which the released file has not
            unknown.append(key)
    if unknown or not all(parts.values()):
        raise ValueError(f"not VideoCrafter2's checkpoint: parts {[k for k, v in parts.items() if not v]} missing, "
                         f"{len(unknown)} name(s) of no part, e.g. {unknown[:3]}")
    return parts


def build(cls, state, *args, **kwargs):
    """cls(*args, **kwargs) with the converted weights, strictly: a weight missing or left over is an
    error that torch names. No random initialisation first: every weight is overwritten."""
    from diffusers.models.modeling_utils import no_init_weights
    with no_init_weights():
        module = cls(*args, **kwargs)
    module.load_state_dict(state, strict=True)
    return module.eval()


# ---- G: the pipeline ----
@dataclass
class VideoCrafter2PipelineOutput(BaseOutput):
    frames: object  # (B, T, H, W, 3) floats in [0, 1]: a numpy array (output_type "np") or a tensor


class VideoCrafter2Pipeline(DiffusionPipeline):
    """VideoCrafter2 called as 01_generate.py calls a diffusers text-to-video pipeline:
    pipe(prompt=str or [str], num_inference_steps=, guidance_scale=, height=, width=, num_frames=,
    generator=[one per prompt], output_type="np").frames -> one (T, H, W, 3) array per prompt.
    DiffusionPipeline brings .to(device), set_progress_bar_config and enable_model_cpu_offload."""
    model_cpu_offload_seq = "text_encoder->unet->vae"  # the order the parts run in
    vae_scale_factor_temporal = 1  # a 2-D VAE, frame by frame: any frame count (01 checks 1 + a multiple)

    def __init__(self, tokenizer, text_encoder, unet, vae, scheduler):
        super().__init__()
        self.register_modules(tokenizer=tokenizer, text_encoder=text_encoder, unet=unet, vae=vae, scheduler=scheduler)

    @property
    def vae_scale_factor(self):
        """Pixels per latent along H and W: the VAE halves once per level but the last (8)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @classmethod
    def from_pretrained(cls, folder, torch_dtype=None, dtype=None, trust_checkpoint=False):
        """The pipeline from a folder in the release's layout (the module docstring), in torch_dtype (or
        dtype, diffusers' newer name; float32 by default, as the original runs). trust_checkpoint:
        unpickle a checkpoint that holds more than tensors (only a file from a source you trust)."""
        from transformers import CLIPTextModel, CLIPTokenizer
        if not is_videocrafter2_folder(folder) or not os.path.isdir(os.path.join(folder, TOKENIZER)):
            raise FileNotFoundError(f"{folder}: needs {CHECKPOINT} (hub VideoCrafter/VideoCrafter2) and {TOKENIZER}/ "
                                    f"(CLIP's vocab.json and merges.txt): see synvita/videocrafter2.py")
        unet_config, vae_config, scheduler_config, layer = read_config(folder)  # before 7.4 GB are mapped
        parts = split_released(load_checkpoint(os.path.join(folder, CHECKPOINT), trust_checkpoint))
        unet = build(VideoCrafterUNet3D, convert_unet(parts["unet"], unet_config), **unet_config)
        vae = build(AutoencoderKL, convert_vae(parts["vae"], len(vae_config["block_out_channels"])), **vae_config)
        text_config, text_state = convert_text_encoder(parts["text"], layer)
        text_encoder = build(CLIPTextModel, text_state, text_config)
        # the float32 weights cast as a whole (nn.Module.to: ModelMixin.to warns about float32-only
        # modules, which these models do not have)
        dtype = dtype or torch_dtype or torch.float32
        for module in (text_encoder, unet, vae):
            torch.nn.Module.to(module, dtype=dtype)
        # from_pretrained: the constructor of transformers 5 misreads file paths given as vocab and merges
        tokenizer = CLIPTokenizer.from_pretrained(os.path.join(folder, TOKENIZER))
        return cls(tokenizer, text_encoder, unet, vae, VideoCrafter2DDIMScheduler(**scheduler_config))

    def encode_prompt(self, prompts, device):
        """c: the text tower's penultimate layer after ln_final, (len(prompts), 77, width). The tokens are
        open_clip.tokenize's: <|startoftext|> BPE <|endoftext|>, cut to 77 keeping the end, padded with 0.
        NOTE (deviation): transformers' CLIPTokenizer stands in for open_clip's, which also runs ftfy and
        html.unescape: the same ids on 4,688 of 4,688 captions (tests/fixtures/videocrafter2_original.json,
        made_by); a caption with mojibake or an HTML entity may differ."""
        length = self.text_encoder.config.max_position_embeddings
        ids = [self.tokenizer(p, max_length=length, truncation=True)["input_ids"] for p in prompts]
        # padded with id 0 (open_clip's zeros), not with <|endoftext|>: c reads every position, pads included
        ids = torch.tensor([x + [0] * (length - len(x)) for x in ids], device=device)
        return self.text_encoder(input_ids=ids).last_hidden_state

    def decode_latents(self, latents):
        """z_0 (B, C, T, h, w) -> frames (B, T, H, W, 3) in [0, 1]: each frame through the VAE's decoder
        as decode_first_stage_2DAE does ((1 / scale_factor) z, post_quant_conv, decoder), then clamped to
        [-1, 1] and mapped to [0, 1] as save_videos does before its uint8 (which truncates; 01 rounds)."""
        z = (1.0 / self.vae.config.scaling_factor) * latents.to(self.vae.dtype)
        # frame i of every video at once: the VAE's memory of B images, never of B * T
        video = torch.stack([self.vae.decode(z[:, :, i]).sample for i in range(z.shape[2])], dim=2).float()
        return ((video.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 4, 1)

    @torch.no_grad()
    def __call__(self, prompt, num_inference_steps=50, guidance_scale=12.0, height=320, width=512, num_frames=16,
                 generator=None, output_type="np", fps_condition=FPS_CONDITION, eta=1.0, return_dict=True):
        """V^s = G(t^s, noise) for each prompt: z_T from the prompt's generator, DDIM with classifier-free
        guidance, the frames decoded. fps_condition: the frame rate the UNet is told (not the mp4's)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if isinstance(generator, (list, tuple)) and len(generator) != len(prompts):
            raise ValueError(f"{len(generator)} generators for {len(prompts)} prompts: give one per prompt")
        # the UNet halves the latent once per level but the last: H/8 and W/8 must halve as often
        multiple = self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)
        if height % multiple or width % multiple:
            raise ValueError(f"{height}x{width}: VideoCrafter2 renders heights and widths that are "
                             f"multiples of {multiple}")
        device = self._execution_device  # the GPU, also under model cpu offload
        context = self.encode_prompt(prompts, device)  # c, one per prompt
        guided = guidance_scale != 1.0  # the original skips the unconditional pass at 1
        if guided:  # uncond_type empty_seq: the empty prompt's c, after the prompts'
            # NOTE (deviation): one UNet call on [c; c_empty] (diffusers' way); the original makes two calls:
            # the same arithmetic per row, but a batch's kernels may round otherwise
            context = torch.cat([context, self.encode_prompt([""] * len(prompts), device)])
        self.scheduler.set_timesteps(num_inference_steps, eta=eta)
        # z_T, then each step's noise, from each prompt's own generator, in the original's order of draws
        # NOTE (deviation): the original draws the whole batch from torch's global stream, on the GPU; here
        # row i draws from generator[i] on its device (01: the CPU), so a row's video does not depend on the
        # rows beside it nor on the GPU. A seed gives other videos than the original's GPU run (as with any
        # diffusers pipeline); one prompt on the CPU gives the original's numbers (the fixture's run)
        shape = (len(prompts), self.unet.config.in_channels, num_frames, height // self.vae_scale_factor,
                 width // self.vae_scale_factor)
        latents = randn_rows(shape, generator, device)  # float32, as the sampler's arithmetic
        rate = torch.full((context.shape[0],), fps_condition, device=device)  # the unconditional rows are told it too
        for t in self.progress_bar(self.scheduler.timesteps):
            x = torch.cat([latents, latents]) if guided else latents
            eps = self.unet(x, t.to(device), context, fps=rate).float()  # eps_theta(z_t, t, c, fps)
            if guided:  # classifier-free guidance: eps_u + w (eps_c - eps_u)
                cond, uncond = eps.chunk(2)
                eps = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(eps, t, latents, generator=generator).prev_sample
        frames = self.decode_latents(latents)  # (B, T, H, W, 3) in [0, 1]
        self.maybe_free_model_hooks()  # with model cpu offload, the last part goes back to the CPU
        frames = frames.cpu().numpy() if output_type == "np" else frames
        return VideoCrafter2PipelineOutput(frames=frames) if return_dict else (frames,)
