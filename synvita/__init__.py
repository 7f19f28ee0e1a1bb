"""The machinery of the SynViTA reference implementation, one job a module. The paper's
mathematics is in common.py and its sections in the four stage scripts; nothing here is needed to
read them, only to run them.

Every stage
  runs.py           a stage's entry point and flags, torchrun, seeds, printing, waiting for other ranks
  disk.py           CSV in (the one reader), atomic writes out, settings-checked resume
  parts.py          per-rank part files, the one protocol of 02's cache and 04's scores
  video_io.py       decord reads frames, x264 writes byte-stable mp4s
  video_llm.py      a video LLM f(V, t) by hub id or folder, a LoRA adapter on it
  shared_prefix.py  Eq. (1)'s fast forward: each video's prompt prefix runs once for all its captions
  mplug_owl.py      mPLUG-Owl 7B (video), the second f(V, t), on transformers' parts; its checkpoints
  mplug_owl_processor.py  its prompt and frames as VideoCon builds them
01_generate.py (§4)
  generator.py      G: diffusers pipelines or "module:Class" generators, memory savers, caches
  render_rows.py    which rows to render, their names, seeds and calls of G, the resume record
  render_writer.py  videos encoded on one thread while G renders the next call
  lavie.py          LaVie, a G of §4: its release folder, SD-1.4's parts, its DDPM sampler
  lavie_unet.py     LaVie's video UNet on diffusers' parts; its checkpoint converted
  videocrafter2.py  VideoCrafter2, a G of §4: its model.ckpt converted, its DDIM sampler
  videocrafter2_unet.py  VideoCrafter2's 3-D UNet on diffusers' blocks; its weight names
02_weight.py (§4 Fig. 2, §5 Eq. 4)
  vqa.py            VQAScore on image VQA models, each frame encoded once for both captions
  clip_t5.py        CLIP-FlanT5 from transformers' parts; finding and loading the ensemble
  score_cache.py    each member's per-frame scores, cached per rank, resumed
  fig2.py           Fig. 2's figure and JSON, one run or several pooled
  gallery.py        the HTML page of V^s beside V^r, their captions, fbar and phi
03_train.py (§5, §6)
  triplets.py       the training items: triplets, their twins V^s and weights phi, explanations
  pairs.py          the pairs (V, t) of a micro-batch, typed, and their alignment logits
  released_loss.py  the released code's answer loss (--answer_loss vocab)
  training.py       batches, DataLoader workers, the micro-step, the log
  checkpoints.py    out_dir, checkpoints, resume, the adapter
04_eval.py (§6)
  tasks.py          VideoCon's released task files, every cell checked
  scores.py         score files, ours and VideoCon's; the pairs left to score; part files merged
"""
