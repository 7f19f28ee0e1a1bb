r"""Implements §5 (Eqs. 5-7) and §6's training details of the paper: LoRA fine-tuning of a video LLM
f(V, t) with Eq. (7), L = L_real + L_syn^phi + lambda_scr * L_scr^phi, on the real VideoCon triplets
(V^r, t^r, t^s) and their synthetic twins V^s = G(t^s), with VideoCon's explanation task mixed in as
the authors' released recipe does.

Reads 02_weight.py's CSV (--train_csv; one per generator for Table 5's "ALL"; a plain VideoCon CSV with
--no-use_syn, the VideoCon baseline), the videos under --video_root and, optionally, VideoCon's explanation
file (--feedback_csv). --syn_types keeps the twins of some misalignment types only (Table 2).
Writes to --out_dir: adapter/ (PeftModel.from_pretrained(base, dir) loads it), args.json, log.jsonl
(one line per optimizer step: every loss term, lr, grad norm, rows/s), skipped.csv (the rows not
trained on and the triplets trained without a twin, each with the reason) and checkpoints/.

The released recipe, 4 GPUs x 4 rows = 16 rows a step (one process: the same global batches):
    torchrun --standalone --nproc_per_node 4 03_train.py --train_csv runs/generate/weighted.csv \
        --feedback_csv data/videocon/videocon_llm_feedback.csv --video_root data/videos \
        --out_dir runs/train
    python 03_train.py <the same flags>
Add --answer_loss vocab for the released code's loss instead of Eqs. (1)-(2) as written.
A CPU-sized run (a tiny random model and 12 toy triplets): README, "A CPU-sized chain".
"""
import time
import warnings
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import common
from common import WEIGHTINGS
from synvita import checkpoints, pairs, released_loss, runs, shared_prefix, training, triplets, video_llm

TERMS = ("loss", "l_real", "l_syn", "l_scr", "l_nle")  # Eq. (7), its three terms and the NLE loss, logged apart
# LoRA on the language model's linear layers only; the vision tower's q/k/v_proj stay frozen.
LORA_TARGETS = r".*language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


