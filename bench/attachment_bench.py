"""The attachment check's cost per message (`services/clamav/attachments.check`, run in the
ClamAV filter on every message), this tree's code beside another revision's, same run.

    .venv/bin/python bench/attachment_bench.py --against 1c23510

Each message kind is checked many times in a child process per code base, rounds
alternated; the best and median microseconds a message are printed with their ratio. Then
the peak memory (VmHWM) of one process checking four archive bombs one after the other
(the filter runs up to six checks at once).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys, time
from services.clamav.attachments import AttachmentPolicy, check
from testkit import mail
policy = AttachmentPolicy.from_lists([], [], 3, 100 * 2**20, 1000)
docs = mail.zipped([(f"doc{n}.txt", b"Quarterly figures, line after line.\n" * 3000)
                    for n in range(10)])
messages = {
    "plain 2 KB": mail.plain(body="Hi Bob, lunch tomorrow? " * 80 + "\n"),
    "text + 34 KB pdf": mail.attaching([("report.pdf", b"%PDF-1.4\n" + bytes(range(256)) * 130)]),
    "text + zip of 1 MB": mail.attaching([("docs.zip", docs)]),
}
times = {}
for name, message in messages.items():
    count = max(20, int(2000 * 2300 / len(message)))
    check(message, policy)
    start = time.perf_counter()
    for _ in range(count):
        check(message, policy)
    times[name] = (time.perf_counter() - start) / count * 1e6
if "--bombs" in sys.argv:
    bomb = mail.attaching([("data.bz2", mail.bzip2_bomb())])
    open("/proc/self/clear_refs", "w").write("5")  # the peak from here on, not the making
    for _ in range(4):
        check(bomb, policy)
    status = open("/proc/self/status").read()
    times["peak KiB"] = int(status.split("VmHWM:")[1].split()[0])
print(json.dumps(times))
"""


def run(tree: Path, code_tree: Path, bombs: bool) -> dict[str, float]:
    """One child: `code_tree`'s services and secumail, this tree's test support."""
    env = {**os.environ, "PYTHONPATH": f"{code_tree}:{tree}"}
    args = [sys.executable, "-c", CHILD] + (["--bombs"] if bombs else [])
    out = subprocess.run(args, env=env, cwd=code_tree, check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--against", default="1c23510", help="the revision to compare with")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        old = Path(folder)
        archive = subprocess.run(["git", "archive", args.against, "services", "secumail"],
                                 cwd=ROOT, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
        results: dict[str, list[dict[str, float]]] = {"this tree": [], args.against: []}
        for _ in range(args.rounds):
            results["this tree"].append(run(ROOT, ROOT, False))
            results[args.against].append(run(ROOT, old, False))
        print(f"attachment check, microseconds a message ({args.rounds} rounds, "
              "best / median)")
        for kind in results["this tree"][0]:
            new = [r[kind] for r in results["this tree"]]
            before = [r[kind] for r in results[args.against]]
            ratios = [b / n for n, b in zip(new, before, strict=True)]
            print(f"  {kind}: this tree {min(new):.0f} / {statistics.median(new):.0f}, "
                  f"{args.against} {min(before):.0f} / {statistics.median(before):.0f}; "
                  f"speed {statistics.median(ratios):.2f}x of {args.against} "
                  f"(paired median)")
        for name, tree in (("this tree", ROOT), (args.against, old)):
            peak = run(ROOT, tree, True)["peak KiB"]
            print(f"  four archive bombs one after the other, {name}: peak {peak / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
