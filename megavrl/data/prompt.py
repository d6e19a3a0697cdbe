"""Prompts: chat template, video-token expansion, token ids, M-RoPE position ids.

One :class:`PreparedPrompt` feeds both sides of a GRPO step, so the rollout engine and the
trainer see the same pixels and the same tokens:

- the trainer takes ``input_ids`` (``<|video_pad|>`` expanded to one token per merged patch,
  exactly as ``Qwen2_5_VLProcessor`` expands it), ``position_ids``, ``pixel_values_videos``,
  ``video_grid_thw`` and ``second_per_grid_ts``;
- the rollout engine takes ``prompt_token_ids`` (one ``<|video_pad|>`` placeholder, which vLLM
  expands), the same uint8 ``frames`` and their ``video_metadata``; the one adapter to the engine's
  input is :func:`megavrl.rollout.inputs.rollout_prompt`.
"""
from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

from megavrl.data.preprocess import VisionSpec, preprocess_video
from megavrl.data.schema import LETTERS, Sample
from megavrl.data.video import SampledVideo
from megavrl.log import get_logger

log = get_logger(__name__)

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful assistant that watches videos carefully. First think about the question step by "
    "step inside <think> </think> tags, then give the final answer inside <answer> </answer> tags, "
    "i.e. <think> reasoning </think><answer> answer </answer>."
)

DEFAULT_TEMPLATES: Dict[str, str] = {
    "tvg": (
        "The video is {duration:.1f} seconds long. Find the moment that matches this description: "
        "\"{question}\".\nAnswer with its start and end time in seconds, as <answer>start to end</answer>, "
        "for example <answer>3.0 to 7.5</answer>."
    ),
    "mcq": (
        "{question}\nOptions:\n{options}\n"
        "Answer with the letter of the correct option, as <answer>X</answer>, for example <answer>B</answer>."
    ),
    "gqa": (
        "The video is {duration:.1f} seconds long. {question}\nOptions:\n{options}\n"
        "Answer with the letter of the correct option and the start and end time in seconds of the moment "
        "that shows it, as <answer>(X) start to end</answer>, for example <answer>(B) 3.0 to 7.5</answer>."
    ),
}


TEMPORAL_R1_TVG_TEMPLATE = (
    "Find the moment in the video that matches this description: \"{question}\". "
    "First output the thinking process in <think> </think> tags and then output the final answer in "
    "<answer> </answer> tags. Output the final answer in JSON format, with the start and end time in "
    "seconds as strings: {{\"start_time\": \"3.0\", \"end_time\": \"7.5\"}}."
)
"""The tvg prompt matching ``reward.preset: temporal_r1``. Temporal-R1 (appletea233/Temporal-R1) takes
its prompt from its data's ``problem`` field, which its code does not publish; this template uses
the instruction written in its ``verl/utils/dataset_video.py`` and asks for exactly the JSON that its
format reward (``tvg_format_reward``) accepts."""

TEMPLATE_PRESETS: Dict[str, Dict[str, str]] = {
    "megavrl": DEFAULT_TEMPLATES,
    "temporal_r1": {**DEFAULT_TEMPLATES, "tvg": TEMPORAL_R1_TVG_TEMPLATE},
}
"""``data.prompt.template_preset`` -> the default templates per task."""


class PromptTooLongError(ValueError):
    """A prompt longer than ``max_prompt_len`` tokens (the row is skipped, counted as prompt_too_long)."""

    kind = "prompt_too_long"


