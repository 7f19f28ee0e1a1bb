"""Tiny random models and videos built offline, for tests and CPU-sized runs.

Nothing here touches the hub: tokenizers are trained in memory on real VideoCon captions, models
are built from configs with random weights and saved with save_pretrained, so that every stage
loads them by path exactly as it would load a hub id.
"""
import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [] if ROOT in sys.path else [ROOT]  # `python tests/tiny_*.py DIR` finds the repo's modules
from toyworld.models import new_video_llava  # noqa: E402

SHARED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "videocon")
REAL_MP4 = os.path.join(SHARED, "y5xuvHpDPZQ_000005_000015.mp4")
SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<video>", "<image>", "<|im_start|>", "<|im_end|>"]


def corpus():
    """Text to train the tiny tokenizer: real VideoCon captions plus the prompt words."""
    import csv
    lines = ['USER: ASSISTANT: Does this video entail the description: "" ? user assistant'] * 500
    lines += ["Yes No"] * 2000  # so that " Yes" and " No" become single tokens, as in LLaMA
    for name in ("final_test.csv", "test.csv", "nextqa-atphard-statements.csv"):
        with open(os.path.join(SHARED, name), newline="", encoding="utf-8") as fh:
            for row in csv.reader(fh):
                lines += row
    return lines


def build_tokenizer(vocab_size=600):
    """A LLaMA-like sub-word tokenizer (BPE over '▁'-marked words, BOS added), trained in memory,
    small enough that many words split into several tokens (which the t' mask must handle)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", extra_special_tokens={"video_token": "<video>", "image_token": "<image>"})


def tiny_video_llava(path, frame_size=32, patch=8, seed=0):
    """A 2-layer CLIP vision tower + 2-layer LLaMA Video-LLaVA, saved (model + processor) to path."""
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


def moving_square(num_frames=8, size=32, color=(255, 0, 0), direction=1, seed=0):
    """uint8 frames (T, size, size, 3): a square moving left-to-right (direction 1) or back."""
    rng = np.random.default_rng(seed)
    frames = np.full((num_frames, size, size, 3), 30, np.uint8) + rng.integers(0, 20, (1, size, size, 3), dtype=np.uint8)
    for t in range(num_frames):
        x = int((t if direction > 0 else num_frames - 1 - t) * (size - 8) / max(num_frames - 1, 1))
        frames[t, size // 2 - 4: size // 2 + 4, x: x + 8] = color
    return frames
