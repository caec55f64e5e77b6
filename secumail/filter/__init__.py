"""The content filters' wing (ports 10025 clamav, 10026 spamd): what a message crosses, in
the order it does.

- aiosmtpd_adapter.py: aiosmtpd reads the client's SMTP; the commands it lacks (chunked
  DATA, XFORWARD, MAIL and RCPT with DSN's parameters) and every use of its insides.
- session.py: a client's session, one envelope per transaction, relayed in lockstep to the
  next hop; what all sessions of a filter share (kept next-hop connections, lost-acks).
- verdicts.py: what is decided about a message, as plain functions.
- service.py: the listener and its drain; `filter_service()` makes a filter from settings.
- metrics.py: the filters' Prometheus metrics.

A filter's own checks (clamd and the attachment rules, spamd) are its `inspect` function,
in services/clamav/main.py and services/spamd/main.py.
"""
