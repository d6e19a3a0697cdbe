"""The training sections of the config: ``algorithm`` (GRPO / SFT), ``selection``, ``optimizer``,
``trainer`` and ``logging``. ``megavrl.config`` assembles them with the other subsystems' sections."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from megavrl.config_base import ConfigError, check_choice, check_number

ADVANTAGE_MODES = ("grpo", "drgrpo", "rloo")
STD_MODES = ("unbiased", "biased")
KL_ESTIMATORS = ("k1", "k2", "k3")
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


@dataclass
class GRPOConfig:
    """GRPO advantage and policy-loss options (the ``algorithm`` config section).

    Advantages (see ``megavrl.rl.advantages.group_advantages``):
        advantage: "grpo" (group z-score), "drgrpo" (mean-centred, no std; Dr. GRPO) or "rloo"
            (leave-one-out baseline).
        adv_epsilon: added to the group std in "grpo".
        adv_std: "unbiased" (divide by G-1, as torch.std and verl) or "biased" (divide by G).
    Policy loss (see ``megavrl.rl.policy_loss.policy_loss``):
        clip_low, clip_high: the ratio is clipped to [1 - clip_low, 1 + clip_high] (DAPO's
            clip-higher when clip_high > clip_low).
        dual_clip: for negative advantages the per-token loss is capped at ``-A * dual_clip``
            (must be > 1); None disables it.
        kl_coef: weight of the KL-to-reference loss term; 0 disables it.
        kl_estimator: "k1", "k2" or "k3" (low variance); see ``kl_penalty``.
        kl_clamp: the per-token KL estimate is clamped to [-kl_clamp, kl_clamp]; None: no clamp.
        entropy_coef: weight of the entropy bonus (subtracted from the loss); 0 disables it.
        loss_agg: "token-mean", "seq-mean-token-mean", "seq-mean-token-sum" or
            "seq-mean-token-sum-norm"; see ``aggregate_loss``.
        tis_cap: truncated importance sampling between the rollout engine's and the trainer's
            log-probs: each token's loss is weighted by min(exp(old - rollout), tis_cap);
            None disables it.
    """

    advantage: str = "grpo"
    adv_epsilon: float = 1e-6
    adv_std: str = "unbiased"
    clip_low: float = 0.2
    clip_high: float = 0.28
    dual_clip: Optional[float] = 3.0
    kl_coef: float = 0.01
    kl_estimator: str = "k3"
    kl_clamp: Optional[float] = 10.0
    entropy_coef: float = 0.0
    loss_agg: str = "token-mean"
    tis_cap: Optional[float] = None

    def __post_init__(self) -> None:
        check_choice("algorithm.advantage", self.advantage, ADVANTAGE_MODES)
        check_choice("algorithm.adv_std", self.adv_std, STD_MODES)
        check_choice("algorithm.kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        check_choice("algorithm.loss_agg", self.loss_agg, LOSS_AGG_MODES)
        check_number("algorithm.adv_epsilon", self.adv_epsilon, minimum=0.0)
        check_number("algorithm.clip_low", self.clip_low, minimum=0.0)
        if self.clip_low >= 1.0:
            raise ConfigError(f"algorithm.clip_low={self.clip_low} must be < 1 "
                             f"(the ratio's lower bound is 1 - clip_low)")
        check_number("algorithm.clip_high", self.clip_high, minimum=0.0)
        if self.dual_clip is not None:
            check_number("algorithm.dual_clip", self.dual_clip)
            if self.dual_clip <= 1.0:
                raise ConfigError(f"algorithm.dual_clip={self.dual_clip} must be > 1, or None to disable it")
        check_number("algorithm.kl_coef", self.kl_coef, minimum=0.0)
        if self.kl_clamp is not None:
            check_number("algorithm.kl_clamp", self.kl_clamp, minimum=0.0)
        check_number("algorithm.entropy_coef", self.entropy_coef)
        if self.tis_cap is not None:
            check_number("algorithm.tis_cap", self.tis_cap)
            if self.tis_cap <= 0:
                raise ConfigError(f"algorithm.tis_cap={self.tis_cap} must be > 0, or None to disable it")

    def advantage_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``group_advantages``: mode, eps, std."""
        return {"mode": self.advantage, "eps": self.adv_epsilon, "std": self.adv_std}

    def loss_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``policy_loss``: the clip, KL, entropy, aggregation and TIS options."""
        return {"clip_low": self.clip_low, "clip_high": self.clip_high, "dual_clip": self.dual_clip,
                "kl_coef": self.kl_coef, "kl_estimator": self.kl_estimator, "kl_clamp": self.kl_clamp,
                "entropy_coef": self.entropy_coef, "loss_agg": self.loss_agg, "tis_cap": self.tis_cap}


@dataclass
class SelectionConfig:
    """Variance-aware data selection (the ``selection`` config section).

    Offline (``select_by_reward_variance``), from ``k`` rollouts per row:
        k: rollouts per row (rows with another number are counted in the summary).
        drop_all_same: drop rows whose k total rewards are all equal (zero variance).
        min_variance: keep rows whose reward variance (population, over the k rollouts) is
            >= min_variance.
        top_fraction: then keep the ceil(top_fraction * number of scored rows) rows of highest
            variance; None keeps all.
        balance_tasks: split the kept rows equally between tasks (see the function).
        seed: breaks ties between equal variances, deterministically.
    Online (``ZeroVarianceFilter``):
        max_refills: at most this many groups are taken from the queue to replace the
            zero-variance groups of one batch.
    """

    k: int = 8
    drop_all_same: bool = True
    min_variance: float = 0.0
    top_fraction: Optional[float] = None
    balance_tasks: bool = False
    seed: int = 0
    max_refills: int = 4

    def __post_init__(self) -> None:
        if not isinstance(self.k, int) or self.k < 1:
            raise ConfigError(f"selection.k={self.k!r} must be a positive integer (rollouts per row)")
        check_number("selection.min_variance", self.min_variance, minimum=0.0)
        if self.top_fraction is not None:
            check_number("selection.top_fraction", self.top_fraction)
            if not 0.0 < self.top_fraction <= 1.0:
                raise ConfigError(f"selection.top_fraction={self.top_fraction} must be in (0, 1], or None")
        if not isinstance(self.max_refills, int) or self.max_refills < 0:
            raise ConfigError(f"selection.max_refills={self.max_refills!r} must be a non-negative integer")

    def select_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``select_by_reward_variance`` (all fields but max_refills)."""
        return {"k": self.k, "drop_all_same": self.drop_all_same, "min_variance": self.min_variance,
                "top_fraction": self.top_fraction, "balance_tasks": self.balance_tasks, "seed": self.seed}


