"""Every wire protocol SecuMail speaks, one module each, both sides: its codec (sans I/O
where the protocol allows), its client, and the probe a healthcheck sends.

    smtp     the filters' relay to their next hop, quarantine release, the chain canary
    policy   Postfix's policy delegation (the policy service on 10023)
    milter   the milter protocol (the DKIM milter on 10028)
    clamd    clamd's INSTREAM over IDSESSION (the ClamAV filter)
    spamc    SPAMC to SpamAssassin's spamd (the SpamAssassin filter)
"""
