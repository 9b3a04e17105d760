"""The peers `scripts/bench.py --peers` compares meter with: LiteLLM's proxy and Portkey's gateway.

Installs each peer on demand into a cache that outlives the run (a venv for LiteLLM,
an npm prefix for Portkey) and starts it on loopback in front of the benchmark's fake
upstream, so that the same wrk load (`POST /v1/responses`, JSON and SSE) reaches it.
The versions are pinned: they are the ones the README's comparison names, and a figure
means nothing without the version that made it.

Each peer runs as the comparison states it: LiteLLM with one worker, no database, no
callbacks, no request or access logging, no telemetry; Portkey headless, as its own
`start-server.js` starts it.  Either one is a single process (uvicorn runs inside the
`litellm` command with one worker; Portkey is one node process), so the returned Popen's
pid is the whole tree whose RSS the benchmark measures, and SIGTERM to it ends the peer.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

PEERS: tuple[str, ...] = ("litellm", "portkey")

LITELLM_VERSION = "1.108.7"
PORTKEY_VERSION = "1.15.2"
# Portkey-AI/gateway's own package-lock.json at tag v1.15.2 pins node_modules/@hono/node-server
# at 1.13.5 (package.json only asks for ^1.3.3).  A plain `npm install` of the gateway resolves
# the newest 1.x instead, which answers every streamed /v1/responses with 500
# (Portkey-AI/gateway#1550), so the override holds it where Portkey's release tested it.
HONO_NODE_SERVER_VERSION = "1.13.5"

# What an installed peer was installed as: a cache from another version is reinstalled.
_SPECS = {
    "litellm": f"litellm[proxy]=={LITELLM_VERSION}",
    "portkey": f"@portkey-ai/gateway@{PORTKEY_VERSION} @hono/node-server@{HONO_NODE_SERVER_VERSION}",
}


def default_cache() -> Path:
    """~/.cache/meter-bench/peers (or under $XDG_CACHE_HOME): kept between runs, since a
    cold install takes a minute or more and the peers do not change."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "meter-bench" / "peers"


# start() takes no cache: it finds each peer where install() last put it (else in the default cache).
_homes: dict[str, Path] = {}


def _check_name(name: str) -> None:
    if name not in PEERS:
        raise RuntimeError(f"unknown peer {name!r} (known: {', '.join(PEERS)})")


def _litellm_bin(home: Path) -> Path:
    return home / "venv" / "bin" / "litellm"


def _portkey_server(home: Path) -> Path:
    return home / "node_modules" / "@portkey-ai" / "gateway" / "build" / "start-server.js"


def _entry(name: str, home: Path) -> Path:
    return _litellm_bin(home) if name == "litellm" else _portkey_server(home)


def install(name: str, cache: Path) -> None:
    """Install the peer into cache/<name>/ if not already there (idempotent, fast when
    present). Raises RuntimeError with one clear line if it cannot."""
    _check_name(name)
    home = cache / name
    _homes[name] = home
    marker = home / "installed"
    spec = _SPECS[name]
    # The marker is written last, so a half-finished install (killed, failed) is redone.
    if marker.is_file() and marker.read_text() == spec and _entry(name, home).exists():
        return
    home.mkdir(parents=True, exist_ok=True)
    log = cache / f"{name}-install.log"
    with log.open("a") as out:
        out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} installing {spec}\n")
        out.flush()
        if name == "litellm":
            steps = _litellm_steps(home)
        else:
            steps = _portkey_steps(home)
        for argv in steps:
            out.write(f"$ {' '.join(argv)}\n")
            out.flush()
            try:
                code = subprocess.run(argv, cwd=home, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=1800).returncode
            except (OSError, subprocess.TimeoutExpired) as e:
                out.write(f"{e}\n")
                code = -1
            if code != 0:
                _show_tail(log)
                raise RuntimeError(f"installing {name} ({spec}) failed at `{' '.join(argv[:3])} ...` (exit {code}); the whole output is in {log}")
    if not _entry(name, home).exists():
        raise RuntimeError(f"installing {name} ({spec}) left no {_entry(name, home)}; the output is in {log}")
    marker.write_text(spec)


