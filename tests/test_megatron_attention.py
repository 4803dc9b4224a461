"""The SDPA core attention against megatron's own DotProductAttention; the response-only loss
helpers against a per-sample reference; the CPU allocator setting.

Tiny fp32 models built here; a few seconds in all.
"""

import resource

import numpy as np
import pytest
import torch

from opd_core.hf_utils import make_tiny_qwen3
from opd_core.megatron.convert import load_hf_config, load_hf_into_model
from opd_core.megatron.layout import Layout
from opd_core.megatron.model import (
    build_gpt_model,
    forward_logits,
    forward_response_logits,
    resolve_attention_backend,
    response_entropy,
    response_logprobs,
    response_logprobs_of,
    response_topk,
    response_vocab_logprobs,
)
from opd_core.megatron.parallel import init_single_process

# Ragged on purpose: right padding of different lengths, and an empty response.
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17], [18, 19, 20]]
RESPONSES = [[21, 22, 23], [24, 25, 26, 27, 28, 29, 30], [], [31]]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    init_single_process()
    # GQA (8 query heads over 2 groups), head_dim != hidden / heads, logits of order 10.
    return make_tiny_qwen3(
        tmp_path_factory.mktemp("attention") / "hf",
        initializer_range=0.2,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=16,
        tie_word_embeddings=False,
    )


def _model(hf_dir, backend):
    config = load_hf_config(hf_dir)
    model = build_gpt_model(config, dtype=torch.float32, attention_backend=backend)
    load_hf_into_model(model, hf_dir, config)
    return model


def _attention_modules(model):
    return {type(layer.self_attention.core_attention).__name__ for layer in model.decoder.layers}


def test_sdpa_matches_megatrons_dot_product_attention_forward_and_backward(hf_dir):
    sdpa, local = _model(hf_dir, "sdpa"), _model(hf_dir, "local")
    assert _attention_modules(sdpa) == {"SDPACoreAttention"}
    assert _attention_modules(local) == {"DotProductAttention"}
    layout = Layout.of(PROMPTS, RESPONSES)
    outputs = {}
    for name, model in (("sdpa", sdpa), ("local", local)):
        logits = forward_logits(model, layout)
        loss = response_logprobs(logits[layout.response_positions], layout).sum()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        outputs[name] = (logits.detach(), grads)
    (logits_sdpa, grads_sdpa), (logits_local, grads_local) = outputs["sdpa"], outputs["local"]
    assert logits_local.abs().max() > 1.0  # real signal, not near-zero logits
    # Every position, the right padding included (no query row there is fully masked).
    assert (logits_sdpa - logits_local).abs().max() <= 1e-5
    assert grads_sdpa.keys() == grads_local.keys()
    for name in grads_local:
        scale = grads_local[name].abs().max().clamp(min=1.0)
        assert (grads_sdpa[name] - grads_local[name]).abs().max() <= 1e-5 * scale, name


@pytest.mark.parametrize("backend", ["sdpa", "local"])
def test_right_padded_rows_need_no_mask(hf_dir, backend):
    """The per-sample layout gives no mask (causal attention: SDPA's is_causal, megatron's
    default causal mask for the local spec): every real position's logits equal those of the
    explicit causal + padding mask, and so do the gradients of a loss on them."""
    model = _model(hf_dir, backend)
    layout = Layout.of(PROMPTS, RESPONSES)
    assert layout.mask is None
    columns = torch.arange(layout.ids.shape[1])
    lengths = torch.tensor([len(p) + len(r) for p, r in zip(PROMPTS, RESPONSES)])
    explicit_mask = (columns[None, :] > columns[:, None])[None, None] | (
        columns[None, :] >= lengths[:, None]
    )[:, None, None, :]
    real = columns[None, :] < lengths[:, None]
    results = []
    for mask in (None, explicit_mask):
        model.zero_grad()
        logits = model(input_ids=layout.ids, position_ids=layout.positions, attention_mask=mask)
        (logits[real] ** 2).mean().backward()
        results.append(
            (logits.detach()[real], {n: p.grad.clone() for n, p in model.named_parameters()})
        )
    (causal, causal_grads), (masked, masked_grads) = results
    assert (causal - masked).abs().max() <= 1e-5
    for name in masked_grads:
        scale = masked_grads[name].abs().max().clamp(min=1.0)
        assert (causal_grads[name] - masked_grads[name]).abs().max() <= 1e-5 * scale, name


@pytest.mark.parametrize("shared", [False, True], ids=["per_sample", "shared_prompts"])
def test_response_logits_are_the_full_logits_at_the_response_positions(hf_dir, shared):
    """forward_response_logits runs the output layer at the response positions only: the same
    logits as the full forward read there, and the same gradients."""
    model = _model(hf_dir, "sdpa")
    prompts, responses = (GROUP_PROMPTS, GROUP_RESPONSES) if shared else (PROMPTS, RESPONSES)
    layout = Layout.of(prompts, responses, share_prompts=shared)
    # Different weights per token and vocabulary entry, so a logit read at another's
    # position shows in the gradients.
    weights = torch.randn(sum(layout.lengths), model.vocab_size)
    results = []
    for picked in (
        lambda: forward_logits(model, layout)[layout.response_positions],
        lambda: forward_response_logits(model, layout),
    ):
        model.zero_grad()
        logits = picked()
        assert logits.shape == weights.shape
        (logits * weights).sum().backward()
        results.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (full, full_grads), (response, response_grads) = results
    assert full.abs().max() > 1.0
    assert (full - response).abs().max() <= 1e-5
    for name in full_grads:
        scale = full_grads[name].abs().max().clamp(min=1.0)
        assert (full_grads[name] - response_grads[name]).abs().max() <= 1e-5 * scale, name


