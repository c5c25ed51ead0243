"""Integrations on the log: a durable, at-least-once subscription to one org's events with a
dead-letter subject (``consumer``), NATS accounts that confine an integration to its org
(``permissions``), a signed-webhook forwarder (``webhook``) and the event catalog (``catalog``)."""
