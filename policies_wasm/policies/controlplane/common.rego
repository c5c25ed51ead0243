# Pieces shared by the decisions: input checks, name matching, quotas, costs.
#
# Written for rego-cpp's evaluator as much as for readers (see docs/adr/0005-policies.md): it
# spends ~4 µs per expression, ~7 µs per rule and ~13 µs per `contains` body, and `else` is far
# dearer. So: no `else`; detail that is rarely needed (itemised input errors, quota checks when no
# quota is set) sits behind one cheap test; sets are joined with `|` rather than forwarded body by
# body.
package controlplane

import rego.v1

# "*" matches every name, "github.*" every name starting with "github.", anything else itself.
matches_any(name, patterns) if name in patterns

matches_any(_, patterns) if "*" in patterns

matches_any(name, patterns) if {
	some pattern in patterns
	endswith(pattern, "*")
	startswith(name, trim_suffix(pattern, "*"))
}

# Allowed when some allow pattern matches and no deny pattern does.
permitted(name, allowed, denied) if {
	matches_any(name, allowed)
	not matches_any(name, denied)
}

# --- Input checks ---------------------------------------------------------------------------------
# A malformed input is denied with the reasons, never half-evaluated: OPA and rego-cpp even order
# values of different types differently.

default input_errors := set()

# Fails closed: should a malformation slip past every itemised check, the input is still denied.
input_errors := input_problems | {"input is malformed" | count(input_problems) == 0} if not well_typed

well_typed if {
	is_string(input.org)
	input.org != ""
	is_string(object.get(input, "queue", ""))
	is_string(object.get(input, "environment", ""))
	is_string(object.get(input, "workflow", ""))
	is_string(object.get(input, "task_type", ""))
	is_string(object.get(input, "tool", ""))
	is_string(object.get(input, "model", ""))
	every name in array.concat(object.get(input, "tools", []), object.get(input, "models", [])) {
		is_string(name)
	}
	is_number(estimated_cost)
	estimated_cost >= 0
	is_number(payload_bytes)
	payload_bytes >= 0
	is_number(tokens_requested)
	tokens_requested >= 0
	every number in object.get(input, "usage", {}) {
		is_number(number)
		number >= 0
	}
}

input_types := {
	"org": "string",
	"queue": "string",
	"environment": "string",
	"workflow": "string",
	"task_type": "string",
	"tool": "string",
	"model": "string",
	"tools": "array",
	"models": "array",
	"estimated_cost_usd": "number",
	"payload_bytes": "number",
	"tokens_requested": "number",
	"usage": "object",
}

input_problems contains "input.org must be a non-empty string" if not input.org

input_problems contains "input.org must be a non-empty string" if input.org == ""

input_problems contains sprintf("input.%s must be of type %s", [key, expected]) if {
	some key, value in input
	expected := input_types[key]
	type_name(value) != expected
}

input_problems contains sprintf("input.%s must not be negative", [key]) if {
	some key, value in input
	input_types[key] == "number"
	is_number(value)
	value < 0
}

input_problems contains sprintf("input.%s must list strings", [key]) if {
	some key in ["tools", "models"]
	is_array(input[key])
	some item in input[key]
	not is_string(item)
}

input_problems contains sprintf("input.usage.%s must be a number >= 0", [key]) if {
	some key, value in input.usage
	not non_negative(value)
}

non_negative(value) if {
	is_number(value)
	value >= 0
}

# The numbers a decision compares, 0 when absent (a present non-number is an input error).
estimated_cost := object.get(input, "estimated_cost_usd", 0)

payload_bytes := object.get(input, "payload_bytes", 0)

tokens_requested := object.get(input, "tokens_requested", 0)

# --- Quotas ----------------------------------------------------------------------------------------
# A quota compares a count the caller passes in input.usage (from the read models) with a limit.
# When a limit is set, a missing count denies rather than letting a caller that forgot it through.
# Only the counts of set limits are read: controlplane/submit_usage (submit.rego) names them from this
# same list and `settings`, and the gateway passes only those (and reads the day's spend only then).

quotas := [
	{"limit": "max_tasks_in_flight_per_org", "usage": "org_in_flight", "label": "tasks in flight for the org"},
	{"limit": "max_tasks_in_flight_per_queue", "usage": "queue_in_flight", "label": "tasks in flight on the queue"},
	{"limit": "max_tokens_per_day", "usage": "tokens_today", "label": "tokens used today"},
	{"limit": "max_cost_usd_per_day", "usage": "cost_today_usd", "label": "USD spent today"},
]

default quota_denials := set()

quota_denials := quota_problems if {
	some quota in quotas
	settings[quota.limit] != null
}

# Spend is recorded in fractions of a cent, which engines print differently: its reason quotes the limit only.
quota_problems contains sprintf("%s: %v in use, limit %v", [quota.label, used, limit]) if {
	some quota in quotas
	quota.usage != "cost_today_usd"
	limit := settings[quota.limit]
	limit != null
	used := input.usage[quota.usage]
	is_number(used)
	used >= limit
}

quota_problems contains sprintf("USD spent today (recorded LLM calls) reached the limit of %v", [limit]) if {
	limit := settings.max_cost_usd_per_day
	limit != null
	used := input.usage.cost_today_usd
	is_number(used)
	used >= limit
}

quota_problems contains sprintf("%s is set but input.usage.%s is missing", [quota.limit, quota.usage]) if {
	some quota in quotas
	settings[quota.limit] != null
	not is_number(input.usage[quota.usage])
}

# --- Costs -----------------------------------------------------------------------------------------
# The input's cost is not quoted in reasons: engines print arbitrary floats differently (rego-cpp
# 1.5 prints 9.45 as 9.449999999999999), and decisions must read the same on every engine.

cost_denials contains sprintf("estimated cost exceeds the limit of %v USD", [settings.max_cost_usd]) if {
	settings.max_cost_usd != null
	is_number(estimated_cost)
	estimated_cost > settings.max_cost_usd
}

cost_approvals contains sprintf("estimated cost is above the approval threshold of %v USD", [settings.approval_cost_usd]) if {
	settings.approval_cost_usd != null
	is_number(estimated_cost)
	estimated_cost > settings.approval_cost_usd
}
