"""VideoCrafter2 (synvita/videocrafter2.py), the paper's third generator G, against VideoCrafter's own code:
the numbers of tests/fixtures/videocrafter2_original.json (its made_by says how they were made) reproduced
through our conversion of the same weights, the plausible mistakes that comparison must catch, and the
release-layout folder of tests/tiny_videocrafter2.py loaded and called as 01_generate.py calls G."""
import importlib
import json
import os

import numpy as np
import pytest
import torch
import yaml

import tiny_videocrafter2
from synvita import videocrafter2 as vc

FIXTURE = tiny_videocrafter2.load_fixture()
RUN = FIXTURE["run"]
SIZE = dict(height=32, width=64, num_frames=4)  # the fixture's latents are 4 x 8
# measured differences (float32, 2026-12-07): text 0.0, eps 5.0e-6 (of values up to 1.8), decoder sums
# 5.4e-5 (over 2048 pixels), a whole run's z_0 3.3e-4 (of values up to 22) and frames 3.6e-6
TOLERANCE = dict(text=1e-5, eps=5e-5, vae=1e-5, latents=2e-3, frames=1e-4)


class FixtureTokenizer:
    """open_clip.tokenize's ids for the fixture's prompts, cut after <|endoftext|> (the pipeline pads them
    again with 0). The real vocabulary is not in this repository; that transformers' CLIPTokenizer gives
    these ids from it was checked beside the original (made_by)."""

    def __call__(self, text, max_length, truncation):
        ids = FIXTURE["input_ids"][FIXTURE["prompts"].index(text)]
        return {"input_ids": ids[:ids.index(49407) + 1]}


@pytest.fixture(scope="module")
def fixture_folder(tmp_path_factory):
    """The fixture's weights (its 49408-token text tower) in the release's layout."""
    path = str(tmp_path_factory.mktemp("videocrafter2-fixture"))
    state = tiny_videocrafter2.released_videocrafter2_state(FIXTURE)
    torch.save({"state_dict": state}, os.path.join(path, vc.CHECKPOINT))
    with open(os.path.join(path, vc.CONFIG), "w", encoding="utf-8") as fh:
        yaml.safe_dump(FIXTURE["config"], fh)
    tiny_videocrafter2.clip_bpe_files(os.path.join(path, vc.TOKENIZER))  # loaded, then replaced by FixtureTokenizer
    return path


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """tests/tiny_videocrafter2.py's folder: what 01_generate.py --pipeline would load."""
    return tiny_videocrafter2.tiny_videocrafter2(str(tmp_path_factory.mktemp("tiny-videocrafter2")))


