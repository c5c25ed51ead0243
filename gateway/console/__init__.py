"""The operator console: server-rendered pages at ``/console`` for the people in human-in-the-loop work.
Every action goes through the same operations as the HTTP API; live updates follow the SSE feeds."""
