"""The one config tree of an OPD run, loaded from YAML and validated once.

    cfg = load_config("configs/toy.yaml", overrides=["train.lr=1e-3", "rollout.num_rollout=4"])

Every component owns one small section below; cross-section rules (slime's OPD argument
errors) live in `OPDRunConfig._check_opd`. Field names follow slime's command-line flags
where one exists (`rollout_batch_size`, `n_samples_per_prompt`, `opd_kl_coef`, ...), so a
slime user can map their script onto a YAML file line by line.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import to_jsonable_python

from opd_core.datasets import PRESETS, template_text


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the file and the field."""


class Section(BaseModel):
    # Unknown keys are errors: a typo like `opd_kl_coeff` must not silently do nothing.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    # Fields that say where or how patiently a stage runs, not what it computes: left out of
    # stage cache keys, so e.g. moving training to another Ray cluster reuses the results.
    NOT_IN_CACHE_KEY: ClassVar[frozenset[str]] = frozenset()


# ----------------------------------------------------------------------------- toy task


class ToyModelSpec(Section):
    """Shape and training budget of one built-in toy Qwen3 model."""

    hidden_size: int = Field(64, gt=0)
    num_hidden_layers: int = Field(2, gt=0)
    num_attention_heads: int = Field(4, gt=0)
    num_key_value_heads: int = Field(2, gt=0)
    head_dim: int = Field(16, gt=0)
    intermediate_size: int = Field(128, gt=0)
    # ~1/sqrt(hidden_size): Qwen's 0.02 is tuned for wide models and leaves a tiny model's
    # attention stuck near uniform for hundreds of steps.
    initializer_range: float = Field(0.1, gt=0)
    train_steps: int = Field(300, ge=0)  # the budget; pass@1 checks may stop training earlier
    batch_size: int = Field(64, gt=0)
    lr: float = Field(3e-3, gt=0)
    check_every: int = Field(50, gt=0)  # training steps between greedy pass@1 checks


class ToyConfig(Section):
    """The synthetic arithmetic task and the two toy models built from `seed`."""

    seed: int = 0
    digits: int = Field(2, ge=1, le=6)
    operations: list[Literal["+", "-"]] = ["+"]
    num_train: int = Field(2000, gt=0)
    num_eval: int = Field(200, gt=0)
    vocab_size: int = Field(384, ge=260)
    # Measured on 2 shared cores (toy defaults): teacher 0.15M params, ~450 steps to >= 95%;
    # the student is the same family at ~half the size, stopped ~250 steps into its SFT, when
    # its accuracy starts to rise (trained on, it reaches ~100% too: weak by training, not size).
    teacher: ToyModelSpec = ToyModelSpec(
        hidden_size=64, num_hidden_layers=2, intermediate_size=256, train_steps=1000
    )
    student: ToyModelSpec = ToyModelSpec(
        hidden_size=48, num_hidden_layers=2, intermediate_size=192, train_steps=800, check_every=10
    )
    # The teacher trains until greedy pass@1 on eval >= this (an error if its budget runs out);
    # the student's short SFT stops early once its pass@1 on held-out train lands in the window.
    teacher_min_pass_at_1: float = Field(0.95, ge=0, le=1)
    student_pass_at_1_window: tuple[float, float] = (0.10, 0.40)
    # Where built toy models are cached (keyed by a hash of this section). Relative to cwd.
    cache_dir: str = ".cache/opd-toy"


# --------------------------------------------------------------------------- the stages


class ModelsConfig(Section):
    """Where the student and teacher come from: `toy`, `hf:<repo id>`, or a local HF dir."""

    student: str = "toy"
    teacher: str = "toy"
    revision: str | None = None


