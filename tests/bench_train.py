"""Benchmark (not a test; pytest does not collect it): one training micro-step of 03_train.py, where
the six scores of every triplet come from ONE shared_prefix.answer_states call (03's micro_batch_pairs) (each video decoded, vision-encoded
and its prompt prefix run once, the six caption suffixes packed after the prefixes, the LM head on the
answer positions only), against the released code's per-sequence way, where every (video, caption)
pair is an independent full pass whose inputs the processor builds (the video decoded again, the
vision tower run again, logits over the whole vocabulary at every position). Both feed the same
Eq. (7) (03_train.objective) and backward, with activation checkpointing.

    OMP_NUM_THREADS=1 python tests/bench_train.py            # the tiny random Video-LLaVA, b = 8 triplets
    python tests/bench_train.py --model DIR --micro_batch_size 4 --repeats 5

Each variant runs twice, each time in a fresh subprocess: time, the median of --repeats steps after a
first (warm-up) one, as wall time and as the process's CPU time (user + system): the two variants run
one after the other, so on a shared machine other processes' load changes the wall time of one and
not the other (4.0-7.3x over 9 runs at load 1-8 on 2026-12-06), while the CPU time moves much less;
the header gives the CPU, ATen's vector kernels (ATEN_CPU_CAPABILITY) and the load average. Peak
memory: the most over those steps of what a step needed above what was in use before it: on GPU
torch.cuda.max_memory_allocated minus memory_allocated; on CPU the peak resident set VmHWM
(reset by writing 5 to /proc/self/clear_refs before the step) minus the resident set VmRSS (after gc
and malloc_trim), in a run with glibc's mmap threshold fixed at 128 KiB (MALLOC_MMAP_THRESHOLD_; both
variants alike). Otherwise glibc raises the threshold after the first large free, freed MiB-sized
tensors stay in the heap, counted as resident, and VmHWM measures the allocator's history more than
live tensors. (The fixed threshold makes steps slower: mmap and page faults for every large tensor;
hence two runs.)
The losses must agree to 1e-5 and the LoRA gradients to 1e-5 (no LoRA dropout here, so both see the
same function). The last line: `ratios per-sequence / ours: time <X>x (CPU time <Z>x), peak memory <Y>x`.
"""
import argparse
import gc
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]
common, tiny, tiny_train, triplets, training, video_io, video_llm = map(importlib.import_module, (
    "common", "tiny", "tiny_train", "synvita.triplets", "synvita.training", "synvita.video_io",
    "synvita.video_llm"))  # through the path above

spec = importlib.util.spec_from_file_location("train", os.path.join(ROOT, "03_train.py"))
train = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train)


def per_sequence_logits(model, processor, batch, args):
    """The released code's way: every pair its own full pass, inputs built by the processor, the
    video read again for every pair; t' by zeroing the attention of the hidden caption tokens."""
    hf = video_llm.unwrap(model)
    out = {k: [] for k in ("rr", "rs", "ss", "sr", "r'", "s'")}
    for r in batch:
        for name, video, text, other in (("rr", "real", "caption", "neg"), ("rs", "real", "neg", "caption"),
                                         ("ss", "syn", "neg", "caption"), ("sr", "syn", "caption", "neg"),
                                         ("r'", "real", "caption", "neg"), ("s'", "syn", "neg", "caption")):
            frames = video_io.read_video(r[video], args.num_frames, args.frame_sampling)
            prompt, start = common.entailment_prompt(processor, hf.config.model_type, r[text])
            inputs = processor(text=prompt, videos=[frames], return_tensors="pt").to(hf.device)
            if name.endswith("'"):  # hide the words outside LCS(t^r, t^s) after the video tokens
                enc = processor.tokenizer(prompt, return_offsets_mapping=True)
                after = len(enc["input_ids"]) - 1 - enc["input_ids"].index(hf.config.video_token_id)
                first = inputs["input_ids"].shape[1] - after
                spans = [(s + start, e + start) for s, e in common.hidden_word_spans(r[text], r[other])]
                visible = common.token_visibility(enc["offset_mapping"][-after:], spans)
                inputs["attention_mask"][0, first:] *= torch.tensor(visible, device=hf.device)
            logits = model(**inputs).logits[0, -1].float()  # every position, the whole vocabulary
            yes, no = common.answer_token_ids(processor.tokenizer, prompt)
            out[name].append(logits[yes] - logits[no])
    return [(k, name, a[k], None) for name, a in out.items() for k in range(len(batch))]  # as micro_batch_pairs


def step(variant, model, processor, rows, args):
    """One micro-step: decode, score, Eq. (7), backward. Returns the loss."""
    if variant == "ours":
        pairs = train.micro_batch_pairs(model, processor, *training.load_videos(rows, args), args)
    else:
        pairs = per_sequence_logits(model, processor, rows, args)
    loss = train.objective(pairs, rows, args)["loss"]
    loss.backward()
    return loss.item()


def status_kb(field):
    """A memory figure of this process from /proc/self/status, in bytes."""
    with open("/proc/self/status") as fh:
        return int(re.search(rf"{field}:\s+(\d+) kB", fh.read()).group(1)) * 1024


def cpu_model():
    """The CPU's model name (/proc/cpuinfo), for comparing runs across machines."""
    try:
        with open("/proc/cpuinfo") as fh:
            return re.search(r"model name\s*:\s*(.*)", fh.read()).group(1).strip()
    except (OSError, AttributeError):  # not Linux, or no model name (some ARM kernels)
        return "CPU model unknown"


