"""The newcomer's path (issue 11): install-time defaults, start-up checks, and every user mistake
ending in one line that says what to do, exercised through the ``callbridge`` entry point."""

from __future__ import annotations

import argparse
import logging
import shutil
import socket
import tomllib
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path

import pytest

from callbridge.cli import _setup_logging, build_parser, main
from callbridge.config import DEFAULT_CONFIG, ENV_OVERRIDES, SECRET_KEYS, Settings, load_settings
from callbridge.startup import public_url_warning, random_tiny_dir
from dia2 import VoiceSnapshot, write_random_checkpoint

ROOT = Path(__file__).resolve().parents[2]
RANDOM_MARKER = "random_weights.json"  # what makes a checkpoint folder "random" (dia2.random_checkpoint)


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """``main`` sets up logging for a process (root handler on the test's captured stderr, levels):
    put it back so later tests log as before."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    quiet = {name: logging.getLogger(name).level for name in ("twilio",)}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, old in quiet.items():
        logging.getLogger(name).setLevel(old)


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """A clean environment: no CALLBRIDGE_* / TWILIO_* from the caller's shell, secrets set,
    any port, the cache in tmp, the working directory in tmp (so nothing lands in the repo)."""
    for var in [*ENV_OVERRIDES, "CALLBRIDGE_CONFIG", "XDG_CACHE_HOME"]:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("CALLBRIDGE_API_TOKEN", "api-token")
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", "auth-token")
    monkeypatch.setenv("CALLBRIDGE_PORT", "0")
    monkeypatch.setenv("CALLBRIDGE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CALLBRIDGE_VOICES_DIR", str(tmp_path / "voices"))
    monkeypatch.setenv("CALLBRIDGE_CONFIG", str(DEFAULT_CONFIG))
    monkeypatch.chdir(tmp_path)
    return monkeypatch


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main(args)
    out, err = capsys.readouterr()
    return rc, out, err


def one_error_line(rc: int, err: str) -> str:
    """The mistake ended in exactly one ``error:`` line, status 2, and no traceback."""
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert rc == 2, err
    assert "Traceback" not in err, err
    assert len(errors) == 1, err
    return errors[0]


# ------------------------------------------------------------------------- config and install


def test_packaged_defaults_are_the_documented_config_file_key_by_key() -> None:
    """An installed wheel has no config/ folder and runs on the dataclass defaults: they must be
    exactly what config/callbridge.toml documents, and the file must list every key."""
    documented = tomllib.loads(DEFAULT_CONFIG.read_text())
    defaults = Settings()
    for section in fields(Settings):
        table = documented.get(section.name)
        assert isinstance(table, dict), f"[{section.name}] missing from {DEFAULT_CONFIG.name}"
        current = getattr(defaults, section.name)
        for key in fields(current):
            if (section.name, key.name) in SECRET_KEYS:
                assert key.name not in table, f"{section.name}.{key.name} is a secret; it must not be in the file"
                continue
            assert key.name in table, f"{section.name}.{key.name} is not documented in {DEFAULT_CONFIG.name}"
            default = getattr(current, key.name)
            value = table[key.name]
            if hasattr(type(default), "from_config"):  # a nested table (sip.numbers, sip.trunks)
                value = type(default).from_config(value, f"{section.name}.{key.name}")
            assert value == default, f"{section.name}.{key.name}"
        assert set(table) <= {f.name for f in fields(current)}, f"[{section.name}] has unknown keys"
    assert set(documented) == {f.name for f in fields(Settings)}


def test_every_environment_override_is_documented_in_the_config_file() -> None:
    header = DEFAULT_CONFIG.read_text()
    for var, key in ENV_OVERRIDES.items():
        if key not in SECRET_KEYS:
            assert var in header, var


def test_without_a_config_file_the_cache_folder_follows_xdg(tmp_path: Path) -> None:
    settings = load_settings(None, env={"XDG_CACHE_HOME": str(tmp_path / "xdg")})
    assert settings.model.cache_dir == str(tmp_path / "xdg" / "callbridge")
    assert random_tiny_dir(settings) == tmp_path / "xdg" / "callbridge" / "random-tiny"
    home = load_settings(None, env={})
    assert home.model.cache_dir == str(Path.home() / ".cache" / "callbridge")
    chosen = load_settings(None, env={"CALLBRIDGE_CACHE_DIR": str(tmp_path / "mine")})
    assert random_tiny_dir(chosen) == tmp_path / "mine" / "random-tiny"


def test_the_phone_service_needs_no_extra() -> None:
    """`pip install callbridge` must give a working `callbridge serve`: its imports are base deps."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = " ".join(project["dependencies"])
    for package in ("aiohttp", "soxr", "twilio", "prometheus-client", "webrtcvad-wheels", "torch==2.13.0"):
        assert package in base, package
    assert "service" not in project["optional-dependencies"]
    assert isinstance(project["license"], str)  # an SPDX expression: the table form is deprecated


