"""mPLUG-Owl's inputs as VideoCon builds them to score Owl-Con (its data_utils/xgpt3_dataset.py and
mplug_owl_video/processing_mplug_owl.py): the prompt tokenized piece by piece with LLaMA's
SentencePiece model, one BOS, the video's place holding num_query_tokens + 1 ids; the frames
squashed to 224 x 224, scaled and normalised with CLIP's mean and std. The processor has the shape
that the stages use of transformers' processors (tokenizer, video_processor, __call__).
"""
import json
import os
import re

import numpy as np
import torch
from transformers import BatchFeature

from synvita.mplug_owl import VIDEO_TOKEN_ID

# VideoCon splits a prompt at these and encodes each piece alone (xgpt3_dataset.py's pattern): every
# piece then starts a word ("▁"), so "AI: " ends in a lone "▁" and the answer "Yes" is "▁Yes"
PIECES = re.compile(r"(<\|video\|>|AI: |\nHuman: )")
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


class PiecewiseTokenizer:
    """LLaMA's SentencePiece model (the checkpoint's tokenizer.model) as VideoCon applies it: the text
    split at PIECES, each piece encoded on its own, <|video|> one VIDEO_TOKEN_ID, a BOS in front. Called
    like a transformers tokenizer: input_ids and, on request, each token's (start, end) in the text."""

    def __init__(self, model_file):
        import sentencepiece
        self.sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
        self.bos_token_id, self.eos_token_id, self.unk_token_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id()
        self.pad_token_id = self.unk_token_id  # LLaMA-1's has no pad piece; padding is never attended to
        self.video_token_id = VIDEO_TOKEN_ID

    def __len__(self):
        return self.sp.get_piece_size()

    def __call__(self, text, add_special_tokens=True, return_offsets_mapping=False, **kwargs):
        ids, spans = ([self.bos_token_id], [(0, 0)]) if add_special_tokens else ([], [])
        start = 0
        for piece in PIECES.split(text):
            if piece == "<|video|>":  # the video's place, expanded by the processor or by shared_prefix
                ids.append(self.video_token_id)
                spans.append((start, start + len(piece)))
            elif piece:
                # SentencePiece gives byte offsets into the piece's UTF-8: made character offsets into text
                chars = np.cumsum([0] + [len(c.encode("utf-8")) for c in piece])
                for p in self.sp.encode(piece, return_type="proto").pieces:
                    ids.append(p.id)
                    spans.append((start + int(np.searchsorted(chars, p.begin)), start + int(np.searchsorted(chars, p.end))))
            start += len(piece)
        return {"input_ids": ids, **({"offset_mapping": spans} if return_offsets_mapping else {})}

    def convert_tokens_to_ids(self, tokens):
        return [self.sp.piece_to_id(t) for t in tokens] if isinstance(tokens, list) else self.sp.piece_to_id(tokens)

    def decode(self, ids, **kwargs):
        return self.sp.decode([int(i) for i in ids if i >= 0])


class VideoProcessor:
    """uint8 frames (T, H, W, 3) -> (T, 3, size, size): squashed (not cropped), scaled to [0, 1], then
    CLIP's mean and std (the checkpoint's preprocessor_config.json, when it has one)."""

    def __init__(self, size=224, mean=CLIP_MEAN, std=CLIP_STD):
        self.size, self.mean, self.std = size, torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]

    def __call__(self, videos, return_tensors="pt", **kwargs):
        from PIL import Image
        # NOTE (deviation): VideoCon's decord squashes each frame to 224 x 224 while decoding (its own
        # scaler); the stages decode frames at full size, so PIL's bicubic squashes them here: the pixels
        # can differ by a few grey levels from VideoCon's.
        out = [torch.stack([torch.from_numpy(np.array(Image.fromarray(f).resize((self.size, self.size), Image.BICUBIC)))
                            for f in np.asarray(video)]) for video in videos]  # (T, S, S, 3) each
        pixels = torch.stack(out).permute(0, 1, 4, 2, 3).float() / 255  # (B, T, 3, S, S)
        return {"pixel_values_videos": (pixels - self.mean) / self.std}


class MplugOwlProcessor:
    """The tokenizer and the video processor; called on a prompt (and its videos) it gives the model's
    inputs, the video's placeholder expanded to num_video_tokens ids as VideoCon's dataset does."""

    def __init__(self, tokenizer, video_processor, num_video_tokens):
        self.tokenizer, self.video_processor, self.num_video_tokens = tokenizer, video_processor, num_video_tokens

    def __call__(self, text=None, videos=None, return_tensors="pt", **kwargs):
        ids = []
        for i in self.tokenizer(text)["input_ids"]:
            ids += [i] * (self.num_video_tokens if i == VIDEO_TOKEN_ID else 1)
        out = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
        if videos is not None:
            out.update(self.video_processor(videos))
        return BatchFeature(out)

    @classmethod
    def from_pretrained(cls, path, num_video_tokens):
        """From a checkpoint folder: tokenizer.model, and preprocessor_config.json's size, mean and std."""
        config_file = os.path.join(path, "preprocessor_config.json")
        pre = json.load(open(config_file, encoding="utf-8")) if os.path.exists(config_file) else {}
        crop = pre.get("crop_size", 224)
        size = crop.get("height", 224) if isinstance(crop, dict) else crop
        video = VideoProcessor(size, pre.get("image_mean", CLIP_MEAN), pre.get("image_std", CLIP_STD))
        return cls(PiecewiseTokenizer(os.path.join(path, "tokenizer.model")), video, num_video_tokens)
