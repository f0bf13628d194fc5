"""Cluster configurations the tests share."""

from __future__ import annotations


def gateway_cluster_config(model_dir, data_dir, **env):
    """A `mint up`-style cluster with the gateway (one executor, auth on, a training budget of
    4 MiB), env: more MINT_* variables of its services."""
    from mintmesh.cluster import ClusterConfig

    return ClusterConfig(
        model_dir=model_dir,
        data_dir=data_dir,
        executors=1,
        port=0,
        http_port=0,
        env={
            # get_info's tokenizer: the backbone's directory, loadable offline.
            "MINT_GATEWAY_TINKER_TOKENIZER_ID": str(model_dir),
            "MINT_EXECUTOR_TRAINING_MAX_BYTES": str(4 << 20),
            "TINKER_TELEMETRY": "0",
            **env,
        },
    )
