"""HF <-> Megatron torch_dist conversion: logits parity, bit-exact round trip, reload, errors, CLI.

Tiny random fp32 models built here (nothing downloaded). ~40 s with the real-width model.
"""

import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
from tiny_runs import make_tiny_qwen2
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    LlamaConfig,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from opd_core.config import load_config
from opd_core.hf_utils import make_tiny_qwen3
from opd_core.io import read_json
from opd_core.megatron import checkpoint
from opd_core.megatron.convert import (
    check_parity,
    hf_to_torch_dist,
    load_hf_config,
    read_hf_state_dict,
    torch_dist_to_hf,
)
from opd_core.megatron.layout import Layout
from opd_core.megatron.model import (
    ConfigMismatchError,
    UnsupportedModelError,
    build_gpt_model,
    check_config_matches,
    forward_logits,
    model_family,
)
from opd_core.rundir import RunDir
from opd_core.stages import Convert

# initializer_range 0.2 instead of 0.02: logits of order 10, so a wrong mapping shows clearly.
VARIANTS = {
    "qwen3_tied": dict(tie_word_embeddings=True),
    "qwen3_untied": dict(tie_word_embeddings=False),
    # GQA 8 query heads / 2 groups and head_dim 16 != hidden 32 / 8 heads, non-default rope base.
    "qwen3_gqa_head_dim": dict(
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=16,
        rope_theta=1e6,
        tie_word_embeddings=False,
    ),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    dirs = {
        name: make_tiny_qwen3(root / name, initializer_range=0.2, **overrides)
        for name, overrides in VARIANTS.items()
    }
    dirs["qwen2_bias"] = make_tiny_qwen2(root / "qwen2_bias")
    return root, dirs


@pytest.mark.parametrize("variant", [*VARIANTS, "qwen2_bias"])
def test_logits_parity_and_bit_exact_round_trip(models, variant):
    root, dirs = models
    hf_dir, ckpt = dirs[variant], root / f"{variant}_torch_dist"
    hf_to_torch_dist(hf_dir, ckpt)
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "0"
    assert (ckpt / "iter_0000000" / "metadata.json").is_file()

    parity = check_parity(hf_dir, ckpt, batch_size=2, seq_len=16)
    assert parity["max_abs_logits"] > 1.0  # the check compares real signal, not near-zero logits
    assert parity["max_abs_logits_diff"] <= 1e-5, parity

    back = torch_dist_to_hf(ckpt, hf_dir, root / f"{variant}_back")
    original, converted = read_hf_state_dict(hf_dir), read_hf_state_dict(back)
    assert sorted(original) == sorted(converted)
    for name in original:
        assert torch.equal(original[name], converted[name]), name
    index = json.loads((back / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(original)
    assert (back / "config.json").is_file()


def test_reload_into_fresh_model_gives_identical_logits(models):
    root, dirs = models
    hf_dir = dirs["qwen3_untied"]
    ckpt = hf_to_torch_dist(hf_dir, root / "reload", step=5)
    config = load_hf_config(hf_dir)
    layout = Layout.of([[1, 2, 3, 4, 5], [7, 8]], [[9, 10], [11]])
    logits = []
    for _ in range(2):
        model = build_gpt_model(config, dtype=torch.float32).eval()
        checkpoint.load_model(model, ckpt, step=5)
        with torch.no_grad():
            logits.append(forward_logits(model, layout))
    assert torch.equal(logits[0], logits[1])
    with pytest.raises(Exception, match="iter_0000007"):
        checkpoint.load_model(model, ckpt, step=7)


def test_unsupported_architecture_is_named():
    config = LlamaConfig(
        hidden_size=32, num_attention_heads=4, num_hidden_layers=1, intermediate_size=64
    )
    config.architectures = ["LlamaForCausalLM"]
    with pytest.raises(
        UnsupportedModelError,
        match="LlamaForCausalLM.*supported: Qwen3ForCausalLM.*Qwen2ForCausalLM",
    ):
        model_family(config)


def test_config_mismatch_names_the_field(models):
    _, dirs = models
    config = load_hf_config(dirs["qwen3_gqa_head_dim"])
    model = build_gpt_model(config, dtype=torch.float32)
    check_config_matches(config, model)  # the real config matches
    for field, value, pattern in [
        ("rope_parameters", {"rope_type": "default", "rope_theta": 10000.0}, "rope_theta"),
        ("head_dim", 8, "head_dim"),
        ("num_key_value_heads", 4, "num_key_value_heads"),
        ("tie_word_embeddings", True, "tie_word_embeddings"),
    ]:
        wrong = AutoConfig.from_pretrained(dirs["qwen3_gqa_head_dim"])
        setattr(wrong, field, value)
        with pytest.raises(ConfigMismatchError, match=pattern):
            check_config_matches(wrong, model)


def test_cli_export_runs_without_process_group(models, tmp_path):
    """torch-dist-to-hf in a fresh process: no torch.distributed group, no Megatron model."""
    root, dirs = models
    hf_dir = dirs["qwen3_tied"]
    ckpt = hf_to_torch_dist(hf_dir, tmp_path / "ckpt", step=3)
    code = (
        "import sys, torch.distributed as d; from opd_core.megatron.cli import convert_app; "
        "convert_app(sys.argv[1:], standalone_mode=False); assert not d.is_initialized(); "
        "assert 'megatron.core.models' not in sys.modules"
    )
    subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "torch-dist-to-hf",
            "--ckpt",
            str(ckpt),
            "--hf-config",
            str(hf_dir),
            "--out",
            str(tmp_path / "hf"),
            "--step",
            "3",
        ],
        check=True,
        cwd=Path(__file__).parents[1],
    )
    original, converted = read_hf_state_dict(hf_dir), read_hf_state_dict(tmp_path / "hf")
    assert all(torch.equal(original[k], converted[k]) for k in original)
    assert (tmp_path / "hf" / "tokenizer.json").is_file()


@pytest.mark.slow
def test_real_width_qwen3_converts_and_matches(tmp_path):
    """Qwen3-0.6B widths (2 layers): hidden 1024, 16 / 8 kv heads, head_dim 128, vocab 151936."""
    config = Qwen3Config(
        vocab_size=151936,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=2,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        rms_norm_eps=1e-6,
        max_position_embeddings=40960,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
    )
    torch.manual_seed(0)
    Qwen3ForCausalLM(config).save_pretrained(tmp_path / "hf")
    hf_to_torch_dist(tmp_path / "hf", tmp_path / "ckpt")
    parity = check_parity(tmp_path / "hf", tmp_path / "ckpt", batch_size=2, seq_len=16)
    assert parity["max_abs_logits_diff"] <= 1e-5, parity
    back = torch_dist_to_hf(
        tmp_path / "ckpt", tmp_path / "hf", tmp_path / "back", max_shard_size="200MB"
    )
    assert len(list(back.glob("*.safetensors"))) > 1  # really sharded, with an index
    original, converted = read_hf_state_dict(tmp_path / "hf"), read_hf_state_dict(back)
    assert all(torch.equal(original[k], converted[k]) for k in original)


def test_bf16_checkpoint_round_trips_in_bf16(models, tmp_path):
    """A bf16 HF model (as Qwen3-8B ships) stays bf16 and bit-identical through torch_dist."""
    _, dirs = models
    AutoModelForCausalLM.from_pretrained(
        dirs["qwen3_untied"], dtype=torch.bfloat16
    ).save_pretrained(tmp_path / "bf16")
    ckpt = hf_to_torch_dist(tmp_path / "bf16", tmp_path / "ckpt")
    back = torch_dist_to_hf(ckpt, tmp_path / "bf16", tmp_path / "back")
    original, converted = read_hf_state_dict(tmp_path / "bf16"), read_hf_state_dict(back)
    assert {t.dtype for t in converted.values()} == {torch.bfloat16}
    assert all(torch.equal(original[k], converted[k]) for k in original)


def test_checkpoint_of_another_shape_is_refused(models):
    """An untied checkpoint into a tied model, or other sizes: an error naming the tensors."""
    root, dirs = models
    untied = hf_to_torch_dist(dirs["qwen3_untied"], root / "untied_for_mismatch")
    for other in ("qwen3_tied", "qwen3_gqa_head_dim"):
        model = build_gpt_model(load_hf_config(dirs[other]), dtype=torch.float32)
        with pytest.raises(Exception, match="does not hold this model"):
            checkpoint.load_model(model, untied)


def test_convert_stage_runs_in_a_child_that_leaves_nothing_behind(tmp_path):
    """The Convert stage converts in a spawned child (dist_checkpointing's Manager must not
    outlive a killed driver); its result and its errors, such as a failed parity check, reach
    the caller."""
    configs = Path(__file__).resolve().parents[1] / "configs"
    run_dir = RunDir.create(tmp_path, "r")
    make_tiny_qwen3(run_dir.student_hf, initializer_range=0.2)
    children_before = {p.pid for p in psutil.Process().children(recursive=True)}

    result = Convert(load_config(configs / "toy.yaml"), run_dir).build()
    assert result["parity"]["max_abs_logits_diff"] <= 1e-5
    assert read_json(run_dir.stage("convert") / "parity.json") == result["parity"]
    assert checkpoint.list_steps(run_dir.student_torch_dist) == [0]
    # A conversion that is really wrong: the GPTModel is always built with silu. (A tight
    # tolerance alone no longer fails: with SDPA attention on both sides the logits are equal.)
    config_file = run_dir.student_hf / "config.json"
    config_file.write_text(config_file.read_text().replace('"silu"', '"gelu"'))
    with pytest.raises(
        RuntimeError, match=r"convert.parity_tolerance=1e-12\): the conversion is wrong"
    ):
        Convert(
            load_config(configs / "toy.yaml", ["convert.parity_tolerance=1e-12"]), run_dir
        ).build()
    # Only multiprocessing's resource tracker stays: it belongs to this process and exits with it.
    left = [p for p in psutil.Process().children(recursive=True) if p.pid not in children_before]
    assert all("multiprocessing.resource_tracker" in " ".join(p.cmdline()) for p in left), [
        p.cmdline() for p in left
    ]
