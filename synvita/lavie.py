"""LaVie (Wang et al., IJCV 2024; Vchitect/LaVie, Apache-2.0), one of the paper's three generators G
(§4), as a pipeline that 01_generate.py calls as it calls a diffusers one: its base text-to-video model
(synvita/lavie_unet.py) with SD-1.4's VAE and CLIP text encoder, and the original sampler of
base/pipelines/sample.py + pipeline_videogen.py: DDPM, 50 steps, betas linear 1e-4..0.02 over 1,000,
classifier-free guidance 7.5 against the empty prompt, 320x512, 16 frames by default.

The folder it loads is the one LaVie's README asks a user to fill (pretrained_models/):
    <folder>/lavie_base.pt                      the UNet's state dict (~3.6 GB), maybe under "ema"
    <folder>/stable-diffusion-v1-4/unet/config.json     SD-1.4's UNet config: LaVie's sizes (no weights read)
    <folder>/stable-diffusion-v1-4/vae/                 AutoencoderKL (config.json + weights)
    <folder>/stable-diffusion-v1-4/text_encoder/        CLIPTextModel (ViT-L/14's text tower)
    <folder>/stable-diffusion-v1-4/tokenizer/           CLIPTokenizer (77 tokens)
    <folder>/stable-diffusion-v1-4/scheduler/scheduler_config.json   read, its betas replaced
filled from the hub with
    hf download YaohuiW/LaVie lavie_base.pt --local-dir <folder>
    hf download CompVis/stable-diffusion-v1-4 --local-dir <folder>/stable-diffusion-v1-4 \\
        --include "unet/config.json" "vae/*" "text_encoder/*" "tokenizer/*" "scheduler/*" --exclude "*.bin"
"""
import os
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from synvita.lavie_unet import LaVieUNet, convert_released

