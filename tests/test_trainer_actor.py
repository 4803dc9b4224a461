"""The training actor in-process (world size 1): megatron-mode teacher, exact resume, HF export,
micro-batch invariance. ~20 s.
"""

import numpy as np
import pytest
import torch
from tiny_runs import make_tiny_qwen2, student_and_teacher
from transformers import AutoModelForCausalLM

from opd_core.algorithm.batch import TrainBatch
from opd_core.config import OPDRunConfig
from opd_core.megatron.convert import hf_to_torch_dist
from opd_core.megatron.parallel import free_port
from opd_core.trainer.actor import TrainActor
from opd_core.trainer.spec import ActorSpec


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return student_and_teacher(tmp_path_factory.mktemp("actor"), teacher_step=7)


def make_actor(
    models, ckpt=None, step=None, micro_batch_size=8, teacher=False, algorithm=None, **train
) -> TrainActor:
    cfg = OPDRunConfig.model_validate(
        {
            "train": {
                "global_batch_size": 8,
                "micro_batch_size": micro_batch_size,
                "lr": 1e-2,
                **train,
            },
            "algorithm": {
                "use_opd": True,
                "opd_type": "megatron",
                "opd_teacher_load": str(models["teacher_ckpt"]),
                "opd_teacher_ckpt_step": 7,
                **(algorithm or {}),
            },
        }
    )
    actor = TrainActor()
    actor.setup(
        0,
        1,
        "127.0.0.1",
        free_port(),
        ActorSpec.from_config(
            cfg,
            models["student"],
            ckpt or models["student_ckpt"],
            step,
            teacher_checkpoint_dir=models["teacher_ckpt"] if teacher else None,
        ),
    )
    return actor


def make_batch(seed: int = 0) -> TrainBatch:
    rng = np.random.default_rng(seed)
    prompts = [list(map(int, rng.integers(3, 300, rng.integers(1, 7)))) for _ in range(8)]
    responses = [list(map(int, rng.integers(3, 300, rng.integers(0, 6)))) for _ in range(8)]
    advantages = [rng.standard_normal(len(r)).astype(np.float32) for r in responses]
    return TrainBatch(prompts, responses, advantages=advantages)


@torch.no_grad()
def hf_logprobs(hf_dir, batch: TrainBatch) -> list[np.ndarray]:
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    out = []
    for prompt, response in zip(batch.prompt_ids, batch.response_ids):
        logits = model(input_ids=torch.tensor([prompt + response])).logits[0].float()
        logprobs = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
        out.append(
            logprobs.gather(-1, torch.tensor(response, dtype=torch.long)[:, None])[:, 0].numpy()
            if response
            else np.zeros(0, np.float32)
        )
    return out


def test_megatron_teacher_logprobs_equal_hf_teacher(models):
    actor = make_actor(models, teacher=True)
    batch = make_batch()
    teacher, student = actor.teacher_logprobs(batch), actor.compute_logprobs(batch)
    for ours, reference, response in zip(
        teacher, hf_logprobs(models["teacher"], batch), batch.response_ids
    ):
        assert ours.shape == (len(response),)
        np.testing.assert_allclose(ours, reference, atol=1e-4)
    for ours, reference in zip(student, hf_logprobs(models["student"], batch)):
        np.testing.assert_allclose(ours, reference, atol=1e-4)
    # Really two models.
    assert max(np.abs(t - s).max() for t, s in zip(teacher, student) if len(t)) > 0.1


def test_teacher_of_another_architecture_is_refused(models, tmp_path):
    qwen2 = hf_to_torch_dist(make_tiny_qwen2(tmp_path / "qwen2"), tmp_path / "qwen2_torch_dist")
    actor = make_actor(models)
    with pytest.raises(ValueError, match="student's architecture.*qwen3.*qwen2"):
        actor._load_teacher(qwen2, None)


SCHEDULE = {"lr_decay_style": "cosine", "lr_warmup_iters": 2, "lr_decay_iters": 6, "min_lr": 1e-3}


def expected_lr(step: int) -> float:
    """Megatron-LM's warmup + cosine, written out: linear from 0 to lr over 2 steps, cosine to
    min_lr by 6."""
    if step <= 2:
        return 1e-2 * step / 2
    return 1e-3 + (1e-2 - 1e-3) * 0.5 * (1 + np.cos(np.pi * (step - 2) / 4))


def test_resume_from_checkpoint_continues_exactly(models):
    root, batch = models["root"], make_batch(1)
    actor = make_actor(models, **SCHEDULE)
    batch.old_logprobs = actor.compute_logprobs(batch)
    lrs = [actor.train_step(batch)["lr"] for _ in range(3)]
    actor.save_checkpoint(root / "run", step=3)
    expected = actor.train_step(batch)
    expected_after = actor.compute_logprobs(batch)
    lrs += [expected["lr"]] + [actor.train_step(batch)["lr"] for _ in range(3)]
    # Steps 0..6: min_lr after 6.
    np.testing.assert_allclose(lrs, [expected_lr(step) for step in range(7)], rtol=1e-6)

    # No step given: the latest, 3, with its optimizer state.
    resumed = make_actor(models, ckpt=root / "run", **SCHEDULE)
    assert resumed.iteration == 3
    got = resumed.train_step(batch)
    assert got["iteration"] == 4
    for key in (
        "loss",
        "grad_norm",
        "clip_frac",
        "ppo_kl",
        "lr",  # the schedule resumes at step 3 too
    ):
        assert got[key] == expected[key], key
    for a, b in zip(resumed.compute_logprobs(batch), expected_after):
        np.testing.assert_array_equal(a, b)


