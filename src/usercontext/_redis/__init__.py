"""
The Redis backend behind `usercontext.redis`: the quota and the event bus that
several processes and hosts share. It imports redis-py at the top; only
`usercontext.redis` imports it.
"""