class DatasetSpec(Section):
    """One prompt set: where its rows come from and how a row becomes a prompt and a label.

    `source`: `toy`, `hf:<dataset id>` or a local .jsonl/.json/.parquet/.arrow file. `preset`
    (a hub id from opd_core/datasets.py) fills every field the config leaves out, when the
    config is validated: the run's config.yaml holds the resolved fields, never a hidden default.
    """

    source: str = "toy"  # toy | hf:<dataset id> | a .jsonl/.json/.parquet/.arrow file
    preset: str | None = None  # a hub id of opd_core/datasets.py: fills the unset fields
    subset: str | None = None  # the hub dataset's config name (openai/gsm8k: main)
    split: str = "train"  # hub datasets and toy (train | test); a local file is one split
    input_key: str = "prompt"  # a string, or a list of {role, content} messages
    label_key: str = "label"  # dotted for nested fields: reward_model.ground_truth
    label_format: Literal["plain", "gsm8k"] = "plain"  # gsm8k: the text after '#### '
    # none (the prompt as it is) | dapo | dapo_boxed | your own text with {problem} in it:
    # wraps a bare problem (or the last user message) in the instruction.
    template: str = "none"
    group_keys: list[str] = []  # eval: fields to report results by (MATH-500: subject, level)
    offset: int = Field(0, ge=0)  # skip this many rows first (e.g. to hold out train rows)
    limit: int | None = Field(None, gt=0)  # then take at most this many

    @model_validator(mode="before")
    @classmethod
    def _resolve_preset(cls, data: Any) -> Any:
        if isinstance(data, str):  # shorthand: `train: toy`, `train: data/math.jsonl`
            data = {"source": data}
        if not isinstance(data, dict) or data.get("preset") is None:
            return data
        preset = PRESETS.get(data["preset"])
        if preset is None:
            raise ValueError(
                f"unknown preset {data['preset']!r}; presets are {', '.join(PRESETS)} "
                "(any other dataset works with explicit input_key / label_key / template)"
            )
        return {**preset.fields(data["preset"]), **data}

    @field_validator("template")
    @classmethod
    def _known_template(cls, value: str) -> str:
        template_text(value)  # raises with the named templates listed
        return value


class DataConfig(Section):
    """The training prompts, and how every prompt is rendered for the models."""

    train: DatasetSpec = DatasetSpec()
    # Extra arguments of the chat template wherever a prompt is rendered (rollouts, both evals,
    # the teacher's view of the prompt, the pre-flight check), e.g. {enable_thinking: true}
    # for Qwen3 (slime's --apply-chat-template-kwargs).
    chat_template_kwargs: dict[str, Any] = {}


class ConvertConfig(Section):
    parity_tolerance: float = Field(1e-4, gt=0)
    parity_batch_size: int = Field(2, gt=0)
    parity_seq_len: int = Field(16, gt=0)


class ServerConfig(Section):
    """SGLang-protocol servers of one role: the student's rollout engines or the teacher.

    `rollout` and `teacher` both extend it, so the two are launched, placed and stopped by
    the same code with the same flags (those of `python -m sglang.launch_server`).
    """

    # Where a server runs, how requests reach it and how long we wait for it or how often we
    # relaunch it does not change what it computes.
    NOT_IN_CACHE_KEY = frozenset(
        {
            "url",
            "host",
            "port",
            "api_key",
            "startup_timeout",
            "max_restarts",
            "router_policy",
            "cpu_threads",
        }
    )

    # builtin = the project's own engine (opd serve); sglang = python -m sglang.launch_server;
    # external = servers someone else runs, at `url`.
    backend: Literal["builtin", "sglang", "external"] = "builtin"
    # backend=external: the running server(s), comma-separated.
    url: str | None = None
    # Where each server binds; on a Ray cluster of several nodes, 127.0.0.1 becomes the
    # server's node IP (the driver and the router must reach it).
    host: str = "127.0.0.1"
    # 0 = a free port for each server; else the first of consecutive ones.
    port: int = Field(0, ge=0, le=65535)
    # SGLang --api-key: clients send it as a Bearer token.
    api_key: str | None = None
    # GPUs each server holds, its SGLang --tp-size (slime: --rollout-num-gpus-per-engine);
    # 0 = a CPU server (built-in engine only).
    num_gpus_per_engine: int = Field(0, ge=0)
    # SGLang --mem-fraction-static: the share of each GPU for weights + KV cache.
    mem_fraction_static: float | None = Field(None, gt=0, le=1)
    # Passed to the server as they are, e.g. ["--chunked-prefill-size", "4096"].
    extra_args: list[str] = []
    # SGLang --enable-deterministic-inference: only then does SGLang honour `sampling_seed`
    # (the built-in engine follows the same rule), at some cost in throughput.
    enable_deterministic_inference: bool = False
    # Seconds a server may take to answer /health_generate after it starts.
    startup_timeout: float = Field(600.0, gt=0)
    # Relaunches of a server that died, per role and run (self-healing; each one is logged and
    # counted in the round's metrics); one more death fails the run, naming the server.
    max_restarts: int = Field(3, ge=0)
    # sglang-router's --policy, when the role has more than one server (the router is only
    # started then); cache_aware sends a prompt's samples where its prefix is cached.
    router_policy: Literal["cache_aware", "round_robin", "random", "power_of_two"] = "cache_aware"
    # Torch CPU threads of each server process (its OMP_NUM_THREADS); None = the driver's
    # OMP_NUM_THREADS, else torch's default (every core). On a small CPU machine, 1 each lets
    # the rollout engine and the teacher compute at the same time (streamed scoring).
    cpu_threads: int | None = Field(None, gt=0)

    @property
    def urls(self) -> list[str]:
        """backend=external: the servers' URLs."""
        return [u.strip() for u in (self.url or "").split(",") if u.strip()]


