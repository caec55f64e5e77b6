"""DMARC report store benchmark (issue 33's target: a day of 100,000 DMARC checks in the
record store under 50 MiB, aggregated into reports in under 30 s). Not a test: it asserts
nothing.

Two milter replicas count --checks checks of one day (from --sources source addresses over
--domains policy domains, a mix of passes, fails and overrides) the way the milter does
(`Tally`), flushing into the store every --flush checks as the milter does once a minute;
then every domain's report is made (`report_xml`) and its mail built, as the gateway does
after midnight. It prints the time each step took, the store's size on disk, and the time
the milter's counting costs per check (work added to every message).

    .venv/bin/python bench/dmarc_bench.py [--checks 100000] [--sources 2000] [--domains 300]
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path

from secumail.dmarc_reports import (
    Check,
    Published,
    ReportStore,
    Tally,
    day_of,
    day_start,
    report_id,
    report_mail,
    report_xml,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checks", type=int, default=100_000)
    parser.add_argument("--sources", type=int, default=2000)
    parser.add_argument("--domains", type=int, default=300)
    parser.add_argument("--flush", type=int, default=5000, help="checks between two flushes")
    args = parser.parse_args()
    rng = random.Random(7)
    day = day_of(time.time() - 86400)
    moment = day_start(day) + 3600
    policies = [Published(f"domain{n}.test", "r", "r", rng.choice(("none", "reject")), "none",
                          100, (f"mailto:dmarc@domain{n}.test",)) for n in range(args.domains)]
    sources = [f"198.51.{n // 250}.{n % 250}" for n in range(args.sources)]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "reports.sqlite"
        store = ReportStore(str(path))
        replicas = [Tally(), Tally()]
        counting = storing = 0.0
        for n in range(args.checks):
            policy = rng.choice(policies)
            dkim_ok = rng.random() < 0.8
            check = Check(
                source_ip=rng.choice(sources), header_from=policy.domain,
                disposition="none" if dkim_ok or policy.p == "none" else "reject",
                dkim_aligned=dkim_ok, spf_aligned=rng.random() < 0.6,
                spf=(policy.domain, "mfrom", rng.choice(("pass", "fail", "softfail"))),
                dkim=((policy.domain, "s1", "pass" if dkim_ok else "fail"),),
                override="local_policy" if rng.random() < 0.01 else "")
            started = time.perf_counter()
            replicas[n % 2].add(moment + n % 80000, policy, check)
            counting += time.perf_counter() - started
            if (n + 1) % args.flush == 0:
                started = time.perf_counter()
                for tally in replicas:
                    store.add(*tally.take())
                storing += time.perf_counter() - started
        for tally in replicas:
            store.add(*tally.take())
        size = sum(os.path.getsize(p) for p in Path(folder).iterdir())
        started = time.perf_counter()
        reports = mailed = 0
        for report_day, domain in store.pending(day_of(time.time())):
            published = store.published(report_day, domain)
            assert published is not None
            rows = store.rows(report_day, domain)
            ident = report_id(report_day, domain)
            xml = report_xml("mx.bench.test", "dmarc@bench.test", ident, report_day, published,
                             rows)
            mailed += len(report_mail("mx.bench.test", "dmarc@bench.test", published.rua[0][7:],
                                      ident, report_day, domain, xml, time.time(),
                                      "mx.bench.test"))
            reports += 1
        aggregating = time.perf_counter() - started
        rows_stored = store.db.execute("SELECT count(*) FROM checks").fetchone()[0]
        store.close()
    print(f"{args.checks} checks, {args.sources} sources, {args.domains} domains, two replicas")
    print(f"  counting in the milter: {counting / args.checks * 1e6:.2f} us a check")
    print(f"  storing (flushes every {args.flush} checks): {storing:.2f} s in all")
    print(f"  store on disk: {size / 1024**2:.1f} MiB, {rows_stored} rows (target < 50 MiB)")
    print(f"  {reports} reports made and mailed ({mailed / 1024:.0f} KiB of mail): "
          f"{aggregating:.2f} s (target < 30 s)")


if __name__ == "__main__":
    main()
