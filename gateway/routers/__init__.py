"""The gateway's routes, one module per area; each takes what it needs from the context
(gateway/context.py). Tokens are checked where app.py includes them."""
