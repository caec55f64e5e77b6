"""Postfix's log lines as tracking events (secumail/tracking.py): what Postfix did with each
message. Plain code, fed one line at a time by the supervisor, which reads the log anyway.

    NOQUEUE: reject: RCPT from h[ip]: 450 4.7.1 <r>: ... Greylisted ...; from=<s> to=<r> ...
                                                        -> greylisted / deferred / refused
    NOQUEUE: proxy-reject: END-OF-MESSAGE: 554 5.7.1 ...; from=<s> to=<r> ...  -> refused
    NOQUEUE: proxy-accept: END-OF-MESSAGE: 250 2.0.0 Ok: queued as Q; from=<s> to=<r> ...
                                                        -> accepted (the filters took it)
    Q: client=h[ip]   Q: message-id=<m>   (remembered for Q's later events)
    Q: from=<s>, size=N, nrcpt=1 (queue active)         -> accepted (queued), once per Q
    Q: to=<r>, relay=R, ..., status=sent (250 ... queued as Q2)   -> delivered, bounced,
        deferred or expired; "passed" when R is the content filter (after-queue mode)
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from secumail import tlsrpt, tracking

# "Nov 28 01:15:55 mx postfix/smtp[2283]: 1363D21A85E: to=<...>, ..., status=sent (...)"
# The process name may carry a service prefix (postfix/submission/smtpd): keep its last part.
LINE = re.compile(
    r"\s[\w.-]+(?:/[\w.-]+)*/(?P<daemon>[\w.-]+)\[(?P<pid>\d+)\]: (?P<text>.*)$")
# An smtpd process serves one connection at a time: its lines without a client address
# (proxy-accept, proxy-reject) are about the one it last logged "connect from".
_CONNECT = re.compile(r"^connect from [^\[]*\[(?P<ip>[^\]]+)\]")
_QUEUE_ID = r"(?P<qid>[0-9A-Za-z]{5,32})"
CLIENT = re.compile(rf"^{_QUEUE_ID}: client=[^\[]*\[(?P<ip>[^\]]+)\]")
_MESSAGE_ID = re.compile(rf"^{_QUEUE_ID}: message-id=(?P<mid>.*)$")
_QUEUED = re.compile(rf"^{_QUEUE_ID}: from=<(?P<sender>[^>]*)>, size=\d+, nrcpt=\d+")
STATUS = re.compile(
    rf"^{_QUEUE_ID}: to=<(?P<to>[^>]*)>,(?: orig_to=<[^>]*>,)? relay=(?P<relay>[^,]*), "
    r".*?status=(?P<status>\w+) \((?P<reply>.*)\)$")
# An SMTP refusal: "<stage> from host[ip]: CODE ...; from=<s> to=<r> proto=... helo=<h>"
REJECT = re.compile(
    rf"^(?:NOQUEUE|{_QUEUE_ID}): (?:milter-)?reject: \w+ from [^\[]*\[(?P<ip>[^\]]+)\]"
    r"(?::\d+)?: (?P<reply>[45]\d\d .*?); from=<(?P<sender>[^>]*)>(?: to=<(?P<to>[^>]*)>)?")
PROXY = re.compile(
    rf"^(?:NOQUEUE|{_QUEUE_ID}): proxy-(?P<kind>accept|reject): [\w-]+: (?P<reply>.*?); "
    r"from=<(?P<sender>[^>]*)>(?: to=<(?P<to>[^>]*)>)?")


def refusal_code(text: str) -> str | None:
    """The reply code of an smtpd refusal (reject, milter-reject, proxy-reject), or None:
    the Postfix exporter's count of refusals reads the lines the events are made from."""
    found = REJECT.match(text) or PROXY.match(text)
    if found is None or found.groupdict().get("kind") == "accept":
        return None
    return str(found["reply"][:3])


STATUS_OUTCOMES = {"sent": "delivered", "bounced": "bounced", "deferred": "deferred",
                   "expired": "expired"}
REMEMBERED = 10_000  # queue ids whose client and Message-ID are kept for their later lines