CHECKPOINT, SD = "lavie_base.pt", "stable-diffusion-v1-4"  # the release's names (README, base/configs/sample.yaml)
SD_PARTS = ("unet/config.json", "vae", "text_encoder", "tokenizer", "scheduler/scheduler_config.json")
# base/configs/sample.yaml: the sampler and the clip the model was trained for
BETAS = dict(beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
DEFAULTS = dict(num_inference_steps=50, guidance_scale=7.5, height=320, width=512, num_frames=16, fps=8)
# The paper's LaVie clips (its project page): 512x320, 32 frames at 8 fps. LaVie's base model makes 16
# (it was trained on 16-frame clips; its interpolation stage makes 61, not 32), so the paper's clips
# are most likely the base model asked for 32 frames, which its temporal layers allow (rotary and
# bucketed positions have no fixed length). NOTE (deviation): 01_generate.py takes these, not DEFAULTS.
PAPER_DEFAULTS = dict(DEFAULTS, num_frames=32)
LATENT_SCALE = 0.18215  # SD-1.4's VAE scaling factor, written out in pipeline_videogen.decode_latents


# ---- the release's folder ----
def is_lavie_folder(path):
    """Whether `path` is laid out as LaVie's release is (lavie_base.pt beside stable-diffusion-v1-4/)."""
    return os.path.isfile(os.path.join(path, CHECKPOINT)) and os.path.isdir(os.path.join(path, SD))


def missing_parts(path):
    """The files and folders of the layout (module docstring) that `path` lacks, as relative paths."""
    wanted = [CHECKPOINT] + [os.path.join(SD, part) for part in SD_PARTS]
    return [p for p in wanted if not os.path.exists(os.path.join(path, p))]


def tokenizer_folder(path):
    """Where the release keeps G's tokenizer (CLIP's, 77 tokens with BOS and EOS): for counting t^s."""
    return os.path.join(path, SD, "tokenizer")


def load_unet(path, dtype=None):
    """LaVie's UNet: its sizes from SD-1.4's unet/config.json, its weights from lavie_base.pt through
    convert_released. Built on the meta device and filled from the memory-mapped file (no second copy)."""
    import json
    config = json.load(open(os.path.join(path, SD, "unet", "config.json")))
    # on the meta device: no random init of the 909M parameters (3.6 GB in float32) that the file replaces
    with torch.device("meta"):
        unet = LaVieUNet.from_sd_config(config)
    # memory-mapped: the tensors are read from disk as they are cast or moved, not all at once
    checkpoint = torch.load(os.path.join(path, CHECKPOINT), map_location="cpu", mmap=True, weights_only=True)
    # cast here, not with unet.to(dtype): ModelMixin.to warns of casting a built model
    state = {k: v.to(dtype) if dtype else v for k, v in convert_released(checkpoint).items()}
    # strict: a key missing from the file or left over in it is an error that names it
    unet.load_state_dict(state, strict=True, assign=True)
    return unet.eval()


def original_scheduler(path):
    """The original's sampler: DDPMScheduler.from_pretrained(SD-1.4's scheduler folder) with LaVie's
    betas (sample.py); x_0 not clipped (pipeline_videogen forces clip_sample off)."""
    # NOTE (deviation): steps_offset 0, where the original passes SD's 1. The numbers are the original's:
    # its diffusers 0.16 DDPM ignored steps_offset (t = 980, 960, ..., 0 for 50 steps), while 0.42 adds it
    # under "leading" spacing (981, ..., 1); tests/test_lavie.py checks both against diffusers 0.16's own
    return DDPMScheduler.from_pretrained(os.path.join(path, SD), subfolder="scheduler", **BETAS, clip_sample=False,
                                         steps_offset=0, timestep_spacing="leading")


@dataclass
class LaVieOutput(BaseOutput):
    frames: object  # output_type "np": (batch, frames, height, width, 3) floats in [0, 1]; "pt": a tensor


class LaViePipeline(DiffusionPipeline):
    """V^s = G(t^s, noise) with LaVie's base model, called as 01_generate.py's `generate` calls a
    diffusers text-to-video pipeline. DiffusionPipeline gives .to(device), set_progress_bar_config,
    enable_model_cpu_offload (model_cpu_offload_seq) and the execution device."""

    # --cpu_offload: each part moves to the GPU when it runs, in this order
    model_cpu_offload_seq = "text_encoder->unet->vae"

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler):
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
        # pixels per latent: 2^(levels - 1) = 8 for SD's VAE, as pipeline_videogen computes it
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)

    @classmethod
    def from_pretrained(cls, path, torch_dtype=None, dtype=None, **kwargs):
        """The pipeline from a folder laid out as the release is (module docstring); torch_dtype (or
        dtype, diffusers' newer name) for every part, float32 if None (the original: float16)."""
        from transformers import CLIPTextModel, CLIPTokenizer
        # a local folder only: the release is two hub repositories, filled by hand (module docstring)
        if kwargs:  # nothing else is read: a keyword would be silently ignored
            raise TypeError(f"LaViePipeline.from_pretrained takes no {sorted(kwargs)}")
        if missing := missing_parts(path):
            raise FileNotFoundError(f"{path}: not LaVie's release layout, missing {', '.join(missing)} "
                                    f"(synvita/lavie.py says how to fill it)")
        dtype = torch_dtype or dtype
        sd = os.path.join(path, SD)
        # SD-1.4's parts in their own formats, as sample.py loads them
        vae = AutoencoderKL.from_pretrained(sd, subfolder="vae", torch_dtype=dtype)
        text_encoder = CLIPTextModel.from_pretrained(sd, subfolder="text_encoder", dtype=dtype)
        tokenizer = CLIPTokenizer.from_pretrained(sd, subfolder="tokenizer")
        return cls(vae.eval(), text_encoder.eval(), tokenizer, load_unet(path, dtype), original_scheduler(path))

    # ---- the original's steps, in its order ----
    def encode_prompts(self, prompts, guidance):
        """CLIP's last hidden states of each prompt padded to 77 tokens; under guidance the empty
        prompt's first (batch: unconditional then conditional, as _encode_prompt stacks them)."""
        texts = [""] * len(prompts) + prompts if guidance else prompts  # no negative prompt: the empty one
        ids = self.tokenizer(texts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids  # t^s past 77 tokens is cut
        # the last layer's states, all 77 (no attention mask: SD-1.4's text encoder does not use one)
        return self.text_encoder(ids.to(self._execution_device))[0]

    def decode(self, latents):
        """Frames in [0, 1] from latents (b, 4, f, h, w): the VAE decodes every frame on its own."""
        b, _, f = latents.shape[:3]
        latents = 1 / LATENT_SCALE * latents  # the original multiplies by the reciprocal
        frames = latents.transpose(1, 2).flatten(0, 1)  # ((b f), 4, h, w)
        video = self.vae.decode(frames.to(self.vae.dtype)).sample  # in [-1, 1]; sliced (01 always): frame by frame
        # NOTE (deviation): the original rounds to uint8 here (x * 255 + 0.5, truncated); we return
        # floats, which 01 rounds half to even: only a value exactly half-way between levels differs
        return (video / 2 + 0.5).clamp(0, 1).unflatten(0, (b, f)).permute(0, 1, 3, 4, 2)  # (b, f, H, W, 3)

    @torch.no_grad()
    def __call__(self, prompt, num_inference_steps=50, guidance_scale=7.5, height=320, width=512, num_frames=16,
                 generator=None, latents=None, output_type="np", return_dict=True):
        """V^s for each prompt -> LaVieOutput.frames, (batch, num_frames, height, width, 3) in [0, 1].

        generator: one torch.Generator, or one per prompt. Each prompt's initial noise and its DDPM
        noise at every step come from its own generator, so its video does not depend on the prompts
        beside it (nor on a GPU count); a single generator for several prompts draws them all, as the
        original does."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)  # 01: a str, or a list (--prompts_per_call)
        if height % 8 or width % 8:  # pipeline_videogen.check_inputs
            raise ValueError(f"height and width must be multiples of 8, not {height} and {width}")
        if isinstance(generator, list) and len(generator) != len(prompts):
            raise ValueError(f"{len(generator)} generators for {len(prompts)} prompts")
        device, guidance = self._execution_device, guidance_scale > 1.0  # 1 turns guidance off, as in the original
        text = self.encode_prompts(prompts, guidance)
        # t = 980, 960, ..., 0 for 50 steps (1000 // steps apart)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        # z_T ~ N(0, I), (b, 4, f, h / 8, w / 8), in the text encoder's dtype as the original draws it
        shape = (len(prompts), self.unet.config.in_channels, num_frames,
                 height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=text.dtype)
        latents = latents.to(device) * self.scheduler.init_noise_sigma  # DDPM: 1
        with self.progress_bar(total=len(self.scheduler.timesteps)) as bar:
            for t in self.scheduler.timesteps:
                latents = self.denoise(latents, t, text, guidance_scale, generator)
                bar.update()
        # z_0 as it is ("latent"), or decoded to frames (01 asks for "np")
        if output_type == "latent":
            return LaVieOutput(frames=latents) if return_dict else (latents,)
        frames = self.decode(latents).float()  # float32 whatever G's dtype: numpy has no bfloat16
        frames = frames.cpu().numpy() if output_type == "np" else frames
        return LaVieOutput(frames=frames) if return_dict else (frames,)

    def denoise(self, latents, t, text, guidance_scale, generator):
        """One DDPM step z_t -> z_{t-1} with classifier-free guidance:
        eps = eps(z_t, "") + w (eps(z_t, t^s) - eps(z_t, ""))."""
        guidance = guidance_scale > 1.0
        model_input = torch.cat([latents] * 2) if guidance else latents  # unconditional rows first
        model_input = self.scheduler.scale_model_input(model_input, t)  # DDPM: unchanged
        noise = self.unet(model_input, t, encoder_hidden_states=text).sample  # both halves in one batch
        if guidance:
            uncond, cond = noise.chunk(2)
            noise = uncond + guidance_scale * (cond - uncond)
        # the step's noise (t > 0) is drawn from each prompt's own generator (randn_tensor with a list)
        return self.scheduler.step(noise, t, latents, generator=generator).prev_sample

