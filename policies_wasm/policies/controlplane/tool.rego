# May an agent call this tool or model now, and does the call need a human's approval first?
package controlplane

import rego.v1

# METADATA
# title: Tool decision
# description: Decides one tool call or model call at run time. {allow, require_approval, reasons}; see README.md.
# entrypoint: true
tool := {"allow": tool_allowed, "require_approval": tool_needs_approval, "reasons": tool_reasons}

tool_denials := (input_errors | cost_denials) | tool_checks

tool_approvals := cost_approvals | tool_approval_checks

default tool_allowed := false

tool_allowed if count(tool_denials) == 0

default tool_needs_approval := false

tool_needs_approval if {
	tool_allowed
	count(tool_approvals) > 0
}

tool_reasons := sort(tool_denials) if not tool_allowed

tool_reasons := sort(tool_approvals) if tool_allowed

tool_checks contains "input must name a tool or a model" if {
	not input.tool
	not input.model
}

tool_checks contains sprintf("tool %s is not allowed here", [input.tool]) if {
	is_string(input.tool)
	not permitted(input.tool, settings.allowed_tools, settings.denied_tools)
}

tool_checks contains sprintf("model %s is not allowed here", [input.model]) if {
	is_string(input.model)
	not permitted(input.model, settings.allowed_models, settings.denied_models)
}

# A call is denied when the tokens it asks for would take the day's total past the limit.
tool_checks contains sprintf("tokens used today: %v + %v requested exceeds the limit of %v", [used, tokens_requested, limit]) if {
	limit := settings.max_tokens_per_day
	limit != null
	used := input.usage.tokens_today
	is_number(used)
	is_number(tokens_requested)
	used + tokens_requested > limit
}

tool_checks contains "max_tokens_per_day is set but input.usage.tokens_today is missing" if {
	settings.max_tokens_per_day != null
	not is_number(input.usage.tokens_today)
}

tool_approval_checks contains sprintf("tool %s requires approval", [input.tool]) if {
	is_string(input.tool)
	matches_any(input.tool, settings.approval_tools)
}