class PostfixEvents:
    """Turns log lines into events. `filter_relay` is the content filter's name as Postfix's
    smtp client logs it ("clamav["): a message handed to it has passed, not arrived."""

    def __init__(self, filter_host: str, clock: Callable[[], float] = time.time) -> None:
        self.filter_relay = f"{filter_host}["
        self.clock = clock
        self._known: OrderedDict[str, dict[str, str]] = OrderedDict()
        self._connected: dict[str, str] = {}  # smtpd pid -> its client's address

    def _about(self, queue_id: str) -> dict[str, str]:
        about = self._known.get(queue_id)
        if about is None:
            about = self._known[queue_id] = {}
            if len(self._known) > REMEMBERED:
                self._known.popitem(last=False)
        return about

    def feed(self, line: str) -> tracking.Event | None:
        found = LINE.search(line)
        if found is None:
            return None
        text = found.group("text")
        if connect := _CONNECT.match(text):
            self._connected[found["pid"]] = connect["ip"]
            if len(self._connected) > REMEMBERED:
                self._connected.pop(next(iter(self._connected)))
        elif client := CLIENT.match(text):
            self._about(client["qid"])["client"] = client["ip"]
        elif mid := _MESSAGE_ID.match(text):
            self._about(mid["qid"])["message_id"] = tracking.message_id_value(mid["mid"])
        elif queued := _QUEUED.match(text):
            about = self._about(queued["qid"])
            if about.get("queued"):
                return None  # back from the deferred queue: accepted once
            about["queued"], about["sender"] = "1", queued["sender"]
            return self._event("accepted", "queued", queued["qid"], sender=queued["sender"])
        elif status := STATUS.match(text):
            to_filter = status["relay"].startswith(self.filter_relay)
            outcome = STATUS_OUTCOMES.get(status["status"], "deferred")
            if to_filter and outcome == "delivered":
                outcome = "passed"
            reply = status["reply"]
            return self._event(outcome, f"relay={status['relay']}: {reply}", status["qid"],
                               recipients=(status["to"],),
                               next_queue_id=tracking.queued_as(reply) if to_filter else "")
        elif reject := REJECT.match(text):
            reply = reject["reply"]
            outcome = ("refused" if reply.startswith("5") else
                       "greylisted" if "greylist" in reply.lower() else "deferred")
            return self._event(outcome, reply, reject["qid"] or "", client=reject["ip"],
                               sender=reject["sender"],
                               recipients=(reject["to"],) if reject["to"] else ())
        elif proxy := PROXY.match(text):
            reply = proxy["reply"]
            accepted = proxy["kind"] == "accept" and reply.startswith("2")
            outcome = "accepted" if accepted else (
                "deferred" if reply.startswith("4") else "refused")
            return self._event(outcome, f"the filters said: {reply}", proxy["qid"] or "",
                               client=self._connected.get(found["pid"], ""),
                               sender=proxy["sender"],
                               recipients=(proxy["to"],) if proxy["to"] else (),
                               next_queue_id=tracking.queued_as(reply) if accepted else "")
        return None

    def _event(self, outcome: str, detail: str, queue_id: str, *, client: str = "",
               sender: str | None = None, recipients: tuple[str, ...] = (),
               next_queue_id: str = "") -> tracking.Event:
        about = self._known.get(queue_id, {}) if queue_id else {}
        return tracking.Event(
            "postfix", outcome, detail[:tracking.MAX_FIELD],
            client=client or about.get("client", ""),
            sender=sender if sender is not None else about.get("sender", ""),
            recipients=recipients, queue_id=queue_id, next_queue_id=next_queue_id,
            message_id=about.get("message_id", ""), time=self.clock())


# TLS sessions with other domains' MX hosts (secumail/tlsrpt.py), from the smtp client's log:
#   "Verified TLS connection established to mx.example.com[192.0.2.1]:25: TLSv1.3 ..."
#   "server certificate verification failed for mx...[192.0.2.1]:25: num=62:hostname mismatch"
#   then each recipient's status line ("status=deferred (Server certificate not verified)").
_TLS_UP = re.compile(
    r"^(?P<level>Verified|Trusted|Untrusted|Anonymous) TLS connection established to "
    r"(?P<host>[^\[\s]+)\[(?P<ip>[^\]]+)\]")
_CHAIN_ERROR = re.compile(r"^(?:server )?certificate verification failed for "
                          r"(?P<host>[^\[\s]+)\[(?P<ip>[^\]]+)\]\S*: (?P<error>.+)$")
_RELAY = re.compile(r"^(?P<mx>[^\[]+)\[(?P<ip>[^\]]+)\](?::\d+)?$")


@dataclass
class _Connection:
    """What one smtp process logged of its current session with one MX."""

    mx: str
    ip: str
    level: str = "none"
    chain_error: str = ""
    counted: str = ""  # the queue id whose status line counted it (others add none)
    counted_at: float = 0.0


PolicyOf = Callable[[str], tlsrpt.Policy]
# A delivery's status lines, one per recipient, come together; the same message's retry comes
# minutes later (minimal_backoff_time), perhaps from the same smtp process and in clear, which
# logs nothing else: a new session.
SAME_DELIVERY = 30.0


