"""Tuning aid for the detection benchmark (issue 29): rescores the messages of a
`detection_bench.py --scores FILE` run under other rule scores and thresholds, without
running spamd again.

    .venv/bin/python bench/detection_tune.py SCORES.jsonl [--cf FILE...]
        [--tag 5] [--reject 10 8 7 ...]

SCORES.jsonl comes from a run on the tuning folders (spam-1, easy-ham-1, split in halves),
made with a --reject above any score so that every message says its score and rules. Each
--cf file's `score RULE N...` lines replace SpamAssassin's scores for those rules (the score
set of Bayes on, network tests off, which the bench and the stack use), as the spamassassin
image would read them; for each reject threshold it prints the bench's line per folder
(stopped, tagged, clean), and each ham folder's highest scores, the margin left.
The rescoring is exact for score changes to rules that fired, as SpamAssassin adds scores
(a rule newly given a score where it had 0 did not fire: it was not evaluated).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

STOCK_RULES = Path("/usr/share/spamassassin")
SCORE_SET = 2  # Bayes on, network tests off: SpamAssassin's score set 2 (of 0-3)


def read_scores(files: list[Path]) -> dict[str, float]:
    """Rule scores from `score NAME S0 [S1 S2 S3]` lines: set 2's, or the one score given."""
    scores: dict[str, float] = {}
    for path in files:
        for line in path.read_text(errors="replace").splitlines():
            words = line.split("#", 1)[0].split()
            if len(words) < 3 or words[0] != "score":
                continue
            try:
                values = [float(w) for w in words[2:6]]
            except ValueError:
                continue
            scores[words[1]] = values[SCORE_SET] if len(values) == 4 else values[0]
    return scores


def rescore(message: dict[str, Any], stock: dict[str, float], ours: dict[str, float]) -> float:
    score = float(message["score"])
    for rule in message["tests"]:
        if rule in ours:
            score += ours[rule] - stock.get(rule, 0.0)
    return score


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scores", type=Path, nargs="+", help="detection_bench.py --scores files")
    parser.add_argument("--cf", type=Path, nargs="*", default=[],
                        help="SpamAssassin config files whose scores replace the stock ones")
    parser.add_argument("--tag", type=float, default=5.0)
    parser.add_argument("--reject", type=float, nargs="+", default=[10.0])
    args = parser.parse_args()
    stock = read_scores(sorted(STOCK_RULES.glob("*.cf")))
    ours = read_scores(args.cf)
    by_folder: dict[tuple[str, str], list[float]] = defaultdict(list)
    for path in args.scores:
        for line in path.read_text().splitlines():
            message = json.loads(line)
            if message["score"] is None:
                raise SystemExit(f"{message['file']}: no score (refused? run with --reject 1000)")
            by_folder[(message["folder"], message["kind"])].append(
                rescore(message, stock, ours))
    for reject in args.reject:
        print(f"tag {args.tag:g}, reject {reject:g}")
        for (folder, kind), scores in sorted(by_folder.items()):
            n = len(scores)
            stopped = sum(s >= reject for s in scores)
            tagged = sum(args.tag <= s < reject for s in scores)
            line = (f"  {folder} kind={kind} n={n} stopped={100 * stopped / n:.1f}% "
                    f"tagged={100 * tagged / n:.1f}% clean={100 * (n - stopped - tagged) / n:.1f}%")
            if kind == "ham":
                line += f" highest={', '.join(f'{s:.1f}' for s in sorted(scores)[-3:])}"
            print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
