"""Storage access: the database executor (sync peewee on worker threads) and the
group-commit batcher. The models and queries live in the top-level models package."""
