"""Mean reward on the synthetic temporal-grounding task across GRPO steps, over several seeds.

Drives ``megavrl train`` as subprocesses, as examples/demo.sh does, on the demo's task: a tiny
random Qwen2.5-VL (``megavrl make-tiny-model``), the demo's synthetic grounding videos (one
frame-filling event per 8 s video, 504 training rows), the demo's SFT warm start (600 steps,
exported to HF format; all three from bench/cli_runs.py's cache, shared with
bench_data_efficiency), then one GRPO run per seed from the SFT model with the demo's GRPO
settings (examples/configs/tiny_cpu_tvg.yaml: vLLM rollouts, dual reward: format + temporal IoU,
KL to the reference; no evaluation runs). Each run's ``tensorboard/metrics.jsonl`` gives
``reward/total`` (the mean over the step's n rollouts of each prompt, before that step's update)
and its components ``reward/tvg/format`` and ``reward/tvg/iou``.

The blind baseline is drawn beside the curve: the training reward of the best constant answer on
the training rows (well formed, format 1, plus the IoU of the span of best mIoU over those rows,
``megavrl.eval.blind``). A mean reward at or below it is reached without looking at the video.

Writes (--full: reward_curve_full.*)
  bench/results/reward_curve.csv   seed, step, reward (+ iou, format, parse_fail_rate)
  bench/results/reward_curve.png   mean over seeds per step, min-max band, each seed thin, the
                                   blind baseline dashed; IoU below
  bench/results/reward_curve.json  value = mean reward of the last ``--last`` steps (all seeds),
                                   baseline = mean reward at step 1 (ratio = improvement factor);
                                   a second figure compares it with the blind baseline; if the
                                   step-1 reward is 0 the ratio is undefined (written as Infinity)
                                   and notes.gain holds the additive improvement.

Modes
  --quick (default): 2 seeds x 10 GRPO steps from one shared SFT warm start: about 2 minutes on
                     one CPU core with the warm start cached (building it takes 11 more).
  --full:            3 seeds x the demo's 24 GRPO steps, an SFT warm start per seed (so the
                     spread includes the warm start): about 39 minutes on one CPU core (each
                     seed 11 min of SFT and 2 of GRPO).
  The GRPO learning rate, n and prompts per step default to the demo's. Any setting can be
  overridden (--seeds, --steps, --sft-steps, --lr, --n, ...); extra ``key=value`` arguments after
  ``--`` go to every GRPO run. Each GRPO seed also sets data.seed (its own prompt order).

What was found on the earlier synthetic tasks (until 2026-11-22: 64 videos, small shapes, events
near the middle, 80 SFT steps at lr 1e-3; the SFT model answered one span for every video):
- after 40 SFT steps only ~12% of the *sampled* responses (temperature 1) were well-formed, and
  GRPO at lr 1e-4 drifted (entropy rose, the reward fell to the format floor); after 80 about
  half were, and the reward rose within 10 GRPO steps: it learned the format, and the constant
  span that suits the most videos;
- the reward of one step is a mean over its prompts' samples: expect +-0.2 step to step, and
  steps whose prompts are hard pull every seed down when the seeds share a prompt order.

On the demo's tasks (2026-12-01, 600-step warm start, --full): the reward starts at 1.81, far above
the blind baseline (1.12), and stays flat (1.70 over the last 5 steps, within the step-to-step
noise); half or more of the groups of 4 score alike, and the share of unparsable samples creeps from
about 1% to 4-7% by the last steps (the README's Benchmarks section has the figures).

Usage: python -m bench.bench_reward_curve [--quick | --full] [--seeds 2] [--steps 10] [-- key=value ...]
"""
from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import time
from dataclasses import replace
from pathlib import Path

from bench.cli_runs import ROOT, WarmStart, constant_answer_reward, demo_config, apply_mode, mode_parser, read_metrics, train, warm_start
from bench.common import RESULTS, Figure, write_result

DEMO = demo_config()
MODES = {
    "quick": dict(seeds=2, steps=10, sft_per_seed=False, last=3),
    "full": dict(seeds=3, steps=DEMO.trainer.total_steps, sft_per_seed=True, last=5),
}


