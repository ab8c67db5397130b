"""HTTP adapters over the engine: native JSON (/v1), health; errors mapped in `errors.py`."""