@dataclass
class PromptConfig:
    """How a row becomes a chat prompt.

    Fields:
        system_prompt: the system message ("" for none: the chat template then inserts Qwen's
            default system message).
        templates: per task ("tvg", "mcq", "gqa"), the user text after the video. Placeholders:
            ``{question}``, ``{options}`` (one "(A) text" per line), ``{duration}`` (seconds of the
            shown video or clip), ``{num_options}``.
        max_prompt_len: prompts with more tokens (video tokens included) are skipped with a
            clear message. None: in a run config, rollout.max_model_len minus the longest response
            (rollout.max_new_tokens, or eval.max_new_tokens when larger), the longest prompt whose
            response still fits (``megavrl.config.Config`` fills it in); standalone, no limit.
        rope_convention: "qwen" (Qwen2.5-VL's own code and vLLM: text after a video resumes at the
            video's largest position + 1) or "transformers" (transformers >= 5.3); see
            ``megavrl.models.qwen2_5_vl.rope_index``. Rollout and trainer must agree.
        compute_position_ids: build M-RoPE position ids with the prompt.
        template_preset: "megavrl" (default) or "temporal_r1" (``TEMPLATE_PRESETS``): the templates a
            task gets when ``templates`` does not set it. "temporal_r1" also leaves the system message
            to the chat template (Qwen's default) unless ``system_prompt`` is changed from megavrl's.
            Use it with ``reward.preset: temporal_r1``.
    """

    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    templates: Dict[str, str] = field(default_factory=lambda: dict(DEFAULT_TEMPLATES))
    max_prompt_len: Optional[int] = None
    rope_convention: str = "qwen"
    compute_position_ids: bool = True
    template_preset: str = "megavrl"

    def __post_init__(self) -> None:
        if self.template_preset not in TEMPLATE_PRESETS:
            raise ValueError(f"prompt.template_preset={self.template_preset!r} is not one of "
                             f"{', '.join(map(repr, TEMPLATE_PRESETS))}")
        preset = TEMPLATE_PRESETS[self.template_preset]
        if self.template_preset != "megavrl":
            # Templates left at megavrl's defaults take the preset's; a template set by hand stays.
            self.templates = {task: preset[task] if text == DEFAULT_TEMPLATES.get(task) else text
                              for task, text in dict(self.templates).items()}
            if self.system_prompt == DEFAULT_SYSTEM_PROMPT:
                self.system_prompt = ""
        missing = [t for t in ("tvg", "mcq", "gqa") if t not in self.templates]
        if missing:
            self.templates = {**preset, **dict(self.templates)}
        if self.max_prompt_len is not None and self.max_prompt_len <= 0:
            raise ValueError(f"prompt.max_prompt_len={self.max_prompt_len} must be positive (or None: see PromptConfig)")
        if self.rope_convention not in ("qwen", "transformers"):
            raise ValueError(f"prompt.rope_convention={self.rope_convention!r} is not 'qwen' or 'transformers'")


def format_options(options: Optional[List[str]]) -> str:
    return "\n".join(f"({letter}) {text}" for letter, text in zip(LETTERS, options or []))


def question_text(sample: Sample, config: PromptConfig, duration: float) -> str:
    """The user text of ``sample`` from its task's template."""
    template = config.templates.get(sample.task)
    if template is None:
        raise ValueError(f"no prompt template for task {sample.task!r}")
    try:
        return template.format(question=sample.question, options=format_options(sample.options),
                               duration=duration, num_options=len(sample.options or []))
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"prompt template for task {sample.task!r} is invalid: {exc!r}") from None


@dataclass
class PreparedPrompt:
    """Everything one rollout prompt and its training sequence need.

    Shapes (S prompt tokens, N video patches, T frames):
        input_ids: long [S], ``<|video_pad|>`` expanded (trainer side).
        position_ids: long [3, S] M-RoPE ids (t, h, w), or None when not computed.
        rope_delta: a generated token at index i (0-based, counted over the whole sequence) has
            position id ``i + rope_delta`` on all three axes.
        pixel_values_videos: float32 [N, C * temporal_patch * patch * patch].
        video_grid_thw: long [1, 3]; second_per_grid_ts: float32 [1] (seconds per temporal patch).
        prompt: the chat text with ONE ``<|video_pad|>`` (vLLM side);
        prompt_token_ids: its token ids (one placeholder token).
        frames: uint8 [T, C, H, W], the exact pixels both sides see.
        video_metadata: transformers ``VideoMetadata`` fields of the frames (fps of the file,
            frames_indices, total_num_frames of the clip, ...).
        timestamps: seconds of each sampled frame from the start of the video file.
        sample: the dataset row; its ``duration`` is the decoded video's when the row had none.
    """

    sample: Sample
    prompt: str
    prompt_token_ids: List[int]
    input_ids: torch.Tensor
    position_ids: Optional[torch.Tensor]
    rope_delta: Optional[int]
    pixel_values_videos: torch.Tensor
    video_grid_thw: torch.Tensor
    second_per_grid_ts: torch.Tensor
    frames: torch.Tensor
    video_metadata: Dict[str, Any]
    timestamps: List[float]
    sample_fps: float
    num_video_tokens: int

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())


