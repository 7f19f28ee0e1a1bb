"""The four stages chained at toy size through one folder, as a user runs them:
01_generate.py -> 02_weight.py -> 03_train.py -> 04_eval.py, each through main(args)."""
import importlib
import json

import tiny
import tiny_generate
import tiny_weight
from synvita import disk, video_io

generate, weight, train, evaluate = (importlib.import_module(m) for m in
                                     ("01_generate", "02_weight", "03_train", "04_eval"))


def test_the_four_stages_chain_through_one_folder(tmp_path, video_llava_dir):
    # a VideoCon-layout CSV over four real clips (a square moving left or right)
    videos = tmp_path / "videos"
    rows = []
    for k, (colour, rgb) in enumerate([("red", (255, 0, 0)), ("blue", (0, 0, 255))] * 2):
        direction = 1 if k < 2 else -1
        side, other = ("right", "left") if direction > 0 else ("left", "right")
        video_io.write_video(str(videos / f"real_{k}.mp4"), tiny.moving_square(color=rgb, direction=direction, seed=k))
        rows.append(dict(videopath=f"real_{k}.mp4", caption=f"a {colour} square moves to the {side}",
                         neg_caption=f"a {colour} square moves to the {other}", misalignment="action", split="train"))
    disk.write_csv(str(tmp_path / "videocon.csv"), rows)

    # §4: one synthetic video per negative caption
    pipe = tiny_generate.tiny_cogvideox(str(tmp_path / "tiny-cogvideox"))
    gen_dir = tmp_path / "gen"
    generate.main(generate.Args(input_csv=str(tmp_path / "videocon.csv"), out_dir=str(gen_dir), pipeline=pipe,
                                height=32, width=64, num_frames=9, num_inference_steps=2))
    generated = disk.read_csv(str(gen_dir / "generated.csv"), required=["syn_video", "seed"])
    assert len(generated) == 4 and all((gen_dir / r["syn_video"]).exists() for r in generated)

    # §4 Fig. 2, §5 Eq. (4): VQAScores and the weights phi
    vqa = tiny_weight.tiny_llava(str(tmp_path / "tiny-llava"))
    weight.main(weight.Args(generated_csv=str(gen_dir / "generated.csv"), models=[vqa]))
    weighted = disk.read_csv(str(gen_dir / "weighted.csv"), required=["score_syn_target", "score_syn_real", "weight"])
    for r in weighted:  # the default weighting is Table 4's row 3, §6.2's for Video-LLaVA (issue 25)
        assert float(r["weight"]) == float(r["score_syn_target"]) * (1 - float(r["score_syn_real"]))

    # §5 Eq. (7): LoRA fine-tuning on the real triplets and their synthetic twins (4 triplets = 8 rows: 2 steps)
    train_dir = tmp_path / "train"
    train.main(train.Args(train_csv=str(gen_dir / "weighted.csv"), video_root=str(videos), out_dir=str(train_dir),
                          model=video_llava_dir, batch_size=4, micro_batch_size=2, warmup_steps=0, lr=1e-3,
                          num_workers=0, weighting="fixed"))  # fixed: a random VQA model may give every row phi = 0
    log = [json.loads(line) for line in open(train_dir / "log.jsonl")]
    assert len(log) == 2 and all(entry["l_syn"] > 0 for entry in log)

    # §6: evaluate base and fine-tuned model on an entailment set; the adapter changes the scores
    test_csv = tmp_path / "test.csv"
    disk.write_csv(str(test_csv), [{k: r[k] for k in ("videopath", "caption", "neg_caption")} for r in rows])
    results = {}
    for name, adapter in (("base", ""), ("tuned", str(train_dir / "adapter"))):
        evaluate.main(evaluate.Args(model=video_llava_dir, adapter=adapter, videocon_llm=str(test_csv),
                                    video_root=str(videos), out_dir=str(tmp_path / f"eval_{name}")))
        results[name] = json.load(open(tmp_path / f"eval_{name}" / "results.json"))
        scores = disk.read_csv(str(tmp_path / f"eval_{name}" / "videocon_llm_scores.csv"), required=["score"])
        results[name]["scores"] = [float(s["score"]) for s in scores]
    assert len(results["base"]["scores"]) == 8  # 4 videos x (caption, negative)
    for name in results:
        llm = results[name]["results"]["videocon_llm"]
        assert llm["items"] == 8 and 0 <= llm["auc"] <= 100
    assert results["base"]["scores"] != results["tuned"]["scores"]
