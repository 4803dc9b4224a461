"""The config tree: YAML loading, overrides, and errors that name the file and the field."""

from pathlib import Path

import pytest

from opd_core.config import ConfigError, OPDRunConfig, load_config
from opd_core.config_doc import markdown

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert cfg.algorithm.use_opd and cfg.algorithm.opd_type == "sglang"


def test_qwen3_config_mirrors_slime_example():
    cfg = load_config(CONFIGS / "qwen3-8b-opd.yaml")
    assert cfg.models.student == "hf:Qwen/Qwen3-8B" and cfg.models.teacher == "hf:Qwen/Qwen3-32B"
    assert (
        cfg.rollout.rollout_batch_size,
        cfg.rollout.n_samples_per_prompt,
        cfg.train.global_batch_size,
    ) == (16, 4, 64)
    assert cfg.train.lr == 1e-6 and cfg.train.parallel.tensor_model_parallel_size == 2
    train = cfg.data.train
    assert (train.source, train.input_key, train.label_key, train.template) == (
        "hf:zhuzilin/dapo-math-17k",
        "prompt",
        "label",
        "none",
    )
    math500, aime = cfg.eval.benchmarks
    assert (math500.name, math500.split, math500.input_key, math500.label_key) == (
        "math500",
        "test",
        "problem",
        "answer",
    )
    assert math500.template == aime.template == "dapo"
    settings = cfg.eval.settings_for(math500)
    assert (settings.n_samples, settings.temperature, settings.top_p) == (16, 1.0, 1.0)
    assert settings.max_new_tokens == 16384 and aime.source == "hf:HuggingFaceH4/aime_2024"


def test_qwen3_4b_config_mirrors_the_modal_tutorial():
    cfg = load_config(CONFIGS / "qwen3-4b-modal.yaml")
    assert (cfg.models.student, cfg.models.teacher) == ("hf:Qwen/Qwen3-4B", "hf:Qwen/Qwen3-8B")
    assert cfg.data.train.limit == 100 and cfg.data.chat_template_kwargs == {
        "enable_thinking": True
    }
    (heldout,) = cfg.eval.benchmarks
    assert (heldout.offset, heldout.limit) == (100, 20)  # after the 100 train rows
    assert cfg.reward.type == "opd_core.verifier:signed_math_reward" and cfg.algorithm.use_opd


def test_overrides_are_parsed_as_yaml():
    cfg = load_config(
        CONFIGS / "toy.yaml",
        [
            "train.lr=3e-4",
            "rollout.num_rollout=2",
            "train.lr_warmup_iters=0",
            "algorithm.use_opd=false",
            "algorithm.opd_topk=0",
        ],
    )
    assert cfg.train.lr == 3e-4 and cfg.rollout.num_rollout == 2 and cfg.algorithm.use_opd is False


def _write(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        (
            "algorithm: {use_opd: true, opd_type: null}",
            "use_opd is true but algorithm.opd_type is not set",
        ),
        (
            "algorithm: {use_opd: true, opd_type: megatron}",
            "opd_type=megatron needs algorithm.opd_teacher_load",
        ),
        (
            "algorithm: {use_opd: true, opd_type: sglang, opd_teacher_load: /ckpt}",
            "only for opd_type=megatron",
        ),
        (
            "algorithm: {use_opd: false, opd_type: null, opd_teacher_load: /ckpt}",
            "opd_teacher_load is set but algorithm.use_opd is false",
        ),
        (
            "rollout: {async_rounds: true}\n"
            "algorithm: {use_opd: true, opd_type: megatron, opd_teacher_load: /ckpt}",
            "rollout.async_rounds=true needs a teacher server",
        ),
        (
            "rollout: {async_rounds: true}\ntrain: {ray: {colocate: true}}",
            "rollout.async_rounds=true cannot run with train.ray.colocate=true",
        ),
    ],
)
def test_slime_opd_argument_errors(tmp_path, yaml_text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, yaml_text))


def test_unknown_field_is_named_with_its_file(tmp_path):
    path = _write(tmp_path, "algorithm: {opd_kl_coeff: 2.0}")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value) and "algorithm.opd_kl_coeff" in str(err.value)


def test_wrong_type_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"rollout\.n_samples_per_prompt"):
        load_config(_write(tmp_path, "rollout: {n_samples_per_prompt: many}"))


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "a: [1,"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(_write(tmp_path, "- 1\n- 2"))
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(None, ["train.lr"])


