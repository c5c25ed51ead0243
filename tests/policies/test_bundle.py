"""Bundles: what is read from a directory or an `opa build` tarball, what the digest covers, and which
bundle (and so which engine) `default_bundle` / `open_engine` pick."""

from __future__ import annotations

import io
import json
import logging
import shutil
import tarfile
from pathlib import Path

import pytest

from policies_wasm import engine as engine_module
from policies_wasm.engine import (
    SOURCES_DIR,
    Bundle,
    PolicyLoadError,
    annotated_entrypoints,
    canonical_json,
    default_bundle,
)
from policies_wasm.engines import open_engine
from tests.policies.wat_modules import module_bytes

SHIPPED_ENTRYPOINTS = (
    "controlplane/settings",
    "controlplane/submit",
    "controlplane/submit_usage",
    "controlplane/tool",
)


def write_tarball(path: Path, files: dict[str, bytes]) -> Path:
    """A tarball laid out as `opa build` writes one: member names start with "/"."""
    with tarfile.open(path, "w:gz") as archive:
        for name, content in files.items():
            member = tarfile.TarInfo("/" + name)
            member.size = len(content)
            archive.addfile(member, io.BytesIO(content))
    return path


def shipped_files() -> dict[str, bytes]:
    return {
        file.relative_to(SOURCES_DIR).as_posix(): file.read_bytes() for file in SOURCES_DIR.rglob("*") if file.is_file()
    }


def test_the_shipped_sources_declare_their_entrypoints() -> None:
    bundle = Bundle.from_dir(SOURCES_DIR)
    assert bundle.entrypoints == SHIPPED_ENTRYPOINTS
    assert bundle.wasm is None
    assert set(bundle.data) == {"policy_config"}


def test_entrypoint_annotations_are_read_as_opa_build_reads_them() -> None:
    source = """package acme.rules

# METADATA
# title: Allowed?
# entrypoint: true
allow := true

# METADATA
# title: not an entrypoint
helper := 1
"""
    assert annotated_entrypoints(source) == ["acme/rules/allow"]


def test_the_digest_is_a_fixed_function_of_the_content() -> None:
    # Golden value: the definition (canonical JSON of data, module hashes and wasm hash) must not
    # drift, or digests recorded in the log would stop matching.
    bundle = Bundle(modules={"a.rego": "package a\n"}, data={"b": [1, 2], "a": None}, wasm=b"\0asm")
    assert bundle.digest == "sha256:dcf866422dbe66a53e40645e18080241f866edaca3fc0257e0b17e76e9ad9208"


def test_the_digest_ignores_paths_and_key_order_but_not_content() -> None:
    base = Bundle(modules={"x/a.rego": "package a\n", "b.rego": "package b\n"}, data={"k": {"y": 1, "x": 2}})
    moved = Bundle(modules={"b.rego": "package a\n", "c/d.rego": "package b\n"}, data={"k": {"x": 2, "y": 1}})
    assert moved.digest == base.digest
    assert base.with_data({"k": {"x": 2, "y": 3}}).digest != base.digest
    assert Bundle(modules={"x/a.rego": "package a\n"}, data=base.data).digest != base.digest


def test_the_source_digest_leaves_out_the_wasm() -> None:
    sources = Bundle(modules={"a.rego": "package a\n"}, data={})
    compiled = Bundle(modules=sources.modules, data={}, wasm=b"\0asm\1\0\0\0")
    assert compiled.source_digest == sources.source_digest == sources.digest
    assert compiled.digest != sources.digest


def test_a_tarball_from_opa_build_is_read_with_its_manifest(tmp_path: Path) -> None:
    wasm = module_bytes("echo")
    manifest = {
        "revision": "2026-11-22.1",
        "roots": [""],
        "wasm": [{"entrypoint": "test/echo", "module": "/policy.wasm"}],
    }
    bundle = Bundle.from_tarball(
        write_tarball(
            tmp_path / "bundle.tar.gz",
            {
                "controlplane/a.rego": b"package controlplane\n",
                "data.json": b'{"policy_config": {"orgs": {}}}',
                "policy.wasm": wasm,
                ".manifest": json.dumps(manifest).encode(),
            },
        )
    )
    assert bundle.wasm == wasm
    assert bundle.modules == {"controlplane/a.rego": "package controlplane\n"}
    assert bundle.data == {"policy_config": {"orgs": {}}}
    assert bundle.version == "2026-11-22.1"


