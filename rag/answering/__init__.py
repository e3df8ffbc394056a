"""Answering a question: the job record and its lifecycle, the queue contract, retrieval,
rewriting, the prompt, the semantic cache, single flight, event streams, summaries.
"""
