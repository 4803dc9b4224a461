"""On a Ray cluster of several nodes (two raylets on this machine), each server binds its
node's IP instead of 127.0.0.1, so the driver and the router can reach it from elsewhere."""

from __future__ import annotations

import pytest

from opd_core.config import OPDRunConfig
from opd_core.engine.fleet import start_servers
from opd_core.hf_utils import make_tiny_qwen3


@pytest.fixture
def two_nodes():
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)  # one CPU bundle each: the two engines land on two nodes
    ray.init(address=cluster.address)
    cluster.wait_for_nodes()
    try:
        yield
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_servers_of_a_multi_node_cluster_bind_their_node_ip(two_nodes, tmp_path):
    model = make_tiny_qwen3(tmp_path / "model", hidden_size=32, num_hidden_layers=1)
    cfg = OPDRunConfig.model_validate({"rollout": {"num_engines": 2}})
    with start_servers("rollout", cfg, model, tmp_path / "rollout.log") as fleet:
        rows = fleet.placement
        assert len({row.node_id for row in rows}) == 2
        for row in rows:
            assert row.url.startswith(f"http://{row.node_ip}:") and row.node_ip != "127.0.0.1"
        with fleet.client(cfg.client) as client:  # through the router, on the driver's host
            assert len(client.generate([[1, 2, 3]] * 4, {"max_new_tokens": 2})) == 4
