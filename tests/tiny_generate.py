"""A tiny random CogVideoX text-to-video pipeline (and LTX-Video, Wan 2.1 ones for the loading
guards), built offline, for the tests of 01_generate.py. The paper's other two generators, in their
release folders' layouts: tests/tiny_lavie.py and tests/tiny_videocrafter2.py.

Same classes as THUDM/CogVideoX-5b (CogVideoXTransformer3DModel with rotary positions,
AutoencoderKLCogVideoX, a T5 encoder and T5 tokenizer, CogVideoXDDIMScheduler), at toy size, saved
with save_pretrained so that 01_generate.py loads it by path exactly as it loads a hub id.
The VAE compresses 8x in space and 4x in time, as the real one does: 9 frames of 32x64 pixels are
3 latent frames of 4x8. (decord cannot read back some small widths such as 48: 64 it can.)

    python tests/tiny_generate.py /tmp/tiny-cogvideox   # then 01_generate.py --pipeline /tmp/tiny-cogvideox
"""
import json
import sys

import torch


def t5_tokenizer(vocab_size=300):
    """A T5Tokenizer (Unigram, '▁' words, </s> appended, <pad>=0 </s>=1 <unk>=2 as in T5) whose
    vocabulary is trained in memory on the captions of tests/tiny.py (corpus)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import T5Tokenizer
    import tiny
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"],
                                      unk_token="<unk>", show_progress=False)
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.train_from_iterator(tiny.corpus(), trainer)
    vocab = [tuple(v) for v in json.loads(tok.to_str())["model"]["vocab"]]  # specials first, in order
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def tiny_cogvideox(path, seed=0, num_layers=1):
    """Build the tiny CogVideoX pipeline and save it (model_index.json + one folder per part).
    num_layers: transformer blocks (a cache that skips blocks after the first needs 2 or more)."""
    from diffusers import (AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline,
                           CogVideoXTransformer3DModel)
    from transformers import T5Config, T5EncoderModel
    torch.manual_seed(seed)
    tokenizer = t5_tokenizer()
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                           num_heads=4, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=32, num_layers=num_layers, sample_width=8, sample_height=4, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=226, use_rotary_positional_embeddings=True)
    vae = AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
        layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4)
    pipe = CogVideoXPipeline(tokenizer=tokenizer, text_encoder=text_encoder.eval(), vae=vae.eval(),
                             transformer=transformer.eval(), scheduler=CogVideoXDDIMScheduler())
    pipe.save_pretrained(path)
    return path


def tiny_ltx(path, seed=0, num_layers=1):
    """A tiny LTX-Video pipeline (LTXPipeline; its VAE compresses 8x in time, 32x in space), saved."""
    from diffusers import (AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXPipeline,
                           LTXVideoTransformer3DModel)
    from transformers import T5Config, T5EncoderModel
    torch.manual_seed(seed)
    tokenizer = t5_tokenizer()
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                           num_heads=4))
    vae = AutoencoderKLLTXVideo(latent_channels=4, block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4,
                                layers_per_block=(1,) * 5, decoder_layers_per_block=(1,) * 5)
    transformer = LTXVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                             cross_attention_dim=16, num_layers=num_layers, caption_channels=32)
    LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae.eval(), text_encoder=text_encoder.eval(),
                tokenizer=tokenizer, transformer=transformer.eval()).save_pretrained(path)
    return path


def tiny_wan(path, seed=0, num_layers=1):
    """A tiny Wan 2.1 text-to-video pipeline (WanPipeline: UMT5 encoder, AutoencoderKLWan), saved."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel
    torch.manual_seed(seed)
    tokenizer = t5_tokenizer()
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                               num_heads=4))
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, latents_mean=[0.0] * 4,
                           latents_std=[1.0] * 4)
    transformer = WanTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                        text_dim=32, freq_dim=16, ffn_dim=32, num_layers=num_layers,
                                        rope_max_seq_len=32)
    WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder.eval(), vae=vae.eval(),
                scheduler=FlowMatchEulerDiscreteScheduler(), transformer=transformer.eval()).save_pretrained(path)
    return path


if __name__ == "__main__":
    print(tiny_cogvideox(sys.argv[1]))
