"""Data efficiency: GRPO on the full dataset, a random subset, and the variance-selected subset.

The paper's claim in small (Li et al., 2025, variance-aware data selection): rows on which k
repeated rollouts of the current policy all score alike give GRPO zero advantages, hence no
gradient; keeping the rows whose rewards vary most trains as well as the full dataset, and better
than a random subset of the same size.

Steps (each a ``megavrl`` subprocess; see bench/cli_runs.py):
  1. warm start, cached and shared with bench_reward_curve: the demo's (examples/demo.sh) tiny
     random Qwen2.5-VL, synthetic grounding videos (504 rows in train.jsonl, 72 in val.jsonl for
     evaluation; one frame-filling event per video) and 600 SFT steps exported to HF;
  2. ``megavrl select`` with the SFT model: k rollouts per training row (temperature 1), keep the
     ``--top-fraction`` of rows with the highest reward variance (rows whose k rewards are all
     equal are dropped first) -> the selected subset, M rows;
  3. a random subset of the same M rows (``--subset-seed``);
  4. one GRPO run per (subset, seed) from the SFT model, identical but for ``data.train``: same
     steps, prompts per step, learning rate, trainer seed and data seed; greedy evaluation on
     val.jsonl before training, every ``--eval-every`` steps and at the end (``megavrl eval``'s
     lmms-eval mIoU, beside its blind baseline: the best constant span's mIoU on val.jsonl);
  5. the expected val reward of the SFT model and of each run's final model: ``--eval-k`` sampled
     responses (temperature 1) per val row, scored with the training reward (format + IoU), mean
     over rows (``megavrl select`` does the sampling and scoring). Greedy answers of a tiny model
     hardly move in a few GRPO steps (greedy mIoU over 16 rows changes one row at a time), while
     the policy's distribution does: this is the figure that sees it.
     Every model is sampled with the same seed (common random numbers): two policies that
     differ little draw the same responses, so a difference between subsets is the policies',
     not the draw's (two runs of --full, whose models differed, scored the very same 1.0479).

Writes (--full: data_efficiency_full.*)
  bench/results/data_efficiency.csv   subset, seed, step, train reward, within-group reward std,
                                      informative groups, eval mIoU and format rate (eval columns
                                      only at eval steps)
  bench/results/data_efficiency.png   (a) the headline, expected val reward per subset vs the SFT
                                      model; (b) greedy eval mIoU per eval step; (c) within-group
                                      reward std per step (seeds averaged, min-max band);
                                      ``--replot`` redraws it from the JSON
  bench/results/data_efficiency.json  figures:
    - expected val reward at the end, selected subset vs random subset of the same size (the
      paper's claim), and vs the full dataset (same quality from less data);
    - greedy eval mIoU at the end, selected vs random;
    - the mean within-group reward std of the training rollouts, selected vs random: the
      mechanism, measured on the training steps (GRPO learns from the differences between the n
      responses to one prompt; the selection keeps the prompts where they are largest);
    notes: per-run curves, the expected val reward of the SFT model and its IoU part, the share of informative groups (reward variance > 0) per subset, the
    selection summary, wall time.

With the grounding reward (format + continuous IoU) a row whose k rewards are all equal is rare
(none of the earlier tasks' 48 rows at k=4 after the warm start, 2026-11-21), so the selection acts through the
size of the spread, not by dropping dead rows; with a discrete reward (multiple choice) the
all-equal rows are common and the informative-group share is the figure to watch.

Modes
  --quick (default): 1 seed, 8 GRPO steps, k=4, the top half of the 504 training rows, greedy
                     evaluation on the 72 val rows at steps 0, 4 and 8, expected val reward from 8
                     samples per val row: about 7 minutes on one CPU core with the warm start
                     cached (building it takes 11 more). One seed: a smoke test of the pipeline
                     and a first look; use --full for the claim.
  --full:            3 seeds, 20 GRPO steps, k=8, eval every 5 steps; figures are means over
                     seeds: about 39 minutes on one CPU core, the warm start included.
  The GRPO learning rate, n and prompts per step default to the demo's
  (examples/configs/tiny_cpu_tvg.yaml). Every setting can be overridden (--seeds, --steps, --k,
  --top-fraction, --lr, ...); extra ``key=value`` arguments after ``--`` go to every GRPO run.

Usage: python -m bench.bench_data_efficiency [--quick | --full] [--seeds N] [--steps N] [-- key=value ...]
"""
from __future__ import annotations

