"""CLI: ``megavrl data synth`` (synthetic video tasks) and ``megavrl data inspect`` (sampling of one video)."""
from __future__ import annotations

import argparse
import json
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="video data tools: synthetic tasks, sampling inspection",
                       description="Video data tools.")
    data_sub = p.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)

    s = data_sub.add_parser(
        "synth", help="write synthetic videos (mp4) with known events and tvg/mcq/gqa rows",
        description="Write DIR/videos/*.mp4, DIR/train.jsonl, DIR/val.jsonl (megavrl row schema, rows of "
                    "every requested task for each video), DIR/data.yaml (a data config for them, to layer with "
                    "--config) and "
                    "DIR/manifest.json. Deterministic from --seed.")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--tasks", default="tvg,mcq,gqa", help="comma-separated subset of tvg,mcq,gqa (default: all)")
    s.add_argument("--n", type=int, default=32, help="number of videos (default 32)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--difficulty", default="easy", choices=["easy", "medium", "hard"])
    s.add_argument("--fps", type=int, default=8, help="frame rate of the videos (default 8)")
    s.add_argument("--seconds", type=float, default=8.0, help="length of each video in seconds (default 8)")
    s.add_argument("--size", default="160x120", help="WIDTHxHEIGHT, even numbers (default 160x120)")
    s.add_argument("--grid", type=float, default=0.5,
                   help="events start and end on multiples of this many seconds (default 0.5; 0: any frame)")
    s.add_argument("--distractors", type=int, default=None,
                   help="shapes besides the one asked about in mcq/gqa (default: 1 easy, 2 medium, 4 hard)")
    s.add_argument("--shape-size", type=float, default=None,
                   help="shape side as a fraction of the frame height, in (0, 1] (default: 0.25 easy, 0.2 medium, "
                        "0.15 hard); 1 fills the frame: the screen shows one colour while an event lasts")
    s.add_argument("--no-clock", dest="clock", action="store_false",
                   help="keep the background constant (default: it brightens with time, a visible clock)")
    s.add_argument("--val-fraction", type=float, default=0.125, help="share of videos in val.jsonl (default 0.125)")
    s.add_argument("--workers", type=int, default=2, help="videos encoded in parallel (default 2)")
    s.set_defaults(func=_synth)

    i = data_sub.add_parser(
        "inspect", help="show which frames of a video are sampled and at what size",
        description="Print the sampled frame indices, their timestamps, the resized height/width, the "
                    "patch grid and the number of video tokens for one video under the given sampling "
                    "settings (defaults: qwen-vl-utils'). Decodes only the first frame.")
    i.add_argument("--video", required=True)
    i.add_argument("--fps", type=float, default=None, help="target sampled frames per second (default 2.0)")
    i.add_argument("--nframes", type=int, default=None, help="fixed frame count instead of --fps")
    i.add_argument("--min-frames", type=int, default=None)
    i.add_argument("--max-frames", type=int, default=None)
    i.add_argument("--min-pixels", type=int, default=None, help="per-frame minimum (default 128*28*28)")
    i.add_argument("--max-pixels", type=int, default=None, help="per-frame maximum (default 768*28*28)")
    i.add_argument("--total-pixels", type=int, default=None, help="whole-video pixel budget")
    i.add_argument("--start", type=float, default=None, help="clip start in seconds")
    i.add_argument("--end", type=float, default=None, help="clip end in seconds")
    i.add_argument("--json", action="store_true", help="print one JSON object")
    i.set_defaults(func=_inspect)


def _synth(args: argparse.Namespace) -> int:
    from megavrl.data.synth import SynthSettings, parse_size, write_synthetic_dataset

    try:
        width, height = parse_size(args.size)
        settings = SynthSettings(tasks=tuple(t.strip() for t in args.tasks.split(",") if t.strip()), n=args.n,
                                 seed=args.seed, difficulty=args.difficulty, fps=args.fps, seconds=args.seconds,
                                 width=width, height=height, val_fraction=args.val_fraction, grid=args.grid,
                                 clock=args.clock, distractors=args.distractors,
                                 shape_size=args.shape_size)
    except ValueError as exc:
        print(f"megavrl data synth: {exc}", file=sys.stderr)
        return 2
    manifest = write_synthetic_dataset(args.out, settings, workers=args.workers)
    print(json.dumps({"out": args.out, **manifest["rows"], "videos": manifest["videos"]}))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from megavrl.data.video import VideoError, VideoSampler

    options = {k: getattr(args, k) for k in ("fps", "nframes", "min_frames", "max_frames", "min_pixels",
                                              "max_pixels", "total_pixels") if getattr(args, k) is not None}
    try:
        plan = VideoSampler(**options).plan(args.video, args.start, args.end)
    except (VideoError, ValueError) as exc:
        from megavrl.errors import debug_enabled

        if debug_enabled():
            import traceback

            traceback.print_exc()
        print(f"megavrl data inspect: error: {exc}", file=sys.stderr)
        return 1
    info = plan.summary()
    if args.json:
        print(json.dumps(info))
        return 0
    t, h, w = info["grid_thw"]
    print(f"{info['video']}: {info['total_frames']} frames at {info['video_fps']:.3f} fps "
          f"({info['duration']:.2f} s), {info['width']}x{info['height']}")
    print(f"sampled {info['nframes']} frames ({info['sample_fps']:.3f} per second) of a {info['clip_frames']}-frame clip")
    print(f"resized to {info['resized_width']}x{info['resized_height']}, grid (t, h, w) = ({t}, {h}, {w}), "
          f"{info['num_video_tokens']} video tokens, {info['second_per_grid_t']:.3f} s per temporal patch")
    print("frame indices: " + " ".join(str(i) for i in info["frame_indices"]))
    print("timestamps (s): " + " ".join(f"{x:.2f}" for x in info["timestamps"]))
    return 0
