"""Serve an exported reward model over HTTP with dynamic batching.

    rewardforge serve runs/quickstart/model --port 8000

Endpoints: ``POST /v1/score`` (native), ``POST /get_reward`` (OpenRLHF ``--remote_rm_url``), the
KServe v2 / Triton HTTP protocol under ``/v2`` (NeMo-Aligner / PyTriton clients), ``GET /health``,
``GET /metrics`` (Prometheus) and the OpenAPI docs at ``/docs``. See :mod:`rewardforge.serve.app`.

Needs the ``serve`` extra: ``pip install 'rewardforge[serve]'``.
"""

from __future__ import annotations

from pathlib import Path

from rewardforge.serve.config import API_KEY_ENV, ServeConfig, add_serve_arguments, config_from_args

__all__ = ["ServeConfig", "API_KEY_ENV", "add_serve_arguments", "config_from_args", "create_app", "make_server", "serve"]


def create_app(scorer, serve_config: ServeConfig | None = None, **kwargs):
    """The FastAPI app for ``scorer`` (see :func:`rewardforge.serve.app.create_app`)."""
    from rewardforge.serve.app import create_app as _create_app

    return _create_app(scorer, serve_config, **kwargs)


def make_server(app, config: ServeConfig):
    """A ``uvicorn.Server`` for ``app`` with the config's host, port, log level, connection limit and graceful shutdown."""
    import uvicorn

    uv = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        log_level=config.log_level,
        access_log=config.log_level in ("debug", "trace"),  # a log line per request costs throughput
        timeout_graceful_shutdown=config.graceful_timeout_s,
        timeout_keep_alive=30,
        # uvicorn answers 503 once `limit_concurrency` connections are open, so N are served and the N+1-th is refused
        limit_concurrency=config.max_connections + 1,
    )
    return uvicorn.Server(uv)


def serve(model_dir: str | Path, config: ServeConfig | None = None) -> None:
    """Load ``model_dir`` and serve it until SIGINT/SIGTERM, then drain in-flight requests and exit."""
    import torch

    import rewardforge

    config = (config or ServeConfig()).validate()
    if config.threads:
        torch.set_num_threads(config.threads)
    scorer = rewardforge.load(model_dir, device=config.device, dtype=config.torch_dtype())
    make_server(create_app(scorer, config), config).run()
