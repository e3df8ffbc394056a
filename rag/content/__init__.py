"""Course content: reading sources, chunking, embedding and indexing them, the course
catalog.
"""
