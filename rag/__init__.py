"""Course Assistant's domain core: importable without Litestar or arq."""
