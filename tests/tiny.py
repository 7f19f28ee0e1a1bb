"""Tiny random models and videos built offline, for tests and CPU-sized runs.

Nothing here touches the hub: tokenizers are trained in memory on captions written here, models
are built from configs with random weights and saved with save_pretrained, so that every stage
loads them by path exactly as it would load a hub id.
"""
import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [] if ROOT in sys.path else [ROOT]  # `python tests/tiny_*.py DIR` finds the repo's modules

# VideoCon's released files (its repository's datasets/ and examples/): read only by the tests that
# reproduce VideoCon's own numbers, from SYNVITA_VIDEOCON or the repository's data/videocon (README,
# "Data and models"); those tests are skipped, saying so, where the folder is not filled
VIDEOCON = os.environ.get("SYNVITA_VIDEOCON") or os.path.join(ROOT, "data", "videocon")


def videocon_file(name):
    """The path of VideoCon's released file `name`, or the calling test is skipped with the reason."""
    import pytest
    path = os.path.join(VIDEOCON, name)
    if not os.path.exists(path):
        pytest.skip(f"VideoCon's {name} is not in {VIDEOCON} (fill it or set SYNVITA_VIDEOCON: README, 'Data and models')")
    return path


SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<video>", "<image>", "<|im_start|>", "<|im_end|>"]


def alignment_logits(model, processor, *args, **kwargs):
    """Eq. (1)'s a = logit_Yes - logit_No of each pair: shared_prefix.yes_no_logits, then common.alignment_logit."""
    import common
    from synvita import shared_prefix
    yes_no = shared_prefix.yes_no_logits(model, processor, *args, **kwargs)  # (n, 2)
    return common.alignment_logit(yes_no[:, 0], yes_no[:, 1])


# ---- the tokenizers' training text: written here, so a clone needs nothing beside it ----------
# Caption-like English made by a small grammar (people, animals and objects doing things somewhere,
# with VideoCon's kinds of edits: counts, colours, directions, order), a NExT-QA-like question form
# and the prompts. Enough words that a 600-token BPE still splits many of them into pieces, as
# LLaMA's tokenizer splits rare words, which the t' mask must handle.
PEOPLE = ["man", "woman", "girl", "boy", "child", "chef", "player", "teacher", "dancer", "farmer", "driver",
          "singer", "worker", "student", "baby", "athlete", "tourist", "waiter", "doctor", "police officer",
          "soccer team", "audience", "crowd", "grandmother", "musician", "climber", "swimmer", "surfer"]
ANIMALS = ["dog", "cat", "horse", "bird", "cow", "sheep", "rabbit", "monkey", "duck", "goat", "elephant",
           "penguin", "squirrel", "turtle", "puppy", "kitten", "parrot", "camel", "dolphin", "chicken"]
THINGS = ["frisbee", "ball", "guitar", "vegetables", "cup", "door", "box", "rope", "sofa", "noodles", "wall",
          "tree", "glass", "book", "bicycle", "square", "triangle", "drum", "stage", "window", "bottle", "knife",
          "umbrella", "ladder", "bucket", "pillow", "basket", "piano", "skateboard", "kite", "sandwich",
          "towel", "blanket", "hammer", "paper", "camera", "bowl", "candle", "helmet", "suitcase"]
ADJECTIVES = ["red", "blue", "green", "yellow", "black", "white", "small", "large", "old", "young", "tall",
              "wooden", "plastic", "shiny", "wet", "empty", "heavy", "striped", "broken", "purple", "orange"]
VERBS = ["catching", "riding", "walking off", "playing", "cutting", "running along",
         "jumping over", "holding", "opening", "closing", "pushing", "pulling", "dancing near", "sleeping on",
         "cooking", "painting", "climbing", "dropping", "picking up", "talking to", "washing", "covering",
         "moving", "rolling toward", "singing to", "clapping for", "hitting", "kicking", "carrying",
         "folding", "stirring", "lifting", "shaking", "spinning", "chasing", "feeding", "hugging",
         "tossing", "sweeping", "polishing", "dragging", "balancing", "sniffing", "watching"]
PLACES = ["to the dog", "from the dog", "to the left", "to the right", "in the kitchen", "on the street",
          "while the audience claps", "before sitting down", "after the music stops", "at night", "indoors",
          "in the park", "on a sunny day", "near the water", "in slow motion", "with a smile", "then leaves",
          "in a classroom", "on the beach", "behind the house", "under the bridge", "at the station",
          "in the snow", "during the game", "across the room", "on a boat", "in the garden", "upside down"]
