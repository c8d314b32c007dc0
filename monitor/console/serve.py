"""Run the console with uvicorn: the store (migrated when this process may), the tokens, the app."""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

from monitor.config.models import MonitorConfig
from monitor.console.auth import AuthError, TokenStore

log = logging.getLogger("monitor.console")


class ConsoleError(RuntimeError):
    """The console cannot start; the message says what to fix."""


def build(cfg: MonitorConfig, base: Path | None, tokens_file: Path | None = None):
    """The app, its store and its tokens (for `serve` and the tests)."""
    from monitor.console.app import create_app
    from monitor.store.db import Store, StoreError, store_url

    path = tokens_file or (_in_config(cfg.console.tokens_file, base) if cfg.console.tokens_file else None)
    if path is None and not cfg.console.proxy.enabled:
        raise ConsoleError("no way to log in: set console.tokens_file (make one with `monitor console token`) "
                           "or console.proxy")
    try:
        tokens = TokenStore(path)
    except AuthError as e:
        raise ConsoleError(str(e)) from e
    try:
        store = Store(store_url(cfg.store, base), migrate=False)
    except StoreError as e:
        raise ConsoleError(str(e)) from e
    try:
        store.migrate()  # the ingester or the chart's Job normally has; a read-only user may not: pages say so
    except Exception as e:  # a database that is down now may come up: the pages answer 503 until then
        log.warning("store not migrated", extra={"database": store.name, "error": str(e).splitlines()[0][:300]})
    return create_app(cfg, store, tokens, _opener(cfg, base)), store


def _in_config(p: str, base: Path | None) -> Path:
    """A path from the console's config: relative ones are in the config file's folder (`base`)."""
    path = Path(p).expanduser()
    return base / path if not path.is_absolute() and base is not None else path


def _opener(cfg: MonitorConfig, base: Path | None):
    """The private key that reveals sealed values: MONITOR_REVEAL_KEY, or `console.reveal_key_file`."""
    from monitor.sinks.sealing import Opener, SealingError, read_key_file

    key, what = os.environ.get("MONITOR_REVEAL_KEY"), "MONITOR_REVEAL_KEY"
    if not key and cfg.console.reveal_key_file:
        what = "console.reveal_key_file"
        try:
            key = read_key_file(_in_config(cfg.console.reveal_key_file, base))
        except SealingError as e:
            raise ConsoleError(f"console.reveal_key_file: {e}") from None
    if not key:
        return None
    try:
        return Opener(key, what)
    except SealingError as e:
        raise ConsoleError(str(e)) from None


def serve(cfg: MonitorConfig, base: Path | None, host: str | None = None, port: int | None = None,
          tokens_file: Path | None = None, config_path: Path | None = None) -> int:
    import uvicorn

    app, store = build(cfg, base, tokens_file)  # also checks, in this process, that the workers can start
    host = host or cfg.console.host
    port = port or cfg.console.port
    workers = cfg.console.workers
    log.info("console listening", extra={"url": f"http://{host}:{port}", "database": store.name, "workers": workers})
    # proxy_headers off: the client address is the TCP peer, which is what the proxy check trusts;
    # uvicorn would otherwise take it from X-Forwarded-For.
    options = dict(host=host, port=port, proxy_headers=False, log_config=None, access_log=False)
    if workers == 1:
        uvicorn.run(app, **options)
    else:
        store.close()
        # Worker processes build their own app from the same files; they must sign sessions alike.
        os.environ[_CONFIG_ENV] = str(config_path) if config_path else ""
        os.environ[_TOKENS_ENV] = str(tokens_file) if tokens_file else ""
        if not cfg.console.session_secret_file and not os.environ.get(cfg.console.session_secret_env):
            os.environ[cfg.console.session_secret_env] = secrets.token_urlsafe(32)
        uvicorn.run("monitor.console.serve:worker_app", factory=True, workers=workers, **options)
    store.close()
    return 0


_CONFIG_ENV = "MONITOR_CONSOLE_WORKER_CONFIG"
_TOKENS_ENV = "MONITOR_CONSOLE_WORKER_TOKENS"


def worker_app():
    """One uvicorn worker's app (`console.workers` > 1), from the files the parent was started with."""
    from monitor.config import load_config
    from monitor.logs import configure

    configure(logging.INFO, "json")  # a spawned worker starts with logging unset

    path = os.environ.get(_CONFIG_ENV)
    if path:
        loaded = load_config(Path(path))
        cfg, base = loaded.config, loaded.path.parent
    else:
        cfg, base = MonitorConfig(), None
    tokens = os.environ.get(_TOKENS_ENV)
    return build(cfg, base, Path(tokens) if tokens else None)[0]