@dataclass
class Args:
    # ---- inputs and outputs ----
    train_csv: list = field(default_factory=lambda: ["runs/generate/weighted.csv"])
    """02_weight.py's CSV (a plain VideoCon CSV with --no-use_syn); or several, one per generator, for
    Table 5's "ALL": their rows are merged by the real triplet (videopath, caption, neg_caption), which
    trains L_real once, with one twin V^s from each CSV that has a usable one (a str is one CSV)"""
    syn_types: list = field(default_factory=list)
    """Table 2: train on the twins V^s of rows of these `misalignment` types only (e.g. --syn_types action);
    every real triplet still trains on L_real, those of other types as triplets without a twin. [] = all"""
    feedback_csv: str = ""
    """VideoCon's explanation file (videocon_llm_feedback.csv: videopath, neg_caption, nle, split):
    its --split rows are mixed into the batches as the released recipe does; '' = entailment only"""
    split: str = "train"
    """train only on rows of this `split` of both CSVs, when they have that column ("" = all rows):
    VideoCon's val and test rows never train (04 evaluates on its test rows)"""
    video_root: str = "data/videos"
    """the folder that the CSV's `videopath` is relative to"""
    out_dir: str = "runs/train"
    """where adapter/, args.json, log.jsonl and checkpoints/ go"""
    # ---- the model f(V, t) ----
    model: str = video_llm.DEFAULT_MODEL
    """the video LLM f(V, t): a hub id or a local directory"""
    prompt: Literal[tuple(common.PROMPT_FORMATS)] = "llava_v1"
    """Video-LLaVA's prompt (common.PROMPT_FORMATS): 'llava_v1' = the released code's, with LLaVA's
    system sentence; 'card' = the transformers model card's; other families use their chat template"""
    # ---- §5: the terms of Eq. (7) and their weights ----
    use_syn: bool = True
    """train on the synthetic twins V^s (Eqs. 5, 6); --no-use_syn is the VideoCon baseline, L = L_real"""
    use_scr: bool = True
    """add lambda_scr * L_scr^phi (Eq. 6); --no-use_scr is the ablation of Fig. 4"""
    answer_loss: Literal["two_way", "vocab"] = "two_way"
    """'two_way': Eqs. (1)-(2) as written, each term a mean over its own pairs; 'vocab': the released
    code's full-vocabulary cross-entropy on every answer token (Yes/No and the end token, every
    explanation token), weighted by phi on synthetic pairs, divided by the micro-batch's answer tokens"""
    weighting: Literal[("csv", *WEIGHTINGS)] = "csv"
    """phi: 'csv' reads the `weight` column of 02_weight.py; a WEIGHTINGS name recomputes it from
    score_syn_target / score_syn_real ('fixed' = unweighted Eq. 3, 'difference' = Eq. 4; the paper's
    Video-LLaVA run used 'target_x_inv_real', Table 4)"""
    lambda_scr: float = 1.0
    """lambda_scr of Eq. (7): 1.0 for Video-LLaVA, 1e-2 for mPLUG-Owl"""
    gamma: float = 0.2
    """the margin g of Eq. (6)"""
    # ---- §6: LoRA, AdamW, schedule ----
    lora_r: int = 32
    """LoRA rank"""
    lora_alpha: int = 32
    """LoRA scaling alpha"""
    lora_dropout: float = 0.05
    """dropout on the LoRA input"""
    lr: float = 5e-5
    """peak learning rate (5e-5 for Video-LLaVA, 1e-4 for mPLUG-Owl)"""
    weight_decay: float = 1e-4
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping"""
    warmup_steps: int = 200
    """linear warm-up steps, then --schedule's decay to 0"""
    schedule: Literal["cosine", "linear"] = "cosine"
    """the decay after warm-up: cosine (the released Video-LLaVA recipe) or linear (the Trainer's default, mPLUG-Owl's)"""
    num_epochs: int = 1
    """passes over the CSV"""
    # ---- batches and videos ----
    batch_size: int = 16
    """GLOBAL batch in the released code's rows (a triplet = its Yes row + its No row, an explanation =
    1 row) per optimizer step over all processes and accumulation steps: 16 = the released 4 GPUs x 4,
    so one epoch is (2 x triplets + explanations) / 16 steps, as released"""
    micro_batch_size: int = 4
    """rows per process per forward pass (the released per-GPU batch); even: a triplet's 2 rows stay together"""
    num_frames: int = 8
    """frames per video"""
    frame_sampling: Literal["uniform", "middle", "videocon"] = "uniform"
    """'uniform' (np.linspace, Video-LLaVA), 'middle', or 'videocon' (VideoCon's rule for mPLUG-Owl, 32 frames)"""
    # ---- the run: precision, memory, workers, checkpoints ----
    bf16: bool = True
    """bf16 weights and autocast on GPU (CPU always runs float32); the LoRA weights stay float32"""
    gradient_checkpointing: bool = True
    """recompute the LLM's activations in the backward pass (non-reentrant)"""
    num_workers: int = 2
    """DataLoader processes that decode the next micro-batches' videos"""
    cache_videos: bool = False
    """keep every decoded video in memory (in each process that decodes), so later epochs do not
    decode it again: for small sets trained over several epochs, like the toy world's; all of
    VideoCon would not fit"""
    save_every: int = 100
    """write a checkpoint every this many optimizer steps"""
    resume: bool = False
    """continue the run in out_dir from its latest checkpoint (a folder that holds a run, its adapter/,
    log.jsonl or a checkpoint, takes no new run without it)"""
    max_steps: int = 0
    """stop after this optimizer step, as if killed there (0 = run to the end); the schedule still spans the full run"""
    seed: int = 0
    """seed of the LoRA initialisation, the epoch shuffles and the LoRA dropout"""
    dist_timeout: int = runs.DIST_TIMEOUT
    """under torchrun: torch.distributed's timeout, the seconds a rank waits for another in a collective
    (the gradients' all-reduce) before it stops: a lost node ends the run; relaunch with --resume"""
    # checked before any work (runs.check_numbers): every number above finite and >= 0 (0 as its
    # --help says), and these above 0
    POSITIVE = ("lora_r", "lora_alpha", "lr", "max_grad_norm", "num_epochs", "batch_size", "micro_batch_size",
                "num_frames", "save_every", "dist_timeout")

    def __post_init__(self):
        if isinstance(self.train_csv, str):  # Args(train_csv="w.csv") in Python: one CSV
            self.train_csv = [self.train_csv]


