"""A tiny random LaVie (synvita/lavie.py) laid out as the original release is, built offline, for
the tests of the LaVie generator and a CPU-sized run of 01_generate.py.

The folder is what LaVie's README asks a user to fill (pretrained_models/): lavie_base.pt, the UNet's
state dict in the original code's own key names, and stable-diffusion-v1-4/ holding SD-1.4's parts in
diffusers' layout (unet/config.json, vae/, text_encoder/, tokenizer/, scheduler/). Every weight is drawn
by the recipe of tests/fixtures/lavie_*.json (the numbers LaVie's own code gave on them), so the
same folder is both a toy G for 01 and the input on which our code must give the original's numbers.
The tokenizer is CLIP's kind (byte-level BPE, words end in </w>), trained in memory on tests/tiny.py's
captions: nothing is downloaded.

    python tests/tiny_lavie.py /tmp/tiny-lavie   # then 01_generate.py --pipeline /tmp/tiny-lavie
"""
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [p for p in (HERE, os.path.dirname(HERE)) if p not in sys.path]  # tiny, synvita
UNET_FIXTURE = os.path.join(HERE, "fixtures", "lavie_unet.json")  # the UNet: config, recipe, output
SAMPLING_FIXTURE = os.path.join(HERE, "fixtures", "lavie_sampling.json")  # the whole sampler


def clip_tokenizer(vocab_size=700):
    """A CLIPTokenizer (lower-cased, byte-level BPE whose word-final pieces end in </w>, BOS and EOS
    added, padded with EOS, 77 tokens at most: SD-1.4's settings) whose merges are trained in memory
    on the captions of tests/tiny.py. The same corpus gives the same merges on every machine."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTokenizer
    import tiny
    special = ["<|startoftext|>", "<|endoftext|>"]
    # CLIPTokenizer's own normalizer and pre-tokenizer (transformers 5), so the merges fit its words
    probe = CLIPTokenizer(vocab={s: i for i, s in enumerate(special)}, merges=[])
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    tok.normalizer = probe.backend_tokenizer.normalizer
    tok.pre_tokenizer = probe.backend_tokenizer.pre_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, end_of_word_suffix="</w>",
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(tiny.corpus(), trainer)
    model = json.loads(tok.to_str())["model"]
    # every byte alone and as a word's end (as CLIP's vocabulary starts), then the learned pieces
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    pieces = [*alphabet, *(c + "</w>" for c in alphabet), *sorted(model["vocab"], key=model["vocab"].get)]
    vocab = {p: i for i, p in enumerate(dict.fromkeys(pieces))}
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


# ---- the recipe: every tensor drawn from one seeded generator, in sorted name order ----
def is_norm_weight(name):
    """A LayerNorm or GroupNorm scale (its module's name holds "norm"): drawn around 1, not 0."""
    parts = name.split(".")
    return len(parts) > 1 and parts[-1] == "weight" and "norm" in parts[-2]


def recipe_state(keys, seed, scale, keep=None):
    """A state dict by the fixtures' recipe: for each (name, shape) of `keys` in the order given
    (sorted), torch.randn(shape, generator seeded once with `seed`) * scale, + 1 for norm weights;
    names in `keep` take keep's tensor instead and draw nothing (LaVie's rotary frequencies)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in keys:
        if keep and name in keep:
            state[name] = keep[name].clone()
            continue
        w = torch.randn(shape, generator=g) * scale
        state[name] = w + 1.0 if is_norm_weight(name) else w
    return state


def float_keys(module):
    """(name, shape) of a module's floating-point state, sorted: what the recipe draws."""
    return [(k, list(v.shape)) for k, v in sorted(module.state_dict().items()) if v.is_floating_point()]


def released_unet_state(fixture):
    """lavie_base.pt's state dict at the fixture's size: the original's key names and shapes
    (fixture["keys"]), the recipe's weights, and each temporal attention's copy of the shared rotary
    frequencies as the original code stores them (1 / 10000^(2i/32), never trained)."""
    from synvita import lavie_unet
    freqs = lavie_unet.rotary_frequencies(torch.device("cpu"))
    keep = {k: freqs for k, _ in fixture["keys"] if k.endswith(lavie_unet.ROTARY_KEY)}
    return recipe_state(fixture["keys"], fixture["weight_seed"], fixture["scale"], keep)


def sd_parts(fixture):
    """SD-1.4's parts at the sampling fixture's size, weights by its recipe: (vae, text_encoder, tokenizer)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel
    tokenizer = clip_tokenizer()
    vae = AutoencoderKL(**fixture["vae_config"])
    text_encoder = CLIPTextModel(CLIPTextConfig(**fixture["text_config"], vocab_size=len(tokenizer)))
    for model, part in ((vae, "vae"), (text_encoder, "text_encoder")):
        recipe = fixture["recipe"][part]
        model.load_state_dict(recipe_state(float_keys(model), recipe["seed"], recipe["scale"]), strict=False)
    return vae.eval(), text_encoder.eval(), tokenizer


def tiny_lavie(path, checkpoint_format="plain"):
    """Write the tiny LaVie to `path` in the release's layout and return path. checkpoint_format:
    "plain" (a state dict, as lavie_base.pt is read) or "ema" ({"ema": state dict}, which the
    original's find_model also takes)."""
    unet_fixture, sampling = json.load(open(UNET_FIXTURE)), json.load(open(SAMPLING_FIXTURE))
    sd = os.path.join(path, "stable-diffusion-v1-4")
    os.makedirs(os.path.join(sd, "unet"), exist_ok=True)
    state = released_unet_state(unet_fixture)
    torch.save({"ema": state} if checkpoint_format == "ema" else state, os.path.join(path, "lavie_base.pt"))
    # SD-1.4's unet/config.json: only its config is read (LaVie's UNet takes its sizes from it)
    json.dump(unet_fixture["unet_config"], open(os.path.join(sd, "unet", "config.json"), "w"), indent=1)
    vae, text_encoder, tokenizer = sd_parts(sampling)
    vae.save_pretrained(os.path.join(sd, "vae"))
    text_encoder.save_pretrained(os.path.join(sd, "text_encoder"))
    tokenizer.save_pretrained(os.path.join(sd, "tokenizer"))
    # SD-1.4's scheduler_config.json, as the hub ships it (the original overrides its betas)
    os.makedirs(os.path.join(sd, "scheduler"), exist_ok=True)
    json.dump(sampling["sd_scheduler_config"], open(os.path.join(sd, "scheduler", "scheduler_config.json"), "w"))
    return path


if __name__ == "__main__":
    print(tiny_lavie(sys.argv[1]))
