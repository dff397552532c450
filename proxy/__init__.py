"""atlasburn-proxy: a local forwarding proxy for LLM API traffic.

Applications keep their SDKs and point their base URL at the daemon; it relays every request to the
configured provider, meters the tokens on the way, and refuses requests its guardrails stop.
"""

__version__ = "0.1.0"
