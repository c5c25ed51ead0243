# May this task be submitted, and does it need a human's approval first?
package controlplane

import rego.v1

# METADATA
# title: Submit decision
# description: Decides a task submission. {allow, require_approval, reasons}; see README.md.
# entrypoint: true
submit := {"allow": submit_allowed, "require_approval": submit_needs_approval, "reasons": submit_reasons}

# METADATA
# title: Usage the submit decision reads
# description: The input.usage facts controlplane/submit reads for this input's scope, sorted; see README.md.
# entrypoint: true
submit_usage := sort([quota.usage | some quota in quotas; settings[quota.limit] != null])

submit_denials := ((input_errors | quota_denials) | cost_denials) | submit_checks

submit_approvals := cost_approvals | submit_approval_checks

default submit_allowed := false

submit_allowed if count(submit_denials) == 0

default submit_needs_approval := false

submit_needs_approval if {
	submit_allowed
	count(submit_approvals) > 0
}

# Denied: the reasons are the denials. Allowed: the reasons are why approval is needed, if it is.
submit_reasons := sort(submit_denials) if not submit_allowed

submit_reasons := sort(submit_approvals) if submit_allowed

submit_checks contains sprintf("tool %s is not allowed here", [name]) if {
	some name in declared_tools
	is_string(name)
	not permitted(name, settings.allowed_tools, settings.denied_tools)
}

submit_checks contains sprintf("model %s is not allowed here", [name]) if {
	some name in declared_models
	is_string(name)
	not permitted(name, settings.allowed_models, settings.denied_models)
}

submit_checks contains sprintf("payload of %v bytes exceeds the limit of %v bytes", [payload_bytes, settings.max_payload_bytes]) if {
	settings.max_payload_bytes != null
	is_number(payload_bytes)
	payload_bytes > settings.max_payload_bytes
}

submit_approval_checks contains sprintf("environment %s requires approval", [input.environment]) if {
	is_string(input.environment)
	input.environment in settings.approval_environments
}

submit_approval_checks contains sprintf("task type %s requires approval", [input.task_type]) if {
	is_string(input.task_type)
	input.task_type in settings.approval_task_types
}

submit_approval_checks contains sprintf("tool %s requires approval", [name]) if {
	some name in declared_tools
	is_string(name)
	matches_any(name, settings.approval_tools)
}

# The tools and models a submission says it will use; none when it does not say.
default declared_tools := []

declared_tools := input.tools if is_array(input.tools)

default declared_models := []

declared_models := input.models if is_array(input.models)