import csv
import json
import random
import shutil
import statistics
import time
from pathlib import Path

from bench.cli_runs import (CONFIG, ROOT, WarmStart, apply_mode, constant_answer_reward, dataset_override,
                            demo_config, megavrl, mode_parser, read_metrics, train, warm_start)
from bench.common import RESULTS, Figure, write_result

DEMO = demo_config()
MODES = {
    "quick": dict(seeds=1, steps=8, eval_every=4, k=4),
    "full": dict(seeds=3, steps=20, eval_every=5, k=8),
}
SUBSETS = ("selected", "random", "full")
EVAL_KEY = "eval/synth_val/tvg/mIoU"
FORMAT_KEY = "eval/synth_val/tvg/format_rate"
BLIND_KEY = "eval/synth_val/tvg/blind/mIoU"


def select(out: Path, hf_dir: Path, jsonl: Path, data: Path, k: int, seed: int, top_fraction: float | None = None
           ) -> dict:
    """``megavrl select`` of ``hf_dir`` on ``jsonl`` (k sampled responses per row, temperature 1, scored
    with the training reward) into ``out``; returns its summary.json."""
    megavrl(["select", "--config", str(CONFIG), "--out", str(out), f"model.hf_dir={hf_dir}",
             dataset_override("data.train", jsonl, data, "rows"), "data.val=[]", f"selection.k={k}",
             f"selection.top_fraction={'null' if top_fraction is None else top_fraction}", f"selection.seed={seed}"],
            out.with_suffix(".log"))
    return json.loads((out / "summary.json").read_text())


def sampled_val_reward(out: Path, hf_dir: Path, data: Path, k: int, seed: int) -> dict:
    """The policy's expected reward on val.jsonl: the mean over val rows of the mean reward of k
    sampled responses (temperature 1), with its IoU component; ``megavrl select`` does the sampling
    and scoring (nothing is selected)."""
    summary = select(out, hf_dir, data / "val.jsonl", data, k, seed)
    stats = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines() if line.strip()]
    return {"reward": summary["mean_reward_before"],
            "iou": statistics.fmean(s["component_mean"].get("iou", 0.0) for s in stats)}


def random_subset(data: Path, size: int, seed: int, out: Path) -> Path:
    """``size`` rows of data/train.jsonl drawn without replacement, in file order."""
    lines = [line for line in (data / "train.jsonl").read_text().splitlines() if line.strip()]
    keep = sorted(random.Random(seed).sample(range(len(lines)), size))
    out.write_text("".join(lines[i] + "\n" for i in keep))
    return out


def curves_of(metrics: Path) -> dict:
    """Per training step: reward, within-group reward std, zero-variance groups; per eval step: mIoU, format rate."""
    train_rows, eval_rows = [], []
    for rec in read_metrics(metrics):
        if "reward/total" in rec:
            train_rows.append({"step": rec["step"], "reward": rec["reward/total"],
                               "group_std": rec["reward/group_std"],
                               "zero_variance_groups": rec["advantage/zero_variance_groups"]})
        if EVAL_KEY in rec:
            eval_rows.append({"step": rec["step"], "miou": rec[EVAL_KEY], "format_rate": rec.get(FORMAT_KEY),
                              "blind_miou": rec.get(BLIND_KEY)})
    return {"train": train_rows, "eval": eval_rows}