class TeacherConfig(ServerConfig):
    """The teacher's servers (opd_type=sglang; unused when opd_type=megatron)."""

    # Teacher servers, each with num_gpus_per_engine GPUs (behind sglang-router when > 1).
    num_replicas: int = Field(1, ge=1)


class ClientConfig(Section):
    """The HTTP client that talks to teacher and rollout servers."""

    timeout: float = Field(120.0, gt=0)
    max_concurrency: int = Field(16, gt=0)
    batch_size: int = Field(32, gt=0)
    max_retries: int = Field(5, ge=0)
    cache_dir: str | None = ".cache/opd-teacher-logprobs"


class RolloutConfig(ServerConfig):
    """The student's rollout engines and what one training round samples from them."""

    # Training rounds (slime's name); the code calls them rounds.
    num_rollout: int = Field(8, ge=0)
    # Prompts per round.
    rollout_batch_size: int = Field(32, gt=0)
    # Responses sampled per prompt (one GRPO group).
    n_samples_per_prompt: int = Field(8, gt=0)
    # max_new_tokens of a rollout; lowered per prompt so prompt + response fit the student's
    # context and what the teacher servers score.
    rollout_max_response_len: int = Field(16, gt=0)
    # slime's flag: train prompts longer than this many tokens (chat template applied) are
    # dropped by the download stage, counted in its manifest. None = keep all that fit.
    rollout_max_prompt_len: int | None = Field(None, gt=0)
    # Sampling temperature of the rollouts.
    rollout_temperature: float = Field(1.0, ge=0)
    # Nucleus sampling: the smallest set of tokens with this much probability.
    rollout_top_p: float = Field(1.0, gt=0, le=1)
    # Sample among the k most likely tokens; -1 = all.
    rollout_top_k: int = -1
    # Rollout engines, each with num_gpus_per_engine GPUs (slime: --rollout-num-gpus / per
    # engine); with more than one, requests go through sglang-router.
    num_engines: int = Field(1, ge=1)
    # Server teacher (opd_type sglang): score each generated batch while the others still
    # generate (opd_core.trainer.streaming); the rows written are the same either way.
    # False = score after the whole round is generated.
    stream_scoring: bool = True
    # Asynchronous rounds (slime has no flag for it: its train_async.py driver): round k+1's
    # rollouts are generated (and scored by a server teacher) while round k trains, by the
    # engines still holding the weights before round k's step. Round k's rollouts then come
    # from the policy after max(k-1, 0) steps (each row's weight_version says which), and
    # the PPO ratio takes the engine's log-probs as the old ones (see use_rollout_logprobs).
    async_rounds: bool = False

    NOT_IN_CACHE_KEY = ServerConfig.NOT_IN_CACHE_KEY | {"stream_scoring"}

    @property
    def rounds(self) -> int:
        return self.num_rollout


class RewardConfig(Section):
    """`math` = the verifier, `none` = pure distillation, else `module:function`."""

    type: str = "none"
    custom_rm_path: str | None = None
    custom_reward_post_process_path: str | None = None


TeacherSource = Literal["none", "server", "megatron"]


