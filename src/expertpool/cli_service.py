"""The `serve` command (issue 5): the realtime model-querying HTTP service."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServeConfig:
    pool: str
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    max_tasks: int = 32
    max_upload_mb: float = 4.0
    cache_size: int = 64
    threads: int = 1
    log_level: str = "info"


def cmd_serve(cfg: ServeConfig) -> int:
    from .errors import UserError

    if not 0 < cfg.port < 65536:
        raise UserError(f"--port must be 1..65535, got {cfg.port}")
    if cfg.workers < 1 or cfg.max_tasks < 1 or cfg.cache_size < 1 or cfg.threads < 1 or cfg.max_upload_mb <= 0:
        raise UserError("--workers, --max-tasks, --cache-size, --threads and --max-upload-mb must be positive")
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise UserError(f"`expertpool serve` needs fastapi and uvicorn ({e.name} is missing)") from None
    from .service import serve

    serve(cfg.pool, host=cfg.host, port=cfg.port, workers=cfg.workers, log_level=cfg.log_level,
          max_tasks=cfg.max_tasks, cache_size=cfg.cache_size, max_upload_bytes=int(cfg.max_upload_mb * 2**20),
          threads=cfg.threads)
    return 0


def add_commands(sub, pool_sub) -> None:
    """Register this module's sub-commands on the top-level ``sub`` (and ``pool_sub`` for ``pool ...``)."""
    s = sub.add_parser("serve", help="serve the pool over HTTP: realtime composite models, exports, inference")
    s.set_defaults(run=cmd_serve, config=ServeConfig)
    s.add_argument("--pool", required=True)
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--workers", type=int, default=1, help="worker processes (each opens the pool once)")
    s.add_argument("--max-tasks", type=int, default=32, help="most primitive tasks in one composite query")
    s.add_argument("--max-upload-mb", type=float, default=4.0, help="largest request body accepted")
    s.add_argument("--cache-size", type=int, default=64, help="composed models kept in memory (LRU)")
    s.add_argument("--threads", type=int, default=1, help="PyTorch intra-op threads per worker")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