COUNTS = ["a", "one", "two", "three", "four", "the", "some", "several"]


def noun_phrase(rng):
    """a noun phrase such as "two striped cats" or "the old chef"."""
    count, noun = rng.choice(COUNTS), rng.choice(rng.choice([PEOPLE, ANIMALS, THINGS]))
    adjective = rng.choice(ADJECTIVES) + " " if rng.random() < 0.5 else ""
    plural = count not in ("a", "one", "the") and not noun.endswith("s")
    words = f"{count} {adjective}{noun}{'s' if plural else ''}"
    return words.replace("a old", "an old").replace("a orange", "an orange").replace("a elephant", "an elephant")


QUESTIONS = ["how do the two men play the instrument", "why did the boy pick up the ball",
             "what does the woman do after opening the door", "how does the man cycling sell the watch"]
PROMPTS = ['USER: ASSISTANT: Does this video entail the description: "" ? user assistant',
           "A chat between a curious human and an artificial intelligence assistant.",
           "The following is a conversation between a curious human and AI assistant."]


def corpus(n=3000, seed=0):
    """Text to train the tiny tokenizers: n captions from the grammar above, questions, the prompt
    words, and every printable ASCII character once (no character a test writes becomes <unk>)."""
    import random
    rng = random.Random(seed)  # the same text, so the same tokenizer, on every machine
    lines = [PROMPTS[0]] * 500 + PROMPTS[1:] * 50
    lines += ["Yes No"] * 2000  # so that " Yes" and " No" become single tokens, as in LLaMA
    for _ in range(n):
        subject = noun_phrase(rng)
        verb = "are" if subject.split()[0] in COUNTS[2:5] + COUNTS[6:] else "is"
        caption = f"{subject} {verb} {rng.choice(VERBS)} {noun_phrase(rng)} {rng.choice(PLACES)}"
        lines.append(caption[0].upper() + caption[1:] + ".")
    lines += [q + "?" for q in QUESTIONS] * 20
    lines.append("".join(chr(c) for c in range(33, 127)))
    return lines


def build_tokenizer(vocab_size=600, special=SPECIAL, video_token="<video>", image_token="<image>"):
    """A LLaMA-like sub-word tokenizer (BPE over '▁'-marked words, BOS added), trained in memory,
    small enough that many words split into several tokens (which the t' mask must handle)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                                            show_progress=False))  # no blank lines on stdout
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", extra_special_tokens={"video_token": video_token, "image_token": image_token})


def llama_tokenizer():
    """A real LLaMA-family SentencePiece tokenizer, offline: Mistral-7B-v0.1's tokenizer.model (32000
    pieces, the LLaMA-2 recipe: BPE over '▁'-marked words, byte fallback, <s> added), which ships
    inside the mistral-common package, converted by transformers as a hub LLaMA checkpoint's is.
    `<video>` is added as a special token, as in Video-LLaVA-7B-hf's tokenizer."""
    import shutil
    import tempfile
    import mistral_common
    from transformers import LlamaTokenizer
    folder = tempfile.mkdtemp()
    shutil.copy(os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1"),
                os.path.join(folder, "tokenizer.model"))
    tok = LlamaTokenizer.from_pretrained(folder, extra_special_tokens={"video_token": "<video>"})
    shutil.rmtree(folder)
    return tok


def tiny_video_llava(path, frame_size=32, patch=8, seed=0):
    """A 2-layer CLIP vision tower + 2-layer LLaMA Video-LLaVA, saved (model + processor) to path."""
    from toyworld.models import new_video_llava
    model, processor = new_video_llava(build_tokenizer(), size=frame_size, patch=patch, seed=seed,
                                                text_layers=2)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


ONEVISION_TEMPLATE = (  # the shape of LLaVA-OneVision's own (Qwen2) chat template, reduced
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
    "{% if c['type'] == 'video' %}<video>\n{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_onevision(path, frame_size=32, patch=8, seed=0):
    """A LLaVA-OneVision (SigLIP vision + Qwen2 LM) at toy size with a chat template, saved to path."""
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                              LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor,
                              Qwen2Config, SiglipVisionConfig)
    torch.manual_seed(seed)
    tok = build_tokenizer()
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=frame_size, patch_size=patch)
    text = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                       pad_token_id=tok.pad_token_id)
    config = LlavaOnevisionConfig(vision_config=vision, text_config=text, vision_feature_layer=-1,
                                  vision_feature_select_strategy="full", image_grid_pinpoints=[[frame_size, frame_size]],
                                  video_token_id=tok.convert_tokens_to_ids("<video>"),
                                  image_token_id=tok.convert_tokens_to_ids("<image>"))
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    size = {"height": frame_size, "width": frame_size}
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=[[frame_size, frame_size]]),
        tokenizer=tok, video_processor=LlavaOnevisionVideoProcessor(size=size),
        num_image_tokens=(frame_size // patch) ** 2, vision_feature_select_strategy="full",
        chat_template=ONEVISION_TEMPLATE)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


