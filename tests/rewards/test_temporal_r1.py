"""``reward.preset: temporal_r1`` against the public Temporal-R1 definitions, written here again.

The reference below follows ``verl/utils/reward_score/tvg.py`` of appletea233/Temporal-R1: the format
regex (fullmatch, DOTALL), the first ``<answer>`` block read with ``json.loads`` and ``float``, both
spans divided by the video length, IoU ``max(min1 - max0, 0) / (max1 - min0)`` then ``max(0, .)``,
every failure 0; total 0.5 * format + 0.5 * accuracy. It is run on a battery of 400 generated
responses mixing the cases that separate it from megavrl's default reward.
"""
from __future__ import annotations

import json
import random
import re

import pytest

from megavrl.rewards import RewardConfig, score
from megavrl.rewards.temporal_r1 import temporal_r1_format_reward

R1 = RewardConfig(preset="temporal_r1")


def reference_format(text: str) -> float:
    pattern = r'<think>.*?</think>\s*<answer>\s*{\s*"start_time"\s*:\s*"([\d.]+)"\s*,\s*"end_time"\s*:\s*"([\d.]+)"\s*}\s*</answer>'
    return 1.0 if re.fullmatch(pattern, text, re.DOTALL) else 0.0


def reference_iou(a, b):
    lo_end, hi_start = min(a[1], b[1]), max(a[0], b[0])
    return max(0, max(lo_end - hi_start, 0) / (max(a[1], b[1]) - min(a[0], b[0])))


def reference_accuracy(text: str, gt: list, length: float, normalise: bool) -> float:
    try:
        block = re.search(r"<answer>(.*?)</answer>", text, re.DOTALL).group(1).strip()
        data = json.loads(block)
        scale = length if normalise else 1.0
        pred = [float(data["start_time"]) / scale, float(data["end_time"]) / scale]
        truth = [gt[0] / scale, gt[1] / scale] if normalise else gt
        return reference_iou(pred, truth)
    except Exception:
        return 0.0


def number(rng: random.Random, length: float):
    kind = rng.choice(["str", "str", "num", "neg", "sci", "comma", "int", "junk"])
    value = round(rng.uniform(-0.1 * length, 1.1 * length), rng.choice([0, 1, 2]))
    if kind == "str":
        return f'"{abs(value)}"'
    if kind == "num":
        return str(abs(value))
    if kind == "neg":
        return f'"{-abs(value) or -1.0}"'
    if kind == "sci":
        return f'"{abs(value):.3e}"'
    if kind == "comma":
        return f'"{abs(value)}"'.replace(".", ",")
    if kind == "int":
        return f'"{int(abs(value))}"'
    return rng.choice(['"abc"', "null", '"nan"', "[1, 2]", '"12.5s"'])


def response(rng: random.Random, length: float) -> str:
    if rng.random() < 0.3:   # the shape the published prompt asks for
        a, b = sorted(round(rng.uniform(0, length), rng.choice([1, 2])) for _ in range(2))
        if rng.random() < 0.2:
            a, b = b, a
        return f'<think>reasoning</think>{rng.choice(["", " ", chr(10)])}<answer>{{"start_time": "{a}", "end_time": "{b}"}}</answer>'
    start, end = number(rng, length), number(rng, length)
    if rng.random() < 0.15:
        start, end = end, start
    sp = rng.choice(["", " ", "\n", "  "])
    body = "{" + sp + f'"start_time"{sp}:{sp}{start}{sp},{sp}"end_time"{sp}:{sp}{end}' + sp + "}"
    if rng.random() < 0.08:
        body = body.replace('"end_time"', '"stop_time"')
    if rng.random() < 0.08:
        body = rng.choice(["12.5 to 17.8", "[3, 9]", "{bad json", ""])
    think = rng.choice(["<think>the person opens the door</think>", "<think>\nstep 1\nstep 2\n</think>", "",
                        "<THINK>x</THINK>", "<think>a</think><think>b</think>"])
    answer = f"<answer>{rng.choice(['', ' ', chr(10)])}{body}{rng.choice(['', ' '])}</answer>"
    extra = rng.random()
    if extra < 0.1:
        answer += "<answer>" + json.dumps({"start_time": "0", "end_time": str(length)}) + "</answer>"
    elif extra < 0.15:
        answer = "<answer>" + json.dumps({"start_time": "0", "end_time": "1"}) + "</answer>" + answer
    elif extra < 0.2:
        answer = answer.replace("</answer>", "")
    elif extra < 0.25:
        answer += " trailing text"
    return think + rng.choice(["", " ", "\n"]) + answer


