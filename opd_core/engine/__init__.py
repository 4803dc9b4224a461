"""Teacher and rollout engines speaking SGLang's HTTP protocol.

- `generation.Generator`: batched KV-cache generation/scoring with an HF causal LM.
- `server`: the built-in FastAPI server (`python -m opd_core.engine.server --model-path DIR`).
- `client.EngineClient`: pooled, batched, retrying, failing-over client with a logprob cache.
- `launcher.launch_server` / `check_external`: start builtin or sglang servers, or check one.

Submodules are imported explicitly (`from opd_core.engine.client import EngineClient`) so
that importing the package does not pull in torch or FastAPI.
"""
