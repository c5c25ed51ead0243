"""Issue 14, finding 2: a worker key never sits on a command line (every local user reads those with
``ps``) nor in a log. ``controlplane runner`` takes its key from ``CP_WORKER_KEY`` or a ``--key-file``
only its owner can read; ``controlplane dev`` hands the key to its runner in the runner's environment."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import httpx
import pytest

from controlplane.cli import main
from controlplane.devstack import fresh_database, running_dev_stack, started_by
from core.domain.access import parse_key

KEY = "cp_0193testkeyid_not-a-real-secret-but-shaped-like-one"
NO_WORKFLOWS = "tests.security.no_such_module:NOTHING"
"""Makes the runner stop with exit 2 right after it has its key, before it connects anywhere."""


@pytest.fixture(autouse=True)
def _no_key_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in ("CP_WORKER_KEY", "CP_API_KEY"):
        monkeypatch.delenv(variable, raising=False)


def run_runner(*options: str) -> list[str]:
    return ["runner", "--url", "http://127.0.0.1:1", "--workflows", NO_WORKFLOWS, *options]


def test_the_runner_refuses_a_key_file_that_others_can_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "worker.key"
    path.write_text(KEY + "\n")
    for mode in (0o644, 0o640, 0o604, 0o660):
        path.chmod(mode)
        assert main(run_runner("--key-file", str(path))) == 2
        err = capsys.readouterr().err
        assert str(path) in err and f"chmod 600 {path}" in err, err
        assert KEY not in err


def test_the_runner_reads_its_key_from_a_private_file_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "worker.key"
    path.write_text(KEY + "\n")
    path.chmod(0o600)
    assert main(run_runner("--key-file", str(path))) == 2
    assert "cannot load workflows" in capsys.readouterr().err  # it got past its key

    monkeypatch.setenv("CP_WORKER_KEY", KEY)
    assert main(run_runner()) == 2
    err = capsys.readouterr().err
    assert "cannot load workflows" in err and "ps" not in err
    assert "CP_WORKER_KEY" not in os.environ  # what the workflows start does not inherit it

    assert main(run_runner()) == 2
    assert "a key is needed" in capsys.readouterr().err
    assert main(run_runner("--key-file", str(tmp_path / "missing.key"))) == 2
    assert "missing.key" in capsys.readouterr().err


def test_a_key_given_on_the_command_line_is_refused_and_never_echoed(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(run_runner("--key", KEY)) == 2
    err = capsys.readouterr().err
    assert "--key is refused" in err and "ps" in err and "CP_WORKER_KEY" in err, err
    assert KEY not in err
    assert main(["policies", "list", "--key", KEY]) == 2
    err = capsys.readouterr().err
    assert "--key is refused" in err and "CP_API_KEY" in err, err
    assert KEY not in err


def test_the_dev_runner_gets_its_key_outside_its_command_line_and_no_log_holds_a_key(
    tmp_path: Path, database_url: str
) -> None:
    data_dir, log_path = tmp_path / "dev", tmp_path / "dev.log"
    # Without provider keys the example workflows never reach a model.
    env = {name: value for name, value in os.environ.items() if not name.endswith("_API_KEY")}
    with fresh_database(database_url, prefix="secrets") as database:
        env["DATABASE_URL"] = database
        with running_dev_stack(data_dir, log_path, env=env) as dev:
            keys = [key for roles in dev.info["orgs"].values() for key in roles.values()]
            secrets = [*keys, *(parse_key(key)[1] for key in keys)]  # type: ignore[index]
            worker_key = dev.info["orgs"]["acme"]["worker"]
            with httpx.Client(
                base_url=dev.gateway_url,
                headers={"Authorization": f"Bearer {dev.info['orgs']['acme']['admin']}"},
                trust_env=False,
            ) as admin:
                deadline = time.monotonic() + 30
                while (runner := admin.get("/v1/workers/dev-runner")).status_code == 404:
                    assert time.monotonic() < deadline, f"the dev runner did not register:\n{dev.logs()}"
                    time.sleep(0.2)
            assert runner.status_code == 200, f"{runner.text}\n{dev.logs()}"

            children = started_by(dev.process.pid, data_dir)
            command_lines = {proc.pid: Path(f"/proc/{proc.pid}/cmdline").read_bytes() for proc in children}
            [runner_pid] = [pid for pid, line in command_lines.items() if b"\0runner\0" in line]
            assert not [line for line in command_lines.values() if any(s.encode() in line for s in secrets)]
            environ = Path(f"/proc/{runner_pid}/environ").read_bytes().split(b"\0")
            assert f"CP_WORKER_KEY={worker_key}".encode() in environ

            info_mode = stat.S_IMODE((data_dir / "dev.json").stat().st_mode)
            assert info_mode == 0o600, f"dev.json holds every key: mode {info_mode:o}"
            logs = {path.name: path.read_text(errors="replace") for path in data_dir.glob("*.log")}
            assert {"runner.log", "projector.log"} <= set(logs)
            for name, text in logs.items():
                assert not [s for s in secrets if s in text], f"{name} holds a key or its hash"
