# Effective settings for the scope an input names. Levels, least to most specific: the shipped
# defaults, then the org's own settings, its environment, its queue and its workflow. A level
# overrides exactly the keys it sets (null included: null lifts a limit); everything else is
# inherited. Setting values are scalars or lists, never objects: object.union merges nested
# objects in OPA but replaces them in rego-cpp, and the two engines must agree.
# See policies_wasm/README.md.
package controlplane

import rego.v1

# METADATA
# title: Effective settings
# description: The settings that apply to input.org/environment/queue/workflow, after inheritance.
# entrypoint: true
settings := object.union(
	object.union(object.union(object.union(data.policy_config.defaults, org_level), environment_level), queue_level),
	workflow_level,
)

org_config := object.get(data.policy_config.orgs, object.get(input, "org", ""), {})

org_level := object.get(org_config, "settings", {})

environment_level := object.get(object.get(org_config, "environments", {}), object.get(input, "environment", ""), {})

queue_level := object.get(object.get(org_config, "queues", {}), object.get(input, "queue", ""), {})

workflow_level := object.get(object.get(org_config, "workflows", {}), object.get(input, "workflow", ""), {})