# =================================================================================================
# §3 Eq. (1): the alignment logit a of every pair (V, t) of a micro-batch (pairs.TRIPLET_PAIRS)
# =================================================================================================
def micro_batch_pairs(model, processor, batch, paths, frames, args):
    """Every pair of a micro-batch (pairs.pair_specs: a triplet's six, three more a further twin, an
    explanation's one) from ONE shared_prefix.answer_states call, then Eq. (1). paths, frames: the
    micro-batch's distinct videos (training.load_videos). Returns a pairs.Pair per pair, in order: a
    in float32; tokens = the logits and targets of the answer's K tokens (the word or the explanation,
    then the end token, teacher-forced), or None where no token loss is asked (t' pairs, and the
    entailment pairs under --answer_loss two_way)."""
    specs, word, states, logits = pairs.answer_states(model, processor, batch, paths, frames, args)
    # states[i]: (K_i, hidden), logits[i]: (K_i, vocab); row j predicts answer token j (row 0: the word)
    yes_no = shared_prefix.answer_logits(model, torch.stack([h[0] for h in states]), [word["Yes"], word["No"]])  # (n, 2)
    a = common.alignment_logit(yes_no[:, 0], yes_no[:, 1])  # (n,) Eq. (1): f = sigmoid(a)
    return [pairs.Pair(s.item, s.name, a[i], (z, torch.tensor(s.answer, device=z.device)) if s.answer else None)
            for i, (s, z) in enumerate(zip(specs, logits))]


# =================================================================================================
# §5 Eq. (7): the objective, from the pairs' alignment logits
# =================================================================================================
def objective(scored, batch, args):
    """Eq. (7): L = L_real + L_syn^phi + lambda_scr * L_scr^phi  (--answer_loss two_way, the default)

    with L_real (Eq. 2), L_syn^phi (Eq. 5) and L_scr^phi (Eq. 6) each a mean over the micro-batch's
    triplets, all from the alignment logits a of micro_batch_pairs' Pairs (scored). Eqs. (5)-(6) are
    written for one twin t (its V^s, the shared V^r, w = phi); a triplet without a twin has w = 0, so
    its synthetic terms are exactly 0; one with k twins (Table 5's "ALL") takes the mean of its k
    twins' terms (pairs.twin_shares, the one place that handles k). Plus l_nle, VideoCon's
    explanation task (not part of Eq. 7), which the released recipe adds to the loss. Returns {TERMS:
    0-dim tensors}. --answer_loss vocab: released_loss.released_objective instead."""
    zero = torch.zeros((), device=scored[0][2].device)  # a term with nothing to average
    a, w, k = pairs.triplet_logits(scored, batch, zero)  # a[name]: (b,) over the b triplets ({} if b = 0); w: (J, b)
    # Table 5's "ALL", its one place: twin slot j as one twin t, weighted phi_j / k (k twins: their mean)
    twins = pairs.twin_views(a, pairs.twin_shares(w, k))  # one twin (k <= 1): t.w = phi; none: []
    # ---- §3 Eq. (2): on V^r, its caption t^r (Yes) against the LLM-written negative t^s (No) ----
    l_real = common.loss_real(a["rr"], a["rs"]) if a else zero
    # ---- §5 Eq. (5): on V^s = G(t^s), t^s (Yes) against t^r (No), each triplet weighted by w = phi ----
    l_syn = pairs.over_twins([common.loss_syn(t.ss, t.sr, t.w) for t in twins], zero) if args.use_syn else zero
    # ---- §5 Eq. (6): f(V^z, t^z) > f(V^z, t') > f(V^z, t^zbar) by the margin gamma, on both videos ----
    l_scr = (pairs.over_twins([common.loss_scr(*pairs.scr_logits(t), t.w, args.gamma) for t in twins], zero)
             if args.use_syn and args.use_scr else zero)  # scr_logits(t): (own t^z, shared t', other t^zbar)
    # ---- not Eq. (7): VideoCon's explanation task, the mean cross-entropy of the explanations' tokens ----
    explained = [tokens for _, name, _, tokens in scored if name == "nle" and tokens]  # [(logits, targets)]
    l_nle = zero
    if explained:
        l_nle = F.cross_entropy(torch.cat([x for x, _ in explained]), torch.cat([y for _, y in explained]))
    # ---- §5 Eq. (7), plus the explanations' loss as the released recipe adds it ----
    loss = common.total_loss(l_real, l_syn, l_scr, args.lambda_scr) + l_nle
    return dict(zip(TERMS, (loss, l_real, l_syn, l_scr, l_nle)))


