"""SPF checks from kept answers: a sender domain checked again needs neither DNS nor a
thread, and a check that would need an answer not kept is run in full, not believed."""

from __future__ import annotations

import time
from typing import Any

import dns.resolver

from secumail.spf import SpfChecker


class Txt:
    def __init__(self, text: str) -> None:
        self.strings = (text.encode(),)


class Answer(list[Txt]):
    """As dnspython's answers: the records, and when they stop being valid."""

    def __init__(self, texts: list[str], ttl: float) -> None:
        super().__init__(Txt(t) for t in texts)
        self.expiration = time.time() + ttl


class CountingResolver:
    def __init__(self, records: dict[str, tuple[str, float]]) -> None:
        self.records = records  # name -> (TXT, TTL)
        self.asked: list[tuple[str, str]] = []

    def resolve(self, name: str, qtype: str, **_: Any) -> Answer:
        self.asked.append((str(name), qtype))
        if qtype != "TXT" or name not in self.records:
            raise dns.resolver.NXDOMAIN()
        text, ttl = self.records[name]
        return Answer([text], ttl)


async def test_a_domain_checked_again_is_answered_from_kept_answers_without_a_thread() -> None:
    resolver = CountingResolver({"ok.test": ("v=spf1 ip4:192.0.2.0/24 -all", 300)})
    checker = SpfChecker(resolver, "mx.test", 5.0)  # type: ignore[arg-type]
    first = await checker.check("192.0.2.1", "a@ok.test", "mail.ok.test")
    checker.close()  # no thread from here on: a check that needed one would fail
    second = await checker.check("198.51.100.7", "b@ok.test", "mail.ok.test")
    assert (first.result, second.result) == ("pass", "fail")
    assert resolver.asked == [("ok.test", "TXT")]
    assert "198.51.100.7" in second.header


async def test_an_answer_not_kept_makes_the_check_run_in_full() -> None:
    # The record is kept, its explanation (exp=) is not (TTL 0). pyspf swallows errors of
    # the explanation's lookup: believed, the kept-only check would give no explanation.
    resolver = CountingResolver({
        "strict.test": ("v=spf1 -all exp=why.strict.test", 300),
        "why.strict.test": ("%{i} may not send for %{d}", 0),
    })
    checker = SpfChecker(resolver, "mx.test", 5.0)  # type: ignore[arg-type]
    try:
        for client in ("192.0.2.1", "192.0.2.2"):
            outcome = await checker.check(client, "a@strict.test", "mail.strict.test")
            assert outcome.result == "fail"
            assert outcome.explanation == f"{client} may not send for strict.test"
        assert resolver.asked.count(("strict.test", "TXT")) == 1
        assert resolver.asked.count(("why.strict.test", "TXT")) == 2
    finally:
        checker.close()