def _load_chat_template(tokenizer, hf_dir: str) -> None:
    if getattr(tokenizer, "chat_template", None):
        return
    for name in ("chat_template.jinja", "chat_template.json"):
        path = os.path.join(hf_dir, name)
        if os.path.isfile(path):
            with open(path) as f:
                text = f.read()
            tokenizer.chat_template = json.loads(text)["chat_template"] if name.endswith(".json") else text
            return
    raise ValueError(f"{hf_dir} has no chat template (tokenizer_config.json, chat_template.jinja or .json)")


class PromptBuilder:
    """Turns (row, sampled video) into a :class:`PreparedPrompt` for one model.

    ``PromptBuilder.from_hf_dir(hf_dir, config)`` reads the tokenizer, chat template, special token
    ids, ``tokens_per_second`` and the processor's patch geometry from a Hugging Face directory.
    """

    def __init__(self, tokenizer, config: Optional[PromptConfig] = None, spec: Optional[VisionSpec] = None, *,
                 video_token_id: int, image_token_id: int, tokens_per_second: float = 2.0):
        self.tokenizer = tokenizer
        self.config = config or PromptConfig()
        self.spec = spec or VisionSpec()
        self.video_token_id = int(video_token_id)
        self.image_token_id = int(image_token_id)
        self.tokens_per_second = tokens_per_second
        self.video_token = tokenizer.convert_ids_to_tokens(self.video_token_id)
        self._rope_index = _find_rope_index()
        # HF fast tokenizers reconfigure their Rust state on every call: concurrent calls from the
        # dataset's decoding threads can fail with "Already borrowed", so text work is serialised.
        self._text_lock = threading.Lock()

    @classmethod
    def from_hf_dir(cls, hf_dir: str, config: Optional[PromptConfig] = None) -> "PromptBuilder":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(hf_dir)
        _load_chat_template(tokenizer, hf_dir)
        from megavrl.models.qwen2_5_vl.config import load_hf_config

        hf = load_hf_config(hf_dir)  # parsed once per process, shared with the model's configs
        vision = hf.vision_config
        video_id = getattr(hf, "video_token_id", None) or tokenizer.convert_tokens_to_ids("<|video_pad|>")
        image_id = getattr(hf, "image_token_id", None) or tokenizer.convert_tokens_to_ids("<|image_pad|>")
        spec = VisionSpec.from_hf_dir(hf_dir)
        if getattr(vision, "spatial_merge_size", None) not in (None, spec.merge_size):
            raise ValueError(f"{hf_dir}: vision_config.spatial_merge_size={vision.spatial_merge_size} differs "
                             f"from the processor's merge_size={spec.merge_size}")
        return cls(tokenizer, config, spec, video_token_id=video_id, image_token_id=image_id,
                   tokens_per_second=getattr(vision, "tokens_per_second", 2))

    # ------------------------------------------------------------------------------ text

    def messages(self, sample: Sample, duration: float) -> List[dict]:
        """The chat: system prompt, then one user turn holding the video and the question."""
        out = []
        if self.config.system_prompt:
            out.append({"role": "system", "content": self.config.system_prompt})
        out.append({"role": "user", "content": [{"type": "video"},
                                                 {"type": "text", "text": question_text(sample, self.config, duration)}]})
        return out

    def prompt_text(self, sample: Sample, duration: float) -> str:
        """The chat-templated prompt with one ``<|video_pad|>`` placeholder, ending with the
        assistant turn's header (generation prompt)."""
        with self._text_lock:
            text = self.tokenizer.apply_chat_template(self.messages(sample, duration), tokenize=False,
                                                      add_generation_prompt=True)
        if text.count(self.video_token) != 1:
            raise ValueError(f"the chat template produced {text.count(self.video_token)} {self.video_token} "
                             "placeholders; exactly one is expected")
        return text

    def expand_video_tokens(self, token_ids: List[int], num_video_tokens: int) -> torch.Tensor:
        """``token_ids`` with its one ``<|video_pad|>`` repeated ``num_video_tokens`` times."""
        where = [i for i, t in enumerate(token_ids) if t == self.video_token_id]
        if len(where) != 1:
            raise ValueError(f"expected one video placeholder token, found {len(where)}")
        i = where[0]
        ids = torch.tensor(token_ids, dtype=torch.long)
        return torch.cat([ids[:i], ids.new_full((num_video_tokens,), self.video_token_id), ids[i + 1:]])

    # ------------------------------------------------------------------------------ build

    def build(self, sample: Sample, video: SampledVideo) -> PreparedPrompt:
        """Preprocess ``video`` and build the prompt of ``sample``; raises PromptTooLongError."""
        duration = video.duration
        if sample.clip is not None:
            duration = min(sample.clip[1], duration) - sample.clip[0]
        if sample.duration is None:
            sample = sample.with_duration(video.duration)
        frames, height, width = (int(x) for x in (video.frames.shape[0], *video.frames.shape[-2:]))
        tp, p, m = self.spec.temporal_patch_size, self.spec.patch_size, self.spec.merge_size
        num_video_tokens = -(-frames // tp) * (height // p) * (width // p) // (m * m)
        text = self.prompt_text(sample, duration)
        with self._text_lock:
            token_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        total = len(token_ids) - 1 + num_video_tokens
        if self.config.max_prompt_len is not None and total > self.config.max_prompt_len:
            raise PromptTooLongError(
                f"prompt of {sample.id!r} has {total} tokens ({num_video_tokens} video tokens for "
                f"{frames} frames of {height}x{width} + "
                f"{len(token_ids) - 1} text), more than prompt.max_prompt_len={self.config.max_prompt_len}: "
                "lower video.max_pixels, video.fps or video.total_pixels, or raise prompt.max_prompt_len")
        features = preprocess_video(video.frames, video.sample_fps, self.spec)
        input_ids = self.expand_video_tokens(token_ids, num_video_tokens)
        position_ids, rope_delta = self.position_ids(input_ids, features.video_grid_thw, features.second_per_grid_ts)
        return PreparedPrompt(
            sample=sample, prompt=text, prompt_token_ids=list(token_ids), input_ids=input_ids,
            position_ids=position_ids, rope_delta=rope_delta,
            pixel_values_videos=features.pixel_values_videos, video_grid_thw=features.video_grid_thw,
            second_per_grid_ts=features.second_per_grid_ts, frames=video.frames,
            video_metadata=video.hf_metadata(), timestamps=list(video.timestamps), sample_fps=video.sample_fps,
            num_video_tokens=num_video_tokens)

    def position_ids(self, input_ids: torch.Tensor, video_grid_thw: torch.Tensor,
                     second_per_grid_ts: torch.Tensor) -> tuple[Optional[torch.Tensor], Optional[int]]:
        """M-RoPE ids [3, S] and the rope delta of one expanded prompt (None, None if disabled)."""
        if not self.config.compute_position_ids or self._rope_index is None:
            return None, None
        pos, delta = self._rope_index(
            input_ids[None], video_grid_thw=video_grid_thw, second_per_grid_ts=second_per_grid_ts,
            image_token_id=self.image_token_id, video_token_id=self.video_token_id,
            spatial_merge_size=self.spec.merge_size, tokens_per_second=self.tokens_per_second,
            convention=self.config.rope_convention)
        return pos[:, 0], int(delta[0, 0])


def _find_rope_index():
    try:
        from megavrl.models.qwen2_5_vl.rope_index import get_rope_index
    except ImportError:  # the model package is optional for data-only tools
        log.warning("megavrl.models.qwen2_5_vl.rope_index is unavailable: prompts carry no position ids")
        return None
    return get_rope_index