def _litellm_steps(home: Path) -> list[list[str]]:
    venv = home / "venv"
    steps = []
    if not (venv / "bin" / "python").exists():
        steps.append([sys.executable, "-m", "venv", str(venv)])
    steps.append([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", _SPECS["litellm"]])
    return steps


def _portkey_steps(home: Path) -> list[list[str]]:
    if shutil.which("npm") is None or shutil.which("node") is None:
        raise RuntimeError("installing portkey needs node and npm (apt-get install nodejs npm)")
    manifest = {
        "name": "meter-bench-portkey",
        "private": True,
        "dependencies": {"@portkey-ai/gateway": PORTKEY_VERSION},
        "overrides": {"@hono/node-server": HONO_NODE_SERVER_VERSION},
    }
    (home / "package.json").write_text(json.dumps(manifest, indent=2) + "\n")
    # --ignore-scripts: the gateway's only install script is patch-package, and its
    # patches/ folder is not in the published package, so it has nothing to apply.
    return [["npm", "install", "--omit=dev", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=warn"]]


def _show_tail(log: Path, lines: int = 30) -> None:
    """On failure only, the end of the install's output on the terminal."""
    tail = log.read_text(errors="replace").splitlines()[-lines:]
    print("\n".join(line if len(line) <= 400 else line[:400] + " ..." for line in tail), file=sys.stderr)


def start(name: str, upstream: str, port: int, workdir: Path) -> tuple[subprocess.Popen, dict[str, str]]:
    """Start the installed peer listening on 127.0.0.1:port, forwarding to `upstream`
    (e.g. "http://127.0.0.1:4321"), and return the process and the extra request
    headers wrk must send for the peer to route the call (Portkey: x-portkey-provider,
    x-portkey-custom-host, ...; LiteLLM: {}). The caller waits for the port itself."""
    _check_name(name)
    cache_home = _installed_home(name)
    workdir.mkdir(parents=True, exist_ok=True)
    log = (workdir / f"{name}.log").open("ab")
    try:
        if name == "litellm":
            return _start_litellm(cache_home, upstream, port, workdir, log), {}
        return _start_portkey(cache_home, port, workdir, log), {
            "x-portkey-provider": "openai",
            "x-portkey-custom-host": upstream.rstrip("/") + "/v1",
        }
    finally:
        log.close()  # the child holds its own descriptor


def _installed_home(name: str) -> Path:
    home = _homes.get(name, default_cache() / name)
    if not (home / "installed").is_file():
        raise RuntimeError(f"{name} is not installed in {home}: call peers.install({name!r}, cache) first")
    return home


def _start_litellm(home: Path, upstream: str, port: int, workdir: Path, log: IO[bytes]) -> subprocess.Popen[bytes]:
    config = workdir / "litellm.yaml"
    # LiteLLM does not pass the answer through: it parses it into its own Response model
    # and re-serialises it (new id, `data:` lines without `event:` for SSE).  An upstream
    # answer without `created_at`, which OpenAI always sends, is a 500 there.
    # JSON is YAML: no YAML writer needed.  model `gpt-4o` goes to the upstream as an
    # OpenAI-compatible provider; the key is any string (the fake upstream reads none).
    config.write_text(json.dumps({
        "model_list": [{
            "model_name": "gpt-4o",
            "litellm_params": {"model": "openai/gpt-4o", "api_base": upstream.rstrip("/") + "/v1", "api_key": "sk-bench-upstream"},
        }],
        # No callbacks of any kind, no message logging: the proxy's own cost only.
        "litellm_settings": {"callbacks": [], "success_callback": [], "failure_callback": [], "turn_off_message_logging": True,
                             "set_verbose": False, "json_logs": False},
        # No database (no DATABASE_URL), so no spend or error logs are written anyway.  No
        # master key either: like meter, the proxy passes the caller's key on unchecked (wrk
        # sends a new random one each run), which this release refuses unless told to.
        "general_settings": {"disable_spend_logs": True, "disable_error_logs": True, "dangerously_permit_weak_or_unset_master_key": True},
    }, indent=2) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "LITELLM_MASTER_KEY", "STORE_MODEL_IN_DB")}
    env.update({
        "LITELLM_LOG": "ERROR",
        # The model cost map is fetched from the internet at import unless told to use
        # the copy in the package; here that fetch could only time out.
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_TELEMETRY": "False",
        "PYTHONUNBUFFERED": "1",
    })
    return subprocess.Popen(
        [str(_litellm_bin(home)), "--config", str(config), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1",
         "--telemetry", "False", "--log_config", str(_quiet_uvicorn_log_config(workdir))],
        cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
    )


def _quiet_uvicorn_log_config(workdir: Path) -> Path:
    """uvicorn's logging with the access log off (a line per request costs the peer CPU
    that meter does not spend) and errors still written."""
    path = workdir / "litellm-logging.json"
    path.write_text(json.dumps({
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"plain": {"format": "%(levelname)s %(name)s: %(message)s"}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stderr"}},
        "loggers": {
            "uvicorn": {"handlers": ["stderr"], "level": "WARNING", "propagate": False},
            "uvicorn.error": {"handlers": ["stderr"], "level": "WARNING", "propagate": False},
            "uvicorn.access": {"handlers": [], "level": "CRITICAL", "propagate": False},
        },
    }))
    return path


# Portkey's start-server.js binds every interface (it gives @hono/node-server no
# hostname); this launcher gives listen() 127.0.0.1 instead, so the benchmark stays on
# loopback, then runs the gateway's own entry point unchanged in the same process.
_PORTKEY_LAUNCHER = """\
import net from 'node:net';
const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (...args) {
  if (typeof args[0] === 'number' && (args.length < 2 || args[1] === undefined || typeof args[1] === 'function')) {
    if (args[1] === undefined && args.length >= 2) args.splice(1, 1);
    args.splice(1, 0, '127.0.0.1');
  }
  return listen.apply(this, args);
};
await import(%s);
"""


def _start_portkey(home: Path, port: int, workdir: Path, log: IO[bytes]) -> subprocess.Popen[bytes]:
    launcher = workdir / "portkey-start.mjs"
    launcher.write_text(_PORTKEY_LAUNCHER % json.dumps(_portkey_server(home).resolve().as_uri()))
    env = dict(os.environ)
    # production: no static UI routes and no log-streaming endpoint (only used by the UI).
    env["NODE_ENV"] = "production"
    return subprocess.Popen(
        ["node", str(launcher), f"--port={port}", "--headless"],
        cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
    )