def test_what_sdpa_attention_does_not_support_is_named(hf_dir):
    from megatron.core.transformer.enums import AttnMaskType

    from opd_core.megatron.attention import SDPACoreAttention

    model = _model(hf_dir, "sdpa")
    core = model.decoder.layers[0].self_attention.core_attention
    q = torch.zeros(4, 1, 8, 16)
    kv = torch.zeros(4, 1, 2, 16)
    with pytest.raises(ValueError, match="neither packed sequences nor an attention bias"):
        core(q, kv, kv, None, attention_bias=torch.zeros(1, 8, 4, 4))
    config = model.config
    config.softmax_type = "off-by-one"
    try:
        with pytest.raises(ValueError, match="softmax_type='off-by-one'"):
            SDPACoreAttention(config, 1, AttnMaskType.causal, "self")
    finally:
        config.softmax_type = "vanilla"


def test_attention_backend_choice():
    assert resolve_attention_backend("auto") == ("te" if _has_te() else "sdpa")
    assert resolve_attention_backend("local") == "local"
    with pytest.raises(ValueError, match="choose one of"):
        resolve_attention_backend("flash")
    if not _has_te():
        with pytest.raises(ValueError, match="needs CUDA and transformer_engine"):
            resolve_attention_backend("te")


def _has_te() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("from_vocab", [False, True], ids=["cross_entropy", "vocab_logprobs"])
def test_response_helpers_equal_a_per_sample_log_softmax_forward_and_backward(hf_dir, from_vocab):
    init_single_process()
    torch.manual_seed(0)
    layout = Layout.of(PROMPTS, RESPONSES)
    logits = (3 * torch.randn(*layout.ids.shape, 40)).requires_grad_()
    spans = [(len(p) - 1, len(p) + len(r) - 1) for p, r in zip(PROMPTS, RESPONSES)]
    topk_ids = [
        np.random.default_rng(i).integers(0, 40, (len(r), 3)) for i, r in enumerate(RESPONSES)
    ]

    def reference():
        """One sample at a time, straight from log_softmax."""
        out = []
        for row, ((start, end), response) in enumerate(zip(spans, RESPONSES)):
            logprobs = torch.log_softmax(logits[row, start:end], -1)
            sampled = logprobs.gather(-1, torch.tensor(response, dtype=torch.long)[:, None])[:, 0]
            entropy = -(logprobs.exp() * logprobs).sum(-1)
            of = logprobs.gather(-1, torch.tensor(topk_ids[row], dtype=torch.long).reshape(-1, 3))
            out.append((sampled, entropy, of))
        return out

    def helpers():
        picked = logits[layout.response_positions]  # what forward_response_logits gives
        vocab = response_vocab_logprobs(picked)
        sampled = response_logprobs(picked, layout, vocab if from_vocab else None)
        return list(
            zip(
                layout.split(sampled),
                layout.split(response_entropy(vocab)),
                layout.split(response_logprobs_of(vocab, layout, topk_ids)),
            )
        )

    grads = []
    for compute in (reference, helpers):
        rows = compute()
        assert [tuple(t.shape) for row in rows for t in row] == [
            shape for r in RESPONSES for shape in ((len(r),), (len(r),), (len(r), 3))
        ]
        # Different weights per term, so a mixed-up term shows in the gradient.
        loss = sum(s.sum() + 2 * e.sum() + 3 * (o**2).sum() for s, e, o in rows)
        grads.append(torch.autograd.grad(loss, logits)[0])
        if compute is reference:
            expected = rows
    for want, got in zip(expected, rows):
        for a, b in zip(want, got):
            assert torch.allclose(a, b, atol=1e-6)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)

    triples = response_topk(logits.detach()[layout.response_positions], layout, k=3)
    assert len(triples) == len(RESPONSES)
    for (sampled, ids_k, values), (want, _, _), (start, end), row in zip(
        triples, expected, spans, range(len(spans))
    ):
        top = torch.log_softmax(logits.detach()[row, start:end], -1).topk(3, -1)
        assert np.allclose(sampled, want.detach().numpy(), atol=1e-6)
        assert np.array_equal(ids_k, top.indices.numpy().astype(np.int32))
        assert np.allclose(values, top.values.numpy(), atol=1e-6)