class AlgorithmConfig(Section):
    # How the old log-probs are obtained does not change what is trained (same results).
    NOT_IN_CACHE_KEY = frozenset({"old_logprob_forward"})

    advantage_estimator: Literal[
        "grpo", "ppo", "reinforce_plus_plus", "reinforce_plus_plus_baseline", "gspo"
    ] = "grpo"
    use_opd: bool = True
    opd_type: Literal["sglang", "megatron"] | None = "sglang"
    opd_kl_coef: float = 1.0
    opd_teacher_load: str | None = None
    opd_teacher_ckpt_step: int | None = None
    # 0 = slime's OPD: the sampled token's reverse KL is a penalty on its advantage. k > 0 =
    # top-k OPD: the teacher also returns its k most likely tokens per position (the server's
    # top_logprobs_num, or the Megatron teacher's logits) and the OPD term is instead a dense
    # loss, the reverse KL over that support (weight opd_kl_coef).
    opd_topk: int = Field(0, ge=0)
    eps_clip: float = Field(0.2, ge=0)
    eps_clip_high: float | None = Field(None, ge=0)
    use_kl_loss: bool = False
    kl_loss_coef: float = Field(0.0, ge=0)
    kl_loss_type: Literal["k1", "k3", "low_var_kl"] = "low_var_kl"
    entropy_coef: float = Field(0.0, ge=0)
    normalize_advantages: bool = False
    use_rollout_logprobs: bool = False
    # auto = a separate forward pass for the old log-probs only when something reads them
    # before the step (several optimizer steps per round, sampled-token OPD, ppo); else the
    # training forward is the old policy's (ratio 1). always = every round, as slime does.
    old_logprob_forward: Literal["auto", "always"] = "auto"
    gamma: float = Field(1.0, ge=0, le=1)
    # GAE's lambda (slime's name).
    lambd: float = Field(1.0, ge=0, le=1)
    # Dual-clip PPO lower bound for negative advantages.
    eps_clip_c: float | None = Field(None, gt=1)
    # grpo/gspo: divide the group-centred reward by the group std.
    grpo_std_normalization: bool = True
    # ppo critic: clip values to old_values +- value_clip.
    value_clip: float | None = Field(0.2, gt=0)
    # Per-round metrics go to train/metrics.arrow always; these add live loggers if installed.
    loggers: list[Literal["tensorboard", "wandb"]] = []
    wandb_project: str | None = None

    @property
    def teacher_source(self) -> TeacherSource:
        """Where the teacher's log-probs come from: `server` = SGLang-protocol servers over
        HTTP (slime's opd_type=sglang, whatever the server's backend), `megatron` = a frozen
        model inside the training actors, `none` = no OPD."""
        if not self.use_opd:
            return "none"
        return "megatron" if self.opd_type == "megatron" else "server"


class ParallelConfig(Section):
    # Must divide the heads and kv groups.
    tensor_model_parallel_size: int = Field(1, ge=1)
    # Stages of Megatron's 1F1B schedule; must divide the layers.
    pipeline_model_parallel_size: int = Field(1, ge=1)
    # World size = TP x PP x DP ranks (Ray actors).
    data_parallel_size: int = Field(1, ge=1)

    @property
    def world_size(self) -> int:
        return (
            self.tensor_model_parallel_size
            * self.pipeline_model_parallel_size
            * self.data_parallel_size
        )


class RayConfig(Section):
    """Where training actors, rollout engines and teacher replicas run (opd_core.cluster)."""

    NOT_IN_CACHE_KEY = frozenset({"address", "placement_timeout", "colocate", "max_restarts"})

    # None = start a local cluster.
    address: str | None = None
    # Nodes the training actors span (world size = nodes x actor_num_gpus_per_node).
    actor_num_nodes: int = Field(1, ge=1)
    # 0 = CPU actors.
    actor_num_gpus_per_node: int = Field(0, ge=0)
    # CPUs (and torch threads) per rank; None = its share of this machine: the cores split
    # over the ranks, and with rollout.async_rounds only those the CPU servers' threads leave
    # (cluster.actor_threads).
    actor_num_cpus_per_rank: int | None = Field(None, gt=0)
    # Seconds to wait for each role's placement group.
    placement_timeout: float = Field(300.0, gt=0)
    # slime's --colocate: rollout engine e runs on the GPUs of training actors e*g .. e*g+g-1
    # (g = rollout.num_gpus_per_engine), sharing them; false = every role has its own GPUs.
    colocate: bool = False
    # Rebuilds of the training actors from the last checkpoint after one died (the lost
    # rounds are redone); one more death fails the run.
    max_restarts: int = Field(3, ge=0)


