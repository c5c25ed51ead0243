#!/bin/sh
# Compiles the shipped Rego policies to an OPA wasm bundle: policies_wasm/build/bundle.tar.gz
# (policy.wasm, data.json, the .rego sources, .manifest). policies_wasm.default_bundle() uses it
# when it was built from the current sources; otherwise regopy evaluates the sources directly.
#
# Needs the opa CLI, v1.x (OPA=/path/to/opa to pick one). Without it:
#   docker run --rm -v "$PWD/policies_wasm:/policies_wasm" openpolicyagent/opa:1.0.0 \
#     build --bundle --target wasm --entrypoint controlplane/submit --entrypoint controlplane/tool \
#     --entrypoint controlplane/settings --entrypoint controlplane/submit_usage --output /policies_wasm/build/bundle.tar.gz /policies_wasm/policies
set -eu

here=$(cd "$(dirname "$0")" && pwd)
opa=${OPA:-opa}

if ! command -v "$opa" >/dev/null 2>&1; then
    echo "build.sh: no opa CLI on PATH (set OPA=/path/to/opa, or use the docker command at the top of this file)" >&2
    exit 1
fi

mkdir -p "$here/build"
"$opa" build --bundle --target wasm \
    --entrypoint controlplane/submit \
    --entrypoint controlplane/tool \
    --entrypoint controlplane/settings \
    --entrypoint controlplane/submit_usage \
    --output "$here/build/bundle.tar.gz" \
    "$here/policies"
echo "wrote $here/build/bundle.tar.gz"
