"""The `model` section of the run configuration: the base model, the tiny model's recipe and
LoRA adapters (stdlib dataclasses, documented field by field as in `schema.py`).

Reads: nothing. Writes: nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TinyModelConfig:
    hidden_size: int = 128
    """Width of the character-level Llama built when `model.path` is empty."""
    num_layers: int = 4
    """Transformer blocks."""
    num_heads: int = 4
    """Attention heads."""
    intermediate_size: int = 352
    """MLP width."""
    sft_lr: float = 5e-4
    """Peak learning rate of the supervised warm-up (reached after `sft_warmup_steps`)."""
    sft_warmup_steps: int = 50
    """Steps of linear learning-rate warm-up."""
    sft_batch_size: int = 64
    """Supervised examples per step."""
    sft_max_steps: int = 3000
    """Hard cap on supervised steps; a build that has not settled by then is an error."""
    flawed_share: float = 0.7
    """Share of warm-up demonstrations that show the task's systematic mistake (for addition:
    every carry dropped) instead of the right answer, for tasks that define one. The base
    model then has the skill but applies it unreliably: sampling applies a carry about
    1 - flawed_share of the time, and greedy decoding (which takes the likelier answer) fails
    wherever a carry is needed. Its accuracy is set by this mixture, not by when training
    stops; RL has to make the rare right behaviour the habit."""
    sft_settle_checks: int = 6
    """With flawed demonstrations: stop once this many probe checks in a row (sft_check_every
    steps apart) fall within `base_accuracy`, i.e. the model sits on the mixture's plateau."""
    sft_target_accuracy: float = 0.3
    """Tasks without flawed demonstrations: stop supervising once greedy accuracy on the
    probe set reaches this."""
    base_accuracy: list = field(default_factory=lambda: [0.1, 0.5])
    """The usable range of the base model's greedy probe accuracy: RL needs successes to
    amplify (above the low end) and room to improve (below the high end). A build that ends
    outside it fails with an error instead of starting RL on a useless model."""
    sft_check_every: int = 50
    """Steps between probe-set checks (200 greedy problems of the train split)."""
    seed: int = 0
    """Seed of the tiny model's initialisation and warm-up. Separate from run.seed, so runs
    that differ only in run.seed (an ablation's seeds) share one base model."""


@dataclass
class LoraConfig:
    r: int = 0
    """Rank of the LoRA adapters the learner trains instead of the full weights (peft); 0 =
    full fine-tuning. The KL reference is then the base model with the adapters turned off
    (no second copy), actors get merged weights, and checkpoints hold the merged `model/`
    folder with the adapter in `model/adapter/` (docs/real_models.md)."""
    alpha: float = 32.0
    """LoRA scaling numerator: the update is (alpha / r) B A."""
    dropout: float = 0.0
    """Dropout on the adapters' input during training (0 keeps learner and engine scoring
    alike)."""
    target_modules: list = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj",
                                                          "o_proj", "gate_proj", "up_proj",
                                                          "down_proj"])
    """Names of the linear layers that get adapters (Llama-style names by default), or
    `["all-linear"]`."""


@dataclass
class ModelConfig:
    path: str = ""
    """A Hugging Face causal-LM folder; empty builds (and caches) the tiny model for `env.name`."""
    cache_dir: str = ""
    """Where built tiny models are cached; empty means $OFFPOLICY_CACHE or ~/.cache/offpolicy."""
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    """Recipe of the tiny base model (part of its cache key)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Train LoRA adapters instead of the full weights (`r` > 0; needs peft)."""
