"""The gateway: one place to watch and manage the running chain (FastAPI, port 8080)."""
