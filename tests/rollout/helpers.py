"""Test media and the transformers reference the rollout tests compare vLLM against."""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from megavrl.rollout import VIDEO_PLACEHOLDER, VideoInput

# Frame sides are multiples of 28 (patch 14 x merge 2), as the data pipeline resizes them.
VIDEO_HEIGHT, VIDEO_WIDTH, VIDEO_FPS, VIDEO_FRAMES = 112, 168, 8, 16


def write_test_video(path: str | Path, num_frames: int = VIDEO_FRAMES, height: int = VIDEO_HEIGHT,
                     width: int = VIDEO_WIDTH, fps: int = VIDEO_FPS) -> Path:
    """An mpeg4 mp4 with a moving green square on a background whose red channel ramps over time."""
    import av

    path = Path(path)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(num_frames):
            img = np.zeros((height, width, 3), np.uint8)
            img[:, :, 0] = (i * 16) % 256
            y, x = (i * 5) % (height - 20), (i * 7) % (width - 30)
            img[y:y + 20, x:x + 30, 1] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def decode_video(path: str | Path, num_frames: int = 8) -> VideoInput:
    """Decode ``num_frames`` evenly spaced frames with decord, as the data pipeline does."""
    import decord

    reader = decord.VideoReader(str(path))
    total = len(reader)
    indices = np.linspace(0, total - 1, num_frames).round().astype(int).tolist()
    frames = reader.get_batch(indices).asnumpy()
    return VideoInput(frames=frames, fps=float(reader.get_avg_fps()), frames_indices=indices, total_num_frames=total)


def video_prompt(question: str) -> str:
    """A Qwen2.5-VL chat prompt with one video, as the chat template renders it."""
    return ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
            f"<|im_start|>user\n{VIDEO_PLACEHOLDER}{question}<|im_end|>\n<|im_start|>assistant\n")


@functools.lru_cache(maxsize=2)
def hf_model_and_processor(model_dir: str):
    import torch
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(model_dir)


def hf_video_inputs(model_dir: str, prompt: str, video: VideoInput):
    """transformers' processor on the same text, frames and metadata, told not to resample or resize."""
    _, processor = hf_model_and_processor(model_dir)
    meta = {k: v for k, v in video.metadata().items() if k != "do_sample_frames"}
    return processor(text=[prompt], videos=[video.frames], video_metadata=[meta], do_resize=False,
                     do_sample_frames=False, return_tensors="pt")


def hf_response_logprobs(model_dir: str, inputs, responses: list[list[int]]) -> list[np.ndarray]:
    """log_softmax (fp32, temperature 1) of each response token given the prompt, teacher-forced."""
    import torch

    model, _ = hf_model_and_processor(model_dir)
    prompt_ids = inputs["input_ids"]
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    out = []
    with torch.no_grad():
        for response in responses:
            ids = torch.cat([prompt_ids, torch.tensor([response])], dim=1)
            if "mm_token_type_ids" in inputs:  # 0 = text; the response is text
                extra["mm_token_type_ids"] = torch.cat(
                    [inputs["mm_token_type_ids"], torch.zeros((1, len(response)), dtype=torch.long)], dim=1)
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), **extra).logits[0].float()
            p = prompt_ids.shape[1]
            logp = torch.log_softmax(logits[p - 1:p - 1 + len(response)], dim=-1)
            out.append(logp.gather(1, torch.tensor(response)[:, None])[:, 0].numpy())
    return out