def load(folder, **kwargs):
    pipe = vc.VideoCrafter2Pipeline.from_pretrained(folder, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def fixture_pipe(folder):
    pipe = load(folder)
    pipe.tokenizer = FixtureTokenizer()
    return pipe


def unet_eps(pipe):
    """eps_theta on the fixture's UNet inputs: x then c drawn from one generator, two t, two fps."""
    spec = FIXTURE["unet_inputs"]
    g = torch.Generator().manual_seed(spec["seed"])
    x, context = torch.randn(spec["x_shape"], generator=g), torch.randn(spec["context_shape"], generator=g)
    with torch.no_grad():
        return pipe.unet(x, torch.tensor(spec["timesteps"]), context, fps=torch.tensor(spec["fps"]))


def whole_run(pipe):
    """The fixture's run (one prompt, its seed, steps, guidance, eta, fps) -> (z_0, frames (T, H, W, 3))."""
    kept = {}
    decode = pipe.decode_latents

    def keep(latents):  # z_0, the sampler's output, before the decoder
        kept["z"] = latents.clone()
        return decode(latents)
    pipe.decode_latents = keep
    frames = pipe(RUN["prompt"], num_inference_steps=RUN["steps"], guidance_scale=RUN["guidance"], eta=RUN["eta"],
                  fps_condition=RUN["fps"], generator=torch.Generator().manual_seed(RUN["seed"]), **SIZE).frames
    return kept["z"], torch.from_numpy(frames[0])


def run_difference(pipe):
    z, _ = whole_run(pipe)
    return (z - torch.tensor(RUN["latents"])).abs().max().item()


def text_difference(pipe):
    with torch.no_grad():
        c = pipe.encode_prompt(FIXTURE["prompts"], "cpu")
    return (c[:, :6] - torch.tensor(FIXTURE["text_head"])).abs().max().item()


# ---- the original's numbers, part by part and for a whole run ----
def test_the_text_tower_gives_the_originals_c(fixture_folder):
    """FrozenOpenCLIPEmbedder's penultimate layer + ln_final, as CLIPTextModel one layer short."""
    pipe = fixture_pipe(fixture_folder)
    assert text_difference(pipe) <= TOLERANCE["text"]
    with torch.no_grad():
        c = pipe.encode_prompt(FIXTURE["prompts"], "cpu")
    assert list(c.shape) == FIXTURE["text_shape"]
    np.testing.assert_allclose(c.double().sum(-1).numpy(), FIXTURE["text_position_sums"], atol=1e-4)


def test_the_unet_gives_the_originals_eps(fixture_folder):
    eps = unet_eps(fixture_pipe(fixture_folder))
    expected = torch.tensor(FIXTURE["unet_out"])
    assert eps.shape == expected.shape == (2, 4, 4, 4, 8)
    torch.testing.assert_close(eps, expected, atol=TOLERANCE["eps"], rtol=0)


def test_the_vae_decodes_as_the_original(fixture_folder):
    """decode_first_stage_2DAE: each frame as (1 / scale_factor) z through post_quant_conv and the decoder."""
    vae = fixture_pipe(fixture_folder).vae
    spec = FIXTURE["vae_inputs"]
    z = torch.randn(spec["z_shape"], generator=torch.Generator().manual_seed(spec["seed"]))
    with torch.no_grad():
        video = torch.stack([vae.decode((1.0 / 0.18215) * z[:, :, i]).sample for i in range(z.shape[2])], dim=2)
    assert list(video.shape) == FIXTURE["vae_shape"]
    torch.testing.assert_close(video[0, :, :, :4, :4], torch.tensor(FIXTURE["vae_crop"]), atol=TOLERANCE["vae"], rtol=0)
    np.testing.assert_allclose(video.double().sum((3, 4)).numpy(), FIXTURE["vae_channel_sums"], atol=1e-3)


def test_the_schedule_is_the_originals():
    """50 steps, eta 1: t = 1, 21, ..., 981 and, per step, abar, abar_prev, sigma, s_t, s_prev."""
    scheduler = vc.VideoCrafter2DDIMScheduler()
    scheduler.set_timesteps(50, eta=1.0)
    expected = FIXTURE["schedule_50"]
    assert scheduler.timesteps.flip(0).tolist() == [int(t) for t in expected["ddim_timesteps"]]
    for ours, theirs in (("a", "ddim_alphas"), ("a_prev", "ddim_alphas_prev"), ("sigma", "ddim_sigmas"),
                         ("s", "ddim_scale_arr"), ("s_prev", "ddim_scale_arr_prev")):
        np.testing.assert_allclose(scheduler.table[ours].double().numpy(), expected[theirs], atol=1e-7, rtol=0)


def test_a_whole_run_gives_the_originals_video(fixture_folder):
    """One prompt, 4 DDIM steps with eta 1 (fresh noise each step), guidance 12, fps 28: z_0 and the frames."""
    z, frames = whole_run(fixture_pipe(fixture_folder))
    torch.testing.assert_close(z, torch.tensor(RUN["latents"]), atol=TOLERANCE["latents"], rtol=0)
    assert list(frames.shape) == RUN["frames_shape"]
    torch.testing.assert_close(frames[:, :4, :4], torch.tensor(RUN["frame_crop"]), atol=TOLERANCE["frames"], rtol=0)
    np.testing.assert_allclose(frames.double().mean((1, 2)).numpy(), RUN["frame_channel_means"], atol=1e-5)


# ---- plausible mistakes: each must move the numbers past the tolerance ----
def no_x0_rescale(pipe):  # the x0 rescale left out of the sampler (plain DDIM)
    pipe.scheduler.register_to_config(use_scale=False)
    return run_difference(pipe), TOLERANCE["latents"]


def fps_dropped(pipe):  # the UNet without its fps embedding
    pipe.unet.fps_embedding = None
    eps = (unet_eps(pipe) - torch.tensor(FIXTURE["unet_out"])).abs().max().item()
    return min(eps / TOLERANCE["eps"], run_difference(pipe) / TOLERANCE["latents"]), 1.0


def timesteps_without_offset(pipe):  # t = 0, 250, 500, 750 (diffusers' leading spacing, steps_offset 0)
    pipe.scheduler.register_to_config(steps_offset=0)
    return run_difference(pipe), TOLERANCE["latents"]


def last_layer(pipe):  # the text tower's last layer instead of its penultimate one
    from transformers import CLIPTextModel
    state = vc.split_released(vc.load_checkpoint(os.path.join(pipe.folder, vc.CHECKPOINT)))["text"]
    pipe.text_encoder = vc.build(CLIPTextModel, *reversed(vc.convert_text_encoder(state, "last")))
    return text_difference(pipe), TOLERANCE["text"]


def fused_qkv_misread(pipe):  # in_proj's rows read as [k; q; v]
    attention = pipe.text_encoder.encoder.layers[0].self_attn
    for name in ("weight", "bias"):
        q, k = getattr(attention.q_proj, name), getattr(attention.k_proj, name)
        tmp = q.detach().clone()
        q.data.copy_(k.detach())
        k.data.copy_(tmp)
    return text_difference(pipe), TOLERANCE["text"]


@pytest.mark.parametrize("mistake", [no_x0_rescale, fps_dropped, timesteps_without_offset, last_layer,
                                     fused_qkv_misread])
def test_a_plausible_mistake_fails_the_comparison(fixture_folder, mistake):
    pipe = fixture_pipe(fixture_folder)
    pipe.folder = fixture_folder
    difference, tolerance = mistake(pipe)
    assert difference > 20 * tolerance, f"{mistake.__name__}: {difference} within {tolerance}"


# ---- the release-layout folder, called as 01_generate.py calls G ----
def test_a_release_folder_is_recognised(tiny_folder, tmp_path):
    assert vc.is_videocrafter2_folder(tiny_folder)
    assert sorted(os.listdir(tiny_folder)) == ["inference_t2v_512_v2.0.yaml", "model.ckpt", "tokenizer"]
    assert sorted(os.listdir(os.path.join(tiny_folder, "tokenizer"))) == ["merges.txt", "vocab.json"]
    tokenizer = load(tiny_folder).tokenizer  # CLIP's BPE from vocab.json and merges.txt
    start, end = tokenizer.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"])
    assert tokenizer("", max_length=77, truncation=True)["input_ids"] == [start, end]
    long = tokenizer("a dog runs " * 40, max_length=77, truncation=True)["input_ids"]
    assert len(long) == 77 and long[0] == start and long[-1] == end  # cut, the end kept: open_clip's rule
    (tmp_path / "model_index.json").write_text("{}")
    (tmp_path / "model.ckpt").write_text("")
    assert not vc.is_videocrafter2_folder(str(tmp_path))  # a diffusers folder is not one
    assert not vc.is_videocrafter2_folder(str(tmp_path / "missing"))


def test_01_generates_from_it(tiny_folder):
    """01_generate.py's generate(): one generator per prompt, output_type np, (T, H, W, 3) uint8 per row;
    each row's video does not depend on the row beside it."""
    generate = importlib.import_module("01_generate").generate
    pipe = load(tiny_folder).to("cpu")  # DiffusionPipeline.to, as 01 moves G to its rank's device
    settings = dict(SIZE, num_inference_steps=2, guidance_scale=12.0, fps=8)
    prompts = ["A red ball rolls to the left.", "Two cats sleep on a sofa."]
    both = generate(pipe, prompts, [1, 2], settings)
    alone = generate(pipe, prompts[1:], [2], settings)
    assert [v.shape for v in both] == [(4, 32, 64, 3)] * 2 and both[0].dtype == np.uint8
    assert np.abs(both[1].astype(int) - alone[0]).max() <= 1  # rounding of a batch of 2 against 1
    assert np.abs(both[0].astype(int) - both[1]).mean() > 5 and both[0].std() > 5  # two videos, not noise-free


def test_memory_savers_keep_the_frames(tiny_folder):
    """vae.enable_slicing / enable_tiling (01 always slices; --vae_tiling) run; at this size no tile
    is cut, and a batch decoded one video at a time gives the same frames."""
    pipe = load(tiny_folder)
    call = dict(prompt=["A dog runs.", "A cat sleeps."], num_inference_steps=2, **SIZE)
    plain = pipe(generator=[torch.Generator().manual_seed(s) for s in (3, 4)], **call).frames
    pipe.vae.enable_slicing()
    pipe.vae.enable_tiling()
    saved = pipe(generator=[torch.Generator().manual_seed(s) for s in (3, 4)], **call).frames
    np.testing.assert_allclose(saved, plain, atol=1e-5)


def test_it_loads_in_bfloat16(tiny_folder):
    pipe = load(tiny_folder, torch_dtype=torch.bfloat16)
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.bfloat16}
    frames = pipe("A dog runs.", num_inference_steps=2, generator=torch.Generator().manual_seed(0), **SIZE).frames
    assert frames.shape == (1, 4, 32, 64, 3) and np.isfinite(frames).all() and frames.dtype == np.float32


