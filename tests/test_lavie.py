"""LaVie, the paper's second generator G, rebuilt in synvita/lavie_unet.py and synvita/lavie.py: against
LaVie's own code (the numbers in tests/fixtures/lavie_unet.json and lavie_sampling.json, made by the
original on a tiny random model), with the plausible mistakes that the comparison must catch; the
released checkpoint's layout and conversion; the call as 01_generate.py's `generate` makes it."""
import importlib
import json
import os

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

import tiny_lavie
from synvita import lavie, lavie_unet

UNET = json.load(open(tiny_lavie.UNET_FIXTURE))
SAMPLING = json.load(open(tiny_lavie.SAMPLING_FIXTURE))


def fixture_unet(dtype=torch.float32):
    """Our UNet with the fixture's weights: the recipe's state dict in the original's names, converted."""
    unet = lavie_unet.LaVieUNet.from_sd_config(UNET["unet_config"])
    unet.load_state_dict(lavie_unet.convert_released(tiny_lavie.released_unet_state(UNET)), strict=True)
    return unet.eval().to(dtype)


def unet_error(unet=None, dtype=torch.float32, key="output"):
    """max |ours - the original's| of the fixture's UNet call (float32 inputs cast to dtype)."""
    unet = unet or fixture_unet(dtype)
    i = UNET["inputs"]
    sample = torch.randn(i["sample_shape"], generator=torch.Generator().manual_seed(i["sample_seed"]))
    text = torch.randn(i["text_shape"], generator=torch.Generator().manual_seed(i["text_seed"]))
    with torch.no_grad():
        out = unet(sample.to(dtype), torch.tensor(i["timestep"]), text.to(dtype)).sample
    return (out - torch.tensor(UNET[key], dtype=dtype).view_as(out)).abs().max().item()


def test_the_unet_gives_the_originals_numbers():
    """Measured (2026, CPU): float32 3.1e-6 on outputs up to 3.4; float64 5.0e-13; the 12 x 20 latents
    whose upsamplers take their skips' sizes 2.5e-6."""
    assert unet_error() < 1e-4
    assert unet_error(dtype=torch.float64, key="output_float64") < 1e-10
    i, unet = UNET["inputs"], fixture_unet()
    odd = torch.randn(i["odd_shape"], generator=torch.Generator().manual_seed(i["odd_seed"]))
    text = torch.randn(i["text_shape"], generator=torch.Generator().manual_seed(i["text_seed"]))[:1]
    with torch.no_grad():
        out = unet(odd, i["odd_timestep"], text).sample
    torch.testing.assert_close(out, torch.tensor(UNET["output_odd"]).view_as(out), atol=1e-4, rtol=0)


def test_the_full_size_unet_has_the_released_checkpoints_keys():
    """Built (on the meta device) from SD-1.4's unet/config.json, our UNet has every key and shape of
    the original's at the released size but its 16 copies of the rotary frequencies: 909,124,100
    parameters, the 3.6 GB of lavie_base.pt in float32."""
    with torch.device("meta"):
        ours = lavie_unet.LaVieUNet.from_sd_config(UNET["sd14_unet_config"]).state_dict()
    released = {k: shape for k, shape in UNET["sd14_keys"] if not k.endswith(lavie_unet.ROTARY_KEY)}
    assert {k: list(v.shape) for k, v in ours.items()} == released and len(UNET["sd14_keys"]) - len(released) == 16
    assert sum(v.numel() for v in ours.values()) == 909_124_100


def test_the_relative_position_buckets_are_the_originals():
    """T5's buckets as the original computes them (its float log, truncated) for 64 frames: every
    boundary, the sign halves and the last bucket beyond 32 frames."""
    assert lavie_unet.relative_buckets(64, "cpu").tolist() == UNET["buckets"]


# ---- the mistakes the comparison must catch: each moves the UNet's output 60x-15,000x past its tolerance ----
ROTATE, BIAS, RESNET = lavie_unet.rotate, lavie_unet.RelativePositionBias.forward, lavie_unet.VideoResnetBlock.forward


def rotary_in_halves(x):  # GPT-NeoX's rotate_half (channels i and i + 16 paired), not rotary_embedding_torch's pairs
    angles = torch.arange(x.shape[-2]).float()[:, None] * lavie_unet.rotary_frequencies(x.device)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    head, rest = x[..., :32], x[..., 32:]
    first, second = head.chunk(2, dim=-1)
    return torch.cat([head * cos + torch.cat([-second, first], -1) * sin, rest], dim=-1)


