"""Megatron-core side of opd: CPU shims, parallel state, the GPTModel built from an HF
Qwen3/Qwen2 config, exact HF <-> torch_dist conversion, and the checkpoint layout.

The known-benign warnings megatron-core prints on import are filtered here, before any
submodule imports megatron (each submodule imports it at its top).
"""

from opd_core.megatron.known_warnings import quiet_known_warnings

quiet_known_warnings()
