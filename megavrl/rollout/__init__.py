"""Rollout: vLLM sampling GRPO groups from video prompts, and the weight sync that feeds it."""
from megavrl.rollout.engine import RolloutConfig, RolloutEngine
from megavrl.rollout.inputs import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, RolloutPrompt, VideoInput
from megavrl.rollout.outputs import RolloutGroup, RolloutSample
from megavrl.rollout.weight_sync import SyncStats

__all__ = ["RolloutConfig", "RolloutEngine", "RolloutPrompt", "VideoInput", "RolloutGroup", "RolloutSample",
           "SyncStats", "VIDEO_PLACEHOLDER", "IMAGE_PLACEHOLDER"]
