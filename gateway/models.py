"""The gateway API's request and response bodies (they make the OpenAPI document)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from gateway.spamassassin import BayesState, RulesState
from secumail.protocols.spamc import Kind


class Problem(BaseModel):
    """An error: what went wrong, in a sentence."""

    detail: str


class Alive(BaseModel):
    status: Literal["alive"] = "alive"


class FailingHop(BaseModel):
    service: str
    error: str


class Readiness(BaseModel):
    status: Literal["ready", "not ready"]
    failing: list[FailingHop] = Field(description="The hops that are not ready, and why")


class ReplicaHealth(BaseModel):
    instance: str = Field(description="Address probed: ip:port, or a unix socket path")
    name: str | None = Field(description="Container name from reverse DNS, when known")
    status: Literal["ok", "failing", "unknown"]
    latency_seconds: float | None = Field(description="How long the last probe took")
    answer: str | None = Field(description="What the replica answered the last probe")
    last_error: str | None = Field(description="The last failure (kept after recovery)")
    last_error_at: float | None = Field(description="Unix time of the last failure")
    last_ok_at: float | None = Field(description="Unix time of the last success")


class ServiceHealth(BaseModel):
    service: str
    address: str
    check: str = Field(description="What the probe does: SMTP banner, EHLO, PING...")
    status: Literal["ok", "failing"]
    error: str | None = Field(description="Why the whole service fails (e.g. unresolvable)")
    replicas: list[ReplicaHealth]


class ProbeReport(BaseModel):
    ok: bool
    token: str = Field(description="The canary's X-SecuMail-Probe header value")
    recipient: str
    started_at: float
    finished_at: float
    queued: str = Field(description="Postfix's answer to the canary's end of DATA")
    delivered_at: float | None
    end_to_end_seconds: float | None = Field(
        description="From the start of the SMTP session to the delivery into the mailbox"
    )
    headers: dict[str, bool] = Field(description="Hop -> whether its header was added")
    missing: list[str]
    error: str | None


class HealthReport(BaseModel):
    status: Literal["ok", "failing"]
    checked_at: float
    services: list[ServiceHealth]
    probe: ProbeReport | None = Field(description="The last chain probe, if any ran yet")
    bayes: BayesState | None = Field(None, description="SpamAssassin's Bayes: what it "
                                     "learned (none until the spamassassin container wrote it)")
    spamassassin_rules: RulesState | None = Field(
        None, description="SpamAssassin's rules: which spamd loads, whether sa-update keeps "
        "them current, and why not (none until the spamassassin container wrote it)")
    dkim_awaiting_record: list[DkimKey] = Field(
        [], description="DKIM keys a rotation made, which sign once their record is in DNS: "
        "publish TXT record_value at record_name")


# --- greylist ---------------------------------------------------------------------------


class GreylistEntry(BaseModel):
    key: str = Field(description="network/sender/recipient, as the policy service keys it")
    network: str
    sender: str
    recipient: str
    first_seen: float
    last_seen: float
    passed: bool = Field(description="The triplet got through (no more delay)")
    state: Literal["passed", "waiting", "may retry", "retry window closed"] = Field(
        description="What its next attempt meets: passed (through, no more delay), waiting "
        "(deferred: too early), may retry (the next attempt passes), retry window closed "
        "(never retried in time: greylisted anew)")


class HeldSender(BaseModel):
    subject: str = Field(description="scope:value, e.g. sender:alice@example.org")
    scope: Literal["sender", "client", "user"]
    value: str
    since: float
    reason: str = Field(description="The limit whose tries it passed, and how far")
    notified: bool = Field(description="The admin was mailed about it")


class WhitelistRequest(BaseModel):
    kind: Literal["client", "recipient"]
    value: str = Field(
        min_length=1, max_length=320,
        description="client: IP, network, host or domain name; "
        "recipient: user@domain, local@ (any domain) or domain",
        examples=["192.0.2.0/24"],
    )


class DnsRecord(BaseModel):
    name: str
    type: str
    value: str
    why: str


class MtaStsReport(BaseModel):
    mode: str = Field(description="SECUMAIL_MTA_STS_MODE (empty: no policy served)")
    policy: str = Field(description="The policy file as served")
    records: list[DnsRecord] = Field(description="What to publish, for each of our domains")


class WhitelistItem(BaseModel):
    kind: Literal["client", "recipient"]
    value: str
    added: float | None = Field(description="When it was added (None: from the settings)")
    source: Literal["admin", "settings"]


class Whitelist(BaseModel):
    entries: list[WhitelistItem]


# --- quarantine -------------------------------------------------------------------------


class QuarantineItem(BaseModel):
    id: str
    filter: str
    verdict: str
    reason: str
    mail_from: str
    rcpt_tos: list[str]
    client: dict[str, str]
    size: int
    time: float
    subject: str = Field("", description="The message's Subject: RFC 2047 encoded words "
                         "decoded, folded lines joined, controls removed, one line cut to "
                         "120 characters (\"\" without one). Plain text: escape it to show it")


class QuarantinePreview(BaseModel):
    text: str = Field(description="The body's first text as plain text, at most 4,096 "
                      "characters: never render it as HTML")
    source: str = Field(description="What it was made from: text/plain (the first such part "
                        "that is no attachment), text/html (tags, scripts and styles "
                        "removed), or \"\" when the message has no text to show")
    truncated: bool = Field(description="The text goes on past the preview")
    note: str = Field("", description="Why there is no preview, or why it may not be the "
                      "first text (too many parts, only the first 1 MiB read)")


class QuarantineDetail(QuarantineItem):
    headers: list[tuple[str, str]] = Field(description="The message's header fields")
    preview: QuarantinePreview


class ReleaseReport(BaseModel):
    id: str
    released: bool
    next_hop: str = Field(description="Where the message went: the quarantining filter's "
                          "next hop")
    reply: str = Field(description="The next hop's answer to the end of DATA")
    learned: str = Field("", description="What teaching SpamAssassin's Bayes it was ham "
                         "gave: learned as ham, known as ham already, or not learned: why")


class LearnReport(BaseModel):
    kind: Kind
    learned: str = Field(description="learned as KIND, known as KIND already, or not "
                         "learned: why")


class DigestReport(BaseModel):
    sent: list[str] = Field(description="recipients whose digest Postfix accepted")
    failed: dict[str, str] = Field(description="recipient: why theirs was not sent (it is "
                                   "tried again, with what they missed, next round)")


class DmarcReportRound(BaseModel):
    sent: list[str] = Field(description="DAY DOMAIN to ADDRESS: reports Postfix accepted")
    failed: dict[str, str] = Field(description="the same: why not (tried again next round)")
    skipped: dict[str, str] = Field(description="the same: why never (an address outside "
                                    "the domain that did not agree to receive it, a size limit)")


class ReportedSender(BaseModel):
    domain: str = Field(description="our domain, as the report's policy domain")
    source_ip: str
    reporter: str = Field(description="who sent the report (its org_name)")
    messages: int
    dkim_pass: int = Field(description="messages with an aligned DKIM pass, as the reporter "
                           "evaluated them")
    spf_pass: int
    dispositions: dict[str, int] = Field(description="what the reporter did: none, "
                                         "quarantine, reject")


class ReportedTls(BaseModel):
    policy_domain: str
    policy_type: str = Field(description="sts, tlsa or no-policy-found")
    reporter: str
    successes: int
    failures: int


class ReceivedReports(BaseModel):
    since: float
    senders: list[ReportedSender]
    tls: list[ReportedTls]


class ReleaseFailure(BaseModel):
    detail: str
    step: str = Field(description="The SMTP step the next hop refused (or 'connection')")
    reply: str


# --- DKIM -------------------------------------------------------------------------------


class DkimKey(BaseModel):
    domain: str
    selector: str
    key_type: str
    active: bool = Field(description="Whether the milter signs with it")
    record_name: str = Field(description="Where to publish the TXT record")
    record_value: str
    error: str | None = Field(description="Why the key cannot be used, if so")
    role: Literal["signing", "awaiting-record", "retired", "inactive"] | None = Field(
        None, description="signing; awaiting-record: a rotated successor that signs once its "
        "record is published; retired: replaced, its record still wanted until "
        "removable_after; inactive")
    removable_after: float | None = Field(
        None, description="Retired keys: from when their DNS record can be removed")


class KeygenRequest(BaseModel):
    domain: str = Field(min_length=1, max_length=253, examples=["example.org"])
    selector: str | None = Field(
        None, description="Default: s<YYYYMMDD> (+ 'e' for ed25519)", max_length=63
    )
    key_type: Literal["rsa", "ed25519"] = "rsa"
    bits: int = Field(2048, ge=1024, le=4096, description="RSA key size")
    activate: bool | None = Field(
        None, description="Sign with it at once; default: only if no key of its type is active"
    )


class KeygenReport(BaseModel):
    domain: str
    selector: str
    key_type: str
    activated: bool
    record_name: str
    record_value: str
    zone_line: str


class DkimActivation(BaseModel):
    domain: str
    active: list[str] = Field(description="The selectors that sign now")