def informative_share(curve: dict, prompts_per_step: int) -> float:
    """Mean over training steps of the share of groups whose rewards vary."""
    return statistics.fmean(1.0 - r["zero_variance_groups"] / prompts_per_step for r in curve["train"])


def _mean_band(curves: list[list[dict]], key: str) -> tuple[list[int], list[float], list[float], list[float]]:
    """Steps present in every curve, and the mean, min and max of ``key`` over the curves."""
    steps = sorted(set.intersection(*(set(r["step"] for r in c) for c in curves))) if curves else []
    values = [[next(r[key] for r in c if r["step"] == step) for c in curves] for step in steps]
    return (steps, [statistics.fmean(v) for v in values], [min(v) for v in values], [max(v) for v in values])


def blind_of(runs: dict[tuple[str, int], dict]) -> dict | None:
    """The blind baseline on val.jsonl: the best constant span's mIoU (from the evaluations) and the
    expected reward of that answer, well formed (format 1 + IoU, the reward weights of
    examples/configs/tiny_cpu_tvg.yaml); None when no evaluation reported it."""
    values = {r["blind_miou"] for curve in runs.values() for r in curve["eval"] if r.get("blind_miou") is not None}
    if not values:
        return None
    miou = values.pop()
    return {"miou": miou, "reward": constant_answer_reward(miou / 100)}