def test_padded_values_lay_out_per_sample_arrays_and_name_a_wrong_length():
    layout = Layout.of(PROMPTS, RESPONSES)
    advantages = [np.arange(len(r), dtype=np.float32) + 10 * i for i, r in enumerate(RESPONSES)]
    padded = layout.padded_values(advantages, "advantages")
    assert padded.shape == (4, 7)
    for i, values in enumerate(advantages):
        assert padded[i, : len(values)].tolist() == values.tolist()
        assert not padded[i, len(values) :].any()
    # The packed form of the same values lays out identically (and keeps gradients).
    packed = torch.from_numpy(np.concatenate(advantages)).requires_grad_()
    assert torch.equal(layout.padded(packed), padded)
    layout.padded(packed).sum().backward()
    assert torch.equal(packed.grad, torch.ones_like(packed))
    # [t, k] values (the teacher's top-k log-probs), an empty response as [0] or [0, k].
    topk = [np.ones((len(r), 3)) for r in RESPONSES]
    topk[2] = np.zeros(0)
    assert layout.padded_values(topk, "teacher_topk_logprobs").shape == (4, 7, 3)
    wrong = advantages[:1] + [advantages[1][:-1]] + advantages[2:]
    with pytest.raises(ValueError, match="advantages: sample 1 has 6 values for 7 response tokens"):
        layout.padded_values(wrong, "advantages")
    with pytest.raises(ValueError, match="advantages: 3 samples for 4 responses"):
        layout.padded_values(advantages[:3], "advantages")


def test_freed_tensor_memory_stays_in_the_process():
    """After keep_freed_memory a re-allocated 16 MB activation touches no new pages; glibc's
    defaults mmap and unmap it each time (4,096 page faults per allocation)."""
    from opd_core.megatron.cpu_allocator import keep_freed_memory

    assert keep_freed_memory()  # glibc (this project's Linux images)
    for _ in range(3):  # warm up: the heap grows once to the block's size
        torch.ones(4 << 20)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        torch.ones(4 << 20)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before < 1000


# Groups of samples of one prompt (what a GRPO round trains), out of order, with an empty
# response, and a prompt on its own.
GROUP_PROMPTS = [[5, 6, 7, 8, 9], [12, 13], [5, 6, 7, 8, 9], [14, 15, 16], [5, 6, 7, 8, 9]]
GROUP_RESPONSES = [[21, 22, 23], [24, 25, 26, 27], [28], [], [29, 30, 31, 32, 33, 34]]


def test_shared_prompt_layout_holds_each_prompt_once():
    layout = Layout.of(GROUP_PROMPTS, GROUP_RESPONSES, share_prompts=True)
    assert layout.ids.shape == (3, 5 + 3 + 1 + 6)  # rows: the 3 distinct prompts
    assert layout.ids[0].tolist() == [5, 6, 7, 8, 9, 21, 22, 23, 28, 29, 30, 31, 32, 33, 34]
    # Each response continues the prompt's positions, as in its own row.
    assert layout.positions[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 5, 5, 6, 7, 8, 9, 10]
    # Sample 2's only token (column 8) sees the prompt and itself, not sample 0's response.
    allowed = (~layout.mask[0, 0, 8]).nonzero().flatten().tolist()
    assert allowed == [0, 1, 2, 3, 4, 8]
    # Every sample's first response token is read at its prompt's last position.
    assert layout.rows.tolist()[:3] == [0, 0, 0] and layout.cols.tolist()[:3] == [4, 5, 6]
    assert layout.lengths == [3, 4, 1, 0, 6]
    # No prompt twice: nothing to share, the plain layout.
    assert not Layout.of(PROMPTS, RESPONSES, share_prompts=True).shared


@pytest.mark.parametrize("backend", ["sdpa", "local"])
def test_shared_prompt_layout_gives_the_per_sample_logits_and_gradients(hf_dir, backend):
    """The same model on both layouts: every response token's log-prob, entropy and the
    parameters' gradients agree (the rotary positions and the mask do the work)."""
    model = _model(hf_dir, backend)
    results = {}
    for shared in (False, True):
        layout = Layout.of(GROUP_PROMPTS, GROUP_RESPONSES, share_prompts=shared)
        model.zero_grad()
        logits = forward_response_logits(model, layout)
        logprobs = layout.split(response_logprobs(logits, layout))
        entropy = layout.split(response_entropy(response_vocab_logprobs(logits)))
        # Different weights per sample, so a response read at another's positions shows.
        loss = sum(
            (i + 1) * (lp.sum() + 0.5 * e.sum()) for i, (lp, e) in enumerate(zip(logprobs, entropy))
        )
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results[shared] = ([lp.detach() for lp in logprobs], grads)
    (plain, plain_grads), (shared, shared_grads) = results[False], results[True]
    assert [t.shape for t in plain] == [t.shape for t in shared]
    assert max(float((a - b).abs().max()) for a, b in zip(plain, shared) if a.numel()) <= 1e-5
    assert max(float(t.abs().max()) for t in plain if t.numel()) > 0.1  # not trivially equal
    for name in plain_grads:
        scale = plain_grads[name].abs().max().clamp(min=1.0)
        assert (plain_grads[name] - shared_grads[name]).abs().max() <= 1e-5 * scale, name
