"""The DKIM milter (port 10028): signs outbound mail, verifies inbound mail, DMARC."""