def norm_per_frame(self, x, temb):  # SD's ResnetBlock2D on each frame: GroupNorm statistics per frame
    h = lavie_unet.per_frame(self.conv1, self.nonlinearity(lavie_unet.per_frame(self.norm1, x)))
    h = h + self.time_emb_proj(self.nonlinearity(temb))[:, :, None, None, None]
    h = lavie_unet.per_frame(self.conv2, self.nonlinearity(lavie_unet.per_frame(self.norm2, h)))
    return (lavie_unet.per_frame(self.conv_shortcut, x) if self.conv_shortcut is not None else x) + h


MISTAKES = {
    "relative position bias dropped": ("RelativePositionBias", lambda self, f: torch.zeros_like(BIAS(self, f))),
    "relative position bias transposed (j - i)": ("RelativePositionBias",
                                                   lambda self, f: BIAS(self, f).transpose(1, 2)),
    "rotary embedding left out": ("rotate", lambda x: x),
    "rotary embedding over the heads axis": ("rotate", lambda x: ROTATE(x.transpose(1, 2)).transpose(1, 2)),
    "rotary channels paired in halves": ("rotate", rotary_in_halves),
    "GroupNorm per frame": ("VideoResnetBlock", norm_per_frame),
}


@pytest.mark.parametrize("mistake", sorted(MISTAKES))
def test_the_comparison_catches_a_plausible_mistake(mistake, monkeypatch):
    """Measured: bias dropped 6.3e-3, transposed 1.1e-2, rotary left out 2.2e-2, over the heads 2.2e-2,
    in halves 2.0e-2, GroupNorm per frame 1.5 (tolerance 1e-4)."""
    where, wrong = MISTAKES[mistake]
    if where == "rotate":
        monkeypatch.setattr(lavie_unet, "rotate", wrong)
    else:
        monkeypatch.setattr(getattr(lavie_unet, where), "forward", wrong)
    assert unet_error() > 1e-3, mistake  # 10x the tolerance at least


# ---- the released layout and its checkpoint ----
@pytest.fixture(scope="module")
def lavie_dir(tmp_path_factory):
    """The tiny LaVie of tests/tiny_lavie.py, in the release's layout (lavie_base.pt under "ema")."""
    return tiny_lavie.tiny_lavie(str(tmp_path_factory.mktemp("tiny-lavie")), checkpoint_format="ema")


@pytest.fixture(scope="module")
def pipe(lavie_dir):
    pipe = lavie.LaViePipeline.from_pretrained(lavie_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, prompts=None, seeds=None, **kw):
    """The fixture's call of the original (its prompts, seeds, steps, guidance, size), on our pipeline."""
    c = SAMPLING["call"]
    seeds = seeds or SAMPLING["seeds"]
    call = dict(num_inference_steps=c["num_inference_steps"], guidance_scale=c["guidance_scale"], height=c["height"],
                width=c["width"], num_frames=c["video_length"], output_type="latent")
    return pipe(prompts or SAMPLING["prompts"], generator=[torch.Generator().manual_seed(s) for s in seeds],
                **{**call, **kw}).frames


def test_the_sampler_gives_the_originals_latents_and_frames(pipe, lavie_dir):
    """Two prompts, their own generators, 3 DDPM steps (t = 666, 333, 0: diffusers 0.16's spacing),
    guidance 7.5, 6 frames of 32 x 64. Measured: latents (up to 45) float32 2e-4, float64 5.4e-12; of
    the 73,728 uint8 values 14 differ by one level (float32 rounding), none by more."""
    ids = pipe.tokenizer(SAMPLING["prompts"], padding="max_length", max_length=77, truncation=True).input_ids
    assert ids == SAMPLING["input_ids"]  # the tiny tokenizer is the one the original ran with
    latents = sample(pipe)
    assert pipe.scheduler.timesteps.tolist() == SAMPLING["timesteps"]
    expected = torch.tensor(SAMPLING["latents"]).view_as(latents)
    assert (latents - expected).abs().max() < 2e-3
    frames = sample(pipe, output_type="np")
    assert frames.shape == tuple(SAMPLING["frames_shape"]) and frames.dtype == np.float32
    levels = (frames * 255).round().astype(int) - np.array(SAMPLING["frames"]).reshape(frames.shape)
    assert np.abs(levels).max() <= 1 and (levels != 0).mean() < 1e-3
    pipe64 = lavie.LaViePipeline.from_pretrained(lavie_dir, torch_dtype=torch.float64)
    pipe64.set_progress_bar_config(disable=True)
    latents64 = sample(pipe64)
    expected64 = torch.tensor(SAMPLING["latents_float64"], dtype=torch.float64).view_as(latents64)
    assert (latents64 - expected64).abs().max() < 1e-9