def test_what_it_refuses(tiny_folder, tmp_path):
    pipe = load(tiny_folder)
    with pytest.raises(ValueError, match=r"reaches t = 1000"):  # 3 steps: the original's IndexError
        pipe("A dog.", num_inference_steps=3, **SIZE)
    with pytest.raises(ValueError, match="multiples of 16"):  # 40 / 8 = 5 latents: the UNet cannot halve it
        pipe("A dog.", num_inference_steps=2, height=40, width=64, num_frames=4)
    with pytest.raises(ValueError, match="one per prompt"):
        pipe(["A dog.", "A cat."], num_inference_steps=2, generator=[torch.Generator()], **SIZE)
    with pytest.raises(FileNotFoundError, match="tokenizer/"):
        vc.VideoCrafter2Pipeline.from_pretrained(str(tmp_path))
    config = json.loads(json.dumps(FIXTURE["config"]))
    config["model"]["params"]["unet_config"]["params"]["use_relative_position"] = True
    with open(os.path.join(str(tmp_path), vc.CONFIG), "w", encoding="utf-8") as fh:
        yaml.safe_dump(config, fh)
    with pytest.raises(ValueError, match="use_relative_position"):  # an option not rebuilt is named, not ignored
        vc.read_config(str(tmp_path))
    state = tiny_videocrafter2.released_videocrafter2_state(FIXTURE)
    with pytest.raises(ValueError, match="of no part"):
        vc.split_released({**state, "model_ema.decay": torch.zeros(())})
    parts = vc.split_released(state)
    unet_config = vc.read_config(tiny_folder)[0]
    with pytest.raises(ValueError, match="fit no layer"):
        vc.convert_unet({**parts["unet"], "input_blocks.99.0.in_layers.0.weight": torch.zeros(1)}, unet_config)