def child(opts):
    """Run one variant; print a JSON line, save the LoRA gradients for the parent to compare."""
    import ctypes
    from peft import LoraConfig, get_peft_model
    torch.set_num_threads(opts.threads)
    args = train.Args(train_csv=opts.csv, video_root=opts.video_root, lora_dropout=0.0)
    rows = triplets.load_triplets(args)[0][: opts.micro_batch_size]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model, processor = video_llm.load_video_llm(opts.model, device=device)
    model.activation_checkpointing_enable()
    model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                                             target_modules=train.LORA_TARGETS)).train()
    t0 = time.perf_counter()
    loss = step(opts.variant, model, processor, rows, args)  # the first step also warms up lazy inits
    first = time.perf_counter() - t0
    grads = {n: p.grad.detach().cpu().clone() for n, p in model.named_parameters() if p.grad is not None}
    torch.save(grads, opts.grads)
    times, cpu, peak = [], [], 0
    for _ in range(opts.repeats):
        model.zero_grad(set_to_none=True)
        gc.collect()
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed memory back, so RSS is what is in use
            base = status_kb("VmRSS")
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # reset the peak resident set (VmHWM) to the current one (Linux >= 4.0)
        t0, c0 = time.perf_counter(), time.process_time()
        step(opts.variant, model, processor, rows, args)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)  # this process's CPU time: what other processes' load moves least
        peak = max(peak, torch.cuda.max_memory_allocated() - base if device == "cuda" else status_kb("VmHWM") - base)
    print(json.dumps(dict(variant=opts.variant, loss=loss, first_s=first, median_s=statistics.median(times),
                          times=times, cpu_s=statistics.median(cpu), peak_bytes=peak, device=device)))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="", help="a video LLM dir or hub id (default: build the tiny one)")
    p.add_argument("--micro_batch_size", type=int, default=8, help="triplets b per micro-step (2b released rows, 6b scores)")
    p.add_argument("--repeats", type=int, default=5, help="timed steps after the first")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (the same for both)")
    p.add_argument("--variant", default="", help=argparse.SUPPRESS)
    p.add_argument("--csv", default="", help=argparse.SUPPRESS)
    p.add_argument("--video_root", default="", help=argparse.SUPPRESS)
    p.add_argument("--grads", default="", help=argparse.SUPPRESS)
    opts = p.parse_args()
    if opts.variant:
        return child(opts)
    work = tempfile.mkdtemp(prefix="bench_train_")
    model = opts.model or tiny.tiny_video_llava(os.path.join(work, "tiny-video-llava"))
    csv, video_root = tiny_train.write_toy_set(work, n=max(opts.micro_batch_size, 1))
    res, load = {}, os.getloadavg()[0]
    for variant in ("ours", "per_sequence"):
        grads = os.path.join(work, f"{variant}.pt")
        cmd = [sys.executable, __file__, "--variant", variant, "--model", model, "--csv", csv, "--video_root",
               video_root, "--grads", grads] + sys.argv[1:]
        env = {**os.environ, "OMP_NUM_THREADS": str(opts.threads)}
        runs = [subprocess.run(cmd, capture_output=True, text=True, env=e)  # time; peak memory
                for e in (env, {**env, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)})]
        if any(done.returncode for done in runs):
            sys.exit("\n".join(done.stderr[-3000:] for done in runs))
        timed, measured = (json.loads(done.stdout.strip().splitlines()[-1]) for done in runs)
        res[variant] = {**timed, "peak_bytes": measured["peak_bytes"], "grads": torch.load(grads)}
    ours, ref = res["ours"], res["per_sequence"]
    grad_diff = max((ours["grads"][k] - ref["grads"][k]).abs().max().item() for k in ref["grads"])
    print(f"b = {opts.micro_batch_size} triplets = {6 * opts.micro_batch_size} scores, device {ours['device']}, "
          f"{cpu_model()}, ATen {torch.backends.cpu.get_cpu_capability()}, {opts.threads} thread(s), "
          f"load average {load:.1f} -> {os.getloadavg()[0]:.1f}")
    print(f"loss: one call {ours['loss']:.8f}, per sequence {ref['loss']:.8f}, |diff| {abs(ours['loss'] - ref['loss']):.2e}")
    print(f"LoRA gradients: max |diff| {grad_diff:.2e} over {len(ref['grads'])} tensors")
    for k in ("ours", "per_sequence"):
        r = res[k]
        print(f"{k:>13}: step {r['median_s']:.3f} s (median of {[round(t, 3) for t in r['times']]}), "
              f"CPU {r['cpu_s']:.3f} s, first {r['first_s']:.3f} s, peak +{r['peak_bytes'] / 2**20:.1f} MiB")
    assert abs(ours["loss"] - ref["loss"]) < 1e-5 and grad_diff < 1e-5, "the two ways disagree"
    print(f"ratios per-sequence / ours: time {ref['median_s'] / ours['median_s']:.1f}x "
          f"(CPU time {ref['cpu_s'] / ours['cpu_s']:.1f}x), peak memory {ref['peak_bytes'] / max(ours['peak_bytes'], 1):.2f}x")


if __name__ == "__main__":
    main()
