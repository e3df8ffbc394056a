"""Protection: identity (JWTs), rate limits, the provider's circuit breaker, model
concurrency.
"""
