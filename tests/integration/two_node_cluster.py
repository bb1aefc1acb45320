"""Run by test_multinode.py in a process of its own: a two-node `ray.cluster_utils.Cluster`
(one CPU per node), a 2-worker training (GRPO, with two rollout engines) whose workers and engines
must land on different nodes, then the trained adapter served by two replicas, one per node. Writes its observations as JSON to
the file named by its third argument (stdout also carries the replicas' forwarded logs)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import httpx
import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

from tests.conftest import free_ports


def actor_nodes(gcs_address: str, class_name: str) -> list[str]:
    return [a.node_id for a in list_actors(address=gcs_address, filters=[("class_name", "=", class_name)], detail=True)]


def main(run_config_path: str, serve_config_path: str, observations_path: str) -> None:
    from finch.config import ServeConfig, load_config
    from finch.serve.app import run, stop
    from finch.train.run import train

    # Serve's proxy prefers the replica on its own node; spread requests so both replicas answer.
    os.environ["RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING"] = "0"
    # Ports of its own: another Ray instance on the machine (the test session's) holds the default
    # dashboard and agent ports, and without a dashboard the state API below cannot list actors.
    dashboard, head_agent, head_metrics, node_metrics = free_ports(4)
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "include_dashboard": True,
            "dashboard_port": dashboard,
            "dashboard_agent_listen_port": head_agent,
            "metrics_export_port": head_metrics,
        },
    )
    # The second node's processes see a Hugging Face cache of their own (the head's is the driver's).
    cluster.add_node(
        num_cpus=1, metrics_export_port=node_metrics, env_vars={"HF_HUB_CACHE": os.environ["FINCH_TEST_NODE_HF_CACHE"]}
    )
    cluster.wait_for_nodes()
    os.environ["RAY_ADDRESS"] = cluster.address
    ray.init(address=cluster.address)
    try:
        entry = train(load_config(run_config_path))
        train_nodes = actor_nodes(cluster.address, "RayTrainWorker")
        engine_nodes = actor_nodes(cluster.address, "RolloutEngine")

        serve_config = load_config(serve_config_path, [f"adapters=[{entry.name}]"], schema=ServeConfig)
        url = run(serve_config, blocking=False)
        replica_nodes = actor_nodes(cluster.address, f"ServeReplica:{serve_config.name}:finch")
        with httpx.Client(base_url=url, timeout=60) as client:
            answers = [
                client.post(
                    "/v1/chat/completions",
                    json={
                        "model": entry.name,
                        "max_tokens": 4,
                        "temperature": 0,
                        "messages": [{"role": "user", "content": "Room 3?"}],
                    },
                )
                for _ in range(16)
            ]
        stop(serve_config)
        Path(observations_path).write_text(
            json.dumps(
                {
                    "nodes": len({n["NodeID"] for n in ray.nodes() if n["Alive"]}),
                    "train_worker_nodes": train_nodes,
                    "rollout_engine_nodes": engine_nodes,
                    "replica_nodes": replica_nodes,
                    "statuses": [a.status_code for a in answers],
                    "answers": [a.json()["choices"][0]["message"]["content"] for a in answers if a.status_code == 200],
                    "replicas_answering": sorted({a.headers["x-finch-replica"] for a in answers}),
                    "registered": entry.ref,
                }
            )
        )
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