class TlsSessions:
    """Each session Postfix's smtp client had with another domain's MX, as tracking events
    (outcome "tls") the gateway counts for TLS reports. `policy_of` names the MTA-STS policy
    the resolver beside Postfix applied to a domain; mail to `own_domains` (a mailbox server
    behind SecuMail, SECUMAIL_DELIVERY_TRANSPORT) is not another domain's."""

    def __init__(self, filter_host: str, policy_of: PolicyOf, own_domains: Iterable[str] = (),
                 clock: Callable[[], float] = time.time) -> None:
        self.filter_relay = f"{filter_host}["
        self.policy_of = policy_of
        self.own_domains = frozenset(d.lower() for d in own_domains)
        self.clock = clock
        self._current: dict[str, _Connection] = {}  # smtp pid -> its latest session
        # smtp pid -> sessions that failed with an MX Postfix then moved past (told with
        # the recipient's status line, which names the domain)
        self._abandoned: dict[str, list[_Connection]] = {}

    def feed(self, line: str) -> list[tracking.Event]:
        if "smtp[" not in line:
            return []
        found = LINE.search(line)
        if found is None or found["daemon"] != "smtp":
            return []
        pid, text = found["pid"], found["text"]
        if up := _TLS_UP.match(text):
            # The handshake's certificate error, if any, came first, about the same host.
            current = self._current.get(pid)
            if current is None or current.counted or current.level != "none" or \
                    (current.mx, current.ip) != (up["host"], up["ip"]):
                current = self._open(pid, up["host"], up["ip"])
            current.level = up["level"].lower()
        elif chain := _CHAIN_ERROR.match(text):
            self._open(pid, chain["host"], chain["ip"]).chain_error = chain["error"][:200]
        elif status := STATUS.match(text):
            return self._status(pid, status)
        return []

    def _open(self, pid: str, mx: str, ip: str) -> _Connection:
        """A new session of process `pid`; the one before it, never told by a status line
        and failed, was with an MX Postfix moved past."""
        before = self._current.get(pid)
        if before is not None and not before.counted and before.chain_error:
            self._abandoned.setdefault(pid, []).append(before)
        connection = self._current[pid] = _Connection(mx, ip)
        if len(self._current) > REMEMBERED:
            self._current.pop(next(iter(self._current)))
            if len(self._abandoned) > REMEMBERED:
                self._abandoned.pop(next(iter(self._abandoned)))
        return connection

    def _status(self, pid: str, status: re.Match[str]) -> list[tracking.Event]:
        relay = _RELAY.match(status["relay"])
        if relay is None or status["relay"].startswith(self.filter_relay):
            self._current.pop(pid, None)  # relay=none: no MX answered; or a hop of ours
            self._abandoned.pop(pid, None)
            return []
        domain = status["to"].rpartition("@")[2].lower()
        if domain in self.own_domains:
            return []
        connection = self._current.get(pid)
        if connection is None or (connection.mx, connection.ip) != (relay["mx"], relay["ip"]):
            connection = self._open(pid, relay["mx"], relay["ip"])  # no TLS line: in clear
        elif connection.counted == status["qid"] and \
                self.clock() - connection.counted_at < SAME_DELIVERY:
            return []  # another recipient of the same message, same session
        elif connection.counted:
            connection = self._open(pid, relay["mx"], relay["ip"])  # another delivery
        connection.counted, connection.counted_at = status["qid"], self.clock()
        policy = self.policy_of(domain)
        sessions = [self._session(domain, policy, earlier, "", False)
                    for earlier in self._abandoned.pop(pid, [])]
        sessions.append(self._session(domain, policy, connection, status["reply"],
                                      status["status"] != "sent"))
        return [tracking.event("postfix", "tls", session.detail(), recipients=(status["to"],),
                               queue_id=status["qid"], at=self.clock())
                for session in sessions]

    @staticmethod
    def _session(domain: str, policy: tlsrpt.Policy, connection: _Connection, reply: str,
                 deferred: bool) -> tlsrpt.Session:
        failure, reason = tlsrpt.outcome(connection.level, connection.chain_error, reply,
                                         deferred, policy, connection.mx)
        if policy.type == "no-policy-found" and (
                connection.level == "verified" or failure == tlsrpt.TLSA_INVALID
                or (deferred and failure == tlsrpt.STARTTLS_NOT_SUPPORTED)):
            # Without an MTA-STS policy, only DANE makes Postfix verify or demand TLS.
            policy = tlsrpt.Policy("tlsa")
        return tlsrpt.Session(domain, connection.mx, connection.ip, connection.level, failure,
                              reason, policy)