class TrainConfig(Section):
    """The optimizer, its lr schedule, checkpoints and the actors' layout.

    The lr schedule has Megatron-LM's names and semantics (megatron-core's
    OptimizerParamScheduler runs it on CPU and CUDA): linear warmup from lr_warmup_init to lr
    over lr_warmup_iters optimizer steps, then decay to min_lr by lr_decay_iters (None = the
    run's last step: num_rollout x optimizer steps per round). `OPDRunConfig.lr_schedule` is
    that schedule resolved in steps.
    """

    # How many old exports stay on disk, which kernel computes attention and how the samples
    # are laid out in its input (the same math) do not change what is trained.
    NOT_IN_CACHE_KEY = frozenset({"keep_hf_exports", "attention_backend", "share_prompts"})

    lr: float = Field(1e-3, gt=0)
    # ppo critic's AdamW lr; None = train.lr.
    critic_lr: float | None = Field(None, gt=0)
    # The lr at the end of the decay.
    min_lr: float = Field(0.0, ge=0)
    # After warmup.
    lr_decay_style: Literal["constant", "linear", "cosine", "inverse-square-root"] = "constant"
    # Optimizer steps of linear warmup.
    lr_warmup_iters: int = Field(0, ge=0)
    # Warmup as a fraction of lr_decay_iters (instead).
    lr_warmup_fraction: float | None = Field(None, ge=0, lt=1)
    # The lr warmup starts from.
    lr_warmup_init: float = Field(0.0, ge=0)
    # The schedule's horizon; None = the whole run.
    lr_decay_iters: int | None = Field(None, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    clip_grad: float = Field(1.0, gt=0)
    # Samples per optimizer step.
    global_batch_size: int = Field(256, gt=0)
    micro_batch_size: int = Field(64, gt=0)
    # Rounds between checkpoints (resume points); the last round is always saved.
    save_interval: int = Field(1, ge=1)
    # Megatron-LM's --attention-backend: auto = Transformer Engine where CUDA and TE are there,
    # else core attention in torch SDPA; local = megatron's unfused DotProductAttention.
    attention_backend: Literal["auto", "te", "sdpa", "local"] = "auto"
    # The samples of one prompt share one input row in every actor forward: the prompt once,
    # then each sample's response attending to the prompt and itself (same logits and
    # gradients, the prompt computed once instead of n_samples_per_prompt times). auto = on
    # unless attention is Transformer Engine's, whose causal kernels ignore such a mask.
    share_prompts: Literal["auto", "on", "off"] = "auto"
    # HF exports of rounds kept: the last N, plus every resume point and `final`; 0 = all.
    keep_hf_exports: int = Field(2, ge=0)
    # auto = bf16 on CUDA, fp32 on CPU.
    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    parallel: ParallelConfig = ParallelConfig()
    ray: RayConfig = RayConfig()


class LRSchedule(BaseModel):
    """The lr schedule resolved in optimizer steps (train.lr_* + the run's length): what the
    optimizer runs. Derived, not configured: `OPDRunConfig.lr_schedule` builds it."""

    model_config = ConfigDict(frozen=True)

    lr: float
    min_lr: float
    warmup_init: float
    warmup_steps: int
    decay_steps: int
    decay_style: Literal["constant", "linear", "cosine", "inverse-square-root"]

    def with_peak(self, lr: float) -> LRSchedule:
        """The same shape at another peak lr (the ppo critic's), its floors capped by it."""
        return self.model_copy(
            update={
                "lr": lr,
                "min_lr": min(self.min_lr, lr),
                "warmup_init": min(self.warmup_init, lr),
            }
        )


class EvalSettings(Section):
    """How a model is evaluated on one prompt set (EvalConfig's defaults for every benchmark).

    n_samples responses per prompt at temperature/top_p/top_k give avg@n (their mean accuracy)
    and the unbiased pass@k for each k in pass_k; `greedy` adds one temperature-0 response per
    prompt, reported as its own pass@1.
    """

    num_prompts: int | None = Field(None, gt=0)  # None = every prompt of the benchmark
    n_samples: int = Field(4, ge=1)  # sampled responses per prompt
    pass_k: list[int] | None = None  # None = 1, 2, 4, ... up to n_samples, and n_samples
    temperature: float = Field(1.0, ge=0)  # of the n samples (the greedy one is 0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = -1  # -1 = off
    max_new_tokens: int = Field(16, gt=0)  # capped per prompt to fit the model's context
    greedy: bool = True  # also one greedy response per prompt: pass@1 (greedy)

    @property
    def ks(self) -> list[int]:
        """The k values of pass@k, sorted."""
        if self.pass_k:
            return sorted(set(self.pass_k))
        powers = [2**i for i in range(self.n_samples.bit_length()) if 2**i <= self.n_samples]
        return sorted({*powers, self.n_samples})


# Per-benchmark sampling overrides (None = the eval section's value).
SAMPLING_OVERRIDES = ("n_samples", "pass_k", "temperature", "top_p", "top_k", "max_new_tokens")


class EvalBenchmark(DatasetSpec):
    """One eval set, reported on its own: a dataset (DatasetSpec's fields) plus optional
    sampling overrides (AIME is often sampled more than MATH-500)."""

    name: str = ""  # a short name for reports; "" = the preset's, else the source file's stem
    split: str = "test"  # eval sets default to their test split
    # Sampling overrides of this benchmark; None = the eval section's value.
    n_samples: int | None = Field(None, ge=1)
    pass_k: list[int] | None = None  # override
    temperature: float | None = Field(None, ge=0)  # override
    top_p: float | None = Field(None, gt=0, le=1)  # override
    top_k: int | None = None  # override
    max_new_tokens: int | None = Field(None, gt=0)  # override

    @model_validator(mode="after")
    def _name(self) -> EvalBenchmark:
        if not self.name:
            preset = PRESETS.get(self.preset or "")
            stem = Path(self.source.removeprefix("hf:")).stem or self.source
            # object.__setattr__: a plain assignment would validate (and run this) again.
            object.__setattr__(self, "name", preset.name if preset else stem)
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name):
            raise ValueError(
                f"benchmark name {self.name!r}: use letters, digits, '_', '.', '-' (it names "
                "report sections and summary keys)"
            )
        return self