MPLUG_FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "mplug_owl_videocon.json")


def released_mplug_owl_state(fixture, seed=None, vocab=None):
    """A state dict in mPLUG-Owl's released layout, by the fixture's recipe (tests/fixtures/: every
    tensor in sorted name order, torch.randn * scale from one seeded generator, + 1 for LayerNorm
    weights); vocab: another vocabulary size for the LLM's embedding and head (same draws otherwise)."""
    g = torch.Generator().manual_seed(fixture["weight_seed"] if seed is None else seed)
    state = {}
    for name, shape in fixture["keys"]:
        if vocab and name in ("language_model.lm_head.weight", "language_model.model.embed_tokens.weight"):
            shape = [vocab, shape[1]]
        w = torch.randn(shape, generator=g) * fixture["scale"]
        if name.endswith("weight") and any(k in name.split(".")[-2] for k in ("norm", "ln", "layernorm")):
            w = w + 1.0
        state[name] = w
    return state


def tiny_mplug_owl(path, seed=0):
    """mPLUG-Owl (video) at the fixture's toy size, saved as the released checkpoint is: config.json of
    model_type "mplug-owl", pytorch_model.bin in mPLUG-Owl's own names, tokenizer.model (a real LLaMA-family
    SentencePiece model: Mistral-7B-v0.1's, from mistral-common, as llama_tokenizer), preprocessor_config.json
    (32 x 32 frames, CLIP's mean and std). The stages load it by path as they would load the hub's."""
    import json
    import shutil
    import mistral_common
    fixture = json.load(open(MPLUG_FIXTURE))
    config = json.loads(json.dumps(fixture["config"]))
    config["text_config"]["vocab_size"] = vocab = 32000  # the SentencePiece model's
    os.makedirs(path, exist_ok=True)
    json.dump({"model_type": "mplug-owl", **config}, open(os.path.join(path, "config.json"), "w"))
    torch.save(released_mplug_owl_state(fixture, seed, vocab), os.path.join(path, "pytorch_model.bin"))
    shutil.copy(os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1"),
                os.path.join(path, "tokenizer.model"))
    size = config["vision_config"]["image_size"]
    json.dump({"crop_size": size, "image_mean": [0.48145466, 0.4578275, 0.40821073],
               "image_std": [0.26862954, 0.26130258, 0.27577711]}, open(os.path.join(path, "preprocessor_config.json"), "w"))
    return path


QWEN_SPECIAL = ["<|vision_start|>", "<|vision_end|>", "<|video_pad|>", "<|image_pad|>"]
QWEN_TEMPLATE = (  # the shape of Qwen2.5-VL's / Qwen3-VL's chat template (default system turn), reduced
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
    "{% if c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>{% elif c['type'] == 'text' %}"
    "{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_qwen_vl(path, version="2.5", frame_size=32, seed=0):
    """A Qwen2.5-VL (version "2.5") or Qwen3-VL ("3") at toy size, saved (model + processor) to path:
    2-layer vision tower (8 px patches, 2 x 2 merge, 2 frames a temporal patch) and a 2-layer LM with
    3-D rotary positions (mrope sections 2/3/3 of its 16-dim heads)."""
    import transformers as tf
    torch.manual_seed(seed)
    tok = build_tokenizer(special=SPECIAL + QWEN_SPECIAL, video_token="<|video_pad|>", image_token="<|image_pad|>")
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=8,
                  spatial_merge_size=2, temporal_patch_size=2)
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=4096, pad_token_id=tok.pad_token_id,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    ids = {f"{k}_token_id": tok.convert_tokens_to_ids(f"<|{t}|>") for k, t in
           (("vision_start", "vision_start"), ("vision_end", "vision_end"), ("video", "video_pad"), ("image", "image_pad"))}
    size = {"shortest_edge": frame_size * frame_size, "longest_edge": 4 * frame_size * frame_size}
    pixels = dict(size=size, patch_size=8, merge_size=2, temporal_patch_size=2)
    if version == "2.5":
        config = tf.Qwen2_5_VLConfig(vision_config=dict(vision, window_size=32, fullatt_block_indexes=[1], tokens_per_second=2),
                                     text_config=text, **ids)
        model = tf.Qwen2_5_VLForConditionalGeneration(config)
        processor = tf.Qwen2_5_VLProcessor(image_processor=tf.Qwen2VLImageProcessor(**pixels), tokenizer=tok,
                                           video_processor=tf.Qwen2VLVideoProcessor(**pixels), chat_template=QWEN_TEMPLATE)
    else:
        config = tf.Qwen3VLConfig(vision_config=dict(vision, num_position_embeddings=16, deepstack_visual_indexes=[0]),
                                  text_config=dict(text, head_dim=16, rope_parameters=dict(text["rope_parameters"], mrope_interleaved=True)),
                                  **ids)
        model = tf.Qwen3VLForConditionalGeneration(config)
        processor = tf.Qwen3VLProcessor(image_processor=tf.Qwen2VLImageProcessor(**pixels), tokenizer=tok,
                                        video_processor=tf.Qwen3VLVideoProcessor(**pixels, do_sample_frames=False),
                                        chat_template=QWEN_TEMPLATE)
    model.eval().save_pretrained(path)
    processor.save_pretrained(path)
    return path


