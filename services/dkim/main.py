"""`secumail-dkim`: the DKIM milter (port 10028), and its key tool.

    secumail-dkim                                   run the milter
    secumail-dkim keygen DOMAIN [--selector S] [--type rsa|ed25519] [--bits 2048] [--activate]
    secumail-dkim activate DOMAIN SELECTOR          sign with SELECTOR from now on
    secumail-dkim keys                              list keys, active ones and their records
    secumail-dkim record DOMAIN SELECTOR            print a key's TXT record again

The keys live in SECUMAIL_DKIM_KEYS_DIR (--keys-dir overrides it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from secumail import dkim_keys
from secumail.runtime import run_service
from secumail.settings import load_settings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="secumail-dkim", description=__doc__.split("\n")[0])
    parser.add_argument("--keys-dir", help="default: SECUMAIL_DKIM_KEYS_DIR")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("serve", help="run the milter (the default)")
    keygen = commands.add_parser("keygen", help="write a new key and print its DNS record")
    keygen.add_argument("domain")
    keygen.add_argument("--selector", help="default: s<YYYYMMDD> (+ 'e' for ed25519)")
    keygen.add_argument("--type", choices=["rsa", "ed25519"], default="rsa")
    keygen.add_argument("--bits", type=int, default=2048, help="RSA key size (default 2048)")
    keygen.add_argument("--activate", action="store_true",
                        help="sign with it at once, even if a key of its type is active")
    activate = commands.add_parser("activate", help="sign with SELECTOR from now on")
    activate.add_argument("domain")
    activate.add_argument("selector")
    commands.add_parser("keys", help="list the keys, which sign, and their DNS records")
    record = commands.add_parser("record", help="print the DNS record of a key")
    record.add_argument("domain")
    record.add_argument("selector")
    return parser


def _print_record(name: str, value: str, zone_line: str) -> None:
    print(f"Publish this TXT record:\n\n  name:  {name}\n  type:  TXT\n  value: {value}\n")
    print(f"As a zone file line:\n\n{zone_line}\n")


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command in (None, "serve"):
        from services.dkim.server import DkimService  # the milter's imports only when serving

        settings = load_settings()
        run_service("dkim", settings, lambda: DkimService(settings))
        return
    keys_dir = Path(args.keys_dir or load_settings().dkim_keys_dir)
    try:
        if args.command == "keygen":
            result = dkim_keys.keygen(keys_dir, args.domain, args.selector, args.type, args.bits,
                                 True if args.activate else None)
            print(f"Wrote {result.key_path}")
            _print_record(result.record_name, result.record_value, result.zone_line)
            if result.activated:
                print("This key signs from now on (the milter sees it within a second).")
            else:
                print("Not signing yet. Once the record is published (check with: dig TXT "
                      f"{result.record_name}), run:\n\n  secumail-dkim activate "
                      f"{result.domain} {result.selector}\n\nKeep the old selector's record "
                      "published for a few days.")
        elif args.command == "activate":
            selectors = dkim_keys.activate(keys_dir, args.domain, args.selector)
            print(f"{args.domain} now signs with: {', '.join(selectors)}")
        elif args.command == "keys":
            for item in dkim_keys.list_keys(keys_dir):
                state = "active" if item.active else "inactive"
                print(f"{item.domain}\t{item.selector}\t{item.key_type}\t{state}\t"
                      f"{item.error or item.record_value}")
        elif args.command == "record":
            domain = dkim_keys.check_domain(args.domain)
            selector = dkim_keys.check_selector(args.selector)
            key = dkim_keys.load_private_key(
                keys_dir / domain / f"{selector}{dkim_keys.KEY_SUFFIX}")
            _print_record(dkim_keys.record_name(domain, selector),
                          dkim_keys.txt_record_value(key),
                          dkim_keys.zone_file_line(domain, selector, key))
    except (ValueError, OSError, dkim_keys.KeyUnusable) as error:
        print(f"secumail-dkim: {error}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