# =================================================================================================
# Training: §6's LoRA fine-tuning with §5's Eq. (7), under torchrun or in one process
# =================================================================================================
def main(args):
    from peft import LoraConfig, get_peft_model  # heavy imports, loaded only to train

    dist = runs.setup_distributed(timeout=args.dist_timeout)  # torchrun's ranks, any nodes; or one process
    cuda = dist.device.startswith("cuda")
    # ---- §6 data: the triplets with their twins and weights, and the explanations, in global batches ----
    items, skipped = triplets.load_triplets(args)  # every flag and input is checked before out_dir is touched
    explanations, skipped_nle = triplets.load_explanations(args)
    items, skipped = items + explanations, skipped + skipped_nle
    training.micro_batch_plan(items, args, dist)  # --batch_size's arithmetic, refused now, not after the model loads
    checkpoints.check_out_dir(args)  # an earlier run's folder: only with --resume

    # ---- §6 model: the video LLM f(V, t), frozen, plus LoRA on its language model; AdamW, cosine decay ----
    runs.seed_everything(args.seed)  # the same LoRA initialisation on every rank
    dtype = torch.bfloat16 if cuda and args.bf16 else torch.float32
    model, processor = video_llm.load_video_llm(args.model, dtype=dtype, device=dist.device)
    items, skipped = pairs.drop_long_prompts(model, processor, items, skipped, args)  # past the LLM's positions
    plan, accum, total = training.micro_batch_plan(items, args, dist)  # the same global batches for any process count
    stop = min(total, args.max_steps) if args.max_steps else total  # --max_steps: as if killed there
    settings = checkpoints.checkpoint_settings(args, items)
    training.print_data(items, skipped, total, accum, args, dist)
    model.config.use_cache = model.config.get_text_config().use_cache = False  # training keeps no KV cache
    if args.gradient_checkpointing:  # non-reentrant; it also makes the input embeddings require grad
        model.activation_checkpointing_enable()
    with warnings.catch_warnings():  # peft 0.21 reads the deprecated `is_gradient_checkpointing` itself:
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)  # not ours
        model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                                                 target_modules=LORA_TARGETS)).train()  # freezes every other weight
    params = [p for p in model.parameters() if p.requires_grad]  # the LoRA weights, all that trains
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = training.lr_schedule(optimizer, args, total)  # warm-up, then cosine (or linear) decay to 0
    start = checkpoints.load_checkpoint(args, settings, model, optimizer, scheduler, dist) if args.resume else 0
    checkpoints.start_out_dir(args, skipped, start, dist)
    # `model` is the PeftModel that is saved; forward and backward go through `ddp_model`: under torchrun
    # a DDP wrapper of it, which averages the LoRA gradients over the processes; in one process, `model`
    ddp_model = DistributedDataParallel(model, device_ids=[dist.local_rank] if cuda else None,
                                        forward_sync_buffers=False) if dist.world_size > 1 else model  # equal buffers

    # ---- §5 Eq. (7): one optimizer step per global batch, accumulated over `accum` micro-batches ----
    loss_fn = released_loss.released_objective if args.answer_loss == "vocab" else objective  # Eq. (7) as written by default
    batches = iter(training.video_loader(items, plan, start, stop, accum, args, dist))
    for step in range(start, stop):
        t0, lr = time.time(), scheduler.get_last_lr()[0]
        sums = torch.zeros(len(TERMS), device=dist.device)  # each of TERMS, summed over the micro-steps
        for j in range(accum):  # Eq. (1) for every pair of the micro-batch, then loss_fn, then backward
            sums += training.micro_step(micro_batch_pairs, loss_fn, ddp_model, processor, next(batches), step,
                                        j == accum - 1, accum, args, dist)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        training.log_step(TERMS, sums, step, lr, grad_norm, t0, accum, args, dist)
        if dist.master and (step + 1) % args.save_every == 0:
            checkpoints.save_checkpoint(args, step + 1, settings, model, optimizer, scheduler)

    checkpoints.save_adapter(args, model, dist)  # out_dir/adapter: PeftModel.from_pretrained(base, dir) loads it
    if dist.world_size > 1:
        torch.distributed.destroy_process_group()
    return model


if __name__ == "__main__":
    runs.run_stage(main, Args, resume_flag="--resume")  # a mistake: `error: ...`, exit 2; Ctrl-C: rerun with --resume