def plot(runs: dict[tuple[str, int], dict], path: Path, title: str, start_val: dict | None,
         eval_k: int | None = None) -> None:
    """Three panels. (a) the headline: expected val reward of each subset's final model (bar: mean
    over seeds, dots: each seed) against the SFT model it started from (dashed line), on an axis
    from 0 to the largest possible reward (format 1 + IoU 1). (b) greedy eval mIoU per eval step and
    (c) the within-group reward std of the training rollouts: means over seeds, the band from the
    lowest to the highest seed, mIoU on its whole 0-100 scale, integer steps. (a) and (b) draw the
    blind baseline: what the best constant answer scores on the same val rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    colors = {"selected": "tab:green", "random": "tab:orange", "full": "tab:blue"}
    styles = {"selected": ("o", "-"), "random": ("s", "--"), "full": ("^", ":")}
    subsets = [s for s in SUBSETS if any(sub == s for sub, _ in runs)]
    seeds = sorted({seed for _, seed in runs})
    blind = blind_of(runs)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2), gridspec_kw={"width_ratios": [1, 1.3, 1.3]})
    ax = axes[0]
    for i, subset in enumerate(subsets):
        finals = [runs[subset, seed]["val"]["reward"] for seed in seeds if "val" in runs.get((subset, seed), {})]
        if not finals:
            continue
        ax.bar(i, statistics.fmean(finals), color=colors[subset], alpha=0.75, width=0.6)
        ax.scatter([i] * len(finals), finals, color="black", s=12, zorder=3,
                   label="one seed" if i == 0 and len(finals) > 1 else None)
        ax.text(i, statistics.fmean(finals) / 2, f"{statistics.fmean(finals):.3f}", ha="center", va="center",
                fontsize=9, color="white", fontweight="bold")
    if start_val:
        ax.axhline(start_val["reward"], color="black", linestyle="--", linewidth=1,
                   label=f"SFT model (start): {start_val['reward']:.3f}")
    if blind:
        ax.axhline(blind["reward"], color="tab:red", linestyle=":", linewidth=1.2,
                   label=f"blind (best constant answer): {blind['reward']:.3f}")
    ax.set_xticks(range(len(subsets)), subsets)
    ax.set_ylim(0, 2.0)
    ax.set_ylabel("expected val reward (format + IoU, max 2)")
    ax.set_title(f"(a) after GRPO: {eval_k or '?'} samples per val row", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    for ax, key, kind, label, top in ((axes[1], "miou", "eval", "greedy eval mIoU on val", 100.0),
                                      (axes[2], "group_std", "train", "within-group reward std\n(training rollouts)", None)):
        for subset in subsets:
            curves = [runs[subset, seed][kind] for seed in seeds if (subset, seed) in runs]
            steps, mean, low, high = _mean_band(curves, key)
            # Own marker and dash per subset: equal curves stay visible on top of each other.
            ax.plot(steps, mean, color=colors[subset], marker=styles[subset][0] if kind == "eval" else None,
                    linestyle=styles[subset][1], markersize=6 if subset == "selected" else 4, markerfacecolor="none",
                    label=f"{subset}" + (f" (mean of {len(curves)} seeds, band: min-max)" if len(curves) > 1 else ""))
            if len(curves) > 1:
                ax.fill_between(steps, low, high, color=colors[subset], alpha=0.15, linewidth=0)
        ax.set_ylim(0, top if top is not None else max(0.1, ax.get_ylim()[1]))
        if kind == "eval" and steps:
            ax.set_xticks(steps)  # the evaluated steps
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("GRPO step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if blind:
        axes[1].axhline(blind["miou"], color="tab:red", linestyle=":", linewidth=1.2,
                        label=f"blind (best constant answer): {blind['miou']:.1f}")
    axes[1].set_title("(b) greedy mIoU, whole 0-100 scale", fontsize=9)
    axes[2].set_title("(c) what GRPO learns from", fontsize=9)
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def replot(stem: str) -> Path:
    """Redraw ``bench/results/<stem>.png`` from ``<stem>.json`` (no run)."""
    import json

    result = json.loads((RESULTS / f"{stem}.json").read_text())
    notes = result["figures"][0]["notes"]
    config = result.get("config", {})
    runs = {}
    for name, curve in notes["curves"].items():
        subset, _, seed = name.rpartition("_seed")
        runs[subset, int(seed)] = curve
    path = RESULTS / f"{stem}.png"
    plot(runs, path, _title(len({s for _, s in runs}), config.get("steps"), notes.get("rows_subset"),
                            notes.get("rows_train"), config.get("k")),
         notes.get("expected_val_reward_before"), config.get("eval_k"))
    return path


def _title(n_seeds, steps, size, n_train, k) -> str:
    return (f"GRPO data efficiency, synthetic grounding (tiny Qwen2.5-VL, CPU): {n_seeds} seed(s), "
            f"{steps} steps, selected/random: {size} of {n_train} rows (k={k})")


def main(argv=None) -> None:
    ap = mode_parser(__doc__)
    ap.add_argument("--seeds", type=int, help="GRPO seeds per subset (trainer.seed and data.seed)")
    ap.add_argument("--steps", type=int, help="GRPO steps per run")
    ap.add_argument("--eval-every", type=int, help="steps between evaluations on val.jsonl")
    ap.add_argument("--k", type=int, help="rollouts per training row for the selection")
    ap.add_argument("--eval-k", type=int, default=8,
                    help="sampled responses per val row for the expected val reward (the headline figures)")
    ap.add_argument("--top-fraction", type=float, default=0.5,
                    help="share of the training rows the selection keeps (highest reward variance)")
    ap.add_argument("--subset-seed", type=int, default=0, help="the random subset's draw")
    ap.add_argument("--lr", type=float, default=DEMO.optimizer.lr, help="GRPO learning rate (default: the demo's)")
    ap.add_argument("--n", type=int, default=DEMO.rollout.n, help="rollouts per prompt in GRPO (default: the demo's)")
    ap.add_argument("--prompts-per-step", type=int, default=DEMO.trainer.prompts_per_step)
    ap.add_argument("--tp", type=int, default=1, help="Megatron TP (1 is the fastest for the tiny model on 2 cores)")
    ap.add_argument("--workdir", type=Path, default=ROOT / "runs" / "bench_data_efficiency",
                    help="selection, subsets, runs and logs (emptied first; the warm start is cached in "
                         "runs/bench_cache)")
    ap.add_argument("extra", nargs="*", metavar="key=value", help="after --: overrides for every GRPO run")
    ap.add_argument("--replot", action="store_true",
                    help="only redraw the PNG of this mode from its results JSON (no run)")
    args = ap.parse_args(argv)
    mode_name = args.mode
    if args.replot:
        print(f"[data_efficiency] redrew {replot('data_efficiency' if mode_name == 'quick' else f'data_efficiency_{mode_name}')}")
        return
    apply_mode(args, MODES)
    t_start = time.time()
    work = args.workdir.resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    seeds = list(range(1, args.seeds + 1))
    print(f"[data_efficiency] {mode_name}: subsets {', '.join(SUBSETS)} x {len(seeds)} seed(s) x {args.steps} "
          f"GRPO steps, selection k={args.k}, top {args.top_fraction:g}; work dir {work}", flush=True)

    warm = warm_start(WarmStart(tp=args.tp))
    summary = select(work / "select", warm.sft_hf, warm.data / "train.jsonl", warm.data, args.k, args.subset_seed,
                     args.top_fraction)
    start_val = sampled_val_reward(work / "val_sft", warm.sft_hf, warm.data, args.eval_k, seed=0)
    print(f"  expected val reward of the SFT model: {start_val['reward']:.3f} (IoU {start_val['iou']:.3f})",
          flush=True)
    selected = work / "select" / "selected.jsonl"
    size = sum(1 for line in selected.read_text().splitlines() if line.strip())
    n_train = sum(1 for line in (warm.data / "train.jsonl").read_text().splitlines() if line.strip())
    if size == 0:
        raise SystemExit(f"[data_efficiency] the selection kept no row (summary in {work / 'select'}): "
                         f"every row's {args.k} rewards were equal; lengthen the warm start or raise --k")
    subsets = {"selected": selected, "random": random_subset(warm.data, size, args.subset_seed, work / "random.jsonl"),
               "full": warm.data / "train.jsonl"}
    print(f"  selected {size} of {n_train} rows ({summary.get('n_all_same_dropped', 0)} had all-equal rewards); "
          f"random subset of {size}", flush=True)

    grpo = [f"parallel.tp={args.tp}", f"trainer.total_steps={args.steps}", f"trainer.eval_every={args.eval_every}",
            f"optimizer.lr={args.lr}", f"rollout.n={args.n}", f"trainer.prompts_per_step={args.prompts_per_step}",
            "eval.max_samples=null", "checkpoint.export_hf_at_end=true", *args.extra]
    runs: dict[tuple[str, int], dict] = {}
    for seed in seeds:
        for subset in SUBSETS:
            metrics = train(work, f"{subset}_seed{seed}", warm.sft_hf, warm.data,
                            [*grpo, f"trainer.seed={seed}", f"data.seed={seed}"], train_jsonl=subsets[subset],
                            val=True)
            runs[subset, seed] = curve = curves_of(metrics)
            curve["val"] = val = sampled_val_reward(work / f"val_{subset}_seed{seed}", metrics.parents[1] / "hf",
                                                    warm.data, args.eval_k, seed=0)
            ev = curve["eval"]
            print(f"  {subset} seed {seed}: expected val reward {start_val['reward']:.3f} -> {val['reward']:.3f}; "
                  f"greedy eval mIoU {ev[0]['miou']:.1f} -> {ev[-1]['miou']:.1f}; within-group "
                  f"reward std {statistics.fmean(r['group_std'] for r in curve['train']):.3f}, informative groups "
                  f"{informative_share(curve, args.prompts_per_step):.2f}", flush=True)

    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "data_efficiency" if mode_name == "quick" else f"data_efficiency_{mode_name}"
    with open(RESULTS / f"{stem}.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["subset", "seed", "step", "train_reward", "group_reward_std", "informative_groups",
                         "eval_miou", "eval_format_rate"])
        for (subset, seed), curve in runs.items():
            evals = {r["step"]: r for r in curve["eval"]}
            trains = {r["step"]: r for r in curve["train"]}
            for step in sorted(set(evals) | set(trains)):
                t, e = trains.get(step), evals.get(step)
                writer.writerow([subset, seed, step, t["reward"] if t else "", t["group_std"] if t else "",
                                 args.prompts_per_step - t["zero_variance_groups"] if t else "",
                                 e["miou"] if e else "", e["format_rate"] if e else ""])

    def final_miou(subset: str) -> float:
        return statistics.fmean(runs[subset, s]["eval"][-1]["miou"] for s in seeds)

    def val_reward(subset: str, key: str = "reward") -> float:
        return statistics.fmean(runs[subset, s]["val"][key] for s in seeds)

    def informative(subset: str) -> float:
        return statistics.fmean(informative_share(runs[subset, s], args.prompts_per_step) for s in seeds)

    def group_std(subset: str) -> float:
        return statistics.fmean(r["group_std"] for s in seeds for r in runs[subset, s]["train"])

    start_miou = statistics.fmean(runs["full", s]["eval"][0]["miou"] for s in seeds)
    blind = blind_of(runs)
    notes = {"rows_train": n_train, "rows_subset": size, "selection": {k: v for k, v in summary.items()
                                                                     if not isinstance(v, dict)},
             "expected_val_reward_before": start_val,
             "expected_val_reward_final": {s: val_reward(s) for s in SUBSETS},
             "expected_val_iou_final": {s: val_reward(s, "iou") for s in SUBSETS},
             "eval_miou_before": start_miou,
             "eval_miou_final": {s: final_miou(s) for s in SUBSETS},
             "blind_val": blind,
             "informative_groups": {s: informative(s) for s in SUBSETS},
             "group_reward_std": {s: group_std(s) for s in SUBSETS},
             "curves": {f"{subset}_seed{seed}": curve for (subset, seed), curve in runs.items()},
             "csv": f"bench/results/{stem}.csv", "png": f"bench/results/{stem}.png",
             "wall_s": round(time.time() - t_start)}
    plot(runs, RESULTS / f"{stem}.png", _title(len(seeds), args.steps, size, n_train, args.k), start_val, args.eval_k)
    steps = f"after {args.steps} GRPO steps"
    expected = f"expected val reward ({args.eval_k} samples per row) {steps}, variance-selected {size} rows"
    figures = [
        Figure(expected, val_reward("selected"), val_reward("random"), "reward", baseline_name=f"random {size} rows",
               notes=notes),
        Figure(expected, val_reward("selected"), val_reward("full"), "reward",
               baseline_name=f"full dataset, {n_train} rows"),
        Figure(f"greedy eval mIoU {steps}, variance-selected {size} rows", final_miou("selected"),
               final_miou("random"), "mIoU", baseline_name=f"random {size} rows"),
        *([Figure(f"greedy eval mIoU {steps}, full dataset, vs the blind baseline", final_miou("full"),
                  blind["miou"], "mIoU", baseline_name="best constant answer on val")] if blind else []),
        Figure("within-group reward std of the GRPO rollouts, variance-selected rows", group_std("selected"),
               group_std("random"), "reward std", baseline_name=f"random {size} rows"),
    ]
    write_result(stem, figures, config={k: (str(v) if isinstance(v, Path) else v)
                                                      for k, v in vars(args).items()})
    print(f"[data_efficiency] expected val reward {start_val['reward']:.3f} before; after {args.steps} steps: "
          + ", ".join(f"{s} {val_reward(s):.3f}" for s in SUBSETS)
          + f"; greedy eval mIoU {start_miou:.1f} before, after: " + ", ".join(f"{s} {final_miou(s):.1f}" for s in SUBSETS)
          + (f" (blind baseline {blind['miou']:.1f})" if blind else "")
          + f"; {time.time() - t_start:.0f} s; curves in {RESULTS / f'{stem}.png'}", flush=True)


if __name__ == "__main__":
    main()