def test_voices_folder_exists_with_its_readme() -> None:
    assert Settings().voices.dir == "voices"
    readme = (ROOT / "voices" / "README.md").read_text()
    for words in ("snapshot.safetensors", "manifest.json", "words.json", "callbridge voice build"):
        assert words in readme, words


# ------------------------------------------------------------------------- start-up mistakes


def test_port_in_use_is_one_line_before_the_model_loads(env: pytest.MonkeyPatch, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env.setenv("CALLBRIDGE_PORT", str(port))
        env.setenv("CALLBRIDGE_MODEL", str(tmp_path / "no-such-model"))  # loading it would fail differently
        rc, _, err = run(["serve", "--log-level", "warning"], capsys)  # --log-level after the command
    line = one_error_line(rc, err)
    assert f"port {port} on 127.0.0.1 is already in use" in line and "CALLBRIDGE_PORT" in line
    assert "loading" not in err and "no-such-model" not in err
    assert not (tmp_path / "cache").exists()  # nothing generated before the check


def test_serve_warns_loudly_without_a_public_url(env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env.setenv("CALLBRIDGE_PORT", str(taken.getsockname()[1]))
        rc, _, err = run(["--log-level", "INFO", "serve"], capsys)  # --log-level before the command
    one_error_line(rc, err)
    assert "WARNING: CALLBRIDGE_PUBLIC_BASE_URL is not set" in err and "403" in err
    settings = Settings().with_(server={"public_base_url": "https://bridge.example.com"})
    assert public_url_warning(settings) is None
    assert public_url_warning(Settings().with_(twilio={"validate_signatures": False})) is None


@pytest.mark.parametrize("args", [["--log-level", "loud", "serve"], ["serve", "--log-level=loud"],
                                  ["voice", "list", "--log-level", "loud"]])
def test_bad_log_level_anywhere_is_one_line(env: pytest.MonkeyPatch, args: list[str],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(args, capsys)
    assert "--log-level 'loud'" in one_error_line(rc, err)


def test_log_level_after_a_subcommand_that_parses_its_own_arguments(
    env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out, err = run(["voice", "list", "--log-level", "DEBUG"], capsys)
    assert rc == 0 and "Traceback" not in err


@pytest.mark.parametrize(("device", "expected"), [("gpu", "use auto, cpu, cuda or cuda:N"),
                                                  ("cuda", "no CUDA GPU is visible")])
def test_bad_or_absent_device_is_one_line(env: pytest.MonkeyPatch, device: str, expected: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    if device == "cuda":
        torch = pytest.importorskip("torch")
        if torch.cuda.is_available():
            pytest.skip("a GPU is present: cuda is valid here")
    env.setenv("CALLBRIDGE_DEVICE", device)
    rc, _, err = run(["serve"], capsys)
    line = one_error_line(rc, err)
    assert expected in line and "CALLBRIDGE_DEVICE" in line


def test_a_top_k_above_the_engines_cut_is_one_line_at_start(env: pytest.MonkeyPatch, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "callbridge.toml"
    config.write_text("[tts]\ntop_k = 1000\n")
    rc, _, err = run(["serve", "--config", str(config)], capsys)
    line = one_error_line(rc, err)
    assert "tts.top_k = 1000" in line and "0 for no cut" in line
    assert not (tmp_path / "cache").exists()  # refused before any model is loaded or written


def test_real_model_without_a_default_voice_says_how_to_build_it(
    env: pytest.MonkeyPatch, tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    real = tmp_path / "model"
    shutil.copytree(tiny_model_dir, real)
    (real / RANDOM_MARKER).unlink()  # now it is "real weights": no throwaway demo voice
    env.setenv("CALLBRIDGE_MODEL", str(real))
    rc, _, err = run(["serve"], capsys)
    line = one_error_line(rc, err)
    assert "default voice 'default' not found" in line and "callbridge voice build default" in line


def test_snapshot_of_another_model_says_how_to_rebuild(
    env: pytest.MonkeyPatch, tiny_snapshot: VoiceSnapshot, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tiny_snapshot.save(tmp_path / "voices" / "default" / "snapshot.safetensors")
    other = write_random_checkpoint(tmp_path / "other-model", "tiny", seed=1)
    env.setenv("CALLBRIDGE_MODEL", str(other))
    rc, _, err = run(["serve"], capsys)
    line = one_error_line(rc, err)
    assert "another model" in line and "--rebuild-all" in line


def test_random_tiny_is_written_to_the_cache_folder_never_the_working_directory(
    env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from callbridge.startup import resolve_model

    said: list[str] = []
    settings = load_settings()
    source = resolve_model(settings, said.append)
    assert Path(source) == tmp_path / "cache" / "random-tiny" and (Path(source) / "config.json").is_file()
    assert any(str(tmp_path / "cache" / "random-tiny") in line for line in said)  # it says where
    assert not (tmp_path / "out").exists()


def test_library_info_lines_stay_out_of_our_logs() -> None:
    """twilio logs ~11 INFO lines per REST hang-up, with the account URL; faster-whisper one
    per decoded utterance."""
    _setup_logging("INFO")
    for name in ("twilio.http_client", "faster_whisper"):
        assert not logging.getLogger(name).isEnabledFor(logging.INFO)
        assert logging.getLogger(name).isEnabledFor(logging.WARNING)
    assert logging.getLogger("callbridge.calls").isEnabledFor(logging.INFO)


def test_demo_and_serve_help_describe_every_option() -> None:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name in ("demo", "serve"):
        for action in commands[name]._actions:
            assert action.help, f"callbridge {name} {action.option_strings}: no help"


async def test_text_socket_answers_a_non_json_message_as_such(tiny_runtime, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """It used to answer "unknown message type None"."""
    from .test_hardening import raw_call, running, until

    async with running(tiny_runtime, tmp_path) as service, raw_call(service, 1100) as call:
        await call.text_socket()
        assert call.text_ws is not None
        await call.text_ws.send_str("hello there")  # not JSON
        await call.text_ws.send_str("[1, 2]")  # JSON, not an object
        await call.say(type="ping")
        await until(lambda: any(e.get("event") == "pong" for e in call.events), "pong")
        errors = call.errors()
        assert len(errors) == 2, errors
        assert all("not a JSON object" in e["message"] and e["status"] == 400 for e in errors)
        assert not any("unknown message type" in e["message"] for e in errors)


def _options(parser: argparse.ArgumentParser, *path: str) -> set[str]:
    for name in path:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return {s for action in parser._actions for s in action.option_strings}


def test_every_option_the_readme_shows_exists() -> None:
    """README commands must work as written: each --flag shown after a callbridge command is one
    that command takes."""
    import re

    from callbridge.sim.cli import _parser as simulate_parser
    from callbridge.voices.cli import build_parser as voice_parser

    known = {
        "simulate": {s for a in simulate_parser()._actions for s in a.option_strings},
        "voice build": _options(voice_parser(), "build"),
        "serve": _options(build_parser(), "serve") | {"--log-level"},
        "demo": _options(build_parser(), "demo") | {"--log-level"},
    }
    readme = (ROOT / "README.md").read_text().replace("\\\n", " ")
    checked = 0
    for command, options in known.items():
        for line in re.findall(rf"callbridge {command}\b([^\n`#]*)", readme):
            for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", line):
                assert flag in options, f"README: callbridge {command} {flag}"
                checked += 1
    assert checked >= 15
