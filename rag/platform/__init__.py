"""Platform plumbing: settings, the database gateway, Redis, the resources a process holds,
event loops, the tokenizer, the error hierarchy.
"""
