"""Tiny random IMAGE VQA models for 02_weight.py, built offline from configs and saved like hub
checkpoints (model + processor), so that the stage loads them by path exactly as a hub id.

- tiny_llava: LLaVA-1.5 style, decoder-only (CLIP vision + LLaMA), the tiny tokenizer of tiny.py
  and the chat template of llava-hf/llava-1.5-7b-hf.
- tiny_instructblip / tiny_blip2: InstructBLIP-FlanT5 / BLIP-2-FlanT5 style, encoder-decoder (BLIP
  vision + Q-Former + T5), with a T5-like tokenizer (and, for InstructBLIP, a BERT-like Q-Former
  tokenizer), trained in memory.
- tiny_clip_flant5: CLIP-FlanT5 (VQAScore's model) written in its released checkpoint's layout.
"""
import json
import os

import torch

import tiny
from toyworld.models import new_llava

VQA_LINES = ['Question: Does this figure show ""? Please answer yes or no. Answer:'] * 500 + ["yes no Yes No"] * 2000


def tiny_llava(path, frame_size=32, patch=8, seed=0, **sizes):
    """LLaVA-1.5 at toy size (toyworld.models.new_llava: CLIP vision + 2-layer LLaMA, llava-1.5's chat
    template) with the tiny BPE tokenizer of tiny.py, saved to path. sizes: new_llava's (hidden,
    text_layers, vision_layers, vision_hidden), e.g. bench_weight.py's proportionate tower."""
    model, processor = new_llava(tiny.build_tokenizer(), frame_size, patch, seed, **{"text_layers": 2, **sizes})
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def t5_tokenizer(vocab_size=700):
    """A T5-like tokenizer: sentencepiece-style '▁' words, </s> appended, <pad> = id 0 (T5's
    decoder start token), "▁yes" a single token as in Flan-T5, and Flan-T5's model_max_length of 512."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    special = ["<pad>", "</s>", "<unk>", "<image>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(tiny.corpus() + VQA_LINES, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                                                                  show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    # no `image_token` attribute: InstructBlipProcessor then registers "<image>" itself, as for the hub's
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                                   model_max_length=512)


def bert_tokenizer(vocab_size=500):
    """A BERT-like WordPiece tokenizer ([CLS] text [SEP]) for the Q-Former, which reads the question
    too (the "instruction-aware" part of InstructBLIP)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False)
    tok.train_from_iterator(tiny.corpus() + VQA_LINES, trainer)
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


def tiny_blip(path, instruct=True, frame_size=32, patch=8, num_query_tokens=4, seed=0, vision_hidden=32,
              vision_layers=2):
    """InstructBLIP-FlanT5 (instruct=True) or BLIP-2-FlanT5 (False; 02_weight.py's stand-in for
    CLIP-FlanT5) at toy size: 2-layer vision tower (vision_layers, width vision_hidden), 2-layer Q-Former,
    2+2-layer T5. InstructBLIP's
    Q-Former also reads the question, through its own BERT-like tokenizer."""
    import transformers
    from transformers import BlipImageProcessor, T5Config
    family = {name: getattr(transformers, ("InstructBlip" if instruct else "Blip2") + name)
              for name in ("Config", "VisionConfig", "QFormerConfig", "ForConditionalGeneration", "Processor")}
    torch.manual_seed(seed)
    tok = t5_tokenizer()
    qtok = {"qformer_tokenizer": bert_tokenizer()} if instruct else {}
    vision = family["VisionConfig"](hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                                    num_hidden_layers=vision_layers, num_attention_heads=2,
                                    image_size=frame_size, patch_size=patch, initializer_range=0.02)
    qformer = family["QFormerConfig"](hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                      **({"vocab_size": len(qtok["qformer_tokenizer"])} if instruct else {}))
    text = T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                    feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
                    eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id)
    config = family["Config"](vision_config=vision, qformer_config=qformer, text_config=text,
                              num_query_tokens=num_query_tokens, image_token_index=tok.convert_tokens_to_ids("<image>"))
    model = family["ForConditionalGeneration"](config).eval()
    processor = family["Processor"](image_processor=BlipImageProcessor(size={"height": frame_size, "width": frame_size}),
                                    tokenizer=tok, num_query_tokens=num_query_tokens, **qtok)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def tiny_instructblip(path, **kw):
    return tiny_blip(path, instruct=True, **kw)


def tiny_blip2(path, **kw):
    return tiny_blip(path, instruct=False, **kw)


def tiny_clip_flant5(path, frame_size=32, patch=8, seed=0, with_tower=True, vision_hidden=24, vision_layers=3):
    """CLIP-FlanT5 at toy size, written as zhiqiulin/clip-flant5-xxl is: config.json = T5's fields +
    model_type clip_t5, mm_vision_tower (here a 3-layer CLIP vision model saved in path/clip-vision,
    standing in for openai/clip-vit-large-patch14-336; vision_layers, width vision_hidden), mm_projector_type,
    mm_vision_select_layer;
    model.safetensors with T5's names + vision_tower.vision_tower.* + mm_projector.{0,2}.* (without
    the vision tower's if with_tower=False); the T5-like tokenizer beside them. Like Flan-T5's 32128
    rows for 32100 tokens, the vocabulary has 28 rows more than the tokenizer."""
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, T5Config, T5ForConditionalGeneration
    torch.manual_seed(seed)
    tok = t5_tokenizer()
    tower_dir = os.path.join(path, "clip-vision")
    tower = CLIPVisionModel(CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                                             num_hidden_layers=vision_layers,
                                             num_attention_heads=2, image_size=frame_size, patch_size=patch)).eval()
    tower.save_pretrained(tower_dir)
    CLIPImageProcessor(size={"shortest_edge": frame_size},
                       crop_size={"height": frame_size, "width": frame_size}).save_pretrained(tower_dir)
    text = T5Config(vocab_size=len(tok) + 28, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                    feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
                    eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id)
    t5 = T5ForConditionalGeneration(text)
    projector = torch.nn.Sequential(torch.nn.Linear(vision_hidden, 32), torch.nn.GELU(), torch.nn.Linear(32, 32))
    state = {**t5.state_dict(), **{f"mm_projector.{k}": v for k, v in projector.state_dict().items()}}
    if with_tower:
        state.update({f"vision_tower.vision_tower.{k}": v for k, v in tower.state_dict().items()})
    save_file({k: v.clone().contiguous() for k, v in state.items()}, os.path.join(path, "model.safetensors"))
    config = {**text.to_dict(), "model_type": "clip_t5", "architectures": ["CLIPT5ForConditionalGeneration"],
              "mm_vision_tower": tower_dir, "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2,
              "mm_vision_select_feature": "patch", "mm_hidden_size": vision_hidden, "use_mm_proj": True}
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(config, fh, indent=2)
    tok.save_pretrained(path)
    return path


if __name__ == "__main__":  # python tests/tiny_weight.py DIR: the tiny members under DIR
    import os
    import sys
    root = sys.argv[1] if len(sys.argv) > 1 else "tiny-vqa"
    for name, build in (("instructblip", tiny_instructblip), ("clip-flant5", tiny_clip_flant5), ("llava", tiny_llava),
                        ("blip2", tiny_blip2)):
        print(build(os.path.join(root, name)))
