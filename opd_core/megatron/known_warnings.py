"""Silence the known-benign warnings megatron-core and torch print on every import and checkpoint.

    from opd_core.megatron.known_warnings import quiet_known_warnings
    quiet_known_warnings()   # before importing megatron; idempotent

Each Ray training actor (and the conversion path) otherwise floods its log with the same
dozen lines: no Apex / Transformer Engine on a CPU machine (we deliberately use the local
layer spec and torch optimizers), a deprecated megatron default we never set, and
dist_checkpointing's own use of deprecated torch.distributed.checkpoint APIs. Only these
exact messages are filtered; every other warning still shows. Spawned processes (the
dist_checkpointing writers) inherit the same filters through PYTHONWARNINGS.
"""

from __future__ import annotations

import os
import re
import warnings

# (category, start of the message). Each is emitted by megatron-core 0.16 / torch 2.13 code
# we do not control.
KNOWN_BENIGN = (
    # megatron optimizer/clip_grads/fsdp on CPU
    (UserWarning, "Transformer Engine and Apex are not installed"),
    # megatron local layer spec: torch norm instead of Apex
    (UserWarning, "Apex is not installed"),
    # TransformerConfig's default cuda_graph_scope
    (UserWarning, "full scope is deprecated"),
    # torch dcp via dist_checkpointing
    (FutureWarning, "Please use DTensor instead and we are deprecating ShardedTensor"),
    # dist_checkpointing's torch strategy calls dcp.load_state_dict
    (FutureWarning, "`load_state_dict` is deprecated"),
)


def quiet_known_warnings() -> None:
    """Install the filters in this process and in processes it spawns (PYTHONWARNINGS)."""
    entries = []
    for category, message in KNOWN_BENIGN:
        warnings.filterwarnings("ignore", message=re.escape(message), category=category)
        entries.append(f"ignore:{message}:{category.__name__}")
    inherited = [e for e in os.environ.get("PYTHONWARNINGS", "").split(",") if e]
    os.environ["PYTHONWARNINGS"] = ",".join(inherited + [e for e in entries if e not in inherited])