def test_a_data_file_in_a_directory_lands_under_that_path(tmp_path: Path) -> None:
    (tmp_path / "orgs" / "acme").mkdir(parents=True)
    (tmp_path / "data.json").write_text('{"orgs": {"globex": {}}}')
    (tmp_path / "orgs" / "acme" / "data.json").write_text('{"tier": "gold"}')
    assert Bundle.from_dir(tmp_path).data == {"orgs": {"globex": {}, "acme": {"tier": "gold"}}}


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"data.json": b'{"a": 1}', "a/data.json": b"{}"}, "data key 'a' is defined twice"),
        ({"data.json": b"[1]"}, "a data document must be a JSON object"),
        ({"data.json": b"{oops"}, "is not valid UTF-8/JSON"),
        ({".manifest": b'{"wasm": [{"module": "/missing.wasm"}]}'}, "names missing.wasm but the bundle does not"),
        ({"a/policy.wasm": b"1", "b/policy.wasm": b"2"}, "several wasm modules are not supported"),
    ],
)
def test_a_broken_bundle_is_refused_with_the_reason(tmp_path: Path, files: dict[str, bytes], message: str) -> None:
    with pytest.raises(PolicyLoadError, match=message):
        Bundle.from_tarball(write_tarball(tmp_path / "bundle.tar.gz", files))


def test_an_unreadable_bundle_is_refused(tmp_path: Path) -> None:
    (tmp_path / "bundle.tar.gz").write_bytes(b"not a tarball")
    with pytest.raises(PolicyLoadError, match="cannot read policy bundle"):
        Bundle.load(tmp_path / "bundle.tar.gz")
    with pytest.raises(PolicyLoadError, match="does not exist"):
        Bundle.from_dir(tmp_path / "nowhere")


def test_input_json_is_canonical() -> None:
    assert canonical_json({"b": [1, 2.5, "é"], "a": None}) == '{"a":null,"b":[1,2.5,"é"]}'.encode()


# --- Which bundle and which engine --------------------------------------------------------------------


@pytest.fixture
def compiled_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "build" / "bundle.tar.gz"
    path.parent.mkdir()
    monkeypatch.setattr(engine_module, "COMPILED_BUNDLE", path)
    monkeypatch.delenv(engine_module.POLICY_BUNDLE_ENV, raising=False)
    return path


def test_without_a_compiled_bundle_the_sources_are_evaluated_by_regopy(compiled_path: Path) -> None:
    bundle = default_bundle()
    assert bundle.wasm is None
    assert open_engine(bundle).name == "regopy"


def test_a_compiled_bundle_built_from_the_current_sources_is_preferred(compiled_path: Path) -> None:
    write_tarball(compiled_path, {**shipped_files(), "policy.wasm": module_bytes("echo")})
    bundle = default_bundle()
    assert bundle.wasm is not None
    assert bundle.source_digest == Bundle.from_dir(SOURCES_DIR).source_digest
    assert open_engine(bundle).name == "opa-wasm"


def test_a_stale_compiled_bundle_is_ignored_with_a_warning(
    compiled_path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    older = shipped_files()
    older["controlplane/tool.rego"] += b"\n# an older revision\n"
    write_tarball(compiled_path, {**older, "policy.wasm": module_bytes("echo")})
    with caplog.at_level(logging.WARNING):
        bundle = default_bundle()
    assert bundle.wasm is None
    assert "rebuild it with policies_wasm/build.sh" in caplog.text


def test_a_configured_bundle_is_used_as_it_is(
    compiled_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A deployment's own bundle (e.g. mounted into a container) need not match the shipped sources.
    configured = write_tarball(
        tmp_path / "theirs.tar.gz", {"a.rego": b"package a\n", "policy.wasm": module_bytes("echo")}
    )
    monkeypatch.setenv(engine_module.POLICY_BUNDLE_ENV, str(configured))
    bundle = default_bundle()
    assert bundle.modules == {"a.rego": "package a\n"}
    assert open_engine(bundle).name == "opa-wasm"


def test_the_sources_directory_reads_the_same_as_a_copy(tmp_path: Path) -> None:
    copy = tmp_path / "policies"
    shutil.copytree(SOURCES_DIR, copy)
    assert Bundle.from_dir(copy).digest == Bundle.from_dir(SOURCES_DIR).digest