@dataclass
class AlgorithmConfig(GRPOConfig):
    """The ``algorithm`` section: the GRPO loss options plus how a step uses its rollouts."""

    name: str = "grpo"
    """grpo | sft (cross-entropy on the reference answers: the paper's SFT baseline and warm start)."""
    ppo_epochs: int = 1
    """Passes over each step's rollouts."""
    mini_batches: int = 1
    """Optimizer steps per epoch (the step's sequences are split into this many mini-batches)."""
    filter_zero_variance: bool = False
    """Drop prompt groups whose n rewards are all equal and refill from the data queue
    (at most selection.max_refills groups per step)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.name not in ("grpo", "sft"):
            raise ConfigError(f"algorithm.name={self.name!r} is not one of 'grpo', 'sft'")
        for key in ("ppo_epochs", "mini_batches"):
            if getattr(self, key) < 1:
                raise ConfigError(f"algorithm.{key}={getattr(self, key)} must be >= 1")


@dataclass
class OptimizerConfig:
    lr: float = 1e-6
    min_lr: float = 0.0
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    lr_warmup_steps: int = 0
    lr_decay_style: str = "constant"
    """constant | linear | cosine (decay over trainer.total_steps)."""


@dataclass
class MicroBatchConfig:
    """How the actor cuts a step's sequences into micro-batches (keys of the ``trainer`` section;
    see ``megavrl.rl.micro_batches``).

        packing: run each micro-batch's sequences packed end to end in one row (THD; attention and
            M-RoPE ids per sequence) instead of padded to the step's longest sequence: the same
            losses, log-probs and gradients, without computing the padding.
        max_tokens_per_micro_batch: cut micro-batches by tokens instead of by count: each computes at
            most this many tokens (packed: the sum of its sequences' lengths; padded: sequences x the
            padded length), and trainer.micro_batch_size is not used. A sequence longer than the
            budget runs alone (warned, counted in micro_batches/oversize_sequences). None: by count.
    """

    packing: bool = True
    max_tokens_per_micro_batch: Optional[int] = None

    def __post_init__(self) -> None:
        budget = self.max_tokens_per_micro_batch
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
            raise ConfigError(f"trainer.max_tokens_per_micro_batch={budget!r} must be a positive number of tokens "
                              f"(for instance rollout.max_model_len, so that the longest sequence fits), or null to "
                              f"cut micro-batches by trainer.micro_batch_size")


@dataclass
class TrainerConfig(MicroBatchConfig):
    total_steps: int = 100
    prompts_per_step: int = 16
    micro_batch_size: int = 1
    """Sequences per micro-batch of Megatron's forward-backward schedule."""
    seed: int = 1234
    eval_every: int = 0
    """Steps between evaluations (0: only before and after training)."""
    max_consecutive_nonfinite: int = 3
    """Stop after this many steps in a row whose loss was NaN/inf (each is skipped and counted)."""
    preemption_grace_s: float = 120.0
    """Seconds from a stop signal (SIGTERM, SIGINT, SIGHUP, SIGUSR1) to a complete checkpoint. The
    step in flight is finished, or abandoned if its update has not started, then a checkpoint is
    written; a process still alive after this many seconds exits without one (the previous
    checkpoint stays). The launcher passes it to torchrun as --shutdown-timeout; on Slurm keep it
    below the --signal lead time."""
    output_dir: str = "runs/megavrl"


@dataclass
class LoggingConfig:
    tensorboard_dir: Optional[str] = None
    """Default: <trainer.output_dir>/tensorboard."""
    log_every: int = 1
    """Steps between console lines (TensorBoard gets every step)."""
