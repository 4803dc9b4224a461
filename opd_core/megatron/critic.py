"""The PPO critic: the student's GPTModel with its vocabulary head replaced by a scalar value head.

    critic = build_critic_model(hf_config)                  # after parallel.init_distributed(...)
    copy_trunk_from_student(critic, student_model)          # trunk = the student's weights
    values = response_values(critic_output)  # [n] at the n response positions (megatron.layout)
    save_critic(critic, directory); load_critic(critic, directory)

Architecture (as verl / OpenRLHF build Megatron critics): the whole transformer of the
student (embedding, layers, final norm) and, instead of the `[vocab, hidden]` output layer,
`ValueHead` = a plain `Linear(hidden, 1)` that every tensor-parallel rank holds in full
(replicated: the hidden states entering it are the same on every TP rank, so its gradient is
too, and the trunk's backward needs no extra all-reduce). The embedding is never tied to the
head, whatever the student's `tie_word_embeddings`.

Initialisation: trunk = the student's weights (copied in memory); head weight and bias ZERO.
Zero makes every initial value exactly 0, so the first round's GAE advantages equal
reward-to-go (REINFORCE) instead of being shifted by random per-token noise from a random
head, and runs are reproducible. The trunk receives gradient once the head is non-zero
(after the first critic step), which is how a zero-initialised head normally trains.

Values are aligned like log-probs: value[t] is V at the position that predicts response
token t, i.e. the state "prompt + response[:t]" before token t is chosen.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

from opd_core.megatron import checkpoint
from opd_core.megatron.model import build_gpt_model

VALUE_HEAD_PREFIX = "output_layer."


class ValueHead(torch.nn.Linear):
    """Linear(hidden, 1) with the call signature GPTModel uses for its output layer."""

    sequence_parallel = False  # GPTModel reads this attribute of its output layer

    def forward(self, hidden_states: torch.Tensor, weight=None, runtime_gather_output=None):
        # GPTModel passes the (tied) embedding as `weight` when sharing; the critic never shares.
        return super().forward(hidden_states), None


def build_critic_model(
    hf_config: Any, dtype: torch.dtype | None = None, attention_backend: str = "auto"
):
    """A GPTModel with the student's trunk architecture and a zero-initialised scalar value head."""
    untied = copy.deepcopy(hf_config)
    untied.tie_word_embeddings = False  # the head is a value head, not the embedding transposed
    model = build_gpt_model(untied, dtype=dtype, attention_backend=attention_backend)
    if model.post_process:  # the last pipeline stage holds the head
        reference = model.output_layer.weight
        head = ValueHead(
            hf_config.hidden_size, 1, bias=True, device=reference.device, dtype=reference.dtype
        )
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
        model.output_layer = head  # frees the [vocab/tp, hidden] output layer
    return model


def copy_trunk_from_student(critic, student) -> None:
    """Copy every trunk tensor of `student` (same architecture, same TP layout) into `critic`.

    From the model in memory rather than from disk, so the critic starts from exactly the
    weights the policy was set up with (a converted student or a resumed checkpoint alike).
    """
    trunk = {k: v for k, v in student.state_dict().items() if not k.startswith(VALUE_HEAD_PREFIX)}
    missing, unexpected = critic.load_state_dict(trunk, strict=False)
    missing = [
        k for k in missing if not k.endswith("_extra_state") and not k.startswith(VALUE_HEAD_PREFIX)
    ]
    if missing or unexpected:
        raise ValueError(
            f"critic and student trunks differ: critic lacks {unexpected[:5]}, "
            f"student lacks {missing[:5]}"
        )


def save_critic(critic, directory: str | Path) -> None:
    """Collective: each rank writes its shards of the critic (trunk + head) to a new `directory`."""
    directory = Path(directory)
    if not dist.is_initialized() or dist.get_rank() == 0:
        directory.mkdir(parents=True, exist_ok=False)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
    dist_checkpointing.save(critic.sharded_state_dict(), str(directory))


def load_critic(critic, directory: str | Path) -> None:
    """Load a critic written by `save_critic` (any TP size: the head is replicated)."""
    checkpoint.load_model(critic, directory)  # a bare dist_checkpointing dir; checks names, shapes


def response_values(output: torch.Tensor) -> torch.Tensor:
    """V at every response position, [n] fp32 packed, from the critic's last-stage output
    (`forward_response_logits` through the value head: [n, 1]; gradients flow)."""
    return output[:, 0].float()
