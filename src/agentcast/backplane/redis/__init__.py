"""The Redis backplane (see ``agentcast.backplane``); this ``__init__`` imports nothing, so the
asyncio publisher never loads the trio broker."""
