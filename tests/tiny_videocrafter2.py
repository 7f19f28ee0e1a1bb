"""A tiny random VideoCrafter2 in the original release's layout, built offline, for the tests of
synvita/videocrafter2.py and for a CPU-sized 01_generate.py run.

The folder holds what a user fills from the hub (synvita/videocrafter2.py's docstring): model.ckpt,
a PyTorch Lightning checkpoint {"state_dict": ...} in VideoCrafter's own names, drawn by the recipe of
tests/fixtures/videocrafter2_original.json (the numbers of VideoCrafter's code on the same weights);
inference_t2v_512_v2.0.yaml, the release's config at the fixture's tiny sizes; tokenizer/, a CLIP BPE
(byte-level, "</w>" word ends, <|startoftext|> and <|endoftext|>) trained in memory on tests/tiny.py's
captions. Frames of 32x64 pixels are latents of 4x8.

    python tests/tiny_videocrafter2.py /tmp/tiny-videocrafter2   # then --pipeline /tmp/tiny-videocrafter2
"""
import json
import os
import sys

import torch

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "videocrafter2_original.json")
# CLIP's pre-tokenizer: contractions, letter runs, single digits, runs of other non-space characters
CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def load_fixture():
    with open(FIXTURE, encoding="utf-8") as fh:
        return json.load(fh)


def released_videocrafter2_state(fixture, seed=None, vocab=None):
    """A state dict in VideoCrafter2's released names, by the fixture's recipe: every parameter in
    sorted name order, torch.randn * scale[its prefix] from one seeded generator, + 1 for the norm
    weights the fixture lists. The schedule's buffers are zeros: the conversion recomputes them.
    vocab: another vocabulary size for the text tower's token embedding (same draws otherwise)."""
    g = torch.Generator().manual_seed(fixture["weight_seed"] if seed is None else seed)
    norms, buffers = set(fixture["norm_weights"]), set(fixture["buffers"])
    state = {}
    for name, shape in fixture["keys"]:
        if name in buffers:  # betas, alphas_cumprod, scale_arr, ...: not weights
            state[name] = torch.zeros(shape)
            continue
        if vocab and name == "cond_stage_model.model.token_embedding.weight":
            shape = [vocab, shape[1]]
        scale = next(v for prefix, v in fixture["scale"].items() if name.startswith(prefix))
        w = torch.randn(shape, generator=g) * scale
        state[name] = w + 1.0 if name in norms else w
    return state


def clip_bpe_files(folder, vocab_size=400):
    """Write vocab.json and merges.txt, the files of a hub CLIP tokenizer, for a BPE in CLIP's layout (the
    256 byte symbols, the same with "</w>", the merged symbols, then <|startoftext|> and <|endoftext|>)
    whose merges are learned on tiny.corpus(); transformers' CLIPTokenizer.from_pretrained reads them."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    import tiny  # tests/ is on sys.path: conftest.py, or `python tests/tiny_videocrafter2.py`
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Sequence([normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    split = pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True)  # keep the matches
    to_bytes = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)  # bytes as CLIP's 256 symbols
    tok.pre_tokenizer = pre_tokenizers.Sequence([split, to_bytes])
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(tiny.corpus(), trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=alphabet,
                                                               end_of_word_suffix="</w>", show_progress=False))
    merges = [m.split(" ") if isinstance(m, str) else m for m in json.loads(tok.to_str())["model"]["merges"]]
    symbols = alphabet + [a + "</w>" for a in alphabet] + ["".join(m) for m in merges]
    symbols = list(dict.fromkeys(symbols)) + ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as fh:
        json.dump({s: i for i, s in enumerate(symbols)}, fh, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as fh:
        fh.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return len(symbols)


def tiny_videocrafter2(path, seed=None):
    """Write the tiny VideoCrafter2 folder (model.ckpt, inference_t2v_512_v2.0.yaml, tokenizer/) to path."""
    import yaml
    fixture = load_fixture()
    vocab = clip_bpe_files(os.path.join(path, "tokenizer"))
    with open(os.path.join(path, "inference_t2v_512_v2.0.yaml"), "w", encoding="utf-8") as fh:
        yaml.safe_dump(fixture["config"], fh)
    state = released_videocrafter2_state(fixture, seed, vocab=vocab)
    torch.save({"state_dict": state}, os.path.join(path, "model.ckpt"))  # Lightning's layout
    return path


if __name__ == "__main__":
    print(tiny_videocrafter2(sys.argv[1]))
