"""The application layer: the operations every entry point calls (the HTTP routes, the console, the
scheduler, tests), each taking what it needs as explicit arguments (the command handler, the submit
gate, the claim index, the read model, who acts, the command id) and raising typed errors that the
gateway maps to HTTP in one place. Nothing here knows about HTTP."""
