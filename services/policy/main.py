"""`secumail-policy`: the greylisting, SPF and DNSBL policy service (port 10023)."""

from secumail.runtime import run_service
from secumail.settings import load_settings
from services.policy.server import PolicyService


def main() -> None:
    settings = load_settings()
    run_service("policy", settings, lambda: PolicyService(settings))


if __name__ == "__main__":
    main()