def blind_reward(data: Path) -> dict:
    """The training reward of the best constant answer on data/train.jsonl: a well-formed answer
    (format reward 1) naming the span of best mIoU over those rows (``megavrl.eval.blind``), with
    the reward weights of examples/configs/tiny_cpu_tvg.yaml. A policy whose mean reward is at or
    below it has learned the format, not the video."""
    from megavrl.eval.blind import blind_baseline

    rows = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines() if line.strip()]
    blind = blind_baseline("tvg", [{"ground_truth": row} for row in rows if row.get("task") == "tvg"])
    iou = blind["blind_baseline"]["mIoU"] / 100
    return {"reward": constant_answer_reward(iou), "iou": iou, "answer": blind["blind_answer"]}


def read_rewards(metrics: Path) -> list[dict]:
    return [{"step": rec["step"], "reward": rec["reward/total"], "iou": rec.get("reward/tvg/iou"),
             "format": rec.get("reward/tvg/format"), "parse_fail_rate": rec.get("reward/parse_fail_rate")}
            for rec in read_metrics(metrics) if "reward/total" in rec]


def plot(curves: dict[int, list[dict]], path: Path, title: str, blind: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted({r["step"] for rows in curves.values() for r in rows})
    fig, axes = plt.subplots(2, 1, figsize=(7, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    for ax, key, label in ((axes[0], "reward", "reward/total (format + IoU)"), (axes[1], "iou", "reward/tvg/iou")):
        per_step = [[r[key] for rows in curves.values() for r in rows if r["step"] == s and r[key] is not None]
                    for s in steps]
        mean = [statistics.fmean(v) for v in per_step]
        ax.fill_between(steps, [min(v) for v in per_step], [max(v) for v in per_step], alpha=0.25,
                        label="min-max over seeds")
        for seed, rows in curves.items():
            ax.plot([r["step"] for r in rows], [r[key] for r in rows], lw=0.8, alpha=0.5, label=f"seed {seed}")
        ax.plot(steps, mean, lw=2.2, color="black", label=f"mean over {len(curves)} seeds")
        if blind is not None:
            ax.axhline(blind[key], color="tab:red", linestyle="--", linewidth=1,
                       label=f"blind: the constant answer {blind['answer']}")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    axes[0].set_title(title, fontsize=10)
    axes[1].set_xlabel("GRPO step (reward of the step's rollouts, before its update)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    ap = mode_parser(__doc__)
    ap.add_argument("--seeds", type=int, help="number of seeds (1, 2, ...)")
    ap.add_argument("--steps", type=int, help="GRPO steps per seed")
    ap.add_argument("--sft-steps", type=int, default=WarmStart.sft_steps,
                    help="SFT warm-start steps (0: GRPO from the random model)")
    ap.add_argument("--sft-per-seed", action=argparse.BooleanOptionalAction, default=None,
                    help="one SFT warm start per seed (default: --full yes, --quick no)")
    ap.add_argument("--last", type=int, help="the figure's value is the mean reward of the last N steps")
    ap.add_argument("--sft-lr", type=float, default=WarmStart.sft_lr)
    ap.add_argument("--lr", type=float, default=DEMO.optimizer.lr, help="GRPO learning rate (default: the demo's)")
    ap.add_argument("--n", type=int, default=DEMO.rollout.n, help="rollouts per prompt (default: the demo's)")
    ap.add_argument("--prompts-per-step", type=int, default=DEMO.trainer.prompts_per_step)
    ap.add_argument("--videos", type=int, default=WarmStart.videos,
                    help="synthetic videos (one grounding row each; an eighth go to val.jsonl)")
    ap.add_argument("--tp", type=int, default=1, help="Megatron TP (1 is the fastest for the tiny model on 2 cores)")
    ap.add_argument("--workdir", type=Path, default=ROOT / "runs" / "bench_reward_curve",
                    help="GRPO runs and their logs (emptied first; the warm start is cached in runs/bench_cache)")
    ap.add_argument("extra", nargs="*", metavar="key=value", help="after --: overrides for every GRPO run")
    args = ap.parse_args(argv)
    apply_mode(args, MODES)
    seeds = list(range(1, args.seeds + 1))
    t_start = time.time()
    work = args.workdir.resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    print(f"[reward_curve] {args.mode}: {len(seeds)} seeds x {args.steps} GRPO steps, "
          f"{args.sft_steps} SFT steps{' per seed' if args.sft_per_seed else ''}, work dir {work}", flush=True)
    common = [f"parallel.tp={args.tp}"]
    # data.seed: each seed also draws its own prompt order, so that the mean over seeds averages
    # out how hard the prompts of a step happen to be (with one order, every seed dips together).
    grpo = [f"trainer.total_steps={args.steps}", f"optimizer.lr={args.lr}", f"rollout.n={args.n}",
            f"trainer.prompts_per_step={args.prompts_per_step}",
            "checkpoint.export_hf_at_end=false", *args.extra]
    shared = WarmStart(videos=args.videos, sft_steps=args.sft_steps, sft_lr=args.sft_lr, tp=args.tp)

    def start_of(seed: int) -> tuple[Path, Path]:
        """(the GRPO run's initial HF model, its data directory)."""
        warm = warm_start(replace(shared, sft_seed=seed) if args.sft_per_seed else shared)
        return warm.sft_hf, warm.data

    curves: dict[int, list[dict]] = {}
    blind = None
    for seed in seeds:
        hf_dir, data = start_of(seed)
        blind = blind or blind_reward(data)
        curves[seed] = read_rewards(train(work, f"grpo_seed{seed}", hf_dir, data,
                                          [*common, *grpo, f"trainer.seed={seed}", f"data.seed={seed}"]))
        rs = curves[seed]
        print(f"  seed {seed}: reward step 1 {rs[0]['reward']:.3f} -> step {rs[-1]['step']} {rs[-1]['reward']:.3f}",
              flush=True)

    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "reward_curve" if args.mode == "quick" else f"reward_curve_{args.mode}"
    with open(RESULTS / f"{stem}.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["seed", "step", "reward", "iou", "format", "parse_fail_rate"])
        for seed, rows in curves.items():
            for r in rows:
                writer.writerow([seed, r["step"], r["reward"], r["iou"], r["format"], r["parse_fail_rate"]])

    steps = sorted({r["step"] for rows in curves.values() for r in rows})
    mean_at = {s: statistics.fmean(r["reward"] for rows in curves.values() for r in rows if r["step"] == s)
               for s in steps}
    last_steps = steps[-args.last:]
    first = mean_at[steps[0]]
    last = statistics.fmean(mean_at[s] for s in last_steps)
    n = len(steps)
    xbar, ybar = statistics.fmean(steps), statistics.fmean(mean_at.values())
    slope = sum((s - xbar) * (mean_at[s] - ybar) for s in steps) / max(1e-12, sum((s - xbar) ** 2 for s in steps))
    per_seed_gain = {seed: statistics.fmean(r["reward"] for r in rows if r["step"] in last_steps) - rows[0]["reward"]
                     for seed, rows in curves.items()}
    rises = last > first and slope > 0
    title = (f"GRPO on synthetic temporal grounding (tiny Qwen2.5-VL, CPU)\n{len(seeds)} seeds, n={args.n}, "
             f"{args.prompts_per_step} prompts/step, lr {args.lr:g}, after {args.sft_steps} SFT steps")
    plot(curves, RESULTS / f"{stem}.png", title, blind)
    notes = {"gain": last - first, "slope_per_step": slope, "first_steps_mean": statistics.fmean(
        mean_at[s] for s in steps[:args.last]), "per_seed_gain": per_seed_gain, "rises": rises,
        "mean_reward_per_step": mean_at, "steps": n, "seeds": seeds,
        "iou_last": statistics.fmean(r["iou"] for rows in curves.values() for r in rows if r["step"] in last_steps),
        "iou_step1": statistics.fmean(rows[0]["iou"] for rows in curves.values()),
        "blind": blind, "csv": f"bench/results/{stem}.csv", "png": f"bench/results/{stem}.png",
        "wall_s": round(time.time() - t_start)}
    if first > 0:
        figure = Figure(f"mean reward, last {len(last_steps)} GRPO steps", last, first, "reward",
                        baseline_name="mean reward at step 1", notes=notes)
    else:
        figure = Figure(f"mean reward, last {len(last_steps)} GRPO steps (step-1 reward 0: ratio undefined, "
                        "additive gain in notes.gain)", last, first, "reward",
                        baseline_name="mean reward at step 1", notes=notes)
    over_blind = Figure(f"mean reward, last {len(last_steps)} GRPO steps, vs the blind baseline", last,
                        blind["reward"], "reward", baseline_name=f"the constant answer {blind['answer']}")
    write_result(stem, [figure, over_blind], config={k: (str(v) if isinstance(v, Path) else v)
                                                   for k, v in vars(args).items()})
    print(f"[reward_curve] {'rises' if rises else 'does NOT rise'}: step 1 {first:.3f} -> last {len(last_steps)} "
          f"steps {last:.3f} (slope {slope:+.4f}/step; blind baseline {blind['reward']:.3f}); {time.time() - t_start:.0f} s; "
          f"curve in {RESULTS / f'{stem}.png'}", flush=True)


if __name__ == "__main__":
    main()