def test_section_hash_tracks_only_its_sections():
    base = load_config(CONFIGS / "toy.yaml")
    changed = load_config(CONFIGS / "toy.yaml", ["train.lr=0.5"])
    assert base.section_hash("eval") == changed.section_hash("eval")
    assert base.section_hash("train") != changed.section_hash("train")


def test_async_rounds_are_part_of_the_training_key():
    base = load_config(CONFIGS / "toy.yaml")
    asynchronous = load_config(CONFIGS / "toy.yaml", ["rollout.async_rounds=true"])
    assert base.section_hash("rollout") != asynchronous.section_hash("rollout")


def test_where_training_runs_is_not_part_of_its_cache_key():
    base = load_config(CONFIGS / "toy.yaml")
    moved = load_config(
        CONFIGS / "toy.yaml",
        ["train.ray.address=ray://head:10001", "train.ray.placement_timeout=900"],
    )
    assert base.section_hash("train") == moved.section_hash("train")
    on_gpus = load_config(
        CONFIGS / "toy.yaml", ["train.ray.actor_num_gpus_per_node=1"]
    )  # bf16 there: other results
    assert base.section_hash("train") != on_gpus.section_hash("train")


def test_readme_config_reference_is_current():
    """README's config reference is generated (`python -m opd_core.config_doc`): regenerate it."""
    readme = (CONFIGS.parent / "README.md").read_text()
    assert markdown() in readme, (
        "README.md config reference is stale: run `python -m opd_core.config_doc README.md`"
    )


TWO_STEP_ROUNDS = [  # 10 rounds of 32 samples, 2 optimizer steps of 16 each
    "rollout.num_rollout=10",
    "rollout.rollout_batch_size=8",
    "rollout.n_samples_per_prompt=4",
    "train.global_batch_size=16",
    "train.micro_batch_size=16",
]


def test_lr_schedule_horizon_and_its_errors():
    cfg = load_config(None, TWO_STEP_ROUNDS)
    # The whole run by default.
    assert cfg.optimizer_steps_per_round == 2 and cfg.lr_schedule.decay_steps == 20
    assert load_config(None, ["train.lr_decay_iters=7"]).lr_schedule.decay_steps == 7
    overrides = ["train.lr_decay_iters=40", "train.lr_warmup_fraction=0.1"]
    assert load_config(None, overrides).lr_schedule.warmup_steps == 4
    with pytest.raises(ConfigError, match="lr_warmup_iters or train.lr_warmup_fraction, not both"):
        load_config(None, ["train.lr_warmup_iters=2", "train.lr_warmup_fraction=0.1"])
    with pytest.raises(
        ConfigError, match=r"train.lr_warmup_iters \(20\) must be < the decay horizon \(20"
    ):
        load_config(
            None,
            [*TWO_STEP_ROUNDS, "train.lr_warmup_iters=20"],
        )
    with pytest.raises(ConfigError, match=r"train.min_lr \(0.1\)"):
        load_config(None, ["train.lr=0.01", "train.min_lr=0.1"])
    with pytest.raises(ConfigError, match="train.lr_decay_style"):
        load_config(None, ["train.lr_decay_style=exponential"])


def test_a_separate_old_logprob_pass_only_when_something_reads_it():
    def needs(**tree):
        base = {"rollout": {"rollout_batch_size": 4, "n_samples_per_prompt": 2}}
        for section, fields in tree.items():
            base.setdefault(section, {}).update(fields)
        return OPDRunConfig.model_validate(base).old_logprobs_forward

    one_step = {"global_batch_size": 8, "micro_batch_size": 4}
    assert not needs(train=one_step, algorithm={"opd_topk": 8})  # the demo's round
    assert not needs(train=one_step, algorithm={"use_opd": False})
    assert needs(train=one_step, algorithm={"opd_topk": 0})  # the penalty reads them
    assert needs(train={"global_batch_size": 4, "micro_batch_size": 4}, algorithm={"opd_topk": 8})
    assert needs(train=one_step, algorithm={"opd_topk": 8, "old_logprob_forward": "always"})
    assert needs(train=one_step, algorithm={"use_opd": False, "advantage_estimator": "ppo"})
    assert not needs(train=one_step, algorithm={"opd_topk": 0, "use_rollout_logprobs": True})
    # Async rounds: the engine's log-probs are the behaviour policy's, the trainer's are not.
    assert not needs(train=one_step, algorithm={"opd_topk": 0}, rollout={"async_rounds": True})
    assert not needs(
        train={"global_batch_size": 4, "micro_batch_size": 4},
        algorithm={"advantage_estimator": "ppo"},
        rollout={"async_rounds": True},
    )