def test_diffusers_own_ddpm_timesteps_are_caught(pipe, lavie_dir):
    """diffusers 0.42's DDPMScheduler.from_pretrained(SD-1.4) adds steps_offset 1 (t = 667, 334, 1),
    which the original's diffusers 0.16 did not: our scheduler keeps the original's 50 timesteps,
    and the shifted ones move the latents far past the tolerance."""
    scheduler = lavie.original_scheduler(lavie_dir)
    scheduler.set_timesteps(50)
    assert scheduler.timesteps.tolist() == SAMPLING["timesteps_50"] == list(range(980, -1, -20))
    shifted = lavie.LaViePipeline.from_pretrained(lavie_dir)
    shifted.scheduler = DDPMScheduler.from_config(shifted.scheduler.config, steps_offset=1)
    shifted.set_progress_bar_config(disable=True)
    assert (sample(shifted) - torch.tensor(SAMPLING["latents"]).view(SAMPLING["latents_shape"])).abs().max() > 0.1


def test_each_prompt_draws_its_noise_from_its_own_generator(pipe):
    """A row's video does not depend on the rows beside it: alone or second in a batch, the same
    latents (up to a batch's rounding), and another first prompt leaves it so."""
    batched = sample(pipe)
    alone = sample(pipe, [SAMPLING["prompts"][1]], [SAMPLING["seeds"][1]])
    other = sample(pipe, ["a red square", SAMPLING["prompts"][1]])
    torch.testing.assert_close(alone[0], batched[1], atol=1e-3, rtol=0)
    torch.testing.assert_close(other[1], batched[1], atol=1e-3, rtol=0)
    assert (other[0] - batched[0]).abs().max() > 0.1  # the first prompt did change its own video


def test_the_release_layout_and_its_checkpoint(lavie_dir, tmp_path):
    assert lavie.is_lavie_folder(lavie_dir) and not lavie.is_lavie_folder(str(tmp_path))
    assert lavie.missing_parts(lavie_dir) == []
    assert lavie.tokenizer_folder(lavie_dir).endswith(os.path.join("stable-diffusion-v1-4", "tokenizer"))
    with pytest.raises(FileNotFoundError, match="missing lavie_base.pt, stable-diffusion-v1-4/unet/config.json"):
        lavie.LaViePipeline.from_pretrained(str(tmp_path))
    state = torch.load(os.path.join(lavie_dir, "lavie_base.pt"))["ema"]
    rotary = [k for k in state if k.endswith(lavie_unet.ROTARY_KEY)]
    assert len(rotary) == 10  # a copy of the shared frequencies per temporal attention (3 down, 1 mid, 6 up)
    plain = lavie_unet.convert_released(state)  # the file as a bare state dict, or under "ema": the same
    assert plain.keys() == lavie_unet.convert_released({"ema": state}).keys() == set(state) - set(rotary)
    with pytest.raises(ValueError, match="not RotaryEmbedding"):  # frequencies that are not the default ones
        lavie_unet.convert_released({**state, rotary[0]: state[rotary[0]] * 2})
    with pytest.raises(RuntimeError, match="Missing key"):  # a key short: strict loading names it
        fixture_unet().load_state_dict({k: v for k, v in plain.items() if "attn_temp.to_q" not in k})


def test_01s_generate_calls_it(pipe):
    """01_generate.generate, as it calls any G: one prompt with its generator, then two in one call
    (--prompts_per_call 2); uint8 frames (T, H, W, 3), the row alone as in the batch."""
    generate = importlib.import_module("01_generate").generate
    settings = dict(num_inference_steps=2, guidance_scale=7.5, height=32, width=64, num_frames=4, fps=8)
    alone = generate(pipe, ["a dog is running"], [5], settings)
    both = generate(pipe, ["a cat", "a dog is running"], [4, 5], settings)
    assert alone[0].shape == (4, 32, 64, 3) and alone[0].dtype == np.uint8 and len(both) == 2
    assert np.abs(alone[0].astype(int) - both[1].astype(int)).max() <= 1


def test_it_runs_in_bfloat16(lavie_dir):
    """--dtype bfloat16 (01's default on a GPU): every part loads in it, the frames are floats in [0, 1]."""
    half = lavie.LaViePipeline.from_pretrained(lavie_dir, torch_dtype=torch.bfloat16)
    half.set_progress_bar_config(disable=True)
    assert {p.dtype for p in half.unet.parameters()} == {torch.bfloat16} == {half.vae.dtype, half.text_encoder.dtype}
    frames = half("a dog", num_inference_steps=1, height=32, width=64, num_frames=2,
                  generator=torch.Generator().manual_seed(0)).frames
    assert frames.shape == (1, 2, 32, 64, 3) and 0 <= frames.min() and frames.max() <= 1
