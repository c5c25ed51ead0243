"""The policy port: bundles, decisions, errors, and the interface every engine implements.

A bundle is what `opa build` consumes or produces: Rego modules, a data document, and optionally the
`policy.wasm` that `opa build -t wasm` compiled from them. An engine loads a bundle once and then
answers `evaluate(entrypoint, input)` synchronously with a `Decision` that names the engine, the
bundle and the input by digest, so a recorded decision says exactly what produced it. The engines
(`policies_wasm.opa_wasm`, `policies_wasm.rego`) import this module; which one a bundle gets is
`policies_wasm.engines`' choice, so this module imports none of them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

import msgspec

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
SOURCES_DIR = PACKAGE_DIR / "policies"
COMPILED_BUNDLE = PACKAGE_DIR / "build" / "bundle.tar.gz"
POLICY_BUNDLE_ENV = "CP_POLICY_BUNDLE"


# --- Errors -----------------------------------------------------------------------------------------


class PolicyError(Exception):
    """Anything that kept a policy from producing a decision. Callers enforcing a policy treat it as
    a denial (fail closed)."""


class PolicyLoadError(PolicyError):
    """The bundle cannot be used: malformed or unsupported wasm, Rego that does not compile, a
    builtin the host lacks, an unreadable bundle file."""


class UnknownEntrypoint(PolicyError):
    """The entrypoint is not one the loaded bundle was built with."""


class PolicyInputError(PolicyError):
    """The input is not a plain JSON document (sets, datetimes, NaN, objects with non-string keys)."""


class PolicyEvaluationError(PolicyError):
    """The policy failed while evaluating: it aborted, trapped, a builtin failed, or it returned
    something that is not a result set."""


class PolicyTimeout(PolicyEvaluationError):
    """The policy used up its execution budget (a loop that does not end, or far too much work)."""


class PolicyUndefined(PolicyError):
    """The entrypoint produced no value for this input. The shipped entrypoints always produce one;
    an undefined decision is never read as "allow"."""


# --- Decisions --------------------------------------------------------------------------------------


class Decision(msgspec.Struct, frozen=True):
    """One evaluation. `value` is plain JSON; the digests make it reproducible and auditable."""

    entrypoint: str
    value: Any
    engine: str  # "opa-wasm" | "regopy"
    bundle_digest: str  # "sha256:<hex>", see Bundle.digest
    input_digest: str  # "sha256:<hex>" of the canonical JSON of the input
    duration_ms: float


def canonical_json(value: Any) -> bytes:
    """The one JSON text of a value: sorted keys, no insignificant whitespace, UTF-8. Both engines
    evaluate exactly these bytes and the input digest is taken over them."""
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    except (TypeError, ValueError) as exc:  # UnicodeEncodeError (a lone surrogate) is a ValueError
        raise PolicyInputError(
            f"policy input must be plain JSON (dict, list, str, number, bool, None): {exc}"
        ) from None


def sha256_digest(content: bytes) -> str:
    return "sha256:" + hashlib.sha256(content).hexdigest()


def input_digest(value: Any) -> str:
    """The digest a decision records for its input (raises PolicyInputError as evaluating would)."""
    return sha256_digest(canonical_json(value))


# --- Bundles ----------------------------------------------------------------------------------------

# `# METADATA` blocks marking a rule `entrypoint: true`, as `opa build` reads them. The rule's name
# must start the first line after the block, which is how the shipped policies are written.
_ENTRYPOINT_ANNOTATION = re.compile(
    r"^# METADATA\n(?:#.*\n)*?#\s*entrypoint:\s*true\s*\n(?:#.*\n)*([A-Za-z_][A-Za-z0-9_]*)", re.MULTILINE
)
_PACKAGE = re.compile(r"^package\s+([A-Za-z_][A-Za-z0-9_.]*)", re.MULTILINE)


def annotated_entrypoints(source: str) -> list[str]:
    """Entrypoints (`pkg/path/rule`) declared with `# METADATA … entrypoint: true` in one module."""
    rules = _ENTRYPOINT_ANNOTATION.findall(source)
    if not rules:
        return []
    package = _PACKAGE.search(source)
    if package is None:
        return []
    prefix = package.group(1).replace(".", "/")
    return [f"{prefix}/{rule}" for rule in rules]


@dataclass(frozen=True, eq=False)
class Bundle:
    """Rego modules (path → source), the data document, and optionally the compiled `policy.wasm`.

    `digest` identifies the content, independent of file paths and machines: sha256 over the
    canonical JSON of {"data": data, "modules": sorted sha256 of each module's text, "wasm": sha256
    of policy.wasm or null}. `source_digest` is the same without the wasm, so a compiled bundle can
    be checked against the sources it claims to come from.
    """

    modules: Mapping[str, str]
    data: dict[str, Any] = field(default_factory=dict)
    wasm: bytes | None = None
    revision: str = ""  # `.manifest` revision when `opa build --revision` set one
    origin: str = ""  # where it was read from, for messages

    @classmethod
    def from_dir(cls, path: str | Path) -> Bundle:
        root = Path(path)
        if not root.is_dir():
            raise PolicyLoadError(f"policy bundle directory {root} does not exist")
        files = {
            file.relative_to(root).as_posix(): file.read_bytes()
            for file in sorted(root.rglob("*"))
            if file.is_file() and _is_bundle_file(file.relative_to(root).as_posix())
        }
        return cls._from_files(files, origin=str(root))

    @classmethod
    def from_tarball(cls, path: str | Path) -> Bundle:
        """A `bundle.tar.gz` as `opa build` writes it (paths start with "/")."""
        files: dict[str, bytes] = {}
        try:
            with tarfile.open(path, "r:*") as archive:
                for member in archive.getmembers():
                    name = PurePosixPath(member.name.lstrip("/")).as_posix()
                    if not member.isfile() or not _is_bundle_file(name):
                        continue
                    extracted = archive.extractfile(member)
                    if extracted is not None:
                        files[name] = extracted.read()
        except (OSError, tarfile.TarError) as exc:
            raise PolicyLoadError(f"cannot read policy bundle {path}: {exc}") from None
        return cls._from_files(files, origin=str(path))

    @classmethod
    def load(cls, path: str | Path) -> Bundle:
        return cls.from_dir(path) if Path(path).is_dir() else cls.from_tarball(path)

    @classmethod
    def _from_files(cls, files: Mapping[str, bytes], origin: str) -> Bundle:
        modules: dict[str, str] = {}
        data: dict[str, Any] = {}
        manifest: dict[str, Any] = {}
        for name, content in files.items():
            base = PurePosixPath(name).name
            try:
                if name.endswith(".rego"):
                    modules[name] = content.decode()
                elif base == "data.json":
                    _merge_data(data, PurePosixPath(name).parent.parts, json.loads(content), name)
                elif name == ".manifest":
                    manifest = json.loads(content)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise PolicyLoadError(f"{origin}: {name} is not valid UTF-8/JSON: {exc}") from None
        return cls(
            modules=modules,
            data=data,
            wasm=_wasm_module(files, manifest, origin),
            revision=str(manifest.get("revision", "")),
            origin=origin,
        )

    def with_data(self, data: dict[str, Any]) -> Bundle:
        """The same policies over another data document (e.g. an operator's org settings)."""
        return replace(self, data=data)

    @cached_property
    def entrypoints(self) -> tuple[str, ...]:
        """Entrypoints declared in the Rego sources, sorted."""
        return tuple(sorted({ep for source in self.modules.values() for ep in annotated_entrypoints(source)}))

    @cached_property
    def digest(self) -> str:
        return self._digest(include_wasm=True)

    @cached_property
    def source_digest(self) -> str:
        return self._digest(include_wasm=False)

    @property
    def version(self) -> str:
        """A short label for logs and metrics: the manifest revision, else the digest's prefix."""
        return self.revision or self.digest[: len("sha256:") + 12]

    def _digest(self, include_wasm: bool) -> str:
        document = {
            "data": self.data,
            "modules": sorted(hashlib.sha256(source.encode()).hexdigest() for source in self.modules.values()),
            "wasm": hashlib.sha256(self.wasm).hexdigest() if include_wasm and self.wasm is not None else None,
        }
        return sha256_digest(canonical_json(document))


def _is_bundle_file(name: str) -> bool:
    return name.endswith(".rego") or PurePosixPath(name).name in {"data.json", "policy.wasm"} or name == ".manifest"


def _merge_data(into: dict[str, Any], path: tuple[str, ...], value: Any, name: str) -> None:
    """A `data.json` in directory a/b holds `data.a.b`, as in OPA bundles; objects merge, nothing
    else may be defined twice."""
    for part in path:
        child = into.setdefault(part, {})
        if not isinstance(child, dict):
            raise PolicyLoadError(f"{name}: data key {part!r} is defined twice")
        into = child
    if not isinstance(value, dict):
        raise PolicyLoadError(f"{name}: a data document must be a JSON object")
    for key, item in value.items():
        if key not in into:
            into[key] = item
        elif isinstance(into[key], dict) and isinstance(item, dict):
            _merge_data(into[key], (), item, name)
        else:
            raise PolicyLoadError(f"{name}: data key {key!r} is defined twice")


def _wasm_module(files: Mapping[str, bytes], manifest: Mapping[str, Any], origin: str) -> bytes | None:
    declared = [str(entry.get("module", "")).lstrip("/") for entry in manifest.get("wasm", []) or []]
    modules = sorted(set(declared)) or [name for name in files if PurePosixPath(name).name == "policy.wasm"]
    if not modules:
        return None
    if len(modules) > 1:
        raise PolicyLoadError(f"{origin}: bundles with several wasm modules are not supported: {modules}")
    if modules[0] not in files:
        raise PolicyLoadError(f"{origin}: the manifest names {modules[0]} but the bundle does not contain it")
    return files[modules[0]]


def default_bundle() -> Bundle:
    """The policies to enforce: the bundle named by $CP_POLICY_BUNDLE (a directory or an `opa build`
    tarball, used as it is) when set; else the shipped ones, as `policies_wasm/build/bundle.tar.gz`
    when `build.sh` compiled it from the current sources, or as the Rego sources (for regopy)."""
    configured = os.environ.get(POLICY_BUNDLE_ENV)
    if configured:
        return Bundle.load(configured)
    sources = Bundle.from_dir(SOURCES_DIR)
    if not COMPILED_BUNDLE.exists():
        return sources
    compiled = Bundle.from_tarball(COMPILED_BUNDLE)
    if compiled.wasm is None:
        log.warning("%s holds no policy.wasm; evaluating the Rego sources with regopy", COMPILED_BUNDLE)
        return sources
    if compiled.source_digest != sources.source_digest:
        log.warning(
            "%s was built from other sources than %s; rebuild it with policies_wasm/build.sh. "
            "Evaluating the Rego sources with regopy meanwhile",
            COMPILED_BUNDLE,
            SOURCES_DIR,
        )
        return sources
    return compiled


# --- The engine interface ----------------------------------------------------------------------------------------


class PolicyEngine(Protocol):
    name: str

    def load(self, bundle: Bundle) -> None:
        """Compile/instantiate the bundle; replaces any bundle loaded before. Raises PolicyLoadError."""

    def evaluate(self, entrypoint: str, input: Any) -> Decision:
        """Evaluate `entrypoint` (e.g. "controlplane/submit") for `input`. Raises a PolicyError."""


__all__ = [
    "Bundle",
    "Decision",
    "PolicyEngine",
    "PolicyError",
    "PolicyEvaluationError",
    "PolicyInputError",
    "PolicyLoadError",
    "PolicyTimeout",
    "PolicyUndefined",
    "UnknownEntrypoint",
    "annotated_entrypoints",
    "canonical_json",
    "default_bundle",
    "input_digest",
]