def moving_square(num_frames=8, size=32, color=(255, 0, 0), direction=1, seed=0):
    """uint8 frames (T, size, size, 3): a square moving left-to-right (direction 1) or back."""
    rng = np.random.default_rng(seed)
    frames = np.full((num_frames, size, size, 3), 30, np.uint8) + rng.integers(0, 20, (1, size, size, 3), dtype=np.uint8)
    for t in range(num_frames):
        x = int((t if direction > 0 else num_frames - 1 - t) * (size - 8) / max(num_frames - 1, 1))
        frames[t, size // 2 - 4: size // 2 + 4, x: x + 8] = color
    return frames


# ---- processes (Linux /proc): the tests that kill a run check that its helper processes end with it ----
def children(pid):
    """The pids of a process's children."""
    path = f"/proc/{pid}/task/{pid}/children"
    return [int(c) for c in open(path).read().split()] if os.path.exists(path) else []


def descendants(pid):
    """The pids of a process's children (of any of its threads), theirs, and so on."""
    tasks = f"/proc/{pid}/task"
    kids = [int(c) for t in (os.listdir(tasks) if os.path.exists(tasks) else [])
            for c in open(f"{tasks}/{t}/children").read().split()]
    return kids + [d for k in kids for d in descendants(k)]


def running(pid):
    """Whether a process exists and is not a zombie."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def run_cli(script, *argv, timeout=600, env=None, cwd=None):
    """`python <script> argv...` as a user runs it (a stage of the repo): the CompletedProcess, with
    stdout and stderr as text. HF_HUB_OFFLINE stays as the test session set it."""
    import subprocess
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, argv)], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})}, cwd=cwd)


def run_main(script, *argv, env=None, cwd=None):
    """`python <script> argv...` in this process: the stage's own entry point (runs.run_stage on its
    main and Args, sys.argv set), its stdout and stderr captured, its exit status taken from SystemExit;
    the same CompletedProcess as run_cli, without a new interpreter's 2-5 s of imports. For what a
    subprocess proves nothing more about: a user's mistake, --help. Any other exception is raised."""
    import contextlib
    import importlib
    import io
    import subprocess
    from synvita import runs
    stage = importlib.import_module(os.path.splitext(script)[0])  # "01_generate.py" -> module 01_generate
    out, err, code = io.StringIO(), io.StringIO(), 0
    saved = {k: os.environ.get(k) for k in env or {}}
    argv0, here = sys.argv, os.getcwd()
    try:
        os.environ.update(env or {})
        os.chdir(cwd or here)
        sys.argv = [script, *map(str, argv)]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runs.run_stage(stage.main, stage.Args)
    except SystemExit as e:  # run_stage's exit 2, argparse's 0 (--help) or 2 (a bad choice)
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    finally:
        sys.argv = argv0
        os.chdir(here)
        for k, v in saved.items():  # the environment as it was
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v
    return subprocess.CompletedProcess([script, *argv], code, out.getvalue(), err.getvalue())


def assert_user_error(done, *needles):
    """A user's mistake, as every stage reports it: exit status 2, no traceback, and one last line
    on stderr `error: ...` that contains each of `needles`."""
    last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert last.startswith("error: "), done.stderr[-3000:]
    for needle in needles:
        assert needle in last, (needle, last)
    return last