def battery(n: int = 400, seed: int = 18):
    rng = random.Random(seed)
    for _ in range(n):
        length = rng.choice([12.0, 30.5, 94.27, 180.0])
        start = round(rng.uniform(0, length * 0.8), 2)
        end = round(rng.uniform(start + 0.1, length), 2)
        yield response(rng, length), [start, end], length


def test_preset_matches_the_public_formulas_on_400_responses():
    parsed = formatted = 0
    for text, gt, length in battery():
        sample = {"task": "tvg", "timestamps": gt, "duration": length}
        result = score("tvg", text, sample, R1)
        fmt = reference_format(text)
        acc_seconds = reference_accuracy(text, gt, length, normalise=False)
        acc_fraction = reference_accuracy(text, gt, length, normalise=True)
        assert result.components["format"] == fmt, text
        assert result.components["iou"] == acc_seconds, text                  # same arithmetic, in seconds
        assert result.components["iou"] == pytest.approx(acc_fraction, abs=1e-12), text  # Temporal-R1's scaling
        assert result.total == 0.5 * fmt + 0.5 * acc_seconds
        parsed += result.parse_ok
        formatted += fmt == 1.0
    assert parsed > 200 and formatted > 100   # the battery exercises both sides of each check


@pytest.mark.parametrize("text, fmt, iou", [
    ('<think>t</think><answer>{"start_time": "2", "end_time": "6"}</answer>', 1.0, 0.5),
    ('<think>t</think> <answer>{"start_time": "6", "end_time": "2"}</answer>', 1.0, 0.0),     # reversed = 0
    ('<think>t</think><answer>{"start_time": "-2", "end_time": "4"}</answer>', 0.0, 0.4),     # no clipping: 4 / 10
    ('<think>t</think><answer>{"start_time": 2, "end_time": 6}</answer>', 0.0, 0.5),          # numbers: no format
    ('<think>t</think><answer>2 to 6</answer>', 0.0, 0.0),                                    # not JSON
    ('<answer>{"start_time": "0", "end_time": "8"}</answer><answer>{"start_time": "2", "end_time": "6"}</answer>',
     0.0, 1.0),                                                                                # first block
])
def test_preset_cases(text, fmt, iou):
    result = score("tvg", text, {"task": "tvg", "timestamps": [0.0, 8.0], "duration": 10.0}, R1)
    assert result.components == {"format": fmt, "iou": pytest.approx(iou)}
    assert temporal_r1_format_reward(text) == fmt


def test_default_preset_is_unchanged():
    text = '<think>t</think><answer>{"start_time": "-2", "end_time": "4"}</answer>'
    result = score("tvg", text, {"task": "tvg", "timestamps": [0.0, 8.0], "duration": 10.0})
    assert result.components["iou"] == 0.5   # megavrl's reward clips the start to 0


def test_the_matching_prompt_asks_for_what_the_format_check_accepts():
    from megavrl.config import load_config
    from megavrl.data.prompt import DEFAULT_SYSTEM_PROMPT, TEMPORAL_R1_TVG_TEMPLATE, PromptConfig

    cfg = load_config([], ["reward.preset=temporal_r1", "data.prompt.template_preset=temporal_r1"])
    assert cfg.reward.preset == "temporal_r1"
    assert cfg.data.prompt.templates["tvg"] == TEMPORAL_R1_TVG_TEMPLATE and cfg.data.prompt.system_prompt == ""
    example = TEMPORAL_R1_TVG_TEMPLATE.format(question="q").rsplit("strings: ", 1)[1].rstrip(".")
    assert temporal_r1_format_reward(f"<think>t</think><answer>{example}</answer>") == 1.0
    custom = PromptConfig(template_preset="temporal_r1", templates={"tvg": "mine {question}"},
                          system_prompt=DEFAULT_SYSTEM_PROMPT + " more")
    assert custom.templates["tvg"] == "mine {question}" and custom.system_prompt.endswith(" more")
    with pytest.raises(ValueError, match="template_preset='r1'"):
        PromptConfig(template_preset="r1")