# The fields that say which rows an eval set has (the download stage's business), as opposed
# to how they are sampled (the eval stages').
DATASET_FIELDS = ("name", *DatasetSpec.model_fields)


class EvalConfig(EvalSettings):
    """The eval stages: default sampling (EvalSettings) and the benchmarks, in report order.
    The first benchmark supplies the summary's top-level numbers (pass_at_1, pass_at_k, ...)."""

    benchmarks: list[EvalBenchmark] = [EvalBenchmark(source="toy", split="test")]

    @model_validator(mode="after")
    def _check_benchmarks(self) -> EvalConfig:
        if not self.benchmarks:
            raise ValueError("eval.benchmarks is empty: list at least one eval set")
        names = [b.name for b in self.benchmarks]
        if duplicates := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"eval.benchmarks: duplicate names {duplicates}; set `name` on each")
        for bench in self.benchmarks:
            settings = self.settings_for(bench)
            if too_big := [k for k in settings.ks if not 1 <= k <= settings.n_samples]:
                raise ValueError(
                    f"eval benchmark {bench.name!r}: pass_k {too_big} needs 1 <= k <= "
                    f"n_samples ({settings.n_samples})"
                )
        return self

    def settings_for(self, bench: EvalBenchmark) -> EvalSettings:
        """This benchmark's settings: its overrides on top of the section's defaults."""
        fields = {name: getattr(self, name) for name in EvalSettings.model_fields}
        for name in SAMPLING_OVERRIDES:
            if getattr(bench, name) is not None:
                fields[name] = getattr(bench, name)
        return EvalSettings(**fields)


class PreflightConfig(Section):
    """The download stage's check that student and teacher fit together (opd_core/preflight.py).

    Each difference it finds is an error naming both models; `allow` accepts named ones you
    know to be safe: tokenizer (other ids for the same text), special_tokens (added tokens
    differ), eos_pad (eos or pad token differs), chat_template (prompts render differently).
    Embedding rows smaller than the tokenizer and prompts that cannot fit the context are
    never allowed: they crash or silently truncate.
    """

    # Named differences between student and teacher accepted as safe (see above).
    allow: list[Literal["tokenizer", "special_tokens", "eos_pad", "chat_template"]] = []
    # Drop prompts that cannot fit the context (train: with rollout_max_response_len; eval:
    # with at least one new token) instead of failing; counted in download/manifest.json.
    drop_overlong_prompts: bool = False
    probe_prompts: int = Field(32, ge=0)  # prompts per data set rendered by both tokenizers


class RunConfig(Section):
    artifacts_dir: str = "artifacts"
    # None = <name>-<timestamp>.
    run_id: str | None = None


# ----------------------------------------------------------------------------- the tree


