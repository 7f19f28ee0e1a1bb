"""The classroom's toy world: the whole SynViTA method on a laptop CPU, in minutes.

world.py      scenes, captions, the seven kinds of negatives, the renderer, the datasets
generator.py  the toy text-to-video generator G (01_generate.py: --pipeline toyworld.generator:ToyGenerator)
models.py     the toy base Video-LLaVA and VQA members, and their pretraining
run.py        the experiment: 01 -> 02 -> 03 -> 04 over seeds, the tables and the figures
pretrained/   the committed pretrained models
"""
