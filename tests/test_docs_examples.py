"""The examples in README.md and docs/ run as written.

- every `meter ...` command in a shell block is accepted by the real argument parser
  (an option renamed in the code, or a choice that went, fails here);
- every config snippet loads as meter would load it from a file;
- the README's first hour, done as a new user does it: its config file (the
  upstream swapped for the fake provider, the example key_id for the test key's),
  its quick start with the official SDK, then each of its `meter ... --url` commands
  against that running meter: each exits 0, and where the README shows the output,
  the real output has the same columns.

No network: the upstream is tests/fake_upstream.py.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from meter.cli import build_parser, main
from meter.config import load_settings
from meter.identity import key_id

from .conftest import ROOT, SECRET_KEY, MeterProcess, UpstreamProcess

README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
ADMIN = "http://127.0.0.1:9464"  # the admin address the examples use


def blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.MULTILINE | re.DOTALL)


def heading_section(text: str, heading: str) -> str:
    """The text under `## heading`, to the next `## `."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    assert match, f"no section {heading!r}"
    return match.group(1)


def shell_commands(block: str) -> list[tuple[list[str], list[str]]]:
    """Each `meter` command of a shell block (after a `$ ` prompt, variables, a pipe) as
    its words, with the output lines the block shows under it."""
    found: list[tuple[list[str], list[str]]] = []
    lines = block.replace("\\\n", " ").splitlines()
    i = 0
    while i < len(lines):
        text = lines[i]
        i += 1
        while True:  # a quoted argument may run over several lines
            try:
                words = shlex.split(text, comments=True)
                break
            except ValueError:
                text += "\n" + lines[i]
                i += 1
        prompt = bool(words) and words[0] == "$"
        words = words[1:] if prompt else words
        if "|" in words:
            words = words[words.index("|") + 1 :]
        words = words[: words.index(">")] if ">" in words else words
        while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):
            words = words[1:]
        if not words or words[0] != "meter":
            continue
        output = []
        while prompt and i < len(lines) and not lines[i].startswith("$ "):
            output.append(lines[i])
            i += 1
        found.append((words, output))
    return found


def examples() -> list[tuple[str, list[str], list[str]]]:
    return [
        (f"{page.name}: {' '.join(words)[:70]}", words, output)
        for page in PAGES
        for language in ("sh", "bash")
        for block in blocks(page.read_text(), language)
        for words, output in shell_commands(block)
    ]


@pytest.mark.parametrize(("where", "words"), [(where, words) for where, words, _ in examples()], ids=[e[0] for e in examples()])
def test_every_command_example_is_accepted(where: str, words: list[str]) -> None:
    try:
        build_parser().parse_args(words[1:])
    except SystemExit as exc:
        pytest.fail(f"{where}: `{shlex.join(words)}` is refused (exit {exc.code})")


def test_the_examples_were_found() -> None:
    found = {words[1] for _, words, _ in examples()}
    assert {"serve", "report", "reprice", "sql", "budgets", "prune", "reconcile", "keys"} <= found, found


def config_snippets() -> list[tuple[str, str]]:
    readme = README.read_text()
    # The README's own config file is built up over its sections, as a user builds theirs.
    first_hour = "\n".join(blocks(heading_section(readme, "Settings"), "toml") + blocks(heading_section(readme, "Budgets"), "toml"))
    config_md = blocks((ROOT / "docs" / "config.md").read_text(), "toml")
    return [("README.md: Settings and Budgets", first_hour)] + [(f"config.md #{i}", text) for i, text in enumerate(config_md, 1)]


@pytest.mark.parametrize(("where", "text"), config_snippets(), ids=[where for where, _ in config_snippets()])
def test_every_config_snippet_loads(tmp_path: Path, where: str, text: str) -> None:
    config = tmp_path / "meter.toml"
    config.write_text(text)
    load_settings({"config": str(config)}, env={})  # raises SettingError, naming the entry


def run(args: list[str], cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OPENAI_API_KEY": SECRET_KEY}
    env.pop("METER_ADMIN_TOKEN", None)
    return subprocess.run(args, cwd=cwd, input=stdin, capture_output=True, text=True, timeout=60, env=env)


def meter_command(args: list[str]) -> tuple[int, str, str]:
    """`meter ARGS` run by meter's own entry point in this process (a subprocess each
    cost a second's imports): exit status, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    umask = os.umask(0o022)
    os.umask(umask)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(args)
            except SystemExit as exc:
                code = int(exc.code or 0)
    finally:
        os.umask(umask)  # main() sets meter's own
    return code, out.getvalue(), err.getvalue()


def test_the_readmes_first_hour(upstream: UpstreamProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    readme = README.read_text()
    config = tmp_path / "meter.toml"
    config.write_text(config_snippets()[0][1].replace("3f1c0b9a7d2e4c11", key_id(SECRET_KEY)))
    meter = MeterProcess(["--upstream", upstream.url, "--config", str(config), "--ledger", str(tmp_path / "meter.duckdb")], log_path=tmp_path / "meter.log")
    meter.start()
    try:
        # The quick start, as written but for the address.
        [quick_start] = [b for b in blocks(heading_section(readme, "Quick start"), "python") if "responses.create" in b]
        script = quick_start.replace("http://127.0.0.1:8080", meter.url)
        answer = run([sys.executable, "-c", script], tmp_path)
        assert answer.returncode == 0 and answer.stdout.strip(), answer.stderr

        keys_id = run([sys.executable, "-m", "meter", "keys", "id"], tmp_path, stdin=SECRET_KEY)
        assert keys_id.stdout == key_id(SECRET_KEY) + "\n", keys_id
        monkeypatch.delenv("METER_ADMIN_TOKEN", raising=False)  # the examples ask a meter without a token

        asked = compared = 0
        for _, words, shown in examples():
            if not any(word == ADMIN for word in words) or "reconcile" in words:
                continue
            code, stdout, stderr = meter_command([meter.admin_url if word == ADMIN else word for word in words[1:]])
            assert code == 0, (words, stderr)
            asked += 1
            if shown and "--format" not in words:
                # The documented header is the command's real one.
                assert stdout.splitlines()[0].split() == shown[0].split(), (words, stdout)
                compared += 1
        assert asked >= 8 and compared >= 5, (asked, compared)
        _, budgets, _ = meter_command(["budgets", "--url", meter.admin_url])
        assert re.search(r"^search-daily +day .* enforce ", budgets, re.MULTILINE), budgets
    finally:
        meter.stop()
