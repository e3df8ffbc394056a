"""Development and test tooling, kept out of the product's packages: the fake
OpenAI-compatible server (``fake_openai``), the embedded PostgreSQL and Redis of the
zero-configuration default (``embedded``), and the process runner behind ``make dev``
and the real-process tests (``processes``). The entry points (``python -m api``,
``python -m workers``) use ``embedded`` when ``DATABASE_URL`` or ``REDIS_URL`` is unset."""
