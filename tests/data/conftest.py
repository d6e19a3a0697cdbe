"""Fixtures for the data tests: real encoded videos (PyAV) and a small synthetic dataset."""
from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest


def write_video(path, width: int, height: int, fps, frames: int, codec: str = "libx264",
                pix_fmt: str = "yuv420p", seed: int = 0) -> str:
    """An mp4 of moving coloured gradients and blocks (compressible, but every frame differs)."""
    import av

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([(xx * 255 // max(width - 1, 1)), (yy * 255 // max(height - 1, 1)),
                     np.full_like(xx, int(rng.integers(0, 255)))], axis=-1).astype(np.uint8)
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        for i in range(frames):
            img = np.roll(base, shift=(i * 3) % width, axis=1).copy()
            y0, x0 = (i * 5) % max(height - 8, 1), (i * 7) % max(width - 8, 1)
            img[y0:y0 + 8, x0:x0 + 8] = (255, 255 - (i * 9) % 255, (i * 13) % 255)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


# name: (width, height, fps, frames, codec, pix_fmt): sizes off the 28-pixel grid, odd sizes, NTSC
# and low frame rates, short and long clips, tall and wide frames.
VIDEO_SPECS = {
    "ntsc_322x182": (322, 182, Fraction(30000, 1001), 95, "libx264", "yuv420p"),
    "odd_225x131": (225, 131, 25, 41, "libx264", "yuv444p"),
    "tall_96x480_12fps": (96, 480, 12, 150, "mpeg4", "yuv420p"),
    "wide_640x360": (640, 360, 30, 45, "libx264", "yuv420p"),
    "short_50x40_8fps": (50, 40, 8, 7, "mpeg4", "yuv420p"),
}


@pytest.fixture(scope="session")
def videos(tmp_path_factory):
    """name -> path of the real encoded test videos of VIDEO_SPECS."""
    root = tmp_path_factory.mktemp("videos")
    return {name: write_video(root / f"{name}.mp4", w, h, fps, n, codec, fmt, seed=i)
            for i, (name, (w, h, fps, n, codec, fmt)) in enumerate(VIDEO_SPECS.items())}


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    """A small synthetic dataset (12 videos, 4 s at 4 fps, 64x48, all three tasks)."""
    from megavrl.data.synth import write_synthetic_dataset

    out = tmp_path_factory.mktemp("synth")
    write_synthetic_dataset(str(out), n=12, seed=3, fps=4, seconds=4.0, width=64, height=48, val_fraction=0.25)
    return out
