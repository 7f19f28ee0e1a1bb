"""The machinery of the SynViTA reference implementation, one job a module. The paper's
mathematics is in common.py and its sections in the four stage scripts; nothing here is needed to
read them, only to run them.

runs.py           a stage's entry point, flags, torchrun, seeds, printing, waiting for other ranks
disk.py           CSV in (the one reader), atomic writes out, settings-checked resume
video_io.py       decord reads frames, x264 writes byte-stable mp4s
video_llm.py      a video LLM f(V, t) by hub id or folder, a LoRA adapter on it
shared_prefix.py  Eq. (1)'s fast forward: each video's prompt prefix runs once for all its captions
"""
