"""Every option of ``rollbackd run`` (and the global ones) from ``ROLLBACKD_<OPTION>``: one
mechanism, shown in --help, booleans read strictly, the command line first."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click
import pytest

from rollbackd import cli

RULES = Path(__file__).parent / "data" / "e2e-rules.yaml"


def _run_params(args: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict:
    """``run``'s parameters as click resolves them (command line, environment, defaults, the
    callbacks), without starting the daemon."""
    for name in [k for k in os.environ if k.startswith("ROLLBACKD_")]:
        monkeypatch.delenv(name)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with cli.run.make_context("run", args) as ctx:
        return dict(ctx.params)


def _cli(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ROLLBACKD_")}
    return subprocess.run([sys.executable, "-m", "rollbackd.cli", *args], cwd=cwd, capture_output=True,
                          timeout=60, env={**clean, **env, "PYTHONPATH": os.pathsep.join(sys.path)})


def test_every_run_option_has_its_variable_shown_in_help():
    options = [p for p in cli.run.params if isinstance(p, click.Option)]
    assert len(options) >= 24
    for p in options:
        if p.name == "kafka_config":  # ROLLBACKD_KAFKA_<KEY>, one variable per librdkafka key
            assert p.envvar is None
            continue
        assert p.envvar and str(p.envvar).startswith("ROLLBACKD_"), p.name
        assert p.show_envvar, p.name
    names = {p.name: p.envvar for p in options}
    assert names["rules"] == "ROLLBACKD_CONFIG"
    assert names["db"] == "ROLLBACKD_DB"
    assert names["checkpoint"] == "ROLLBACKD_CHECKPOINT"
    assert names["http_listen"] == "ROLLBACKD_HTTP"
    assert names["topics"] == "ROLLBACKD_TOPICS"  # named before this mechanism: kept
    assert names["ledger_key_file"] == "ROLLBACKD_LEDGER_KEY_FILE"
    root = {p.name: p.envvar for p in cli.main.params if isinstance(p, click.Option) and p.expose_value}
    assert root == {"log_level": "ROLLBACKD_LOG_LEVEL", "log_json": "ROLLBACKD_LOG_JSON"}


def test_help_names_the_variables(tmp_path):
    out = _cli("run", "--help", env={}, cwd=tmp_path)
    assert out.returncode == 0
    text = b" ".join(out.stdout.split())
    for var in (b"ROLLBACKD_CONFIG", b"ROLLBACKD_DB", b"ROLLBACKD_CHECKPOINT", b"ROLLBACKD_DRY_RUN",
                b"ROLLBACKD_STOP_TIMEOUT", b"ROLLBACKD_MEASUREMENTS_OUT"):
        assert b"env var: " + var in text, var
    out = _cli("--help", env={}, cwd=tmp_path)
    assert b"ROLLBACKD_LOG_LEVEL" in out.stdout and b"ROLLBACKD_LOG_JSON" in out.stdout


def test_environment_fills_options_and_the_command_line_wins(tmp_path, monkeypatch):
    env = {"ROLLBACKD_CONFIG": str(RULES), "ROLLBACKD_DB": str(tmp_path / "env.db"),
           "ROLLBACKD_CHECKPOINT": str(tmp_path / "env.ckpt"), "ROLLBACKD_BATCH_SIZE": "77",
           "ROLLBACKD_STOP_TIMEOUT": "3.5", "ROLLBACKD_DRY_RUN": "yes", "ROLLBACKD_TOPICS": "a b"}
    params = _run_params([], env, monkeypatch)
    assert params["rules"] == str(RULES)
    assert params["db"] == str(tmp_path / "env.db")
    assert params["checkpoint"] == str(tmp_path / "env.ckpt")
    assert (params["batch_size"], params["stop_timeout"], params["dry_run"]) == (77, 3.5, True)
    assert params["topics"] == ("a", "b")
    params = _run_params(["--db", str(tmp_path / "cli.db"), "--batch-size", "5", "-c", "other.yaml"], env,
                         monkeypatch)
    assert (params["db"], params["batch_size"], params["rules"]) == (str(tmp_path / "cli.db"), 5, "other.yaml")


@pytest.mark.parametrize("word,value", [("true", True), ("TRUE", True), ("1", True), ("Yes", True),
                                        ("false", False), ("0", False), ("no", False)])
def test_booleans_from_the_environment(word, value, monkeypatch):
    assert _run_params(["-c", "x"], {"ROLLBACKD_DRY_RUN": word}, monkeypatch)["dry_run"] is value


@pytest.mark.parametrize("word", ["ture", "on", "y", "2", "enabled"])
def test_a_bad_boolean_is_a_clear_error(word, tmp_path):
    out = _cli("run", env={"ROLLBACKD_CONFIG": str(RULES), "ROLLBACKD_DRY_RUN": word}, cwd=tmp_path)
    assert out.returncode == 2
    assert b"Traceback" not in out.stderr
    assert b"ROLLBACKD_DRY_RUN" in out.stderr and f"'{word}' is not a boolean".encode() in out.stderr
    out = _cli("validate", str(RULES), env={"ROLLBACKD_LOG_JSON": word}, cwd=tmp_path)
    assert out.returncode == 2 and b"ROLLBACKD_LOG_JSON" in out.stderr and b"Traceback" not in out.stderr


def test_a_path_from_the_environment_is_checked_like_one_given(tmp_path):
    out = _cli("run", env={"ROLLBACKD_CONFIG": str(RULES), "ROLLBACKD_DB": str(tmp_path / "no" / "x.db")},
               cwd=tmp_path)
    assert out.returncode == 2
    assert b"ROLLBACKD_DB" in out.stderr and b"does not exist" in out.stderr


def test_global_options_from_the_environment(tmp_path):
    out = _cli("validate", str(RULES), env={"ROLLBACKD_LOG_LEVEL": "info", "ROLLBACKD_LOG_JSON": "1"}, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    out = _cli("validate", str(RULES), env={"ROLLBACKD_LOG_LEVEL": "loud"}, cwd=tmp_path)
    assert out.returncode == 2 and b"ROLLBACKD_LOG_LEVEL" in out.stderr


def test_a_kafka_secret_comes_from_a_file(tmp_path):
    """librdkafka settings come from ROLLBACKD_KAFKA_<KEY>; a secret (the SASL password) from a
    mounted file with ROLLBACKD_KAFKA_<KEY>_FILE, its trailing newline stripped."""
    import click

    from rollbackd.cli import _kafka_env

    secret = tmp_path / "sasl-password"
    secret.write_text("s3cret\n")
    env = {"ROLLBACKD_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
           "ROLLBACKD_KAFKA_SASL_PASSWORD_FILE": str(secret), "PATH": "/usr/bin"}
    assert _kafka_env(env) == {"sasl.mechanism": "SCRAM-SHA-512", "sasl.password": "s3cret"}
    with pytest.raises(click.UsageError, match="not both"):
        _kafka_env({**env, "ROLLBACKD_KAFKA_SASL_PASSWORD": "inline"})
    with pytest.raises(click.UsageError, match=r"ROLLBACKD_KAFKA_SASL_PASSWORD_FILE '/nonexistent' cannot be read") as err:
        _kafka_env({"ROLLBACKD_KAFKA_SASL_PASSWORD_FILE": "/nonexistent"})
    assert "s3cret" not in str(err.value)