class OPDRunConfig(Section):
    name: str = "toy"
    seed: int = 0
    run: RunConfig = RunConfig()
    toy: ToyConfig = ToyConfig()
    models: ModelsConfig = ModelsConfig()
    data: DataConfig = DataConfig()
    preflight: PreflightConfig = PreflightConfig()
    convert: ConvertConfig = ConvertConfig()
    teacher: TeacherConfig = TeacherConfig()
    client: ClientConfig = ClientConfig()
    rollout: RolloutConfig = RolloutConfig()
    reward: RewardConfig = RewardConfig()
    algorithm: AlgorithmConfig = AlgorithmConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _check_opd(self) -> OPDRunConfig:
        # slime's argument rules for on-policy distillation, with its flag names.
        a = self.algorithm
        if a.use_opd and a.opd_type is None:
            raise ValueError(
                "algorithm.use_opd is true but algorithm.opd_type is not set (sglang or megatron)"
            )
        if a.opd_teacher_load and not a.use_opd:
            raise ValueError("algorithm.opd_teacher_load is set but algorithm.use_opd is false")
        if a.teacher_source == "megatron" and not a.opd_teacher_load:
            raise ValueError(
                "algorithm.opd_type=megatron needs algorithm.opd_teacher_load "
                "(a torch_dist checkpoint)"
            )
        if a.teacher_source == "server" and a.opd_teacher_load:
            raise ValueError(
                "algorithm.opd_type=sglang takes the teacher from the teacher server; "
                "algorithm.opd_teacher_load is only for opd_type=megatron"
            )
        if a.opd_topk and not a.use_opd:
            raise ValueError("algorithm.opd_topk is set but algorithm.use_opd is false")
        if a.opd_teacher_ckpt_step is not None and not a.opd_teacher_load:
            raise ValueError(
                "algorithm.opd_teacher_ckpt_step is set but algorithm.opd_teacher_load is not"
            )
        for role in ("teacher", "rollout"):
            if getattr(self, role).backend == "external" and not getattr(self, role).urls:
                raise ValueError(f"{role}.backend=external needs {role}.url")
        if self.train.micro_batch_size > self.train.global_batch_size:
            raise ValueError("train.micro_batch_size must be <= train.global_batch_size")
        self._check_lr_schedule()
        self._check_parallel_layout()
        self._check_async_rounds()
        return self

    def _check_async_rounds(self) -> None:
        if not self.rollout.async_rounds:
            return
        if self.algorithm.teacher_source == "megatron":
            raise ValueError(
                "rollout.async_rounds=true needs a teacher server (algorithm.opd_type=sglang) "
                "or no teacher: the Megatron teacher (opd_type=megatron) scores inside the "
                "training actors, which are busy with the step the next rollouts overlap"
            )
        if self.train.ray.colocate:
            raise ValueError(
                "rollout.async_rounds=true cannot run with train.ray.colocate=true: colocated "
                "engines share the actors' GPUs, so generation cannot overlap a step (slime's "
                "train_async.py refuses colocation too)"
            )

    def _check_parallel_layout(self) -> None:
        """TP must divide the heads and kv groups and PP the layers of every model the
        training actors hold: checked here, before any stage runs, wherever the shapes are
        known without downloading (the toy specs, a local HF dir's config.json); a hub
        model's are checked as soon as it is downloaded (`opd_core.stages.Train.check_layout`)."""
        parallel = self.train.parallel
        tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
        if tp == pp == 1:
            return
        # Imported only when there is a layout to check: loading a config stays torch-free.
        from opd_core.megatron.model import check_parallel_layout

        roles = (
            ("student", "teacher") if self.algorithm.teacher_source == "megatron" else ("student",)
        )
        for role in roles:
            source = getattr(self.models, role)
            if source == "toy":
                check_parallel_layout(
                    getattr(self.toy, role), tp, pp, f"models.{role} (toy.{role})"
                )
            elif (Path(source) / "config.json").is_file():
                shape = json.loads((Path(source) / "config.json").read_text())
                shape.setdefault("num_key_value_heads", shape.get("num_attention_heads"))
                check_parallel_layout(SimpleNamespace(**shape), tp, pp, f"models.{role} ({source})")

    def _check_lr_schedule(self) -> None:
        t = self.train
        if t.min_lr > t.lr or t.lr_warmup_init > t.lr:
            raise ValueError(
                f"train.min_lr ({t.min_lr}) and train.lr_warmup_init ({t.lr_warmup_init}) "
                f"must be <= train.lr ({t.lr})"
            )
        if t.lr_warmup_iters and t.lr_warmup_fraction is not None:
            raise ValueError("set train.lr_warmup_iters or train.lr_warmup_fraction, not both")
        horizon = self.lr_schedule.decay_steps
        if t.lr_warmup_iters and t.lr_warmup_iters >= horizon:
            raise ValueError(
                f"train.lr_warmup_iters ({t.lr_warmup_iters}) must be < the decay horizon "
                f"({horizon} optimizer steps: train.lr_decay_iters, or num_rollout x steps "
                "per round)"
            )

    @property
    def optimizer_steps_per_round(self) -> int:
        samples = self.rollout.rollout_batch_size * self.rollout.n_samples_per_prompt
        return -(-samples // self.train.global_batch_size)

    @property
    def old_logprobs_from_rollouts(self) -> bool:
        """True when the PPO ratio's old log-probs are the engine's per-token rollout log-probs:
        asked for (use_rollout_logprobs), or asynchronous rounds, whose rollouts come from
        weights the trainer no longer holds (the behaviour policy, one step behind)."""
        return self.algorithm.use_rollout_logprobs or self.rollout.async_rounds

    @property
    def old_logprobs_forward(self) -> bool:
        """True when a round needs the policy's log-probs in a forward pass of their own.

        With one optimizer step per round the old policy IS the one being trained, so its
        log-probs are the training forward's (detached): the PPO ratio is exactly 1 and the
        actor reports the reverse-KL metric itself. A separate pass is needed only when
        something reads them before the step: several steps per round (later steps' ratios),
        the sampled-token OPD penalty on the advantages, ppo's critic path, or when asked.
        """
        algorithm = self.algorithm
        if self.old_logprobs_from_rollouts:
            return False  # the engine's log-probs are the old ones
        return (
            algorithm.old_logprob_forward == "always"
            or self.optimizer_steps_per_round > 1
            or (algorithm.use_opd and algorithm.opd_topk == 0)
            or algorithm.advantage_estimator == "ppo"
        )

    @property
    def lr_schedule(self) -> LRSchedule:
        """The schedule in optimizer steps: the horizon is train.lr_decay_iters, else the whole
        run; warmup is train.lr_warmup_iters, or lr_warmup_fraction of the horizon (so it
        scales with the run)."""
        t = self.train
        decay_steps = t.lr_decay_iters or max(
            1, self.rollout.num_rollout * self.optimizer_steps_per_round
        )
        warmup_steps = (
            int(t.lr_warmup_fraction * decay_steps)
            if t.lr_warmup_fraction is not None
            else t.lr_warmup_iters
        )
        return LRSchedule(
            lr=t.lr,
            min_lr=t.min_lr,
            warmup_init=t.lr_warmup_init,
            warmup_steps=warmup_steps,
            decay_steps=decay_steps,
            decay_style=t.lr_decay_style,
        )

    def sections_dump(self, *names: str) -> dict[str, Any]:
        """Some sections as JSON-able values, without their NOT_IN_CACHE_KEY fields."""
        return {n: _dump(getattr(self, n)) for n in names}

    def section_hash(self, *names: str) -> str:
        """Stable hash of some sections: the config part of a stage's cache key."""
        payload = self.sections_dump(*names)
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _dump(value: Any) -> Any:
    """JSON-able form of a config value for cache keys, without NOT_IN_CACHE_KEY fields."""
    if isinstance(value, Section):
        skip = type(value).NOT_IN_CACHE_KEY
        return {
            name: _dump(getattr(value, name))
            for name in type(value).model_fields
            if name not in skip
        }
    return to_jsonable_python(value)


# ------------------------------------------------------------------------------ loading


def apply_override(tree: dict, override: str) -> None:
    """Apply one `a.b.c=value` override; the value is parsed as YAML (so 1e-3, true, [1,2])."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not of the form section.field=value")
    dotted, raw = override.split("=", 1)
    keys = dotted.strip().split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {key!r} is not a section")
    node[keys[-1]] = yaml.safe_load(raw)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> OPDRunConfig:
    """Load, override and validate. Errors name the file and the dotted field."""
    source = str(path) if path else "<defaults>"
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(tree).__name__}")
    for override in overrides or []:
        apply_override(tree, override)
    return validate_config(tree, source)


def validate_config(tree: dict, source: str = "<dict>") -> OPDRunConfig:
    try:
        return OPDRunConfig.model_validate(tree)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            field = ".".join(str(p) for p in e["loc"]) or "(top level)"
            lines.append(
                f"  {field}: {e['msg']}"
                + (f" (got {e['input']!r})" if "input" in e and field != "(top level)" else "")
            )
        raise ConfigError(f"{source}: invalid config\n" + "\n".join(lines)) from None
