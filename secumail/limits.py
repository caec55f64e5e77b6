"""Every connection-level limit of SecuMail's servers and clients, in one place: read sizes,
line and reply caps, kept connections and their idle times. Timeouts that an admin may need
to change are settings instead (secumail/settings.py, each listed in .env.example):
SECUMAIL_REQUEST_TIMEOUT (a peer's request whole), SECUMAIL_RELAY_TIMEOUT (an SMTP next
hop's reply), SECUMAIL_SCANNER_TIMEOUT (clamd's and spamd's answer),
SECUMAIL_DKIM_ANSWER_TIMEOUT (the milter's decision), SECUMAIL_{POLICY,DKIM,FILTER}_IDLE_TIMEOUT
(a silent connection), SECUMAIL_DNS_TIMEOUT, SECUMAIL_GATEWAY_REQUEST_TIMEOUT.

Limits of what a message or a report may hold (MIME parts, archive depth, report sizes) stay
beside the code that reads them: they are part of what it decides.
"""

# --- reading and writing ----------------------------------------------------------------

# One socket read: a policy request or an SMTP reply is far smaller, a message's DATA comes
# in as many reads as it takes.
READ_SIZE = 65536
# One read of milter packets: a body chunk is up to 64 KiB (Postfix's milter_body_chunk),
# so a few of them in one read.
MILTER_READ_SIZE = 262144
# asyncio's StreamReader buffer for the listeners (secumail/connections.py): a request line
# longer than this is refused by the reader.
LINE_LIMIT = 65536
# Bytes written and not yet sent before a writer waits for its peer to read them.
WRITE_BUFFER_HIGH = 65536
# aiosmtpd refuses SMTP lines over 1001 bytes only once they end: a line that never ends
# would hold the connection until the idle timeout. Past this many bytes without one, the
# filter hangs up.
UNENDING_LINE = 65536

# --- replies we read ----------------------------------------------------------------------

SMTP_REPLY_LINES = 100  # lines of one multi-line SMTP reply
SMTP_REPLY_LINE = 4096  # bytes of one SMTP reply line
SPAMD_REPLY = 64 * 1024  # spamd's answer to one CHECK or TELL (headers only)
HTTP_REQUEST_HEAD = 8192  # a metrics listener's request line and headers
HTTP_CONNECTIONS = 64  # connections a metrics listener serves at once

# --- clamd ------------------------------------------------------------------------------

CLAMD_CHUNK = 64 * 1024  # INSTREAM chunk (clamd's StreamMaxLength caps the sum)
CLAMD_ONE_WRITE = 256 * 1024  # messages up to this size go to clamd in one write
# clamd ends a session idle for IdleTimeout (30 s by default); keep ours well under that.
CLAMD_SESSION_IDLE = 10.0
CLAMD_SESSIONS_KEPT = 32

# --- a filter's next-hop connections --------------------------------------------------------

# Kept across Postfix's sessions (Postfix opens one per message): it spares a connection, a
# banner and an EHLO per message on both ends. Like Postfix's own connection cache: an idle
# connection is kept for a short while, and none is reused after a while, so that new
# replicas of a scaled next hop get their share.
NEXT_HOP_IDLE = 2.0
NEXT_HOP_REUSE_LIMIT = 60.0
NEXT_HOP_KEPT = 64