def test_export_hf_loads_in_transformers_with_same_logprobs(models):
    actor = make_actor(models)
    batch = make_batch(2)
    batch.old_logprobs = actor.compute_logprobs(batch)
    actor.train_step(batch)  # export the trained weights, not the initial ones
    out = actor.export_hf(models["root"] / "export")
    for ours, reference in zip(actor.compute_logprobs(batch), hf_logprobs(out, batch)):
        np.testing.assert_allclose(ours, reference, atol=1e-5)
    assert (models["root"] / "export" / "tokenizer.json").is_file()


def test_micro_batches_do_not_change_the_step(models):
    batch = make_batch(3)
    results = []
    for micro_batch_size in (8, 3, 1):
        actor = make_actor(models, micro_batch_size=micro_batch_size)
        batch.old_logprobs = actor.compute_logprobs(batch)
        results.append([actor.train_step(batch) for _ in range(2)])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)


def test_a_one_step_round_needs_no_separate_old_logprob_pass(models):
    """One optimizer step per round: the step without stored old log-probs (its own forward,
    detached, is the old policy) equals the step after a separate old-logprob pass: same loss,
    gradient norm, top-k KL and reverse-KL metric, same weights after."""
    batch = make_batch(5)
    teacher_actor = make_actor(models, teacher=True)
    scored = teacher_actor.teacher_topk(batch, 4)
    batch.teacher_logprobs = [logprobs for logprobs, _, _ in scored]
    batch.teacher_topk_ids = [ids for _, ids, _ in scored]
    batch.teacher_topk_logprobs = [values for _, _, values in scored]
    steps, after, old = [], [], None
    for separate_pass in (True, False):
        actor = make_actor(models, micro_batch_size=3, algorithm={"opd_topk": 4})
        if separate_pass:
            old = actor.compute_logprobs(batch)
        batch.old_logprobs = old if separate_pass else []
        steps.append(actor.train_step(batch))
        after.append(actor.compute_logprobs(batch))
    with_pass, without = steps
    for key in ("loss", "pg_loss", "opd_topk_kl", "opd_reverse_kl", "teacher_logprob_mean"):
        assert with_pass[key] == pytest.approx(without[key], abs=1e-6), key
    assert with_pass["grad_norm"] == pytest.approx(without["grad_norm"], rel=1e-5)
    assert without["clip_frac"] == 0 and without["ppo_kl"] == 0  # the ratio is exactly 1
    for a, b in zip(*after):
        np.testing.assert_allclose(a, b, atol=1e-6)
    # The reported reverse KL is the sampled tokens' old - teacher log-prob, token-averaged.
    reverse_kl = np.concatenate(old) - np.concatenate(batch.teacher_logprobs)
    assert without["opd_reverse_kl"] == pytest.approx(float(reverse_kl.mean()), abs=1e-5)


def test_the_attention_backend_is_a_kernel_choice_not_a_different_model(models):
    """train.attention_backend: megatron's unfused local attention and the SDPA default give
    the same log-probs and the same step."""
    batch = make_batch(7)
    results = []
    for backend in ("local", "sdpa"):
        actor = make_actor(models, attention_backend=backend)
        batch.old_logprobs = actor.compute_logprobs(batch)
        step = actor.train_step(batch)
        results.append((batch.old_logprobs, step, actor.compute_logprobs(batch)))
    (local_before, local_step, local_after), (sdpa_before, sdpa_step, sdpa_after) = results
    for a, b in zip(local_before + local_after, sdpa_before + sdpa_after):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)  # fp32 rounding
    assert local_step["loss"] == pytest.approx(sdpa_step["loss"], abs=1e-6)
    assert local_step["grad_norm"] == pytest.approx(sdpa_step["grad_norm"], rel=1e-4)


def test_a_checkpoint_of_an_unfused_optimizer_resumes_on_the_fused_kernel(models, tmp_path):
    """A param group's kernel choice is saved with it; a checkpoint written by an unfused
    AdamW (as before the CPU optimizer was fused) resumes fused, with its state."""
    batch = make_batch(2)
    actor = make_actor(models)
    actor.train_step(batch)
    actor.save_checkpoint(tmp_path / "run", step=1)
    (saved,) = (tmp_path / "run").rglob("optimizer_rank00000.pt")
    state = torch.load(saved, weights_only=False)
    for group in state["optimizer"]["param_groups"]:  # as the earlier build wrote them
        group["fused"] = None
    torch.save(state, saved)

    resumed = make_actor(models, ckpt=tmp_path / "run")
    optimizer = resumed.optim.optimizer
    assert {group["fused"] for group in optimizer.param_groups} == {True}
    restored = optimizer.state_dict()["state"]
    assert restored.keys() == state["optimizer"]["state"].keys() and restored
    for key, values in state["optimizer"]["state"].items():
        for name, value in values.items():
            torch.testing.assert_close(restored[key][name], value, rtol=0, atol=0)
